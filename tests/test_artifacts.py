"""The run directory: summary from the last metrics line, metrics truncation, atomic checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from feddm_flower.app.server_app import _resumed_config, _starting_point
from feddm_flower.config import RunConfig
from feddm_flower.evaluation.artifacts import RunDirectory
from feddm_flower.task.models import build_unet


def test_summary_is_the_last_metrics_line_without_per_node_detail(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    for rnd in (1, 2):
        run.append_metrics({"round": rnd, "bytes-up": rnd * 10, "bytes-up-per-node": {"1": 5}})
    assert run.write_summary() == {"round": 2, "bytes-up": 20}
    assert json.loads((tmp_path / "summary.json").read_text()) == {"round": 2, "bytes-up": 20}


def test_truncate_drops_rounds_after_the_checkpoint(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    for rnd in (1, 2, 3):
        run.append_metrics({"round": rnd})
    run.truncate_metrics(2)
    assert [json.loads(x)["round"] for x in run.metrics_file.read_text().splitlines()] == [1, 2]


def test_checkpoint_round_trips_weights_and_state(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    unet = build_unet("tiny", 28, 1, seed=5)
    run.save_checkpoint(unet, {"round": 3})
    run.save_checkpoint(unet, {"round": 4})  # replaces the previous one
    loaded, state = run.load_checkpoint()
    assert state == {"round": 4} and run.load_ema() is None  # kept with server-ema only
    for (k, a), b in zip(unet.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert not (tmp_path / ".checkpoint.tmp").exists()
    assert not (tmp_path / ".checkpoint.old").exists()


def test_resume_before_the_first_checkpoint_starts_the_run_again(tmp_path: Path) -> None:
    """A server that died in round 1 left its config and maybe a partial metrics line, but no
    checkpoint: resuming starts from the same seeded weights; with a checkpoint, from it."""
    run = RunDirectory(tmp_path)
    cfg = RunConfig(resume=str(tmp_path), seed=3)
    run.write_config(cfg.to_dict())
    run.append_metrics({"round": 1, "partial": True})
    unet, state = _starting_point(cfg, run, 1, 28, latent=False)
    assert state is None and run.metrics_file.read_text() == ""
    fresh = build_unet("tiny", 28, 1, seed=3).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in unet.state_dict().items())

    run.save_checkpoint(build_unet("tiny", 28, 1, seed=4), {"round": 1})
    unet, state = _starting_point(cfg, run, 1, 28, latent=False)
    assert state == {"round": 1} and not torch.equal(unet.conv_in.weight, fresh["conv_in.weight"])


def test_resume_of_a_directory_that_is_no_run_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a feddm-flower run directory"):
        _resumed_config(RunConfig(resume=str(tmp_path)), RunDirectory(tmp_path))
