"""The communication ledger adds bytes per round, node and direction."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from feddm_flower.fed.accounting import CommLedger

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


def test_compression_is_baseline_over_actual() -> None:
    ledger = CommLedger()
    ledger.add(1, "up", 0, 100, fp32_bytes=400)
    ledger.add(1, "up", 1, 100, fp32_bytes=400)
    ledger.add(1, "down", 0, 50)
    ledger.add(2, "up", 0, 200, fp32_bytes=400)
    assert ledger.round_summary(1)["compression-up"] == 4.0
    assert ledger.round_summary(1)["compression-down"] == 1.0
    assert ledger.round_summary(2)["compression-up"] == 3.0  # cumulative: 1200 / 400
    assert ledger.round_summary(2)["compression-down"] == 1.0


def test_unknown_direction_is_refused() -> None:
    with pytest.raises(ValueError, match="'sideways'"):
        CommLedger().add(1, "sideways", 0, 1)
