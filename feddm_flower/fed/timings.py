"""Where a node's time for one message goes: phases timed from the process's own start.

Every reply carries them as ``time-<phase>`` metrics (seconds), so the server can say how
much of a round was training (:data:`OVERHEAD_KEY`). Plain code: no Flower, no torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

PREFIX = "time-"
# The phases a reply may report, in order: process start to the app's handler ("startup"),
# handing the message to the node's worker ("handoff"), data ready, model ready (weights
# loaded, on its device), training or evaluation, encoding the reply; "total" spans them all.
PHASES = ("startup", "handoff", "data", "model", "train", "eval", "encode", "total")
OVERHEAD_KEY = "overhead-share"
# Replies claiming more than this many seconds for a phase are not believed.
MAX_PHASE_SECONDS = 7 * 24 * 3600.0


def process_start() -> float:
    """The ``time.time()`` at which this process started (Linux: from /proc, 10 ms ticks);
    elsewhere, now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


@dataclass
class Stopwatch:
    """Seconds per phase since ``start`` (a ``time.time()``): :meth:`mark` ends a phase. It
    travels with a message to the node's worker, so both processes add to one record."""

    start: float = field(default_factory=time.time)
    phases: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.last = self.start

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + max(now - self.last, 0.0)
        self.last = now

    def metrics(self) -> dict[str, float]:
        """``time-<phase>`` for every phase marked, and ``time-total`` up to now."""
        out = {PREFIX + k: round(v, 4) for k, v in self.phases.items()}
        out[PREFIX + "total"] = round(max(time.time() - self.start, 0.0), 4)
        return out


def phase_times(metrics: dict[str, object]) -> dict[str, float]:
    """The valid ``time-<phase>`` values of a reply's metrics (a hostile or older client's
    missing, negative, non-finite or absurd ones are left out, never an error)."""
    out = {}
    for phase in PHASES:
        value = metrics.get(PREFIX + phase)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if 0.0 <= value <= MAX_PHASE_SECONDS:  # NaN fails both comparisons
            out[phase] = float(value)
    return out


def overhead_share(train_seconds: float, round_seconds: float) -> float | None:
    """1 - training / wall: the share of a round not spent training (None without a round)."""
    if round_seconds <= 0:
        return None
    return round(1.0 - min(train_seconds, round_seconds) / round_seconds, 4)


class PhaseMeans:
    """Mean seconds per phase over a round's replies (each phase over the replies that
    reported it)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, times: dict[str, float]) -> None:
        for phase, seconds in times.items():
            self.sums[phase] = self.sums.get(phase, 0.0) + seconds
            self.counts[phase] = self.counts.get(phase, 0) + 1

    def summary(self, prefix: str) -> dict[str, float]:
        """``<prefix><phase>``: the mean, for every phase in :data:`PHASES` order."""
        return {
            f"{prefix}{phase}": round(self.sums[phase] / self.counts[phase], 3)
            for phase in PHASES
            if phase in self.counts
        }
