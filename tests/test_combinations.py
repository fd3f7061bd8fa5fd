"""Every pair of values of the six axes (five of the strategy, and what trains) in one round:
all 25 covering runs through the real strategy and real nodes in this process, and 5 of them
that hold every value of the strategy axes, two as presets, as real `flwr run`s (Flower's
transport, the ServerApp's report, checkpoint and pipeline; LoRA's real runs are
test_finetune's)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN
from diffusers import DDPMPipeline, UNet2DModel

from feddm_flower.app.hostile import run_in_process
from feddm_flower.config import AGGREGATIONS, SERVER_OPTIMIZERS, UPLINKS, RunConfig
from feddm_flower.task.models import build_unet

OPTIMIZERS = SERVER_OPTIMIZERS
DOWNLINKS = UPLINKS
MUS = (0.0, 0.01)
# What trains: all weights, or LoRA adapters (rank 8) with either variant.
TRAINABLES = ("all", "lora-ffa", "lora-ab")
AXES = {"proximal-mu": MUS, "uplink": UPLINKS, "downlink": DOWNLINKS,
        "server-optimizer": OPTIMIZERS, "aggregation": AGGREGATIONS,
        "trainable": TRAINABLES}  # fmt: skip
# The fold of the fifth Latin square onto TRAINABLES: surjective, so every pair stays covered,
# and "all" where the real runs fall (index 4).
TRAINABLE_FOLD = ("lora-ffa", "lora-ab", "all", "lora-ffa", "all")


def covering_set() -> list[dict[str, object]]:
    """25 runs (uplink x downlink, the largest pair) that cover every pair of values: with
    i the uplink and j the downlink, the optimizer is (i + j) mod 5, the aggregation
    (i + 2j) mod 5, proximal-mu (i + 3j) mod 5 and what trains (i + 4j) mod 5, folded onto
    their fewer values. These are mutually orthogonal Latin squares (5 is prime), so any two
    columns meet every pair."""
    runs = []
    for i, j in itertools.product(range(5), range(5)):
        runs.append(
            {
                "proximal-mu": MUS[(i + 3 * j) % 5 % 2],
                "uplink": UPLINKS[i],
                "downlink": DOWNLINKS[j],
                "server-optimizer": OPTIMIZERS[(i + j) % 5],
                "aggregation": AGGREGATIONS[(i + 2 * j) % 5 % 4],
                "trainable": TRAINABLE_FOLD[(i + 4 * j) % 5],
            }
        )
    return runs


def test_the_runs_cover_every_pair_of_values() -> None:
    runs = covering_set()
    for a, b in itertools.combinations(AXES, 2):
        for pair in itertools.product(AXES[a], AXES[b]):
            assert any((r[a], r[b]) == pair for r in runs), (a, b, pair)


CHEAP = {**TINY_RUN, "num-server-rounds": 1, "local-steps": 1, "batch-size": 8,
         "eval-max-examples": 4, "sample-steps": 1, "grid-samples": 1}  # fmt: skip


# The presets, on the real runs whose values they stand for.
PRESETS = {"fp32": {"strategy": "prox"}, "int4": {"strategy": "quant", "error-feedback": True}}


def real_runs() -> list[dict[str, object]]:
    """The covering runs whose downlink is the value after their uplink (a permutation that
    holds every value of every axis), the fp32-uplink one as the prox preset and the int4 one
    as the quant preset."""
    runs = []
    for r in covering_set():
        if UPLINKS.index(r["downlink"]) == (UPLINKS.index(r["uplink"]) + 1) % 5:
            runs.append({**run_config(r), **PRESETS.get(str(r["uplink"]), {})})
    return runs


def run_config(combination: dict[str, object]) -> dict[str, object]:
    """The run-config keys of a covering combination (its ``trainable`` axis spelled out)."""
    trainable, _, variant = str(combination["trainable"]).partition("-")
    lora = {"lora-variant": variant} if variant else {}
    return {**combination, "trainable": trainable, **lora}


def test_the_real_runs_hold_every_value_and_the_presets() -> None:
    runs = real_runs()
    for axis, values in AXES.items():
        if axis != "trainable":
            assert {r[axis] for r in runs} == set(values), axis
    assert {r["trainable"] for r in runs} == {"all"}
    for run in runs:  # a preset's values are the ones it stands for
        assert RunConfig.from_mapping({**run, "strategy": "custom"}) == dataclasses.replace(
            RunConfig.from_mapping(run), strategy="custom"
        )
    assert {r.get("strategy") for r in runs} == {None, "prox", "quant"}


def check_round(row: dict[str, object], combination: dict[str, object]) -> None:
    """One round's metrics line (or the strategy's history and ledger of it): nothing rejected
    or missing, losses reported, and the bytes each direction's codec should send."""
    assert "rejected" not in row and "missing" not in row and "aggregate-rejected" not in row
    assert row["train-loss"] > 0 and row["eval-loss"] > 0
    # Sparse (5% of each tensor, int4): half a byte a value and at most about 1.3 for its
    # position, less where zstd finds structure in the positions (it varies with the update).
    # LoRA's many small tensors: FedAvg's per-tensor overhead weighs more (up to 15%), and
    # sparse sends at least a value per tensor.
    lora = str(combination.get("trainable", "all")) != "all"
    sparse = (20, 220) if lora else (55, 110)
    ratios = {"fp32": 1.0, "fp16": 2.0, "int8": 4.0, "int4": 7.9}
    up, down = combination["uplink"], combination["downlink"]
    if up == "sparse":
        assert sparse[0] < row["compression-up"] < sparse[1]
    else:
        assert_ratio(row["compression-up"], ratios[up], lora)
    # Down, against FedAvg's two fp32 models: the seeded start is not sent (except under
    # fp16, which sends its rounding: none of LoRA's zero B), then one model or change per node.
    ratios = {"fp32": 2.0, "fp16": 2.0, "int8": 7.9, "int4": 15.3}
    if down == "sparse":
        assert 2 * sparse[0] < row["compression-down"] < 2 * sparse[1]
    elif down == "fp16" and lora:
        assert 2.0 * 0.95 < row["compression-down"] < 4.0 * 1.15
    else:
        assert_ratio(row["compression-down"], ratios[down], lora)


