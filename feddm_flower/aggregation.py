"""Server-side math on client contributions: checks, bounded influence, streaming weighted sum.

Plain torch, no Flower: the strategy feeds it one decoded update at a time. Written here
because no maintained library does bounded-influence streaming aggregation over state dicts.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

State = dict[str, torch.Tensor]

# Largest num-examples a reply may claim: every integer up to it is exact in float64, and a
# sum of a million of them stays finite.
MAX_EXAMPLES = 2**53


class InvalidReply(ValueError):
    """A client reply that must not reach the global model; the message says why."""


def check_like(tensors: State, reference: State, dtypes: dict[str, torch.dtype]) -> None:
    """Raise :class:`InvalidReply` unless ``tensors`` has exactly ``reference``'s names and
    shapes, the given ``dtypes`` and only finite values."""
    missing = sorted(reference.keys() - tensors.keys())
    extra = sorted(tensors.keys() - reference.keys())
    if missing or extra:
        raise InvalidReply(f"tensor names differ: missing {missing[:3]}, extra {extra[:3]}")
    for name, ref in reference.items():
        t = tensors[name]
        if t.shape != ref.shape:
            raise InvalidReply(f"{name}: shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if t.dtype != dtypes[name]:
            raise InvalidReply(f"{name}: dtype {t.dtype}, expected {dtypes[name]}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidReply(f"{name}: non-finite values")


def check_examples(value: object, key: str = "num-examples") -> float:
    """``value`` as a float if it is a finite number in (0, MAX_EXAMPLES], else InvalidReply."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidReply(f"{key}={value!r} is not a number")
    if not 0 < value <= MAX_EXAMPLES:  # NaN fails too
        raise InvalidReply(f"{key}={value!r} is not in (0, 2**53]")
    return float(value)


def update_norm(update: State) -> float:
    """L2 norm over all float tensors, in float64 (fp32 squares of finite values may overflow)."""
    total = sum(
        float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
        for t in update.values()
        if t.is_floating_point()
    )
    return math.sqrt(total)


# fp32 rounds each scaled value by at most 2**-24 of itself; scaling to this much below the
# clip keeps the rounded result's norm at or under it (so a bound that holds, holds exactly).
_CLIP_MARGIN = 1 - 2**-22


def clip_update(update: State, max_norm: float) -> float:
    """Scale the float tensors of ``update`` in place to L2 norm <= ``max_norm``; return the
    norm it had.

    Flower's ``fixedclipping_mod`` (FlatClip, arXiv:1710.06963), on a state dict: one scale
    ``min(1, max_norm / norm)`` for all float tensors together. Ours because that mod needs
    exactly one ArrayRecord in the reply, and a codec reply carries a payload instead, which
    must be quantized from the clipped update. Non-float tensors are never aggregated and stay.
    """
    norm = update_norm(update)
    if norm > max_norm:
        scale = max_norm / norm * _CLIP_MARGIN
        for t in update.values():
            if t.is_floating_point():
                t.mul_(scale)
    return norm


@dataclass
class Contribution:
    """One accepted reply: its weight, fp32 update, update norm and metrics."""

    weight: float
    update: State
    norm: float
    metrics: dict[str, float]


@dataclass(frozen=True)
class InfluenceBound:
    """Bounded influence of one reply, relative to the round's reference replies.

    The reference is the median weight and the median update norm of the first
    ``reference_size`` accepted replies of the round (0: all of them, for aggregations that
    hold every reply anyway). A contribution's weight is capped at ``weight_bound`` x the median
    weight and its update is scaled down to at most ``norm_bound`` x the median norm; 0 turns
    a bound off. As long as most reference replies are honest, a weighted mean of bounded
    updates is itself no longer than ``norm_bound`` x a typical honest update, whatever the
    other replies claim.
    """

    norm_bound: float = 1.0
    weight_bound: float = 2.0
    reference_size: int = 3

    def limits(self, reference: list[Contribution]) -> tuple[float, float]:
        """(largest weight, largest update norm) for this round; ``inf`` where a bound is off."""
        weight = statistics.median(c.weight for c in reference)
        norm = statistics.median(c.norm for c in reference)
        return (
            self.weight_bound * weight if self.weight_bound else math.inf,
            self.norm_bound * norm if self.norm_bound else math.inf,
        )

    @staticmethod
    def apply(c: Contribution, max_weight: float, max_norm: float) -> Contribution:
        """``c`` with its weight capped and its update scaled (in place) to the limits."""
        if c.norm > max_norm:
            scale = max_norm / c.norm
            for t in c.update.values():
                if t.is_floating_point():
                    t.mul_(scale)
            c.norm = max_norm
        c.weight = min(c.weight, max_weight)
        return c


class BoundedStream:
    """Contributions in, bounded contributions out: the first ``reference_size`` are held
    until they set the round's limits, every later one passes straight through."""

    def __init__(self, bound: InfluenceBound) -> None:
        self.bound = bound
        self.pending: list[Contribution] = []
        self.limits: tuple[float, float] | None = None

    def push(self, c: Contribution) -> list[Contribution]:
        """The contributions ready to aggregate now (bounded), possibly none yet."""
        if self.limits is not None:
            return [self.bound.apply(c, *self.limits)]
        self.pending.append(c)
        return self.flush() if len(self.pending) == self.bound.reference_size else []

    def flush(self) -> list[Contribution]:
        """The held contributions, bounded by the limits they set (at the end of a round)."""
        if self.pending and self.limits is None:
            self.limits = self.bound.limits(self.pending)
        ready = [self.bound.apply(c, *self.limits) for c in self.pending]
        self.pending = []
        return ready


class RunningMean:
    """Weighted mean of float updates, folded in one at a time (fp32 sums, float64 weights).

    Memory is one fp32 copy of the float tensors, however many updates are added. Weights
    are divided by the first weight seen before summing, so that large claimed counts cannot
    overflow the total.
    """

    def __init__(self, like: State) -> None:
        self.sums = {k: torch.zeros(v.shape) for k, v in like.items() if v.is_floating_point()}
        self.total = 0.0
        self.count = 0
        self._unit = 0.0

    def add(self, update: State, weight: float) -> None:
        self._unit = self._unit or weight
        w = weight / self._unit
        for name, acc in self.sums.items():
            acc.add_(update[name], alpha=w)
        self.total += w
        self.count += 1

    def mean(self) -> State:
        return {k: v / self.total for k, v in self.sums.items()}


class Spread:
    """Count, mean, standard deviation, min and max of numbers added one at a time (Welford's
    update: constant memory however many clients reply)."""

    def __init__(self) -> None:
        self.count, self.mean, self._m2 = 0, 0.0, 0.0
        self.low, self.high = math.inf, -math.inf

    def add(self, value: float) -> None:
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (value - self.mean)
        self.low, self.high = min(self.low, value), max(self.high, value)

    def summary(self, name: str) -> dict[str, float]:
        """``{name}-mean``, ``-std`` (population), ``-min``, ``-max``; empty if nothing added."""
        if not self.count:
            return {}
        std = math.sqrt(self._m2 / self.count)
        return {f"{name}-mean": self.mean, f"{name}-std": std,
                f"{name}-min": self.low, f"{name}-max": self.high}  # fmt: skip
