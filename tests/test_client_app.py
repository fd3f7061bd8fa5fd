"""The ClientApp's uplink: error feedback carries the quantization residual exactly."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from torch.optim.optimizer import register_optimizer_step_pre_hook

from feddm_flower.app import node_settings, node_tasks
from feddm_flower.app.client_app import train
from feddm_flower.app.compat import KEY_CLIPPING_NORM
from feddm_flower.app.node_tasks import MODEL_KEY, RESIDUAL_KEY, node_store, run_task
from feddm_flower.app.overrides import parse
from feddm_flower.app.records import (
    OUT_OF_SYNC,
    REFUSED,
    encode_uplink,
    from_record,
    payload_from,
    to_record,
)
from feddm_flower.fed import changes
from feddm_flower.fed.aggregation import update_norm
from feddm_flower.fed.changes import ChangeCodec, decode_change
from feddm_flower.fed.codecs import decode_update
from feddm_flower.fed.downlink import digest
from feddm_flower.fed.timings import Stopwatch
from feddm_flower.protocol import NUM_PARTITIONS, PARTITION_ID, STATE_DIR
from feddm_flower.task.models import build_unet


def test_encoded_update_is_what_the_server_decodes() -> None:
    g = torch.Generator().manual_seed(0)
    received = {"w": torch.randn(5, 7, generator=g)}
    local = {"w": received["w"] + 0.01 * torch.randn(5, 7, generator=g)}
    for uplink, bits in (("int8", 8), ("int4", 4)):
        record, sent = encode_uplink(local, received, uplink, codec=ChangeCodec(uplink, 8))
        decoded = decode_update(payload_from(record))
        torch.testing.assert_close(decoded["w"], sent["w"], rtol=0, atol=0)
        step = (local["w"] - received["w"]).abs().max() / {8: 127, 4: 7}[bits]
        assert (decoded["w"] - (local["w"] - received["w"])).abs().max() <= step / 2 + 1e-7


def test_fp_uplinks_send_weights_in_their_dtype() -> None:
    local = {"w": torch.randn(3, 2), "n": torch.tensor([3])}
    record, sent = encode_uplink(local, {}, "fp16")
    state = from_record(record)
    assert state["w"].dtype == torch.float16 and state["n"].dtype == torch.int64
    assert sent == {}
    # Packed: the layout and one Array per dtype, whatever the number of tensors.
    assert sorted(record.keys()) == ["data.float16", "data.int64", "layout"]


@pytest.fixture
def fashion_context(tmp_path: Path) -> Context:
    """Node 0 of 2 on real FashionMNIST, one local step of batch 8, its store in tmp_path."""
    run_config = {"local-steps": 1, "batch-size": 8, "eval-max-examples": 8}
    node_config = {PARTITION_ID: 0, NUM_PARTITIONS: 2, STATE_DIR: str(tmp_path)}
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(),
                   run_config=run_config)  # fmt: skip


def _train_message(
    feedback: bool, server_round: int, uplink: str = "int4", clip: float = 0.0
) -> Message:
    config = ConfigRecord(
        {
            "server-round": server_round,
            "uplink": uplink,
            "quant-block-size": 8,
            "quant-stochastic": False,
            "error-feedback": feedback,
            "sparse-fraction": 0.05,
            "sparse-bits": 4,
        }
    )
    if clip:  # what Flower's DP wrapper puts in the train config
        config[KEY_CLIPPING_NORM] = clip
    weights = build_unet("tiny", 28, 1, seed=0).state_dict()
    config["model-digest"] = digest(weights)
    arrays = to_record(weights)
    meta = Metadata(
        run_id=1,
        message_id=f"m{server_round}",
        src_node_id=0,
        dst_node_id=5,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    return Message(metadata=meta, content=RecordDict({"arrays": arrays, "config": config}))


@pytest.mark.parametrize("uplink", ["int4", "sparse"])
def test_error_feedback_residual_is_what_the_payload_left_out(fashion_context, uplink) -> None:
    """Through the real ClientApp train(): the residual kept in the node's store is exactly the
    part of (update + last residual) that the int4 or sparse payload did not carry."""
    context = fashion_context
    reply = train(_train_message(True, 1, uplink), context)
    residual = node_store(context).load(RESIDUAL_KEY)
    received = from_record(_train_message(False, 1).content["arrays"])
    expected = {k: (tuple(v.shape), v.dtype) for k, v in received.items()}
    sent = decode_change(payload_from(reply.content["update"]), expected)
    # The same round in fp32 trains to the same local weights (the noise is seeded per round).
    local = train(_train_message(False, 1, "fp32"), context).content["arrays"]
    for name, weights in from_record(local).items():
        update = weights - received[name]
        torch.testing.assert_close(sent[name] + residual[name], update, rtol=0, atol=1e-6)
    assert max(v.abs().max() for v in residual.values()) > 0


def test_without_error_feedback_no_state_is_kept(fashion_context) -> None:
    train(_train_message(False, 1), fashion_context)
    assert node_store(fashion_context).load(RESIDUAL_KEY) is None


def test_a_node_that_loses_its_store_recovers(fashion_context) -> None:
    """A lost residual (a restart: state gone) or a corrupt one: the node trains on, with a
    fresh residual; a lost copy of the model: the change cannot apply, out of sync, and the
    full model brings it back."""
    store = node_store(fashion_context)
    other = build_unet("tiny", 28, 1, seed=1).state_dict()  # not what a node starts from

    def message(server_round: int) -> Message:
        msg = _train_message(True, server_round, "sparse")
        msg.content["arrays"] = to_record(other)
        msg.content["config"]["model-digest"] = digest(other)
        return msg

    train(message(1), fashion_context)
    assert store.load(RESIDUAL_KEY) is not None and store.load(MODEL_KEY) is not None
    (store.root / f"{RESIDUAL_KEY}.pt").write_bytes(b"not a checkpoint")
    reply = train(message(2), fashion_context)
    assert not reply.has_error() and store.load(RESIDUAL_KEY) is not None
    assert digest(store.load(MODEL_KEY)) == digest(other)
    config = ConfigRecord({"server-round": 3, "uplink": "sparse", "error-feedback": True,
                           "model-base": digest(other), "model-digest": digest(other)})  # fmt: skip
    fashion_context.state.clear()  # a restarted SuperNode: no state, so no store, no copy
    current = message(3)
    current.content = RecordDict({"config": config})
    assert train(current, fashion_context).error.code == OUT_OF_SYNC
    assert not train(message(3), fashion_context).has_error()
    assert node_store(fashion_context).root != store.root


def test_under_dp_the_client_sends_its_update_clipped(fashion_context) -> None:
    """fp32: received + the update clipped to the config's clipping_norm."""
    clip = 1e-3
    reply = train(_train_message(False, 1, "fp32", clip=clip), fashion_context)
    sent = from_record(reply.content["arrays"])
    received = from_record(_train_message(False, 1).content["arrays"])
    norm = update_norm({k: sent[k] - received[k] for k in sent})
    assert 0.5 * clip < norm <= clip * (1 + 1e-4)  # fp32 rounding of received + update


