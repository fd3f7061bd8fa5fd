"""Fine-tuning a pretrained U-Net with LoRA: a real `flwr run` from a saved model, the adapter
and merged outputs, the base sent once per node and kept, and the bad inputs."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN
from diffusers import DDPMPipeline, UNet2DModel
from flwr.app import Context, RecordDict
from peft import PeftModel

from feddm_flower.app.hostile import run_in_process
from feddm_flower.app.local_grid import node_reply, train_metrics
from feddm_flower.app.node_tasks import _base_weights, base_store
from feddm_flower.app.records import payload_record, to_record, uplink_key
from feddm_flower.app.server_app import build_strategy, fresh_model
from feddm_flower.config import ConfigError, RunConfig
from feddm_flower.evaluation.artifacts import RunDirectory
from feddm_flower.fed.changes import ChangeCodec
from feddm_flower.fed.downlink import NoBase, digest
from feddm_flower.fed.node_store import NodeStore
from feddm_flower.protocol import BASE, METRICS
from feddm_flower.task.finetune import (
    add_lora,
    check_space,
    load_adapter,
    load_pretrained,
    trainable_state,
)
from feddm_flower.task.models import build_scheduler, build_unet

LORA = {"trainable": "lora", "lora-rank": 4}
ONE_ROUND = {**TINY_RUN, "num-server-rounds": 1, "local-steps": 2, "batch-size": 8,
             "eval-max-examples": 4, "sample-steps": 1, "grid-samples": 1}  # fmt: skip


def saved_pipeline(directory: Path, seed: int) -> UNet2DModel:
    """A tiny seeded U-Net saved as a DDPMPipeline folder (its U-Net under unet/)."""
    unet = build_unet("tiny", 28, 1, seed=seed)
    DDPMPipeline(unet=unet, scheduler=build_scheduler()).save_pretrained(directory)
    return unet


def test_a_saved_model_fine_tunes_in_real_runs(flwr_run, tmp_path: Path) -> None:
    """Run 1 (LoRA 'ffa', int8 both ways) sends each node the base once, then only adapter
    tensors; run 2 (all weights) from the same base sends no base. The base stays
    bit-identical, the merged pipeline samples, and the adapter loads into the base with peft
    and gives the merged model's output."""
    seed = time.time_ns() % 2**31  # a base no node holds yet
    base = saved_pipeline(tmp_path / "base", seed)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    store = NodeStore.bases("")
    ffa = {**LORA, "lora-variant": "ffa", "uplink": "int8", "downlink": "int8"}
    runs = (ffa, {"trainable": "all"})
    try:
        rows = []
        for i, extra in enumerate(runs):
            out = tmp_path / f"run{i}"
            run_config = {**ONE_ROUND, **extra, "init-from": str(tmp_path / "base"),
                          "output-dir": str(out)}  # fmt: skip
            proc = flwr_run(run_config)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            [row] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            assert "rejected" not in row and "missing" not in row
            rows.append(row)
        base_bytes = sum(v.numel() * 4 for v in base_weights.values())
        # Run 1: the base went once to each node that lacked it (the simulated nodes share
        # this machine's store, so a node that asks after the other kept it finds it there);
        # everything else is adapters (rank 4, B only: 4160 values, int8), far below one base.
        sent = rows[0]["bytes-base-down"] / base_bytes
        assert sent == pytest.approx(1, rel=0.01) or sent == pytest.approx(2, rel=0.01)
        # Per node at most: configs, the fp32 adapter resent with the base, one int8 change.
        adapter_down = rows[0]["bytes-down-cumulative"] - rows[0]["bytes-base-down"]
        assert 0 < adapter_down < base_bytes / 10
        assert 0 < rows[0]["bytes-up-cumulative"] < base_bytes / 20
        # Run 2, all weights from the same base: no base, and the train message no model
        # (the nodes hold it); the evaluate message one fp32 model per node.
        assert "bytes-base-down" not in rows[1]
        assert rows[1]["bytes-down-cumulative"] == pytest.approx(2 * base_bytes, rel=0.02)
        # The node kept the base, bit for bit, under its digest; the saved one is unchanged.
        held = store.load(digest(base_weights))
        assert held is not None and all(torch.equal(held[k], v) for k, v in base_weights.items())
        reloaded = UNet2DModel.from_pretrained(tmp_path / "base" / "unet").state_dict()
        assert all(torch.equal(reloaded[k], v) for k, v in base_weights.items())
        for i in range(2):
            pipe = DDPMPipeline.from_pretrained(tmp_path / f"run{i}" / "pipeline")
            assert not any("lora" in k for k in pipe.unet.state_dict())
            trained = pipe.unet.state_dict()
            assert any(not torch.equal(trained[k], v) for k, v in base_weights.items())
            images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
            assert images.shape == (1, 28, 28, 1)
        merged = DDPMPipeline.from_pretrained(tmp_path / "run0" / "pipeline").unet
        adapter = tmp_path / "run0" / "adapter"
        adapted = PeftModel.from_pretrained(build_unet("tiny", 28, 1, seed=seed), adapter)
        x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 900])
        with torch.no_grad():  # merged weights round differently from the adapter's sum
            assert_close = torch.testing.assert_close
            assert_close(adapted(x, t).sample, merged(x, t).sample, atol=1e-4, rtol=1e-4)
        assert not (tmp_path / "run1" / "adapter").exists()
    finally:
        store.drop(digest(base_weights))


