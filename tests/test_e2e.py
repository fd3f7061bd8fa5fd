"""End to end: a real `flwr run .` on the simulation engine with real FashionMNIST."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN
from diffusers import DDPMPipeline, UNet2DModel
from formats import write_celeba, write_cifar
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from feddm_flower.config import RunConfig
from feddm_flower.evaluation.budget import config_images, run_images
from feddm_flower.task.models import build_unet


def board(run_dir: Path) -> EventAccumulator:
    """The run's TensorBoard event files, as TensorBoard itself reads them."""
    everything = {"scalars": 0, "images": 0, "tensors": 0}
    return EventAccumulator(str(run_dir), size_guidance=everything).Reload()


def scalar_steps(events: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in events.Scalars(tag)]


def test_two_rounds_write_metrics_samples_and_a_loadable_pipeline(flwr_run, tmp_path: Path):
    out = tmp_path / "run"
    proc = flwr_run({**TINY_RUN, "output-dir": str(out)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert str(out) in proc.stdout  # the output directory is printed

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    model_bytes = 4 * sum(p.numel() for p in build_unet("tiny", 28, 1).state_dict().values())
    for r in rows:
        assert r["strategy"] == "vanilla"
        assert r["train-loss"] > 0 and r["eval-loss"] > 0 and r["wall-seconds"] > 0
        assert math.isfinite(r["global-loss"]) and "global-loss-ema" not in r  # EMA off
        # 2 train replies carry the fp32 weights up.
        assert 2 * model_bytes <= r["bytes-up"] < 2 * model_bytes * 1.05  # + tensor names
        assert len(r["bytes-up-per-node"]) == 2
    # One message per node and round, and one evaluate message after the last: each model
    # goes down once per node. Round 1 sends none (the nodes rebuild the seeded start), round
    # 2's train messages bring round 1's model, the final evaluation round 2's (FedAvg: the
    # model in all 6 messages).
    assert rows[0]["bytes-down"] < 1000 and "downlink-full" not in rows[0]
    assert 4 * model_bytes <= rows[1]["bytes-down"] < 4 * model_bytes * 1.05
    assert rows[1]["compression-down"] == pytest.approx(6 / 4, rel=0.02)
    assert rows[1]["bytes-down-cumulative"] == rows[0]["bytes-down"] + rows[1]["bytes-down"]
    # eval-loss: the nodes' loss of the model they received (round 1: the initial weights);
    # the final model's comes from the one evaluate message, in the last line only.
    assert rows[0]["eval-loss"] > rows[1]["eval-loss"]
    assert "final-eval-loss" not in rows[0] and rows[1]["final-eval-loss"] > 0
    assert "evaluate-time-total" not in rows[0] and rows[1]["evaluate-time-total"] > 0
    assert rows[0]["global-loss-initial"] > rows[1]["global-loss"] > 0  # round 0: random init
    # The centralized baseline's equal compute: 2 rounds x 2 clients x 2 steps of 16 images.
    cfg = RunConfig.from_mapping({**TINY_RUN, "output-dir": str(out)})
    assert run_images(rows, 16) == config_images(cfg, num_supernodes=2) == 2 * 2 * 2 * 16
    for rnd in (0, 1, 2):
        assert (out / "samples" / f"round_{rnd:03d}.png").stat().st_size > 0
    assert json.loads((out / "run_config.json").read_text())["num-server-rounds"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bytes-up-cumulative"] == rows[1]["bytes-up-cumulative"]
    assert summary["final-eval-loss"] == rows[1]["final-eval-loss"]
    assert "Traffic:" in proc.stdout + proc.stderr
    # TensorBoard: each round's numbers, the rejected replies, the sample grids, the config.
    events = board(out)
    for tag in ("global-loss", "train-loss", "eval-loss", "bytes-down", "bytes-up",
                "overhead-share", "replies-accepted", "replies-rejected"):  # fmt: skip
        assert scalar_steps(events, tag) == [1, 2], tag
    assert [e.value for e in events.Scalars("global-loss")] == pytest.approx(
        [r["global-loss"] for r in rows]
    )
    assert [e.value for e in events.Scalars("replies-accepted")] == [2, 2]
    assert [e.step for e in events.Images("samples")] == [0, 1, 2]
    [config] = events.Tensors("run-config/text_summary")
    assert '"num-server-rounds": 2' in config.tensor_proto.string_val[0].decode()

    pipe = DDPMPipeline.from_pretrained(out / "pipeline")
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 28, 28, 1)
    # The saved pipeline holds the trained global model, not the initial one.
    init = build_unet("tiny", 28, 1).state_dict()
    trained = pipe.unet.state_dict()
    assert any(not torch.equal(init[k], trained[k]) for k in init)


def test_invalid_run_config_fails_before_training(flwr_run, tmp_path: Path) -> None:
    out = tmp_path / "bad"
    proc = flwr_run({**TINY_RUN, "dirichlet-alpha": 0.0, "output-dir": str(out)})
    logs = proc.stdout + proc.stderr
    assert "dirichlet-alpha=0.0 is invalid: allowed is > 0" in logs
    assert not (out / "metrics.jsonl").exists()


def test_resume_continues_after_the_last_checkpointed_round(flwr_run, tmp_path: Path) -> None:
    """A FedAdam run stopped after round 1 and resumed ends with the weights, and the server
    EMA, of a run that never stopped: Flower's own round numbers, the optimizer's moments and
    the EMA restored."""
    fedadam = {**TINY_RUN, "server-optimizer": "fedadam", "server-ema": 0.9}
    straight = tmp_path / "straight"
    proc = flwr_run({**fedadam, "num-server-rounds": 3, "output-dir": str(straight),
                     "tensorboard": False})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(straight.glob("events.out.tfevents.*"))  # tensorboard=false: none
    out = tmp_path / "resumable"
    first = flwr_run({**fedadam, "num-server-rounds": 1, "output-dir": str(out)})
    assert first.returncode == 0, first.stdout + first.stderr
    # flwr run exits 0 even when the ServerApp failed: its summary says it finished.
    assert (out / "summary.json").exists(), first.stdout + first.stderr
    assert (out / "checkpoint" / "server_optimizer.npz").stat().st_size > 0
    # A server that died after writing round 2's metrics line but before its checkpoint:
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"round": 2, "strategy": "vanilla", "partial": True}) + "\n")

    again = flwr_run({**fedadam, "num-server-rounds": 3, "resume": str(out)})
    assert again.returncode == 0, again.stdout + again.stderr
    logs = again.stdout + again.stderr
    assert "Resuming after round 1 of 3" in logs and "rounds 2 to 3" in logs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert not any(r.get("partial") for r in rows)
    ups = [r["bytes-up"] for r in rows]
    assert rows[2]["bytes-up-cumulative"] == sum(ups)  # the ledger survived the restart
    assert (out / "samples" / "round_003.png").exists()
    assert all(r["global-loss-ema"] > 0 for r in rows)
    # TensorBoard shows each round once: the restart dropped the interrupted run's round 2.
    assert scalar_steps(board(out), "global-loss") == [1, 2, 3]
    # The global weights (checkpoint) and their EMA (the pipeline) both match.
    for kept in ("checkpoint", "pipeline/unet"):
        resumed = UNet2DModel.from_pretrained(out / kept).state_dict()
        uninterrupted = UNet2DModel.from_pretrained(straight / kept).state_dict()
        for name, value in uninterrupted.items():
            torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
    ema = UNet2DModel.from_pretrained(straight / "pipeline/unet").conv_in.weight
    assert not torch.equal(ema, UNet2DModel.from_pretrained(straight / "checkpoint").conv_in.weight)


@pytest.mark.parametrize(
    ("dataset", "write", "shape"),
    [("cifar10", write_cifar, (3, 32)), ("celeba", write_celeba, (3, 64))],
)
def test_one_round_on_real_format_files(
    flwr_run, tmp_path: Path, dataset: str, write: Callable[[Path], object], shape: tuple
) -> None:
    """`dataset=...` reaches the clients from files in the real on-disk format, non-IID (by
    label for CIFAR-10, by the `Smiling` attribute for CelebA), at the dataset's resolution."""
    root, out = tmp_path / "data", tmp_path / dataset
    write(root)
    overrides = {"dataset": dataset, "data-root": str(root), "partitioning": "dirichlet"}
    proc = flwr_run({**TINY_RUN, "num-server-rounds": 1, **overrides, "output-dir": str(out)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["train-loss"] > 0 and row["eval-loss"] > 0 and "rejected" not in row
    pipe = DDPMPipeline.from_pretrained(out / "pipeline")
    assert (pipe.unet.config.in_channels, pipe.unet.config.sample_size) == shape
