"""What this app assumes of Flower beyond its public API, each assumption once.

Everything else uses ``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp`` and ``flwr.common``'s
``log``. Each name here has a test in ``tests/test_compat.py`` whose failure names the
assumption, so a Flower upgrade is this file and that test.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.config import parse_config_args
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Krum
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "ErrorCode",
    "KEY_CLIPPING_NORM",
    "OPTIMIZER_STATE",
    "Run",
    "STEP_STATE",
    "SUPERLINK_NODE_ID",
    "act_as_server_app",
    "assign_message_id",
    "empty_run",
    "parse_config_args",
    "remember_model",
    "set_krum_byzantine",
]

# SUPERLINK_NODE_ID: the sender of the errors the SuperLink writes in place of a node that
# did not answer (ErrorCode: their codes). KEY_CLIPPING_NORM: the config key in which
# Flower's client-side fixed-clipping DP wrapper sends the clip norm to the nodes.
# parse_config_args: how `flwr run --run-config` reads its text (checked before Flower starts).

# The attributes in which Flower's server optimizers keep their state between rounds (a
# resumed run restores them); they are assigned anew at each step, never changed in place, so
# keeping the old objects is a full snapshot. With current_arrays (the model an optimizer steps
# from), they are what a refused step puts back.
OPTIMIZER_STATE = ("m_t", "v_t", "momentum_vector")
STEP_STATE = (*OPTIMIZER_STATE, "current_arrays")


def remember_model(
    strategy: FedAvg, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
) -> None:
    """Let a Flower strategy that samples no nodes (``fraction_train`` 0) keep ``arrays`` as the
    model its next ``aggregate_train`` steps from: its ``configure_train`` does that."""
    strategy.configure_train(server_round, arrays, config, grid)


def set_krum_byzantine(krum: Krum, count: int) -> None:
    """How many of the next round's replies Krum assumes hostile (read at aggregation)."""
    krum.num_malicious_nodes = count


def assign_message_id(message: Message, message_id: str) -> None:
    """Give a message the id a grid gives it when pushing (Flower's grids write it so)."""
    message.metadata.__dict__["_message_id"] = message_id


def act_as_server_app() -> None:
    """Let this process build messages as a ServerApp process does (in-process grids)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1


def empty_run(run_id: int = 1) -> Run:
    """The run an in-process grid reports as its own (Grid.run's type: Run)."""
    return Run.create_empty(run_id=run_id)
