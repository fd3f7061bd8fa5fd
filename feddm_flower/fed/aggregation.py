"""Server-side math on client contributions: checks, bounded influence, streaming weighted sum.

Plain torch, no Flower: the strategy feeds it one decoded update at a time. Written here
because no maintained library does bounded-influence streaming aggregation over state dicts.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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


def with_update(model: State, update: State) -> State:
    """``model`` plus ``update`` (float tensors); other tensors stay the model's."""
    return {k: (g + update[k] if g.is_floating_point() else g) for k, g in model.items()}


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
    """One accepted reply: its weight, fp32 update, update norm, metrics and node."""

    weight: float
    update: State
    norm: float
    metrics: dict[str, float]
    spilled: Path | None = None  # where a held update waits on disk (its ``update`` empty)
    node: int = 0


@dataclass(frozen=True)
class Reference:
    """The median weight and the median update norm over every accepted reply of a round.

    A median of a set does not depend on the order its members arrived in, and while honest
    replies are a majority of the set it lies between two honest values, whatever the others
    claim (docs/theory.md, "Bounded influence").
    """

    weight: float
    norm: float

    @classmethod
    def of(cls, weights: list[float], norms: list[float]) -> Reference | None:
        if not weights:
            return None
        return cls(statistics.median(weights), statistics.median(norms))