def test_under_dp_int8_quantizes_the_clipped_update_and_feeds_back_the_rest(
    fashion_context, monkeypatch
) -> None:
    """int8 with error feedback: the codec gets the clipped update; the residual kept is what
    quantization left out of it (the clipped-off part is dropped, not carried)."""
    clip, seen = 1e-3, []
    encode = changes.encode_update

    def spy(update, **kwargs):
        seen.append({k: v.clone() for k, v in update.items()})
        return encode(update, **kwargs)

    monkeypatch.setattr(changes, "encode_update", spy)
    reply = train(_train_message(True, 1, "int8", clip=clip), fashion_context)
    [update] = seen
    assert update_norm(update) <= clip
    sent = decode_update(payload_from(reply.content["update"]))
    residual = node_store(fashion_context).load(RESIDUAL_KEY)
    for name, value in update.items():
        torch.testing.assert_close(sent[name] + residual[name], value, rtol=0, atol=1e-9)


def test_the_training_keys_reach_the_optimiser(fashion_context) -> None:
    """client-optimizer, client-momentum, warmup-steps and grad-clip from the run-config, and
    the preset's learning rate (tiny, sgd: 0.1), are what train_local's optimiser steps with."""
    fashion_context.run_config.update(
        {"client-optimizer": "sgd", "client-momentum": 0.5, "warmup-steps": 2, "grad-clip": 1e-3}
    )
    fashion_context.run_config["local-steps"] = 3
    seen = []

    def record(opt: torch.optim.Optimizer, *_: object) -> None:
        group = opt.param_groups[0]
        grads = [p.grad for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads).item()
        seen.append((type(opt).__name__, group["momentum"], group["lr"], norm))

    handle = register_optimizer_step_pre_hook(record)
    try:
        train(_train_message(False, 1, "fp32"), fashion_context)
    finally:
        handle.remove()
    assert [s[:2] for s in seen] == [("SGD", 0.5)] * 3
    assert [s[2] for s in seen] == pytest.approx([0.05, 0.1, 0.1])
    assert [s[3] for s in seen] == pytest.approx([1e-3] * 3, rel=1e-3)


