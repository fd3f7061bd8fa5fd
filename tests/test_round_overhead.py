"""``bench round-overhead``, short: one real federation per engine, the same run-config.

The deployment one is a real ``flower-superlink`` and two ``flower-supernode`` processes (each
with its node worker) on loopback, the simulation one Flower's simulation engine. The overhead
figures themselves are a benchmark (docs/benchmarks.md), not asserted here; what is
asserted is that every round reports them and where the time went, and that both engines
train the same model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN

from feddm_flower.app.launch import run_config_text
from feddm_flower.tools.round_overhead import markdown

BIN = Path(sys.executable).parent


@pytest.mark.deployment
@pytest.mark.skipif(
    not all((BIN / t).exists() for t in ("flwr", "flower-superlink", "flower-supernode")),
    reason="Flower's deployment CLIs are not installed in this environment",
)
def test_round_overhead_on_both_engines(tmp_path: Path) -> None:
    # The sparse codec both ways: its keys on both engines, too.
    run_config = {**TINY_RUN, "uplink": "sparse", "downlink": "sparse"}
    config = run_config_text(run_config)
    cmd = [
        sys.executable,
        "-m",
        "feddm_flower.tools.bench",
        "round-overhead",
        "--engine",
        "deployment",
        "--engine",
        "simulation",
        "--out",
        str(tmp_path),
        "--run-config",
        config,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    engines = report["engines"]
    assert sorted(engines) == ["deployment", "simulation"]
    losses = {}
    for engine, result in engines.items():
        rows = result["rounds"]
        assert [r["round"] for r in rows] == [1, 2]
        for r in rows:
            assert 0 <= r["overhead_share"] < 1
            assert r["train_seconds"] < r["round_seconds"]
            for phase in ("startup", "data", "model", "train", "encode", "total"):
                assert r[f"train_{phase}"] >= 0
            assert r["train_total"] >= r["train_train"]
            assert r["train_eval"] > 0  # the train message measured the model it received
        # Only the deployment's nodes hand their messages to a worker.
        assert ("train_handoff" in rows[-1]) == (engine == "deployment")
        metrics = (Path(result["output_dir"]) / "metrics.jsonl").read_text().splitlines()
        losses[engine] = [
            [json.loads(line)[k] for k in ("train-loss", "bytes-up", "bytes-down")]
            for line in metrics
        ]
    # The same seeded training and the same bytes down, anywhere; up differs only by the
    # metrics' few bytes (the deployment's nodes also report their hand-off time).
    for (loss, up, down), (loss2, up2, down2) in zip(
        losses["deployment"], losses["simulation"], strict=True
    ):
        assert (loss, down) == (loss2, down2) and abs(up - up2) < 0.01 * up2
        assert up < 40_000 and down < 2 * 40_000  # round 2: its change and the final one
    assert report["deployment_vs_simulation"] > 0
    assert isinstance(report["deployment_overhead_ok"], bool)
    table = markdown(report)
    assert "### deployment" in table and "### simulation" in table
    assert "deployment round / simulation round" in table