def assert_ratio(measured: float, expected: float, lora: bool) -> None:
    if lora:
        assert expected * 0.95 < measured < expected * 1.15
    else:
        assert measured == pytest.approx(expected, rel=0.05)


def moved(init: dict[str, torch.Tensor], final: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(init[k], final[k]) for k in init)


@pytest.mark.parametrize(
    "combination", covering_set(), ids=lambda c: "-".join(map(str, c.values()))
)
def test_each_combination_runs_one_round(combination) -> None:
    run = run_in_process({**CHEAP, **run_config(combination)}, nodes=3)
    check_round({**run.strategy.history[1], **run.strategy.book.ledger.round_summary(1)},
                combination)  # fmt: skip
    assert moved(run.initial, run.final)


@pytest.mark.parametrize("combination", real_runs(), ids=lambda c: "-".join(map(str, c.values())))
def test_each_value_runs_one_real_round(flwr_run, tmp_path: Path, combination) -> None:
    """Also: the ServerApp names the combination (a preset by its name) and writes a
    checkpoint and a pipeline that diffusers loads."""
    out = tmp_path / "run"
    proc = flwr_run({**CHEAP, **combination, "output-dir": str(out)}, num_supernodes=3)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    check_round(row, combination)
    expected = combination.get("strategy") or RunConfig.from_mapping(combination).label
    assert row["strategy"] == expected
    config = json.loads((out / "run_config.json").read_text())
    assert {k: config[k] for k in combination} == combination
    init = build_unet("tiny", 28, 1, seed=0).state_dict()
    assert moved(init, UNet2DModel.from_pretrained(out / "checkpoint").state_dict())
    assert DDPMPipeline.from_pretrained(out / "pipeline").unet.config.sample_size == 28
