"""Every pair of values of the five strategy axes in at least one real one-round `flwr run`."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN
from diffusers import UNet2DModel

from feddm_flower.models import build_unet

OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
AGGREGATIONS = ("mean", "median", "trimmed-mean", "krum")
UPLINKS = DOWNLINKS = ("fp32", "fp16", "int8", "int4")
MUS = (0.0, 0.01)
# downlink - uplink takes every value over the optimizers, and so does optimizer + offset.
OFFSETS = (0, 2, 1, 3, 1)


def covering_set() -> list[dict[str, object]]:
    """20 runs (optimizer x aggregation, the largest pair) that cover every pair of values:
    uplink, downlink and proximal-mu are cycled so that they meet every value of the others."""
    runs = []
    for i, optimizer in enumerate(OPTIMIZERS):
        for j, aggregation in enumerate(AGGREGATIONS):
            runs.append(
                {
                    "proximal-mu": MUS[(i + j * (j + 1) // 2) % 2],
                    "uplink": UPLINKS[(i + j) % 4],
                    "downlink": DOWNLINKS[(i + j + OFFSETS[i]) % 4],
                    "server-optimizer": optimizer,
                    "aggregation": aggregation,
                }
            )
    return runs


def test_the_runs_cover_every_pair_of_values() -> None:
    axes = {"proximal-mu": MUS, "uplink": UPLINKS, "downlink": DOWNLINKS,
            "server-optimizer": OPTIMIZERS, "aggregation": AGGREGATIONS}  # fmt: skip
    runs = covering_set()
    for a, b in itertools.combinations(axes, 2):
        for pair in itertools.product(axes[a], axes[b]):
            assert any((r[a], r[b]) == pair for r in runs), (a, b, pair)


CHEAP = {**TINY_RUN, "num-server-rounds": 1, "local-steps": 1, "batch-size": 8,
         "eval-max-examples": 4, "sample-steps": 1, "grid-samples": 1}  # fmt: skip


@pytest.mark.parametrize(
    "combination", covering_set(), ids=lambda c: "-".join(map(str, c.values()))
)
def test_each_combination_runs_one_real_round(flwr_run, tmp_path: Path, combination) -> None:
    out = tmp_path / "run"
    proc = flwr_run({**CHEAP, **combination, "output-dir": str(out)}, num_supernodes=3)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "rejected" not in row and "missing" not in row and "aggregate-rejected" not in row
    assert row["train-loss"] > 0 and row["eval-loss"] > 0
    config = json.loads((out / "run_config.json").read_text())
    assert {k: config[k] for k in combination} == combination
    expected_ratio = {"fp32": 1.0, "fp16": 2.0, "int8": 4.0, "int4": 7.9}[combination["uplink"]]
    assert row["compression-up"] == pytest.approx(expected_ratio, rel=0.05)
    # Down, against FedAvg's two fp32 models: the seeded start is not sent (except under
    # fp16, which sends its rounding), then one model or change per node.
    expected_ratio = {"fp32": 2.0, "fp16": 2.0, "int8": 7.9, "int4": 15.3}[combination["downlink"]]
    assert row["compression-down"] == pytest.approx(expected_ratio, rel=0.05)
    init = build_unet("tiny", 28, 1, seed=0).state_dict()
    final = UNet2DModel.from_pretrained(out / "checkpoint").state_dict()
    assert any(not torch.equal(init[k], final[k]) for k in init)  # the round moved the model
