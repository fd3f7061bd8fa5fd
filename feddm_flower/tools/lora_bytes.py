"""``python -m feddm_flower.tools.bench lora-bytes``: a round's bytes under LoRA against FedAvg.

Bytes are exact, so no federation is needed: the U-Net of ``--preset`` at ``--size`` px takes
one local step (random images) with LoRA adapters (run-config ``lora-*`` defaults unless
given), and the messages of one round per node are built with the app's own functions:

- LoRA: the train message (a node that holds the model gets the config alone), the evaluate
  message with the coded change of the adapters, and the train reply with the coded update;
- FedAvg full fine-tuning as Flower ships it: the fp32 model down in train and evaluate, and
  up once (``records.fedavg_record_bytes``).

The base model, sent once to a node that lacks it, is on its own line, and so are the totals
over ``--rounds`` rounds with and without it. Metrics records (under 200 B a message, on both
sides) are left out.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from feddm_flower.app.dispatch import Architecture
from feddm_flower.app.records import (
    downlink_content,
    encode_uplink,
    fedavg_record_bytes,
    message_bytes,
    to_record,
)
from feddm_flower.config import RunConfig
from feddm_flower.fed.changes import ChangeCodec
from feddm_flower.fed.downlink import Delivery, ModelChain, digest
from feddm_flower.protocol import PROXIMAL_MU, SERVER_ROUND, UPLINK
from feddm_flower.task.diffusion import train_local
from feddm_flower.task.finetune import add_lora, base_state, frozen_state, trainable_state
from feddm_flower.task.models import build_scheduler, build_unet


def measure(preset: str, size: int, channels: int, run_config: dict[str, Any]) -> dict[str, Any]:
    """One LoRA setting's bytes per node: a round, the base, and FedAvg's round."""
    cfg = RunConfig.from_mapping({"trainable": "lora", **run_config})
    unet = build_unet(preset, size, channels, seed=cfg.seed)
    fedavg_round = 3 * fedavg_record_bytes(unet.state_dict())
    add_lora(unet, cfg)
    received = {k: v.clone() for k, v in trainable_state(unet).items()}
    images = torch.randint(0, 256, (8, channels, size, size), dtype=torch.uint8)
    start = time.perf_counter()
    train_local(unet, build_scheduler(), images, batch_size=8, lr=1e-3, steps=1)
    seconds = time.perf_counter() - start
    local = trainable_state(unet)
    codec = {"quant-block-size": cfg.quant_block_size, "lossless": cfg.lossless}
    chain = ModelChain.from_config(cfg.downlink, codec)
    chain.start(received, nodes_have_it=True)
    held = chain.digest
    chain.update(local)  # the server's new model: here one client's
    arch = Architecture(
        base_digest=digest(base_state(unet)), frozen_digest=digest(frozen_state(unet))
    )
    config = {SERVER_ROUND: 2, PROXIMAL_MU: 0.0, UPLINK: cfg.uplink, **arch.fields()}
    train_down = message_bytes(downlink_content(Delivery("current", held), held, config))
    delivery = chain.plan(held)  # fp32/fp16: the whole adapter
    dtype = "fp16" if cfg.downlink == "fp16" else "fp32"
    full = to_record(chain.ref, dtype) if delivery.kind == "full" else None
    eval_down = message_bytes(downlink_content(delivery, chain.digest, config, full))
    uplink = (
        ChangeCodec.from_config(cfg.uplink, codec) if cfg.uplink not in ("fp32", "fp16") else None
    )
    record, _ = encode_uplink(local, received, cfg.uplink, codec=uplink)
    lora_round = train_down + eval_down + record.count_bytes()
    base = to_record(base_state(unet)).count_bytes()
    adapter = sum(v.numel() for v in received.values())
    return {
        "run-config": run_config,
        "parameters": sum(v.numel() for v in base_state(unet).values()),
        "trained": adapter,
        "step-seconds": round(seconds, 2),
        "round-bytes": {"down": train_down + eval_down, "up": record.count_bytes()},
        "lora-round": lora_round,
        "fedavg-round": fedavg_round,
        "ratio-per-round": round(fedavg_round / lora_round, 1),
        "base-once": base,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every ``--setting`` (run-config text ``k=v ...``) on ``--preset`` at ``--size`` px."""
    cells = []
    for text in args.setting:
        run_config = {}
        for pair in text.split():
            key, _, value = pair.partition("=")
            kind = RunConfig.key_type(key)
            run_config[key] = kind(value) if kind is not bool else value == "true"
        cell = measure(args.preset, args.size, args.channels, run_config)
        rounds = args.rounds
        cell["total-rounds"] = rounds
        cell["total-lora-held-base"] = rounds * cell["lora-round"]
        cell["total-lora-with-base"] = rounds * cell["lora-round"] + cell["base-once"]
        cell["total-fedavg"] = rounds * cell["fedavg-round"]
        cells.append(cell)
    return {"preset": args.preset, "size": args.size, "channels": args.channels, "cells": cells}


def markdown(report: dict[str, Any]) -> str:
    """One row per setting: bytes per node and round, the ratio, the base and the totals."""
    rows = [
        f"`{report['preset']}` U-Net at {report['size']} px, {report['channels']} channel(s); "
        "bytes per node.",
        "",
        "| setting | trained / all | round (down + up) | FedAvg round | ratio | base, once "
        "| total, base held | total with base | FedAvg total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cells"]:
        setting = " ".join(f"{k}={v}" for k, v in c["run-config"].items()) or "defaults"
        n = c["total-rounds"]
        rows.append(
            f"| `{setting}` | {c['trained'] / c['parameters']:.2%} "
            f"| {c['lora-round']:,} ({c['round-bytes']['down']:,} + {c['round-bytes']['up']:,}) "
            f"| {c['fedavg-round']:,} | **{c['ratio-per-round']}x** | {c['base-once']:,} "
            f"| {c['total-lora-held-base']:,} | {c['total-lora-with-base']:,} "
            f"| {c['total-fedavg']:,} ({n} rounds) |"
        )
    return "\n".join(rows)
