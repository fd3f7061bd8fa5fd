"""``python -m feddm_flower.tools.bench compressibility``: how much of one round's update survives a
compressor sent once, without error feedback.

One client trains the seeded initial U-Net for a round on its partition (the default run's
first round: ``tiny``, FashionMNIST, 200 AdamW steps of batch 64), then the server's
``global-loss`` (500 class-balanced test images) is measured for the initial weights plus the
update passed through each compressor: the dense codec (int8, int4), the sparse codec at
several shares (int4 values), the sign of each value times its block's mean magnitude (1 bit a
value), and a rank-r truncation of each weight (reshaped to output x rest). This is what error
feedback has to make up for in later rounds; when a round moves every weight, as the first
one does, it bounds what any one-shot compressor at that size can keep.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch

State = dict[str, torch.Tensor]
SPARSE_SHARES = (0.05, 0.1, 0.2, 0.3, 0.5)
SIGN_BLOCK = 64
RANKS = (1, 4, 8)


def sign_blocks(x: torch.Tensor, block: int = SIGN_BLOCK) -> torch.Tensor:
    """sign(x) times the mean |x| of its block of ``block`` consecutive values."""
    flat = x.reshape(-1)
    pad = -flat.numel() % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    counts = torch.nn.functional.pad(torch.ones_like(flat), (0, pad)).view(-1, block).sum(1)
    out = torch.sign(blocks) * (blocks.abs().sum(1) / counts).unsqueeze(1)
    return out.reshape(-1)[: flat.numel()].reshape(x.shape)


def low_rank(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, int]:
    """The rank-``rank`` truncation of ``x`` (as output x rest; vectors stay whole) and the
    number of values it takes to send."""
    if x.dim() < 2:
        return x, x.numel()
    matrix = x.reshape(x.shape[0], -1)
    u, s, v = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.numel())
    return ((u[:, :r] * s[:r]) @ v[:r]).reshape(x.shape), r * sum(matrix.shape)


def compressors() -> dict[str, Callable[[State], tuple[State, float]]]:
    """name -> (update -> (what the receiver gets, bytes sent))."""
    from feddm_flower.fed.changes import ChangeCodec, decode_change
    from feddm_flower.fed.codecs import schema_of

    def codec(kind: str, **options: Any) -> Callable[[State], tuple[State, float]]:
        def run(update: State) -> tuple[State, float]:
            payload = ChangeCodec(kind, **options).encode(update)
            expected = schema_of(update)
            return decode_change(payload, expected), len(payload)

        return run

    def sign(update: State) -> tuple[State, float]:
        n = sum(v.numel() for v in update.values())
        return {k: sign_blocks(v) for k, v in update.items()}, n / 8 + 4 * n / SIGN_BLOCK

    def rank(r: int) -> Callable[[State], tuple[State, float]]:
        def run(update: State) -> tuple[State, float]:
            out, sent = {}, 0
            for k, v in update.items():
                out[k], values = low_rank(v, r)
                sent += values
            return out, 4 * sent

        return run

    table: dict[str, Callable[[State], tuple[State, float]]] = {
        "int8": codec("int8"),
        "int4": codec("int4"),
    }
    table |= {f"sparse {s:g} int4": codec("sparse", fraction=s, sparse_bits=4)
              for s in SPARSE_SHARES}  # fmt: skip
    table[f"sign x block mean ({SIGN_BLOCK})"] = sign
    table |= {f"rank {r} (fp32)": rank(r) for r in RANKS}
    return table


def run(args: Any) -> dict[str, Any]:
    """Train one round, then the global-loss of init + C(update) for every compressor."""
    from feddm_flower.config import RunConfig
    from feddm_flower.data.loading import load_client_data
    from feddm_flower.evaluation.quality import global_loss, load_eval_inputs
    from feddm_flower.task.diffusion import train_local
    from feddm_flower.task.models import build_scheduler, build_unet

    cfg = RunConfig.from_mapping(
        {"local-steps": args.steps, "seed": args.seed, "server-eval-examples": args.eval_examples}
    )
    inputs = load_eval_inputs(cfg, None)
    unet = build_unet(cfg.model_preset, 28, 1, seed=cfg.seed)
    start = {k: v.clone() for k, v in unet.state_dict().items()}
    train_set, _ = load_client_data(
        cfg.dataset, cfg.data_root, 0, 2, partitioning=cfg.partitioning,
        alpha=cfg.dirichlet_alpha, shards_per_client=cfg.shards_per_client,
        eval_fraction=cfg.eval_fraction, seed=cfg.seed,
    )  # fmt: skip
    train_local(unet, build_scheduler(), train_set.images, **cfg.optimizer_options,
                steps=cfg.local_steps, seed=cfg.seed, label="compressibility")  # fmt: skip
    update = {k: v.detach() - start[k] for k, v in unet.state_dict().items()}
    fp32 = 4 * sum(v.numel() for v in update.values())

    def loss_with(received: State) -> float:
        unet.load_state_dict({k: start[k] + received[k] for k in start})
        return global_loss(unet, inputs, cfg.seed)

    rows = [{"compressor": "none (init)", "ratio": math.inf, "global_loss": loss_with(
        {k: torch.zeros_like(v) for k, v in update.items()})}]  # fmt: skip
    rows.append({"compressor": "fp32 (the update)", "ratio": 1.0, "global_loss": loss_with(update)})
    for name, compress in compressors().items():
        received, sent = compress(update)
        rows.append({"compressor": name, "ratio": fp32 / sent, "global_loss": loss_with(received)})
        print(f"compressibility: {name}: {rows[-1]['global_loss']:.4f}", file=sys.stderr)
    full = rows[1]["global_loss"]
    for row in rows:
        row["vs_full_update"] = row["global_loss"] / full
    return {"steps": cfg.local_steps, "seed": cfg.seed, "eval_examples": len(inputs),
            "fp32_bytes": fp32, "rows": rows}  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    lines = ["| compressor | fp32 / sent | global loss | vs the full update |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for r in report["rows"]:
        ratio = "–" if math.isinf(r["ratio"]) else f"{r['ratio']:.1f}x"
        lines.append(f"| {r['compressor']} | {ratio} | {r['global_loss']:.4f} "
                     f"| {r['vs_full_update']:.2f}x |")  # fmt: skip
    return "\n".join(lines)
