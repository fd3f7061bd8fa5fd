"""The server's step in a round: the accepted updates combined (streamed mean, DP release or
Flower's robust rule), Flower's optimizer stepped on the result, and the last check; when
it refuses, the replies that fail on their own are found, and the round combined again."""

from __future__ import annotations

from collections.abc import Sequence
from logging import INFO, WARNING
from typing import Protocol

from flwr.common import log
from flwr.serverapp.strategy import FedAvg, Krum, Strategy

from feddm_flower.app import privacy as dp
from feddm_flower.app.compat import STEP_STATE, set_krum_byzantine
from feddm_flower.app.guard import as_reply
from feddm_flower.fed.aggregation import (
    InfluenceBound,
    Intake,
    LossCheck,
    State,
    refusal,
    with_update,
)
from feddm_flower.fed.group_testing import find_culprits


def combine(
    server_round: int,
    intake: Intake,
    model: State,
    aggregator: Strategy | None,
    privacy: dp.Privacy | None,
    history: dict[str, object],
) -> State | None:
    """The aggregate weights: ``model`` + the (DP-released) mean update, or the pick of
    Flower's rule among the held replies; None if the DP wrapper refused."""
    if privacy is not None:
        update = dp.release(privacy, server_round, intake.mean, history)
        dp.note_spent(privacy, history)
        return with_update(model, update) if update is not None else None
    if intake.mean is not None:
        return with_update(model, intake.mean.mean())
    if isinstance(aggregator, Krum):  # Krum needs n > 2f + 2
        set_krum_byzantine(aggregator, max(0, (len(intake.held) - 3) // 2))
    replies = [as_reply(with_update(model, c.update), c.weight) for c in intake.held]
    arrays, _ = aggregator.aggregate_train(server_round, replies)
    return arrays.to_torch_state_dict()


class Rejects(Protocol):
    def reject(self, server_round: int, phase: str, node: int, reason: str) -> None: ...


class StepParts(Protocol):
    """What the server's step needs of a strategy."""

    aggregator: Strategy | None
    privacy: dp.Privacy | None
    optimizer: FedAvg
    loss_check: LossCheck | None
    min_replies: int
    book: Rejects


def server_step(
    server_round: int, intake: Intake, model: State, parts: StepParts, history: dict[str, object]
) -> State | None:
    """The new global weights: the replies combined, then the optimizer's step and the last
    check; None (model unchanged) with fewer than ``min_replies`` accepted replies or if the
    DP wrapper or the last check refused. A refused round whose replies the intake kept is
    searched for the replies that fail on their own (:func:`find_culprits`); they are
    rejected and the round is combined and checked again without them."""
    check = parts.loss_check
    evaluations = check.evaluations if check is not None else 0
    new, reason = _step(server_round, intake, model, parts, history)
    if reason and check is not None and intake.keep and intake.accepted:
        # In node order: the groups tested do not depend on the order replies arrived in.
        order = sorted(range(len(intake.nodes)), key=intake.nodes.__getitem__)

        def refusal(group: Sequence[int]) -> str | None:
            update = intake.mean_of(order[i] for i in group)
            return check.judge(with_update(model, update), model)[1]

        found = find_culprits(len(order), refusal, reason)
        culprits = [order[i] for i in found]
        for i, why in zip(culprits, found.values(), strict=True):
            parts.book.reject(server_round, "train", intake.nodes[i], f"its model's {why}")
        if culprits:
            intake.drop(culprits)
            new, again = _step(server_round, intake, model, parts, history)
            if new is not None or again:  # else: no replies left, refused as before
                reason = again
    if check is not None:
        history["server-evaluations"] = check.evaluations - evaluations
    if reason:
        log(WARNING, "Round %d: new global model refused: %s; keeping the current one",
            server_round, reason)  # fmt: skip
        history["aggregate-rejected"] = reason
    return new


def _step(
    server_round: int, intake: Intake, model: State, parts: StepParts, history: dict[str, object]
) -> tuple[State | None, str | None]:
    """The new weights, or None and the last check's reason ('' for no check to make)."""
    if (accepted := len(intake.accepted)) < parts.min_replies:
        log(WARNING, "Round %d: %d valid training replies, fewer than min-replies=%d; global "
            "model unchanged", server_round, accepted, parts.min_replies)  # fmt: skip
        dp.note_spent(parts.privacy, history)
        return None, ""
    candidate = combine(server_round, intake, model, parts.aggregator, parts.privacy, history)
    if candidate is None:
        return None, ""
    return optimizer_step(parts.optimizer, server_round, candidate, model, parts.loss_check)


def optimizer_step(
    optimizer: FedAvg,
    server_round: int,
    candidate: State,
    model: State,
    loss_check: LossCheck | None,
) -> tuple[State | None, str | None]:
    """Flower's optimizer's new global weights from ``candidate`` if they pass the last
    check (and None); else None and why, with the optimizer's state put back as it was
    before the step."""
    before = {a: getattr(optimizer, a) for a in STEP_STATE if hasattr(optimizer, a)}
    arrays, _ = optimizer.aggregate_train(server_round, [as_reply(candidate, 1.0)])
    new = {name: value.to(model[name].dtype)
           for name, value in arrays.to_torch_state_dict().items()}  # fmt: skip
    reason = refusal(new, model, loss_check)
    if reason is None:
        return new, None
    for attr, value in before.items():
        setattr(optimizer, attr, value)
    return None, reason


class Combination(StepParts, Protocol):
    """What a strategy runs, as :func:`describe` logs it."""

    uplink: str
    downlink: str
    proximal_mu: float
    bound: InfluenceBound


def describe(parts: Combination) -> None:
    """Log the combination a strategy runs."""
    log(INFO, "\t├──> FedDM: uplink %s, downlink %s, proximal-mu %g, optimizer %s, "
        "aggregation %s", parts.uplink, parts.downlink, parts.proximal_mu,
        type(parts.optimizer).__name__,
        type(parts.aggregator).__name__ if parts.aggregator else "mean (streamed)")  # fmt: skip
    if (privacy := parts.privacy) is not None:
        log(INFO, "\t├──> DP: clip %g (clients, then server), noise multiplier %g (Flower's "
            "wrapper and RDP accountant)", privacy.clipping_norm,
            privacy.noise_multiplier)  # fmt: skip
    else:
        log(INFO, "\t├──> bounds: update norm %gx, num-examples %gx the previous round's "
            "median (0 = off)", parts.bound.norm_bound, parts.bound.weight_bound)  # fmt: skip
    ratio = parts.loss_check.max_ratio if parts.loss_check else 0.0
    log(INFO, "\t└──> last check: finite, global-loss <= %gx the current (0 = off)", ratio)
