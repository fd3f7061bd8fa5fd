"""The server's step in a round: the accepted updates combined (streamed mean, DP release or
Flower's robust rule), Flower's optimizer stepped on the result, and the last check."""

from __future__ import annotations

from logging import WARNING

from flwr.common import log
from flwr.serverapp.strategy import FedAvg, Krum, Strategy

from feddm_flower.app import privacy as dp
from feddm_flower.app.compat import STEP_STATE, set_krum_byzantine
from feddm_flower.app.guard import as_reply
from feddm_flower.fed.aggregation import Intake, LossCheck, State, refusal


def with_update(model: State, update: State) -> State:
    """``model`` plus ``update`` (float tensors); other tensors stay the model's."""
    return {k: (g + update[k] if g.is_floating_point() else g) for k, g in model.items()}


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
    intake.held.clear()
    arrays, _ = aggregator.aggregate_train(server_round, replies)
    return arrays.to_torch_state_dict()


def optimizer_step(
    optimizer: FedAvg,
    server_round: int,
    candidate: State,
    model: State,
    loss_check: LossCheck | None,
    history: dict[str, object],
) -> State | None:
    """Flower's optimizer's new global weights from ``candidate`` if they pass the last
    check; else None, with the optimizer's state put back as it was before the step."""
    before = {a: getattr(optimizer, a) for a in STEP_STATE if hasattr(optimizer, a)}
    arrays, _ = optimizer.aggregate_train(server_round, [as_reply(candidate, 1.0)])
    new = {name: value.to(model[name].dtype)
           for name, value in arrays.to_torch_state_dict().items()}  # fmt: skip
    reason = refusal(new, model, loss_check)
    if reason is None:
        return new
    log(WARNING, "Round %d: new global model refused: %s; keeping the current one",
        server_round, reason)  # fmt: skip
    history["aggregate-rejected"] = reason
    for attr, value in before.items():
        setattr(optimizer, attr, value)
    return None
