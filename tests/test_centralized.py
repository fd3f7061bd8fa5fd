"""The centralized baseline: equal-compute accounting, and a tiny real run of the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from diffusers import DDPMPipeline

from feddm_flower.config import ConfigError, RunConfig
from feddm_flower.evaluation.budget import central_steps, config_images, run_images
from feddm_flower.tools.centralized import main, price_of_federation


def test_config_images_count_every_sampled_client_of_every_round() -> None:
    cfg = RunConfig(num_server_rounds=3, local_steps=5, batch_size=8)
    assert config_images(cfg, num_supernodes=2) == 3 * 2 * 5 * 8
    half = RunConfig(num_server_rounds=3, local_steps=5, batch_size=8, fraction_train=0.5)
    assert config_images(half, num_supernodes=10) == 3 * 5 * 5 * 8
    assert config_images(half, num_supernodes=2) == 3 * 2 * 5 * 8  # at least min-nodes=2
    with pytest.raises(ConfigError, match="--from-run"):
        config_images(RunConfig(local_steps=0), num_supernodes=2)


def test_run_images_count_the_accepted_training_replies() -> None:
    rows = [
        {"round": 1, "sampled-train": ["1", "2", "3"], "train-steps": 5.0},
        # one node missing, one train reply rejected (an evaluate rejection does not count)
        {
            "round": 2,
            "sampled-train": ["1", "2", "3"],
            "missing": ["3"],
            "rejected": [{"node": "2", "phase": "train"}, {"node": "1", "phase": "evaluate"}],
            "train-steps": 5.0,
        },
        {"round": 3, "sampled-train": ["1", "2", "3"], "missing": ["1", "2", "3"]},  # none
    ]
    assert run_images(rows, batch_size=8) == (3 + 1) * 5 * 8
    assert central_steps(run_images(rows, 8), 8) == 20 and central_steps(161, 8) == 21


def test_price_of_federation_is_federated_over_centralized() -> None:
    run = {"fid": 300.0, "global-loss": 0.06, "eval-loss": 0.05}
    assert price_of_federation(run, {"fid": 200.0, "global-loss": 0.05}) == {
        "fid-ratio": 1.5,
        "global-loss-ratio": pytest.approx(1.2),
    }
    assert price_of_federation(run, {"global-loss": 0.05}).keys() == {"global-loss-ratio"}


def test_centralized_command_matches_a_finished_run(tmp_path: Path) -> None:
    """A few steps on the whole training split, for the images the run's lines count."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig(num_server_rounds=1, local_steps=2, batch_size=4, server_eval_examples=20)
    (run / "run_config.json").write_text(json.dumps(cfg.to_dict()))
    line = {"round": 1, "sampled-train": ["1", "2"], "train-steps": 2.0, "global-loss": 2.0}
    (run / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    out = tmp_path / "central"
    argv = ["--from-run", str(run), "--run-config", "sample-steps=2", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images-seen"] == 2 * 2 * 4 and metrics["train-steps"] == 4
    assert math.isfinite(metrics["global-loss"]) and "fid" not in metrics  # eval-every=0
    ratio = metrics["price-of-federation"]["global-loss-ratio"]
    assert ratio == pytest.approx(2.0 / metrics["global-loss"])
    assert json.loads((out / "run_config.json").read_text())["sample-steps"] == 2
    assert DDPMPipeline.from_pretrained(out / "pipeline").unet.config.sample_size == 28


def test_centralized_command_refuses_a_bad_run_config(tmp_path: Path, capsys) -> None:
    assert main(["--run-config", "uplnk='int8'", "--out", str(tmp_path)]) == 2
    assert "did you mean 'uplink'" in capsys.readouterr().err


def test_centralized_trains_with_the_clients_optimiser_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Equal compute means the same training function with the same options as the clients
    (client-optimizer, momentum, preset warm-up and clip), not AdamW whatever was asked."""
    from feddm_flower.task.diffusion import TrainResult
    from feddm_flower.tools import centralized

    seen: dict[str, object] = {}

    def record(unet, scheduler, images, **kwargs) -> TrainResult:
        seen.update(kwargs)
        return TrainResult(0.1, kwargs["steps"], kwargs["steps"] * kwargs["batch_size"], 0.0)

    monkeypatch.setattr(centralized, "train_local", record)
    config = ("client-optimizer='sgd' client-momentum=0.5 num-server-rounds=1 local-steps=1 "
              "batch-size=2 server-eval-examples=4 sample-steps=1 grid-samples=1")  # fmt: skip
    assert main(["--run-config", config, "--out", str(tmp_path / "c")]) == 0
    cfg = RunConfig.from_mapping({"client-optimizer": "sgd", "client-momentum": 0.5})
    assert {k: seen[k] for k in cfg.optimizer_options} == {**cfg.optimizer_options, "batch_size": 2}