def test_init_from_finds_the_unet_in_each_folder_kind(tmp_path: Path) -> None:
    unet = saved_pipeline(tmp_path / "pipe", seed=3)
    unet.save_pretrained(tmp_path / "unet-only")
    for folder in ("pipe", "unet-only"):
        loaded = load_pretrained(str(tmp_path / folder))
        assert digest(loaded.state_dict()) == digest(unet.state_dict())


def test_a_hub_id_without_network_is_a_config_error() -> None:
    """Hugging Face's offline mode stands for a machine without network (no waiting here)."""
    code = "from feddm_flower.task.finetune import load_pretrained; load_pretrained('org/model')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ConfigError: run-config init-from='org/model'" in proc.stderr
    assert "hub download failed" in proc.stderr and "save_pretrained(DIR)" in proc.stderr


@pytest.mark.parametrize(
    ("init_from", "match"),
    [("{tmp}/missing", "no such directory"), ("{tmp}", "no UNet2DModel there"),
     ("{tmp}/vae", "no UNet2DModel there")],
)  # fmt: skip
def test_init_from_that_is_no_unet_is_a_config_error(tmp_path: Path, init_from, match) -> None:
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ConfigError, match="init-from") as err:
        load_pretrained(init_from.format(tmp=tmp_path))
    assert match in str(err.value)


def test_a_unet_of_another_size_or_channel_count_is_a_config_error() -> None:
    unet = build_unet("tiny", 32, 3)
    check_space(unet, 3, 32, "dataset")
    for channels, size in ((1, 32), (3, 28)):
        with pytest.raises(ConfigError, match="init-from"):
            check_space(unet, channels, size, "dataset")


def test_lora_keys_need_trainable_lora() -> None:
    for key, value in {"lora-rank": 4, "lora-alpha": 2.0, "lora-targets": "conv1",
                       "lora-variant": "ffa"}.items():  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_mapping({key: value})
        RunConfig.from_mapping({key: value, "trainable": "lora"})
    with pytest.raises(ConfigError, match="lora-rank"):
        RunConfig.from_mapping({"trainable": "lora", "lora-rank": 0})


def test_a_rank_too_large_or_an_unknown_target_is_a_config_error() -> None:
    cfg = RunConfig.from_mapping(LORA)
    with pytest.raises(ConfigError, match="lora-rank=17.*at most 16"):
        add_lora(build_unet("tiny", 28, 1), dataclasses.replace(cfg, lora_rank=17))
    with pytest.raises(ConfigError, match="lora-targets.*'nope'.*conv1"):
        add_lora(build_unet("tiny", 28, 1), dataclasses.replace(cfg, lora_targets="conv1,nope"))


def test_lora_freezes_the_base_and_trains_b_alone_under_ffa() -> None:
    for variant, factors in (("ffa", {"lora_B"}), ("ab", {"lora_A", "lora_B"})):
        cfg = RunConfig.from_mapping({**LORA, "lora-variant": variant})
        unet = add_lora(build_unet("tiny", 28, 1), cfg)
        state = trainable_state(unet)
        assert {k.split(".")[-3] for k in state} == factors
        # A is seeded: the same on every node and the server.
        again = add_lora(build_unet("tiny", 28, 1), cfg).state_dict()
        assert all(torch.equal(v, again[k]) for k, v in unet.state_dict().items())