def test_a_node_keeps_its_built_model_for_the_next_run_that_builds_the_same(
    fashion_context,
) -> None:
    """The module (compiled once on a GPU) stays from one run to the next unless what builds
    it changes: another run's rounds or output keep it, another seed builds another."""

    def built(**run_config: object) -> node_tasks.NodeModel:
        fashion_context.run_config.update(run_config)
        fashion_context.state.clear()  # a new run: a fresh node state
        node_tasks.receive(_train_message(False, 1).content, fashion_context)
        [model] = node_tasks._BUILT.values()
        return model

    first = built()
    assert built(**{"num-server-rounds": 9, "output-dir": "elsewhere"}) is first
    assert built(seed=1) is not first


def test_a_node_reads_its_own_data_root_and_logs_the_run_value_it_ignored(
    fashion_context, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """node-config data-root wins over the run's (which here does not exist); the node logs
    the ignored run value once, not per message."""
    own = tmp_path / "node-data"
    fashion_context.node_config["data-root"] = str(own)
    fashion_context.run_config["data-root"] = str(tmp_path / "the-run-s")
    with caplog.at_level(logging.WARNING):
        for rnd in (1, 2):
            status, _ = run_task("train", _train_message(False, rnd, "fp32").content,
                                 fashion_context, Stopwatch(time.time()))  # fmt: skip
            assert status == "ok"
    assert (own / "FashionMNIST" / "raw").is_dir() and not (tmp_path / "the-run-s").exists()
    ignored = [r.message for r in caplog.records if "wins over run-config data-root" in r.message]
    assert len(ignored) == 1 and str(own) in ignored[0]


def test_a_node_that_refuses_run_chosen_paths_answers_with_an_error_reply(
    fashion_context, tmp_path: Path
) -> None:
    fashion_context.node_config["run-paths"] = "refuse"
    fashion_context.run_config["latent-cache-dir"] = str(tmp_path / "cache")
    msg = _train_message(False, 1, "fp32")
    reply = train(msg, fashion_context)
    assert reply.has_error() and reply.error.code == REFUSED
    assert "latent-cache-dir" in reply.error.reason and "run-paths='refuse'" in reply.error.reason
    fashion_context.node_config["latent-cache-dir"] = str(tmp_path / "own")  # the node's: fine
    assert not train(msg, fashion_context).has_error()


@pytest.mark.parametrize(
    ("node_config", "match"),
    [
        ("data-root=5", "node-config data-root=5 has type int; allowed is a str"),
        ("num-threads='two'", "node-config num-threads='two' has type str"),
        ("run-paths='never'", "node-config run-paths='never' is invalid"),
        ("device='tpu'", "node-config device='tpu' is invalid: allowed is one of"),
    ],
)
def test_a_bad_node_config_value_is_an_error_at_the_node_naming_the_key(
    fashion_context, capsys: pytest.CaptureFixture, node_config: str, match: str
) -> None:
    assert node_settings.main([f"partition-id=0 num-partitions=2 {node_config}"]) == 2
    assert match in capsys.readouterr().err
    key = node_config.partition("=")[0]
    fashion_context.node_config[key] = parse([node_config])[key]
    status, reason = run_task("train", _train_message(False, 1, "fp32").content,
                              fashion_context, Stopwatch(time.time()))  # fmt: skip
    assert status == "refused" and match in reason
