"""The communication ledger adds bytes per round, node and direction."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from feddm_flower.accounting import CommLedger

entries = st.lists(
    st.tuples(
        st.integers(1, 4), st.sampled_from(["down", "up"]), st.integers(0, 3), st.integers(0, 10**9)
    ),
    max_size=40,
)


@given(entries)
def test_totals_and_cumulative_match_a_direct_sum(rows: list[tuple[int, str, int, int]]) -> None:
    ledger = CommLedger()
    for rnd, direction, node, nbytes in rows:
        ledger.add(rnd, direction, node, nbytes)
    for rnd in range(1, 5):
        for d in ("down", "up"):
            assert ledger.total(rnd, d) == sum(b for r, dd, _, b in rows if r == rnd and dd == d)
            assert ledger.cumulative(rnd, d) == sum(
                b for r, dd, _, b in rows if r <= rnd and dd == d
            )
            summary = ledger.round_summary(rnd)
            assert sum(summary[f"bytes-{d}-per-node"].values()) == summary[f"bytes-{d}"]


def test_unknown_direction_is_refused() -> None:
    with pytest.raises(ValueError, match="'sideways'"):
        CommLedger().add(1, "sideways", 0, 1)
