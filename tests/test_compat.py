"""Each assumption of feddm_flower/app/compat.py against the installed Flower: a failure here
names the assumption a Flower upgrade broke."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    Krum,
)

from feddm_flower.app import compat


class NoNodes:
    def get_node_ids(self) -> list[int]:
        return [11, 12]


def _reply(value: float) -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord({"w": torch.tensor([value])}),
         "metrics": MetricRecord({"num-examples": 1})}
    )  # fmt: skip
    meta = Metadata(run_id=1, message_id="", src_node_id=5, dst_node_id=0,
                    reply_to_message_id="x", group_id="", created_at=time.time(), ttl=60.0,
                    message_type="train")  # fmt: skip
    return Message(metadata=meta, content=content)


def test_the_superlink_stands_in_for_unavailable_nodes_as_superlink_node_id() -> None:
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    compat.act_as_server_app()
    ins = Message(RecordDict(), dst_node_id=7, message_type="train").metadata
    reply = create_message_error_unavailable_res_message(ins, "node_unavail")
    assert reply.metadata.src_node_id == compat.SUPERLINK_NODE_ID, "SUPERLINK_NODE_ID"
    assert reply.error.code == compat.ErrorCode.NODE_UNAVAILABLE, "ErrorCode.NODE_UNAVAILABLE"


def test_flowers_dp_wrapper_sends_the_clip_norm_under_key_clipping_norm() -> None:
    release = FedAvg(fraction_train=0.0)
    dp = DifferentialPrivacyClientSideFixedClipping(release, 1.0, 0.7, num_sampled_clients=1)
    config = ConfigRecord()
    dp.configure_train(1, ArrayRecord(), config, NoNodes())
    assert config.get(compat.KEY_CLIPPING_NORM) == 0.7, "KEY_CLIPPING_NORM"


def test_parse_config_args_reads_run_config_text_as_flwr_run_does() -> None:
    parsed = compat.parse_config_args(["a=1 b='x' c=true d=0.5"])
    assert parsed == {"a": 1, "b": "x", "c": True, "d": 0.5}, "parse_config_args"


@pytest.mark.parametrize("kind", [FedAdam, FedAvgM])
def test_remember_model_gives_an_optimizer_that_samples_no_nodes_its_model(kind) -> None:
    optimizer = kind(fraction_train=0.0)
    arrays = ArrayRecord({"w": torch.tensor([1.0, 2.0])})
    compat.remember_model(optimizer, 1, arrays, ConfigRecord(), NoNodes())
    current = optimizer.current_arrays
    current = current.to_numpy_ndarrays() if isinstance(current, ArrayRecord) else current
    w = current["w"] if isinstance(current, dict) else current[0]
    assert np.array_equal(w, [1.0, 2.0]), "remember_model: configure_train keeps current_arrays"


def test_optimizer_state_is_assigned_anew_at_each_step() -> None:
    """OPTIMIZER_STATE / STEP_STATE: the attributes exist after a step and the next step
    replaces them rather than changing them in place (a kept reference is a snapshot)."""
    optimizer = FedAdam(fraction_train=0.0, eta=0.1)
    arrays = ArrayRecord({"w": torch.tensor([0.0])})
    compat.remember_model(optimizer, 1, arrays, ConfigRecord(), NoNodes())
    optimizer.aggregate_train(1, [_reply(1.0)])
    kept = {a: getattr(optimizer, a) for a in compat.STEP_STATE if hasattr(optimizer, a)}
    assert {"m_t", "v_t", "current_arrays"} <= set(kept), "OPTIMIZER_STATE attribute names"
    before = {a: {k: np.array(v) for k, v in kept[a].items()} for a in ("m_t", "v_t")}
    optimizer.aggregate_train(2, [_reply(3.0)])
    for attr in ("m_t", "v_t"):
        assert getattr(optimizer, attr) is not kept[attr], f"{attr} assigned anew"
        for k, v in kept[attr].items():
            assert np.array_equal(v, before[attr][k]), f"{attr} not changed in place"
    momentum = FedAvgM(fraction_train=0.0, server_momentum=0.9)
    compat.remember_model(momentum, 1, arrays, ConfigRecord(), NoNodes())
    momentum.aggregate_train(1, [_reply(1.0)])
    assert hasattr(momentum, "momentum_vector"), "OPTIMIZER_STATE: FedAvgM.momentum_vector"


def test_krum_reads_the_number_of_hostile_replies_when_it_aggregates() -> None:
    """Points 0, 1, 2, 10, 11: Krum keeps 2 with f = 0 (3 neighbours) and 1 with f = 1."""
    picks = []
    for hostile in (0, 1):
        krum = Krum()
        compat.set_krum_byzantine(krum, hostile)
        arrays, _ = krum.aggregate_train(1, [_reply(v) for v in (0.0, 1.0, 2.0, 10.0, 11.0)])
        picks.append(float(arrays["w"].numpy()[0]))
    assert picks == [2.0, 1.0], "set_krum_byzantine: Krum.num_malicious_nodes"


def test_message_ids_and_the_server_identity() -> None:
    compat.act_as_server_app()
    msg = Message(RecordDict(), dst_node_id=9, message_type="train")
    assert msg.metadata.src_node_id == compat.SUPERLINK_NODE_ID, "act_as_server_app"
    assert msg.metadata.run_id == 1, "act_as_server_app: TaskIdentity.run_id"
    compat.assign_message_id(msg, "m-1")
    assert msg.metadata.message_id == "m-1", "assign_message_id: Metadata._message_id"
    assert compat.empty_run(3).run_id == 3, "empty_run: Run.create_empty"
