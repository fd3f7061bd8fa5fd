"""What a resumed run needs of the strategy besides the weights, and putting it back."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from feddm_flower.app.compat import OPTIMIZER_STATE
from feddm_flower.fed.accounting import CommLedger
from feddm_flower.fed.aggregation import Reference

if TYPE_CHECKING:
    from feddm_flower.app.strategy import FedDMStrategy


def strategy_state(strategy: FedDMStrategy, completed_round: int) -> dict[str, object]:
    """JSON-ready: the round, traffic ledger, history, reference medians, privacy spent."""
    state = {
        "round": completed_round,
        "ledger": strategy.book.ledger.to_dict(),
        "history": {str(k): v for k, v in strategy.book.history.items()},
    }
    if strategy.reference is not None:
        state["reference"] = dataclasses.asdict(strategy.reference)
    if strategy.privacy is not None:
        state["privacy"] = strategy.privacy.accountant.state_dict()
    return state


def optimizer_arrays(strategy: FedDMStrategy) -> dict[str, np.ndarray]:
    """The server optimizer's moments/momentum as flat named arrays (may be empty)."""
    out = {}
    for attr in OPTIMIZER_STATE:
        value = getattr(strategy.optimizer, attr, None)
        items = value.items() if isinstance(value, dict) else enumerate(value or [])
        out.update({f"{attr}/{k}": np.asarray(v) for k, v in items})
    return out


def restore(
    strategy: FedDMStrategy, state: dict[str, object], arrays: dict[str, np.ndarray]
) -> None:
    """Continue after ``state["round"]`` (the inverse of :func:`strategy_state` and
    :func:`optimizer_arrays`)."""
    strategy.first_round = int(state["round"]) + 1
    strategy.book.ledger = CommLedger.from_dict(state["ledger"])
    strategy.book.history.update({int(k): v for k, v in state["history"].items()})
    if "reference" in state:
        strategy.reference = Reference(**state["reference"])
    if strategy.privacy is not None and "privacy" in state:
        strategy.privacy.accountant.load_state_dict(state["privacy"])
    for attr in OPTIMIZER_STATE:
        named = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(attr + "/")}
        if named and attr == "momentum_vector":
            setattr(strategy.optimizer, attr, [named[str(i)] for i in range(len(named))])
        elif named:
            setattr(strategy.optimizer, attr, named)
