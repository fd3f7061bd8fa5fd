"""Micro-benchmarks for feddm_flower, one argparse subcommand each.

``python -m feddm_flower.bench codecs`` measures the quantized-update codec on the real U-Net
presets and prints JSON on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from feddm_flower.codecs import decode_update, encode_update, fp32_bytes
from feddm_flower.models import build_unet

MODELS: tuple[tuple[str, int, int], ...] = (("tiny", 28, 1), ("paper", 28, 1), ("paper", 32, 3))
BITS = (8, 4)
BLOCK_SIZES = (64, 256, 1024, 4096)
_QMAX = {8: 127, 4: 7}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Seconds one call takes, and its result."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def _copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The baseline: a plain copy of the same tensors."""
    return {k: v.clone() for k, v in tensors.items()}


def model_update(
    preset: str, image_size: int, channels: int, source: str
) -> dict[str, torch.Tensor]:
    """A realistic update for a preset: seed-1 weights minus seed-0 weights, or N(0, 1e-3^2)."""
    base = build_unet(preset, image_size, channels, seed=0).state_dict()
    if source == "normal":
        gen = torch.Generator().manual_seed(0)
        return {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in base.items()}
    other = build_unet(preset, image_size, channels, seed=1).state_dict()
    return {k: other[k] - v for k, v in base.items()}


def error_stats(
    update: dict[str, torch.Tensor], decoded: dict[str, torch.Tensor], bits: int, block_size: int
) -> dict[str, float]:
    """Max abs error, max error in quantization steps (<= 0.5 expected) and relative L2 error.

    Block scales are recomputed here from the format's definition, independently of the codec.
    """
    max_abs = max_steps = 0.0
    err_sq = ref_sq = 0.0
    for name, x in update.items():
        if not x.is_floating_point() or x.numel() == 0:
            continue
        x = x.float().reshape(-1)
        err = (decoded[name].reshape(-1) - x).abs()
        pad = -x.numel() % block_size
        scales = (
            torch.nn.functional.pad(x.abs(), (0, pad)).view(-1, block_size).amax(1) / _QMAX[bits]
        )
        steps = torch.nn.functional.pad(err, (0, pad)).view(-1, block_size) / scales[:, None]
        max_abs = max(max_abs, err.max().item())
        max_steps = max(max_steps, steps.nan_to_num(nan=0.0).max().item())
        err_sq += err.square().sum().item()
        ref_sq += x.square().sum().item()
    return {
        "max_abs_error": max_abs,
        "max_error_in_steps": max_steps,
        "rel_l2_error": (err_sq / ref_sq) ** 0.5 if ref_sq else 0.0,
    }


def bench_codec(
    update: dict[str, torch.Tensor], bits: int, block_size: int, repeats: int
) -> dict[str, Any]:
    """Size, speed and error of one codec setting.

    Copy, encode and decode are timed round-robin so that background load hits all three
    alike; each figure is a median over ``repeats``.
    """
    copy_s, encode_s, decode_s = [], [], []
    for _ in range(repeats):
        t, _ = _timed(_copy, update)
        copy_s.append(t)
        t, payload = _timed(encode_update, update, bits=bits, block_size=block_size)
        encode_s.append(t)
        t, decoded = _timed(decode_update, payload)
        decode_s.append(t)
    t_copy, t_enc, t_dec = (statistics.median(s) for s in (copy_s, encode_s, decode_s))
    return {
        "bits": bits,
        "block_size": block_size,
        "payload_bytes": len(payload),
        "ratio": fp32_bytes(update) / len(payload),
        "copy_s": t_copy,
        "encode_s": t_enc,
        "decode_s": t_dec,
        "encode_vs_copy": t_enc / t_copy,
        "decode_vs_copy": t_dec / t_copy,
        **error_stats(update, decoded, bits, block_size),
    }


def run_codecs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``codecs`` subcommand: every model x bits x block size."""
    results = []
    for preset, image_size, channels in MODELS:
        if args.models and preset + str(image_size) not in args.models:
            continue
        update = model_update(preset, image_size, channels, args.source)
        model = {
            "preset": preset,
            "image_size": image_size,
            "channels": channels,
            "tensors": len(update),
            "elements": sum(v.numel() for v in update.values()),
            "fp32_bytes": fp32_bytes(update),
            "runs": [],
        }
        for bits in BITS:
            for block_size in BLOCK_SIZES:
                _log(f"codecs: {preset} {image_size}px bits={bits} block_size={block_size}")
                model["runs"].append(bench_codec(update, bits, block_size, args.repeats))
        results.append(model)
    return {
        "benchmark": "codecs",
        "source": args.source,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "models": results,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m feddm_flower.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    codecs = commands.add_parser("codecs", help="quantized-update codec: size, speed, error")
    codecs.add_argument("--repeats", type=int, default=5, help="timed repeats per setting")
    codecs.add_argument(
        "--source",
        choices=("diff", "normal"),
        default="diff",
        help="update = difference of two seeds' weights, or N(0, 1e-3^2) noise",
    )
    codecs.add_argument(
        "--models",
        nargs="*",
        help="subset such as tiny28 paper28 paper32 (default: all)",
    )
    codecs.set_defaults(run=run_codecs)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print(json.dumps(args.run(args), indent=2))


if __name__ == "__main__":
    main()
