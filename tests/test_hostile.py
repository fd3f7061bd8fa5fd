"""Real `flwr run`s with one hostile node of four: the run finishes and the model holds."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_RUN
from diffusers import UNet2DModel

from feddm_flower.models import build_unet

RUN = {**TINY_RUN, "num-server-rounds": 2, "local-steps": 3}


@pytest.fixture(scope="module")
def hostile_app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This app with tests/apps/hostile_app.py as its ClientApp (node 0 hostile)."""
    app = tmp_path_factory.mktemp("hostile-app")
    text = (REPO / "pyproject.toml").read_text()
    component = 'clientapp = "feddm_flower.client_app:app"'
    assert component in text
    (app / "pyproject.toml").write_text(text.replace(component, 'clientapp = "hostile_app:app"'))
    shutil.copy(REPO / "tests" / "apps" / "hostile_app.py", app)
    return app


def _run(
    flwr_run, out: Path, app: Path = REPO, **overrides: object
) -> tuple[dict[str, torch.Tensor], float]:
    """The final weights and eval-loss of a 4-node run, after checking every round finished."""
    proc = flwr_run({**RUN, **overrides, "output-dir": str(out)}, num_supernodes=4, app_dir=app)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(len(r["sampled-train"]) == 4 and "missing" not in r for r in rows)
    weights = UNet2DModel.from_pretrained(out / "pipeline" / "unet").state_dict()
    return weights, rows[-1].get("eval-loss", math.nan)  # none when every reply was refused


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


@pytest.mark.parametrize("uplink", ["fp32", "int8"])
def test_one_hostile_node_of_four_moves_the_model_no_more_than_an_honest_one(
    flwr_run, hostile_app: Path, tmp_path: Path, uplink: str
) -> None:
    """Node 0 sends its update x 1e6 claiming 1e9 x its examples, every round. The bounds
    keep it to the weight of two median clients and the norm of the median update: the
    model ends as good as the honest run's, and nearer to it than training moved it."""
    init = build_unet("tiny", 28, 1, seed=0).state_dict()
    honest, honest_loss = _run(flwr_run, tmp_path / "honest", uplink=uplink)
    hostile, hostile_loss = _run(flwr_run, tmp_path / "hostile", hostile_app, uplink=uplink)
    assert hostile_loss == pytest.approx(honest_loss, rel=0.05)
    moved, gap = _distance(honest, init), _distance(hostile, honest)
    assert gap < 0.75 * moved, (gap, moved)


def test_without_the_bounds_the_same_node_wrecks_the_model(
    flwr_run, hostile_app: Path, tmp_path: Path
) -> None:
    """What the bounds prevent: switched off, the hostile node's update dominates."""
    init = build_unet("tiny", 28, 1, seed=0).state_dict()
    off = {"norm-bound": 0.0, "weight-bound": 0.0}
    wrecked, _ = _run(flwr_run, tmp_path / "unbounded", hostile_app, **off)
    assert _distance(wrecked, init) > 1e3