@pytest.mark.parametrize("uplink", ["fp32", "int8"])
def test_replies_with_base_weights_or_misshapen_adapters_are_rejected(
    server_identity, uplink: str
) -> None:
    """Under LoRA the global state is the adapter: a reply with the base's weights, or with an
    adapter tensor of another shape, is rejected with its reason; the good reply is taken."""
    cfg = RunConfig.from_mapping({**LORA, "uplink": uplink})
    unet = add_lora(build_unet("tiny", 28, 1), cfg)
    adapter = {k: v.clone() for k, v in trainable_state(unet).items()}
    name = next(iter(adapter))
    good = {k: v + 0.01 for k, v in adapter.items()}
    replies = {
        "base": {**unet.state_dict(), **good},
        "shape": {**good, name: torch.zeros(adapter[name].shape[0] + 1, *adapter[name].shape[1:])},
        "good": good,
    }
    strategy = build_strategy(cfg)
    strategy.global_state = adapter
    messages = []
    for node, state in enumerate(replies.values(), start=1):
        if uplink == "fp32":
            record = to_record(state)
        else:  # the coded update of whatever the node claims its weights are
            same = {k: v for k, v in adapter.items() if v.shape == state[k].shape}
            update = {k: v - same.get(k, torch.zeros_like(v)) for k, v in state.items()}
            record = payload_record(ChangeCodec("int8").encode(update))
        messages.append(node_reply(node, RecordDict({uplink_key(uplink): record,
                                                     METRICS: train_metrics(10)})))  # fmt: skip
    arrays, _ = strategy.aggregate_train(1, messages)
    reasons = {r["node"]: r["reason"] for r in strategy.history[1]["rejected"]}
    assert set(reasons) == {"1", "2"}
    assert "base_layer" in reasons["1"] or "names" in reasons["1"], reasons["1"]
    assert "shape" in reasons["2"] or name in reasons["2"], reasons["2"]
    new = arrays.to_torch_state_dict()
    assert set(new) == set(adapter)
    torch.testing.assert_close(new[name], good[name], atol=1e-3, rtol=0)


def test_a_stored_base_altered_on_disk_is_dropped_not_used(tmp_path: Path) -> None:
    """A node checks its stored base against the digest the server names: an altered copy is
    dropped and the node asks for the base (NoBase); sent the base, it keeps the right one."""
    base = build_unet("tiny", 28, 1, seed=3).state_dict()
    want = digest(base)
    context = Context(run_id=1, node_id=7, node_config={"state-dir": str(tmp_path)},
                      state=RecordDict(), run_config={})  # fmt: skip
    store = base_store(context)
    store.save(want, {k: v + 1.0 if v.is_floating_point() else v for k, v in base.items()})
    with pytest.raises(NoBase):
        _base_weights(want, RecordDict(), context)
    assert store.load(want) is None  # dropped
    sent = _base_weights(want, RecordDict({BASE: to_record(base)}), context)
    assert digest(sent) == digest(store.load(want)) == want


def test_no_module_imports_peft_when_loaded() -> None:
    """The app runs without peft (the GPU kit carries none): only LoRA's functions import it."""
    package = Path(__file__).resolve().parents[1] / "feddm_flower"
    for path in package.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level; `if TYPE_CHECKING` aside
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "peft" for n in names), path


def test_lora_runs_under_differential_privacy_and_a_robust_rule() -> None:
    """DP clipping, noise and accounting, and a robust rule, on adapter tensors alone (real
    strategy and nodes in this process)."""
    cheap = {**ONE_ROUND, **LORA, "local-steps": 1}
    for extra in ({"dp-clip-norm": 0.5, "dp-noise-multiplier": 0.1}, {"aggregation": "median"}):
        run = run_in_process({**cheap, **extra}, nodes=3)
        history = run.strategy.history[1]
        assert "rejected" not in history and "missing" not in history
        assert set(run.final) == set(run.initial)
        assert {k.split(".lora_")[1][0] for k in run.initial} == {"A", "B"}  # 'ab': both travel
        assert any(not torch.equal(run.initial[k], run.final[k]) for k in run.initial)
        assert ("dp-epsilon" in history) == ("dp-clip-norm" in extra)


def test_a_lora_checkpoint_resumes_the_adapter(tmp_path: Path) -> None:
    """The checkpoint holds the merged U-Net and the adapter; the resumed run rebuilds the base
    and loads the adapter: the same trainable state, the base unchanged."""
    cfg = RunConfig.from_mapping({**LORA, "lora-variant": "ab"})
    unet = fresh_model(cfg, 1, 28, latent=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    run = RunDirectory(tmp_path)
    run.save_checkpoint(unet, {"round": 2})
    resumed = fresh_model(cfg, 1, 28, latent=False)
    load_adapter(resumed, run.checkpoint_adapter())
    for k, v in trainable_state(unet).items():
        assert torch.equal(trainable_state(resumed)[k], v)
    assert run.checkpoint_state() == {"round": 2}
    merged = UNet2DModel.from_pretrained(tmp_path / "checkpoint")
    x, t = torch.randn(1, 1, 28, 28, generator=generator), torch.tensor([300])
    with torch.no_grad():  # merged weights round differently from the adapter's sum
        torch.testing.assert_close(merged(x, t).sample, resumed(x, t).sample, atol=1e-4, rtol=1e-4)
