"""Micro-benchmarks for feddm_flower, one argparse subcommand each.

``python -m feddm_flower.bench codecs`` measures the quantized-update codec on the real U-Net
presets and prints JSON on stdout; progress goes to stderr. Add a benchmark by writing a
``run_<name>(args) -> dict`` function and registering a subcommand in ``build_parser``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from feddm_flower.codecs import decode_update, encode_update, fp32_bytes
from feddm_flower.models import build_unet

MODELS: tuple[tuple[str, int, int], ...] = (("tiny", 28, 1), ("paper", 28, 1), ("paper", 32, 3))
BITS = (8, 4)
BLOCK_SIZES = (64, 256, 1024, 4096)
# Targets: size ratio vs fp32 at block sizes >= 256, and codec time vs a plain copy.
MIN_RATIO = {8: 3.9, 4: 7.5}
RATIO_MIN_BLOCK_SIZE = 256
MAX_TIME_VS_COPY = 3.0
_QMAX = {8: 127, 4: 7}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cpu_pressure() -> float | None:
    """Share of the last 10 s that runnable tasks waited for a CPU (Linux PSI), in percent.

    Timings are only comparable when this stays near 0: other processes compete for the cores.
    """
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return float(line.split()[1].removeprefix("avg10="))


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(
    clock: Callable[[], float], fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[float, Any]:
    """Seconds one call takes on ``clock``, and its result."""
    start = clock()
    result = fn(*args, **kwargs)
    return clock() - start, result


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

    Block scales are recomputed here from the format's definition (blocks of the joint stream
    of float values), independently of the codec.
    """
    names = [k for k, v in update.items() if v.is_floating_point()]
    if not names:
        return {"max_abs_error": 0.0, "max_error_in_steps": 0.0, "rel_l2_error": 0.0}
    x = torch.cat([update[k].float().reshape(-1) for k in names])
    err = (torch.cat([decoded[k].reshape(-1) for k in names]) - x).abs()
    pad = -x.numel() % block_size
    blocks = torch.nn.functional.pad(x.abs(), (0, pad)).view(-1, block_size)
    steps = blocks.amax(1, keepdim=True) / _QMAX[bits]
    in_steps = torch.nn.functional.pad(err, (0, pad)).view(-1, block_size) / steps
    # 0/0 in all-zero blocks is no error; an error there shows up as inf.
    ref = x.square().sum().item()
    return {
        "max_abs_error": err.max().item(),
        "max_error_in_steps": in_steps.nan_to_num(nan=0.0).max().item(),
        "rel_l2_error": (err.square().sum().item() / ref) ** 0.5 if ref else 0.0,
    }


