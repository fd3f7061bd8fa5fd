"""The GPU paper-scale script (scripts/gpu_paper.sh) end to end on the CPU at `tiny` size, and
the kit that carries it (feddm_flower.tools.gpu_kit): its size check, its package list, its report
and the FID step on what comes back.

The end-to-end test starts a real SuperLink and SuperNodes on loopback, on free ports, and uses
this environment instead of installing the kit (SKIP_INSTALL=1): building the kit downloads
wheels, which a test must not need.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch

from feddm_flower.app.launch import free_port
from feddm_flower.tools import gpu_kit

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# --- the size check, without downloading anything ----------------------------------------


def test_check_size_passes_under_the_limit_and_fails_above(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)
    (kit / "wheels" / "a.whl").write_bytes(b"x" * 3000)
    (kit / "data.gz").write_bytes(b"y" * 1000)
    assert gpu_kit.tree_size(kit) == 4000
    line = gpu_kit.check_size(4000, 500, limit=4500)
    assert line.startswith("kit 0.0 MiB + repository 0.0 MiB")
    with pytest.raises(SystemExit, match="too large to carry"):
        gpu_kit.check_size(4000, 501, limit=4500)
    assert gpu_kit.CARRY_LIMIT == 64 * 2**20


def test_repository_size_counts_what_git_would_hand_over(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("kit/\n")  # 5 bytes
    (tmp_path / "tracked.py").write_bytes(b"a" * 100)
    (tmp_path / "new.py").write_bytes(b"b" * 10)  # untracked, not ignored: travels
    (tmp_path / "kit").mkdir()
    (tmp_path / "kit" / "big.whl").write_bytes(b"c" * 10_000)  # ignored: carried separately
    subprocess.run(["git", "-C", str(tmp_path), "add", "tracked.py", ".gitignore"], check=True)
    assert gpu_kit.repository_size(tmp_path) == 115


def test_the_kit_carries_flower_and_diffusers_but_not_torch() -> None:
    packages = gpu_kit.carried_packages()
    for name in ("flwr", "diffusers", "flwr-datasets", "datasets", "torch-fidelity", "zstandard"):
        assert packages[name] == version(name)
    assert {"fastapi", "uvicorn", "sqlalchemy", "cryptography", "pydantic-core"} <= set(packages)
    assert not {"torch", "torchvision", "triton", "numpy", "uv", "ray"} & set(packages)
    assert not [p for p in packages if p.startswith(("nvidia-", "cuda-"))]


# --- report and FID on fake results ----------------------------------------------------------


def test_client_speeds_read_train_locals_last_line_per_call(tmp_path: Path) -> None:
    log = tmp_path / "supernode-0.log"
    prefix = "INFO feddm_flower.task.diffusion: client 0 round"
    log.write_text(
        f"{prefix} 1: epoch 1, step 50/100, loss 0.5, 900 img/s\n"
        f"{prefix} 1: epoch 1, step 100/100, loss 0.4, 1000 img/s\n"
        f"{prefix} 2: epoch 2, step 100/100, loss nan, 3000 img/s\n"
        f"{prefix} 3: epoch 2, step 100/100, loss 0.1, 2000 img/s\n"
    )
    (tmp_path / "supernode-1.log").write_text(
        "client 1 round 1: epoch 1, step 7/7, loss 0.4, 12 img/s\n"
    )
    speeds = gpu_kit.client_speeds(sorted(tmp_path.glob("supernode-*.log")))
    assert speeds == {
        "0": {"img-per-s-by-round": [1000.0, 3000.0, 2000.0], "img-per-s-median": 2000.0},
        "1": {"img-per-s-by-round": [12.0], "img-per-s-median": 12.0},
    }


# --- the script, end to end on the CPU --------------------------------------------------------


@pytest.mark.deployment
@pytest.mark.skipif(
    not all((BIN / t).exists() for t in ("flwr", "flower-superlink", "flower-supernode")),
    reason="Flower's deployment CLIs are not installed in this environment",
)
def test_gpu_script_runs_end_to_end_on_cpu_at_tiny_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kit, out = tmp_path / "kit", tmp_path / "out"
    out.mkdir()
    if DEBIAN_FASHION_MNIST.is_dir():  # the kit's data, as pack lays it out
        (kit / "data").mkdir(parents=True)
        for name in gpu_kit.FASHION_FILES:
            (kit / "data" / name).symlink_to(DEBIAN_FASHION_MNIST / name)
    samples = 8
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "SKIP_INSTALL": "1",
        "KIT": str(kit),
        "OUT": str(out),
        "WORK": str(tmp_path / "work"),
        "DATA_ROOT": str(tmp_path / "data"),
        "CELLS": "vanilla int8",  # prox differs from vanilla only in the clients' loss
        "NUM_NODES": "2",
        "ROUNDS": "1",
        "STEPS": "2",
        "BATCH": "16",
        "PRESET": "tiny",
        "DEVICE": "cpu",
        "MIXED_PRECISION": "no",
        "CHANNELS_LAST": "false",
        "EXTRA_RUN_CONFIG": "eval-max-examples=16 server-eval-examples=50 sample-steps=3 "
        "grid-samples=4",
        "SAMPLES": str(samples),
        "SAMPLE_STEPS": "2",
        "SAMPLE_BATCH": "8",
        "BENCH_PRESET": "tiny",
        "BENCH_SIZE": "28",
        "BENCH_CHANNELS": "1",
        "BENCH_BATCH": "8",
        "BENCH_STEPS": "2",
        "BENCH_WARMUP": "1",
        "BENCH_COMPILE": "0",
        "BUDGET": "1500",
        "PORT": str(free_port()),
        "NODE_PORT": str(free_port()),
    }
    proc = subprocess.run(
        [str(REPO / "scripts" / "gpu_paper.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu-paper.tar.gz",
        "gpu_paper.log",
        "summary.json",
    ]
    assert "training img/s per client" in log and "FashionMNIST unpacked" in log

    summary = json.loads((out / "summary.json").read_text())
    bench = summary["bench"]
    assert bench["runs"]["eager"]["img_per_s"] > 0 and bench["runs"]["plain"]["img_per_s"] > 0
    assert bench["parameters"] == 267313  # tiny 28 px
    cells = {c["cell"]: c for c in summary["cells"]}
    assert sorted(cells) == ["int8", "vanilla"]
    for cell in cells.values():
        assert cell["finished"] and cell["round"] == 1 and cell["samples"]
        assert sorted(cell["clients"]) == ["0", "1"]
        # A whole number of img/s: a tiny CPU run under load may round to 0.
        assert all(c["img-per-s-median"] >= 0 for c in cell["clients"].values())
        # Where each round went: the overhead share, and each node's worker took the message.
        [share] = cell["overhead-share-by-round"]
        assert 0 <= share < 1
        [phases] = cell["client-phases-by-round"]
        assert phases["train-time-handoff"] >= 0 and phases["train-time-train"] > 0
    assert cells["int8"]["bytes-up-cumulative"] < cells["vanilla"]["bytes-up-cumulative"] / 3

    with tarfile.open(out / "gpu-paper.tar.gz") as tar:
        names = tar.getnames()
        npz = tar.extractfile("cells/int8/samples.npz")
        with np.load(npz) as f:
            images = f["images"]
    assert images.dtype == np.uint8 and images.shape == (samples, 1, 28, 28)
    assert "cells/vanilla/run/metrics.jsonl" in names and "cells/vanilla/flwr.log" in names
    assert not [n for n in names if "/checkpoint" in n or "/pipeline" in n]  # no weights

    # The CPU step on what came back; fid_kid itself (Inception) is tested in test_fid.py.
    seen = []

    def fake_fid_kid(fake, real, **kwargs):
        seen.append((fake.shape, real.shape, float(fake.min()), float(fake.max())))
        return {"fid": 123.4, "kid": 0.1, "kid-std": 0.01, "num-fake": len(fake),
                "num-real": len(real)}  # fmt: skip

    monkeypatch.setattr("feddm_flower.evaluation.fid.fid_kid", fake_fid_kid)
    gpu_kit.main(["fid", str(out / "gpu-paper.tar.gz"), "--real", "8", "--data-root",
                  str(tmp_path / "data")])  # fmt: skip
    assert [s[:2] for s in seen] == [
        (torch.Size([samples, 1, 28, 28]), torch.Size([8, 1, 28, 28]))
    ] * 2
    assert all(0 <= lo <= hi <= 1 for *_, lo, hi in seen)
    table = (out / "fid.md").read_text().splitlines()
    assert table[0].startswith("| cell | rounds | FID | KID")
    assert table[2].startswith("| int8 | 1 | 123.40 | 0.1000 ± 0.0100 | 8 / 8 |")
    assert "bench eager:" in (out / "fid.md").read_text()
    assert "outside training" in table[0]
    rows = json.loads((out / "fid.json").read_text())
    assert [r["cell"] for r in rows] == ["int8", "vanilla"] and rows[0]["rounds"] == 1
