"""The compute a federation spends, counted in training images: what the centralized
baseline (``python -m feddm_flower.tools.centralized``) gets to train on."""

from __future__ import annotations

import math
from collections.abc import Iterable

from feddm_flower.config import ConfigError, RunConfig


def config_images(cfg: RunConfig, num_supernodes: int) -> int:
    """Images the federation of ``cfg`` trains on: every round, each sampled client takes
    ``local-steps`` optimizer steps of ``batch-size`` images (the strategy samples
    ``fraction-train`` of the nodes, at least ``min-nodes``)."""
    if cfg.local_steps == 0:
        raise ConfigError(
            "local-steps=0 (epochs): steps depend on the partitions; pass --from-run RUN_DIR "
            "to count the steps the run took"
        )
    nodes = min(num_supernodes, max(int(num_supernodes * cfg.fraction_train), cfg.min_nodes))
    return cfg.num_server_rounds * nodes * cfg.local_steps * cfg.batch_size


def run_images(rows: Iterable[dict[str, object]], batch_size: int) -> int:
    """Images a finished run trained the global model on, from its metrics lines: per round,
    its accepted training replies (sampled, less missing and rejected) × their mean
    ``train-steps`` × ``batch-size`` (exact when the clients take equal steps)."""
    total = 0
    for row in rows:
        rejected = [r for r in row.get("rejected", []) if r["phase"] == "train"]
        accepted = len(row.get("sampled-train", [])) - len(row.get("missing", [])) - len(rejected)
        total += round(accepted * row.get("train-steps", 0)) * batch_size
    return total


def central_steps(images: int, batch_size: int) -> int:
    """Optimizer steps of ``batch_size`` that see ``images`` images."""
    return math.ceil(images / batch_size)