@dataclass(frozen=True)
class InfluenceBound:
    """Bounded influence of one reply, relative to a :class:`Reference`.

    A contribution's weight is capped at ``weight_bound`` x the reference's weight and its
    update is scaled down to at most ``norm_bound`` x the reference's norm; 0 turns a bound
    off. As long as most replies of the reference round are honest, a weighted mean of bounded
    updates is itself no longer than ``norm_bound`` x a typical honest update, whatever the
    other replies claim and in whatever order they arrive.
    """

    norm_bound: float = 1.0
    weight_bound: float = 2.0

    @property
    def off(self) -> bool:
        return not self.norm_bound and not self.weight_bound

    def limits(self, reference: Reference | None) -> tuple[float, float]:
        """(largest weight, largest update norm); ``inf`` where a bound is off."""
        if self.off or reference is None:
            return math.inf, math.inf
        return (
            self.weight_bound * reference.weight if self.weight_bound else math.inf,
            self.norm_bound * reference.norm if self.norm_bound else math.inf,
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
    """Contributions in, bounded contributions out; the limits never depend on arrival order.

    Given a reference (the previous round's medians over all of its accepted replies) every
    contribution is bounded and passed on as it arrives. Without one (a run's first round, or
    a rule that holds every reply anyway) the round's replies are held until it ends and then
    bounded by the medians of all of them; ``spill`` holds them on disk, one file each, so the
    server's memory stays one update however many reply. Hand-written: no maintained library
    bounds a streamed aggregation over state dicts.
    """

    def __init__(
        self, bound: InfluenceBound, reference: Reference | None, spill: Path | None = None
    ) -> None:
        self.bound, self.spill = bound, spill
        self.limits = None if reference is None and not bound.off else bound.limits(reference)
        self.pending: deque[Contribution] = deque()
        self.weights: list[float] = []
        self.norms: list[float] = []

    def push(self, c: Contribution) -> list[Contribution]:
        """The contributions ready to aggregate now (bounded): ``c``, or none while held."""
        self.weights.append(c.weight)
        self.norms.append(c.norm)
        if self.limits is not None:
            return [self.bound.apply(c, *self.limits)]
        if self.spill is not None:
            path = self.spill / f"{len(self.pending)}.pt"
            torch.save(c.update, path)
            c = Contribution(c.weight, {}, c.norm, c.metrics, path, c.node)
        self.pending.append(c)
        return []

    def flush(self) -> Iterator[Contribution]:
        """The held contributions, one at a time, bounded by the medians of the whole round."""
        if self.limits is None:
            self.limits = self.bound.limits(self.reference())
        while self.pending:
            c = self.pending.popleft()
            if c.spilled is not None:
                c.update = torch.load(c.spilled, weights_only=True)
                c.spilled.unlink()
                c.spilled = None
            yield self.bound.apply(c, *self.limits)

    def reference(self) -> Reference | None:
        """The medians over every contribution pushed so far (raw, before the bounds)."""
        return Reference.of(self.weights, self.norms)


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


class LossCheck:
    """The last check: every new global model's loss on the server's fixed data, and each
    reply's own model (the global weights plus its update) on a small probe of that data.

    A model whose loss is not finite, or above ``max_ratio`` x the current global model's on
    the same data, is refused (reasons as text). A refused global model makes the server look
    for the replies responsible (:mod:`~feddm_flower.fed.group_testing`), testing models built
    from groups of them. ``probe`` (optional) measures a reply's own model on a fixed
    twentieth of the data, with fixed timesteps and noise: it catches grossly hostile replies
    as they arrive, at 1/20 of an evaluation each, so that an honest round needs one full
    evaluation. ``current`` is the loss of the model the server holds; it follows every
    accepted global model, so the server's report can reuse it. ``evaluations`` and
    ``probes`` count what was measured. Ours: a rule over our own global-loss, in the spirit
    of Zeno (Xie et al. 2019) and FLTrust (Cao et al. 2021), which score replies on
    server-held data; no library implements it for Flower.
    """

    def __init__(
        self,
        loss: Callable[[State], float],
        max_ratio: float,
        probe: Callable[[State], float] | None = None,
    ) -> None:
        self.loss, self.max_ratio, self.probe = loss, max_ratio, probe
        self.current: float | None = None
        self.current_probe: float | None = None  # the probe's loss of the current model
        self.evaluations = self.probes = 0

    def measure(self, state: State) -> float:
        """The loss of ``state`` (counted)."""
        self.evaluations += 1
        return self.loss(state)

    def _why(self, name: str, loss: float, current: float) -> str | None:
        if not math.isfinite(loss):
            return f"{name} {loss} is not finite"
        if loss > self.max_ratio * current:
            return (f"{name} {loss:.4g} is more than {self.max_ratio:g}x the current model's "
                    f"{current:.4g} (max-loss-ratio)")  # fmt: skip
        return None

    def judge(self, candidate: State, current: State) -> tuple[float, str | None]:
        """The loss of ``candidate`` and why it is refused against ``current``, or None."""
        if self.current is None:
            self.current = self.measure(current)
        loss = self.measure(candidate)
        return loss, self._why("global-loss", loss, self.current)

    def screen(self, model: State, update: State) -> str | None:
        """Why one reply's own model, ``model`` + ``update``, fails the probe, or None (also
        without a probe)."""
        if self.probe is None:
            return None
        if self.current_probe is None:
            self.probes += 1
            self.current_probe = self.probe(model)
        self.probes += 1
        return self._why("probe-loss", self.probe(with_update(model, update)), self.current_probe)

    def refusal(self, candidate: State, current: State) -> str | None:
        """Why the new global model ``candidate`` must not replace ``current``, or None (then
        it is current)."""
        loss, reason = self.judge(candidate, current)
        if reason is None:
            self.current, self.current_probe = loss, None
        return reason


def refusal(new: State, current: State, loss_check: LossCheck | None) -> str | None:
    """Why the candidate global model ``new`` must not replace ``current``, if so: a missing
    or misshapen tensor, a non-finite value, or (with ``loss_check``) its global-loss."""
    for name, g in current.items():
        value = new.get(name)
        if value is None or value.shape != g.shape:
            return f"{name}: misshapen or missing"
        if g.is_floating_point() and not value.isfinite().all():
            return f"{name}: not finite"
    return loss_check.refusal(new, current) if loss_check is not None else None


class Intake:
    """One round's accepted updates: bounded as they arrive (:class:`BoundedStream`), then
    folded into a :class:`RunningMean` (``streamed``), or held for a rule that needs every
    reply at once. The streamed mean bounds by the previous round's ``reference`` or, without
    one, holds the round's updates on disk until :meth:`close`; a rule that holds every reply
    bounds them by the round's own medians.

    With ``keep`` the streamed mean also keeps each bounded update on disk, one file each, so
    that models of any group of the round's replies can be built (:meth:`mean_of`) and the
    round aggregated again without some (:meth:`drop`); :meth:`release` deletes them. Memory
    stays one update however many reply."""

    def __init__(
        self,
        bound: InfluenceBound,
        reference: Reference | None,
        like: State,
        streamed: bool,
        keep: bool = False,
    ) -> None:
        self.like = like
        self.mean = RunningMean(like) if streamed else None
        self._spill = tempfile.TemporaryDirectory(prefix="feddm-held-") if streamed else None
        spill = Path(self._spill.name) if self._spill else None
        self.keep = keep
        kept = keep and streamed
        self._kept = tempfile.TemporaryDirectory(prefix="feddm-round-") if kept else None
        self.stream = BoundedStream(bound, reference if streamed else None, spill)
        self.held: list[Contribution] = []
        self.kept: list[Path] = []  # streamed with ``keep``: each bounded update's file
        self.accepted: list[tuple[dict[str, float], float]] = []  # (metrics, weight)
        self.nodes: list[int] = []  # the node of each accepted update
        self.drift = Spread()  # ‖update‖ of the accepted replies, as decoded, before bounds

    def add(self, c: Contribution) -> None:
        self.drift.add(c.norm)
        self._fold(self.stream.push(c))

    def close(self) -> Reference | None:
        """Fold what is held; the round's medians (None without replies)."""
        self._fold(self.stream.flush())
        if self._spill is not None:
            self._spill.cleanup()
        return self.stream.reference()

    def mean_of(self, group: Iterable[int]) -> State:
        """The weighted mean of the accepted (bounded) updates numbered ``group``."""
        mean = RunningMean(self.like)
        for i in group:
            mean.add(self._update(i), self.accepted[i][1])
        return mean.mean()

    def drop(self, dropped: Iterable[int]) -> None:
        """Leave out the accepted updates numbered ``dropped``; the mean is folded again."""
        out = set(dropped)
        keep = [i for i in range(len(self.accepted)) if i not in out]
        self.accepted = [self.accepted[i] for i in keep]
        self.nodes = [self.nodes[i] for i in keep]
        if self.mean is None:
            self.held = [self.held[i] for i in keep]
            return
        for i in out:
            self.kept[i].unlink(missing_ok=True)
        self.kept = [self.kept[i] for i in keep]
        self.mean = RunningMean(self.like)
        for i, (_, weight) in enumerate(self.accepted):
            self.mean.add(self._update(i), weight)

    def release(self) -> None:
        """Delete the kept updates (the round is over)."""
        self.held, self.kept = [], []
        if self._kept is not None:
            self._kept.cleanup()

    def _update(self, i: int) -> State:
        if self.mean is None:
            return self.held[i].update
        return torch.load(self.kept[i], weights_only=True)

    def _fold(self, ready: Iterable[Contribution]) -> None:
        for c in ready:
            self.accepted.append((c.metrics, c.weight))
            self.nodes.append(c.node)
            if self.mean is None:
                self.held.append(c)
                continue
            self.mean.add(c.update, c.weight)
            if self._kept is not None:  # and the update leaves memory
                self.kept.append(Path(self._kept.name) / f"{len(self.kept)}.pt")
                torch.save(c.update, self.kept[-1])
