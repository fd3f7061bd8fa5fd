"""The server's measures: balanced test subset, global loss, and the EMA of the global weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from formats import write_celeba

from feddm_flower.app.report import RoundReporter
from feddm_flower.app.server_app import build_strategy
from feddm_flower.config import RunConfig
from feddm_flower.data.datasets import open_source, resolve_root
from feddm_flower.data.loading import load_dataset
from feddm_flower.evaluation.artifacts import RunDirectory
from feddm_flower.evaluation.quality import (
    balanced_subset,
    ema_decay,
    ema_update,
    global_loss,
    load_eval_images,
)
from feddm_flower.task.models import build_unet


def test_balanced_subset_has_equal_counts_interleaved_and_is_seeded() -> None:
    labels = np.repeat([0, 1, 2, 5], [40, 7, 30, 12])  # unequal classes, a gap in the ids
    idx = balanced_subset(labels, 24, seed=3)
    assert len(idx) == 24 and len(set(idx.tolist())) == 24
    # 6 of each class, in the order 0 1 2 5 0 1 2 5 ...: each class spans the timestep grid.
    assert labels[idx].tolist() == [0, 1, 2, 5] * 6
    assert np.array_equal(idx, balanced_subset(labels, 24, seed=3))
    assert not np.array_equal(idx, balanced_subset(labels, 24, seed=4))
    assert len(balanced_subset(labels, 1000, seed=0)) == 4 * 7  # capped by the rarest class
    assert len(balanced_subset(labels, 2, seed=0)) == 4  # at least one per class


def test_eval_images_are_a_balanced_test_subset_or_the_first_without_classes(
    tmp_path: Path,
) -> None:
    images = load_eval_images("fashion-mnist", "", 500, seed=0)
    source = open_source("fashion-mnist", resolve_root(""), False)
    idx = balanced_subset(source.labels, 500, seed=0)
    assert images.dtype == torch.uint8 and torch.equal(images, source.read(idx))
    assert np.bincount(source.labels[idx]).tolist() == [50] * 10
    write_celeba(tmp_path, n=40)  # no classes: the first n test images, as FID's real ones
    first = load_dataset("celeba", str(tmp_path), train=False, limit=3).images
    assert torch.equal(load_eval_images("celeba", str(tmp_path), 3, seed=0), first)


def test_global_loss_is_deterministic_and_seeded() -> None:
    unet = build_unet("tiny", 28, 1)
    images = load_eval_images("fashion-mnist", "", 20, seed=0)
    loss = global_loss(unet, images, seed=0)
    assert loss > 0 and loss == global_loss(unet, images, seed=0)
    assert loss != global_loss(unet, images, seed=1)


def test_ema_update_mixes_floats_and_copies_the_rest() -> None:
    ema = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor([1])}
    new = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor([7])}
    out = ema_update(ema, new, 0.75)
    assert torch.equal(out["w"], torch.tensor([1.5, 3.5])) and torch.equal(out["n"], new["n"])
    assert ema_decay(0.9, 1) == 0.0  # the first update replaces the starting weights
    assert ema_decay(0.9, 2) == pytest.approx(0.9 / 1.9)


def _round(reporter: RoundReporter, server_round: int, arrays: ArrayRecord) -> None:
    """What the strategy does after a round: evaluate_fn, then end_round."""
    reporter.evaluate(server_round, arrays)
    reporter.end_round(server_round)


def test_reporter_ema_is_the_bias_corrected_average_of_the_rounds_and_survives_resume(
    tmp_path: Path,
) -> None:
    """Round 0 is the random init, rounds 1..3 bring w1..w3; at decay d the EMA after round 2
    is (d·w1 + w2) / (1 + d) and, resumed from the checkpoint, after round 3
    (d²·w1 + d·w2 + w3) / (1 + d + d²). Samples, checkpoint and metrics follow."""
    d = 0.5
    cfg = RunConfig(server_ema=d, server_eval_examples=20, grid_samples=1, sample_steps=1)
    w = [build_unet("tiny", 28, 1, seed=s).state_dict() for s in range(4)]
    run = RunDirectory(tmp_path)
    strategy = build_strategy(cfg)
    reporter = RoundReporter(cfg, run, strategy, build_unet("tiny", 28, 1, seed=0))
    for rnd in range(3):
        _round(reporter, rnd, ArrayRecord(w[rnd]))
    reporter.close()
    expected = {k: (d * w[1][k] + w[2][k]) / (1 + d) for k in w[0]}
    torch.testing.assert_close(reporter.model.state_dict(), expected)
    torch.testing.assert_close(run.load_ema(), expected)
    assert torch.equal(reporter.unet.conv_in.weight, w[2]["conv_in.weight"])  # raw global

    rows = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    assert rows[0]["global-loss-initial"] == global_loss(
        build_unet("tiny", 28, 1, seed=0), reporter.eval_inputs, cfg.seed
    )
    assert rows[0]["global-loss-ema"] == rows[0]["global-loss"]  # EMA of one round = it
    assert rows[1]["global-loss-ema"] != rows[1]["global-loss"]
    assert "global-loss-initial" not in rows[1]

    resumed = RoundReporter(cfg, run, strategy, build_unet("tiny", 28, 1), ema=run.load_ema())
    _round(resumed, 3, ArrayRecord(w[3]))
    resumed.close()
    expected = {k: (d * d * w[1][k] + d * w[2][k] + w[3][k]) / (1 + d + d * d) for k in w[0]}
    torch.testing.assert_close(resumed.model.state_dict(), expected)


def test_the_reporter_writes_in_the_background_what_the_round_was_when_it_ended(
    tmp_path: Path,
) -> None:
    """The metrics line and checkpoint of round 1 are written while round 2 goes on: what
    round 2 adds to the strategy's history and ledger meanwhile stays out of them."""
    cfg = RunConfig(server_eval_examples=0, grid_samples=1, sample_steps=1)
    run = RunDirectory(tmp_path)
    strategy = build_strategy(cfg)
    reporter = RoundReporter(cfg, run, strategy, build_unet("tiny", 28, 1, seed=0))
    strategy.history[1]["sampled-train"] = ["7"]
    strategy.book.ledger.add(1, "down", 7, 100, 400)
    _round(reporter, 0, ArrayRecord(build_unet("tiny", 28, 1, seed=0).state_dict()))
    w1 = build_unet("tiny", 28, 1, seed=1).state_dict()
    _round(reporter, 1, ArrayRecord(w1))
    strategy.history[1]["late"] = True  # round 2 goes on while round 1 is written
    strategy.history[2]["sampled-train"] = ["7"]
    strategy.book.ledger.add(2, "down", 7, 100, 400)
    reporter.close()
    (row,) = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    assert row["round"] == 1 and row["sampled-train"] == ["7"] and "late" not in row
    assert row["bytes-down-cumulative"] == 100
    assert (run.path / row["sample-grid"]).exists() and (run.path / "samples").is_dir()
    unet, state = run.load_checkpoint()
    assert state["round"] == 1 and set(state["history"]) == {"1"}
    assert "late" not in state["history"]["1"] and set(state["ledger"]) == {"1"}
    assert torch.equal(unet.conv_in.weight, w1["conv_in.weight"])
