"""Per-phase timings: what a reply reports, what the server believes, the overhead share."""

from __future__ import annotations

import math
import time

from hypothesis import given
from hypothesis import strategies as st

from feddm_flower.fed.timings import (
    MAX_PHASE_SECONDS,
    PHASES,
    PREFIX,
    PhaseMeans,
    Stopwatch,
    overhead_share,
    phase_times,
    process_start,
)

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.lists(st.floats(), max_size=2),
)


@given(st.dictionaries(st.sampled_from([PREFIX + p for p in PHASES] + ["x"]), numbers))
def test_a_reply_cannot_report_an_unbelievable_time(metrics: dict[str, object]) -> None:
    times = phase_times(metrics)
    assert set(times) <= set(PHASES)
    for phase, seconds in times.items():
        assert 0.0 <= seconds <= MAX_PHASE_SECONDS and math.isfinite(seconds)
        assert seconds == metrics[PREFIX + phase] and not isinstance(metrics[PREFIX + phase], bool)


def test_the_stopwatch_adds_up() -> None:
    clock = Stopwatch(time.time() - 1.0)  # a process that started a second ago
    clock.mark("startup")
    time.sleep(0.02)
    clock.mark("train")
    clock.mark("train")  # a phase marked twice adds up
    m = clock.metrics()
    assert m["time-startup"] >= 1.0 and m["time-train"] >= 0.02
    assert m["time-total"] >= m["time-startup"] + m["time-train"] - 1e-3


def test_this_process_started_before_now_and_after_boot() -> None:
    assert time.time() - 3600 * 24 * 365 < process_start() <= time.time()


def test_phase_means_and_overhead_share() -> None:
    means = PhaseMeans()
    means.add({"train": 10.0, "startup": 1.0})
    means.add({"train": 20.0})
    assert means.summary("t-") == {"t-startup": 1.0, "t-train": 15.0}
    assert overhead_share(15.0, 20.0) == 0.25
    assert overhead_share(30.0, 20.0) == 0.0  # clients' clocks can't make it negative
    assert overhead_share(1.0, 0.0) is None
