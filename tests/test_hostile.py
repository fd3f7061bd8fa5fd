"""Real `flwr run`s with colluding hostile nodes: the run finishes and the model holds (and in
this process, what the same colluders do with every defence off).

Seven nodes, two rounds; the attackers are :mod:`feddm_flower.fed.attacks`' (test app:
tests/apps/hostile_app.py). Targets (issue 19): the final global-loss within 10% of the
all-honest run's, the final model within 2x the honest training distance of the all-honest one.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_RUN
from diffusers import UNet2DModel

from feddm_flower.app.hostile import run_in_process
from feddm_flower.fed.group_testing import max_tests
from feddm_flower.task.models import build_unet

NODES = 7
RUN = {**TINY_RUN, "num-server-rounds": 2, "local-steps": 3, "fraction-evaluate": 0.0}
OFF = {"norm-bound": 0.0, "weight-bound": 0.0, "max-loss-ratio": 0.0}


def _app(root: Path, attack: str, hostile: int) -> Path:
    """This app with tests/apps/hostile_app.py as its ClientApp, running ``attack`` on the
    nodes with partition-id < ``hostile``."""
    app = root / f"{attack}-{hostile}"
    app.mkdir()
    text = (REPO / "pyproject.toml").read_text()
    component = 'clientapp = "feddm_flower.app.client_app:app"'
    assert component in text
    (app / "pyproject.toml").write_text(text.replace(component, 'clientapp = "hostile_app:app"'))
    shutil.copy(REPO / "tests" / "apps" / "hostile_app.py", app)
    (app / "attack_config.py").write_text(f"ATTACK = {attack!r}\nHOSTILE = {hostile}\n")
    return app


def _run(flwr_run, out: Path, app: Path = REPO, **overrides: object) -> dict[str, object]:
    """Final weights, global-loss and metrics rows of a run, after checking it finished."""
    proc = flwr_run({**RUN, **overrides, "output-dir": str(out)}, num_supernodes=NODES, app_dir=app)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(len(r["sampled-train"]) == NODES and "missing" not in r for r in rows)
    weights = UNet2DModel.from_pretrained(out / "pipeline" / "unet").state_dict()
    return {"weights": weights, "loss": rows[-1]["global-loss"], "rows": rows}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


@pytest.fixture(scope="module")
def honest(flwr_run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    run = _run(flwr_run, tmp_path_factory.mktemp("honest"))
    # An honest round: the last check measures one model, the new global one, and probes
    # each reply's model (and the current one) on a twentieth of its images.
    assert [r["server-evaluations"] for r in run["rows"]] == [1, 1]
    assert [r["server-probes"] for r in run["rows"]] == [NODES + 1, NODES + 1]
    init = build_unet("tiny", 28, 1, seed=0).state_dict()
    run["moved"] = _distance(run["weights"], init)
    return run


@pytest.mark.parametrize(
    ("attack", "hostile", "keys"),
    [
        # K < N/3 under the default keys: they skip training and answer first, claiming 1e9.
        ("fast-colluders", 2, {}),
        # K < N/2 under the median, answering after everyone, through the int8 uplink.
        ("slow-colluders", 3, {"aggregation": "median", "uplink": "int8"}),
    ],
)
def test_colluders_below_the_limit_leave_the_model_as_good_as_the_honest_runs(
    flwr_run, honest, tmp_path: Path, attack: str, hostile: int, keys: dict
) -> None:
    run = _run(flwr_run, tmp_path / "run", _app(tmp_path, attack, hostile), **keys)
    assert run["loss"] == pytest.approx(honest["loss"], rel=0.10)
    gap = _distance(run["weights"], honest["weights"])
    assert gap < 2 * honest["moved"], (gap, honest["moved"])
    # Each colluder's own model is far worse than the current one: the probe rejects it with
    # that reason as it arrives, the rest make the round, and the server measured the new
    # model once (a search would stay within its bound).
    for row in run["rows"]:
        reasons = [r["reason"] for r in row["rejected"]]
        assert len(reasons) == hostile and all("its model's probe-loss" in r for r in reasons)
        assert "aggregate-rejected" not in row and row["replies-accepted"] == NODES - hostile
        assert 1 <= row["server-evaluations"] <= 2 + max_tests(NODES, hostile), row
        assert row["server-probes"] == NODES + 1


def test_with_every_defence_off_the_same_colluders_wreck_the_model() -> None:
    """What the defences prevent: without bounds and last check, two fast colluders of seven
    make the global model non-finite or throw it far away (so the test above can fail). The
    same attack and strategy, on real nodes in this process (the attack table's federation)."""
    run = run_in_process({**RUN, **OFF}, NODES, "fast-colluders", 2)
    assert not math.isfinite(run.loss) or _distance(run.final, run.initial) > 1e3