def bench_codec(
    update: dict[str, torch.Tensor],
    bits: int,
    block_size: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Size, speed and error of one codec setting.

    After one untimed round (plans and metadata are cached, as in later federated rounds),
    copy, encode and decode are timed round-robin so that background load hits all three
    alike. Times are medians over ``repeats``; the ``*_min`` ratios use the fastest runs,
    which are steadier on a busy machine.
    """
    payload = encode_update(update, bits=bits, block_size=block_size)
    decode_update(payload)
    times: dict[str, list[float]] = {"copy": [], "encode": [], "decode": []}
    for _ in range(repeats):
        times["copy"].append(_timed(clock, _copy, update)[0])
        seconds, payload = _timed(clock, encode_update, update, bits=bits, block_size=block_size)
        times["encode"].append(seconds)
        seconds, decoded = _timed(clock, decode_update, payload)
        times["decode"].append(seconds)
    median = {k: statistics.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}
    ratio = fp32_bytes(update) / len(payload)
    return {
        "bits": bits,
        "block_size": block_size,
        "payload_bytes": len(payload),
        "ratio": ratio,
        "ratio_target": MIN_RATIO[bits] if block_size >= RATIO_MIN_BLOCK_SIZE else None,
        "copy_s": median["copy"],
        "encode_s": median["encode"],
        "decode_s": median["decode"],
        "encode_vs_copy": median["encode"] / median["copy"],
        "decode_vs_copy": median["decode"] / median["copy"],
        "encode_vs_copy_min": fastest["encode"] / fastest["copy"],
        "decode_vs_copy_min": fastest["decode"] / fastest["copy"],
        **error_stats(update, decoded, bits, block_size),
    }


def targets(models: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the runs meet the size and speed targets, with the worst figures: speed over
    all runs, and over the block sizes that the size target applies to (``*_sized``)."""
    runs = [run for model in models for run in model["runs"]]
    sized = [run for run in runs if run["ratio_target"] is not None]
    report: dict[str, Any] = {
        "ratio": all(run["ratio"] >= run["ratio_target"] for run in sized),
        "worst_ratio_margin": min((run["ratio"] / run["ratio_target"] for run in sized), default=0),
    }
    for op in ("encode", "decode"):
        for suffix, subset in (("", runs), ("_sized", sized)):
            worst = max((run[f"{op}_vs_copy"] for run in subset), default=0.0)
            report[f"{op}_speed{suffix}"] = worst <= MAX_TIME_VS_COPY
            report[f"worst_{op}_vs_copy{suffix}"] = worst
    return report


def markdown(report: dict[str, Any]) -> str:
    """The ``codecs`` report as a Markdown table, one row per model, bits and block size."""
    lines = [
        "| model (parameters) | bits | block | payload bytes | fp32 / payload "
        "| encode ÷ copy | decode ÷ copy | max error (steps) | rel. L2 error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        name = f"{m['preset']} {m['image_size']}px ({m['elements'] / 1e6:.2f} M)"
        lines += [
            f"| {name} | int{r['bits']} | {r['block_size']} | {r['payload_bytes']:,} "
            f"| {r['ratio']:.3f} | {r['encode_vs_copy']:.1f} | {r['decode_vs_copy']:.1f} "
            f"| {r['max_error_in_steps']:.3f} | {r['rel_l2_error']:.4f} |"
            for r in m["runs"]
        ]
    return "\n".join(lines)


def run_codecs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``codecs`` subcommand: every model x bits x block size."""
    if args.threads:
        torch.set_num_threads(args.threads)
    pressure_before = _cpu_pressure()
    models = []
    for preset, image_size, channels in MODELS:
        if args.models and f"{preset}{image_size}" not in args.models:
            continue
        update = model_update(preset, image_size, channels, args.source)
        runs = []
        for bits in BITS:
            for block_size in BLOCK_SIZES:
                _log(f"codecs: {preset} {image_size}px bits={bits} block_size={block_size}")
                runs.append(bench_codec(update, bits, block_size, args.repeats, CLOCKS[args.clock]))
        models.append(
            {
                "preset": preset,
                "image_size": image_size,
                "channels": channels,
                "tensors": len(update),
                "elements": sum(v.numel() for v in update.values()),
                "fp32_bytes": fp32_bytes(update),
                "runs": runs,
            }
        )
    return {
        "benchmark": "codecs",
        "source": args.source,
        "repeats": args.repeats,
        "clock": args.clock,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_pressure_avg10": {"before": pressure_before, "after": _cpu_pressure()},
        "targets": targets(models),
        "models": models,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m feddm_flower.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    codecs = commands.add_parser("codecs", help="quantized-update codec: size, speed, error")
    codecs.add_argument("--repeats", type=int, default=7, help="timed repeats per setting")
    codecs.add_argument(
        "--source",
        choices=("diff", "normal"),
        default="diff",
        help="update = difference of two seeds' weights, or N(0, 1e-3^2) noise",
    )
    codecs.add_argument(
        "--models",
        nargs="*",
        choices=[f"{preset}{size}" for preset, size, _ in MODELS],
        help="subset of the models (default: all)",
    )
    codecs.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice); 1 is steadier on a busy machine",
    )
    codecs.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (with --threads 1: work done, immune to load)",
    )
    codecs.add_argument("--markdown", action="store_true", help="a table instead of JSON")
    codecs.set_defaults(run=run_codecs)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    report = args.run(args)
    print(markdown(report) if args.markdown else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
