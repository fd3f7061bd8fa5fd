"""Micro-benchmarks for feddm_flower, one argparse subcommand each.

``python -m feddm_flower.tools.bench codecs`` measures the quantized-update codec on the real
U-Net presets; ``... bench server-memory`` measures the ServerApp's peak memory in one
training round against the number of replies; ``... bench train-speed`` measures training
img/s of the clients' loop beside a plain diffusers loop in the same process (the 32 px
``paper`` preset in bf16 by default, for a GPU). Each prints JSON on stdout (``--markdown``: a
table); progress goes to stderr. Add a benchmark by writing a ``run_<name>(args) -> dict``
function and registering a subcommand in ``build_parser``. ``round-overhead`` runs real
federations (:mod:`feddm_flower.tools.round_overhead`); ``simulation-memory`` real simulations
at several node counts (:mod:`feddm_flower.tools.simulation_memory`); ``compressibility`` one
round's update through each compressor (:mod:`feddm_flower.tools.compressibility`).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

from feddm_flower.app.local_grid import ReplyingGrid, run_rounds
from feddm_flower.app.records import decode_uplink, uplink_key
from feddm_flower.config import AGGREGATIONS, UPLINKS, RunConfig
from feddm_flower.data.loading import load_dataset
from feddm_flower.fed.changes import ChangeCodec, decode_change
from feddm_flower.fed.codecs import (
    DEFAULT_ZSTD_LEVEL,
    FLAG_ZSTD,
    decode_update,
    encode_update,
    fp32_bytes,
    schema_of,
)
from feddm_flower.protocol import EVAL_METRICS, TRAIN_LOSS, TRAIN_METRICS
from feddm_flower.task.diffusion import AMP_DTYPES, train_local
from feddm_flower.task.finetune import add_lora
from feddm_flower.task.models import (
    NUM_TRAIN_TIMESTEPS,
    build_scheduler,
    build_unet,
    compile_unet,
    count_parameters,
    resolve_device,
    unet_config,
)
from feddm_flower.tools import compressibility, lora_bytes, round_overhead, simulation_memory

MODELS: tuple[tuple[str, int, int], ...] = (("tiny", 28, 1), ("paper", 28, 1), ("paper", 32, 3))
BITS = (8, 4)
BLOCK_SIZES = (64, 256, 1024, 4096)
# Targets: size ratio vs fp32 at block sizes >= 256, and codec time vs a plain copy.
MIN_RATIO = {8: 3.9, 4: 7.5}
RATIO_MIN_BLOCK_SIZE = 256
MAX_TIME_VS_COPY = 3.0
# Sparse settings (share of each tensor, bits) timed beside the dense codec; the first is the
# run-config default.
SPARSE_SETTINGS = ((0.05, 4), (0.05, 8), (0.01, 4), (0.2, 4))
_QMAX = {8: 127, 4: 7}
# ``--source train``: AdamW steps (the apps' learning rate) and minibatch size per preset. The
# paper presets take seconds a step on a CPU, so they get a few small steps only.
TRAIN_STEPS = {"tiny": 50, "paper": 12}
TRAIN_BATCH = {"tiny": 64, "paper": 8}
TRAIN_LR = 3e-3
TRAIN_IMAGES = 4096


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


def training_images(image_size: int, channels: int, data_root: str = "") -> torch.Tensor:
    """The first TRAIN_IMAGES FashionMNIST training images (uint8) in a model's input shape:
    zero-padded (the background) from 28 px to ``image_size``, the channel repeated."""
    images = load_dataset("fashion-mnist", data_root, limit=TRAIN_IMAGES).images
    pad = image_size - images.shape[-1]
    if pad < 0:
        raise ValueError(f"cannot fit 28 px FashionMNIST into {image_size} px")
    if pad:
        images = torch.nn.functional.pad(images, (pad // 2, pad - pad // 2) * 2)
    return images.expand(-1, channels, -1, -1).contiguous()


def model_update(
    preset: str,
    image_size: int,
    channels: int,
    source: str,
    train_steps: int | None = None,
    data_root: str = "",
) -> dict[str, torch.Tensor]:
    """An update for a preset: ``train`` = weights after local training from the seed-0
    initialisation minus that initialisation (what a client sends in its first round, see
    :func:`training_images` and TRAIN_STEPS); ``diff`` = seed-1 minus seed-0 weights;
    ``normal`` = N(0, 1e-3^2) noise."""
    unet = build_unet(preset, image_size, channels, seed=0)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    if source == "normal":
        gen = torch.Generator().manual_seed(0)
        return {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in base.items()}
    if source == "train":
        train_local(
            unet,
            build_scheduler(),
            training_images(image_size, channels, data_root),
            batch_size=TRAIN_BATCH[preset],
            lr=TRAIN_LR,
            steps=TRAIN_STEPS[preset] if train_steps is None else train_steps,
            seed=0,
            label=f"bench {preset} {image_size}px",
        )
        return {k: v.detach() - base[k] for k, v in unet.state_dict().items()}
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
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
) -> dict[str, Any]:
    """Size, speed and error of one codec setting, without and with the lossless (zstd) stage.

    After one untimed round (plans and metadata are cached, as in later federated rounds),
    copy, encode and decode, then encode and decode with ``lossless=True``, are timed
    round-robin so that background load hits all of them alike. Times are medians over
    ``repeats``; the ``*_min`` ratios use the fastest runs, which are steadier on a busy machine.
    """
    kwargs = {"bits": bits, "block_size": block_size}
    lossless = {**kwargs, "lossless": True, "zstd_level": zstd_level}
    decode_update(encode_update(update, **kwargs))
    decode_update(encode_update(update, **lossless))
    times: dict[str, list[float]] = {
        "copy": [],
        "encode": [],
        "decode": [],
        "lossless_encode": [],
        "lossless_decode": [],
    }
    for _ in range(repeats):
        times["copy"].append(_timed(clock, _copy, update)[0])
        seconds, payload = _timed(clock, encode_update, update, **kwargs)
        times["encode"].append(seconds)
        seconds, decoded = _timed(clock, decode_update, payload)
        times["decode"].append(seconds)
        seconds, packed = _timed(clock, encode_update, update, **lossless)
        times["lossless_encode"].append(seconds)
        seconds, unpacked = _timed(clock, decode_update, packed)
        times["lossless_decode"].append(seconds)
    median = {k: statistics.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}
    ratio = fp32_bytes(update) / len(payload)
    same = all(torch.equal(unpacked[k], v) for k, v in decoded.items())
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
        # The lossless stage: its payload, the extra ratio over the plain payload (1.0 when
        # zstd would not make it smaller), and its time, also as extra seconds.
        "lossless_used": packed[6] & FLAG_ZSTD == FLAG_ZSTD,
        "lossless_payload_bytes": len(packed),
        "lossless_ratio": fp32_bytes(update) / len(packed),
        "lossless_gain": len(payload) / len(packed),
        "lossless_decodes_same": same and list(unpacked) == list(decoded),
        "lossless_encode_s": median["lossless_encode"],
        "lossless_decode_s": median["lossless_decode"],
        "lossless_extra_encode_s": median["lossless_encode"] - median["encode"],
        "lossless_extra_decode_s": median["lossless_decode"] - median["decode"],
        "lossless_encode_vs_copy": median["lossless_encode"] / median["copy"],
        "lossless_decode_vs_copy": median["lossless_decode"] / median["copy"],
    }


def bench_sparse(
    update: dict[str, torch.Tensor],
    fraction: float,
    bits: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Size and speed of the sparse codec at one setting, timed round-robin with a copy (the
    baseline); the error is what one payload leaves out (the residual a sender carries)."""
    codec = ChangeCodec("sparse", fraction=fraction, sparse_bits=bits)
    expected = schema_of(update)
    times: dict[str, list[float]] = {"copy": [], "encode": [], "decode": []}
    decode_change(codec.encode(update), expected)
    for _ in range(repeats):
        times["copy"].append(_timed(clock, _copy, update)[0])
        seconds, payload = _timed(clock, codec.encode, update)
        times["encode"].append(seconds)
        seconds, decoded = _timed(clock, decode_change, payload, expected)
        times["decode"].append(seconds)
    median = {k: statistics.median(v) for k, v in times.items()}
    floats = [k for k, v in update.items() if v.is_floating_point()]
    ref = sum(update[k].float().square().sum().item() for k in floats)
    left = sum((update[k].float() - decoded[k]).square().sum().item() for k in floats)
    return {
        "fraction": fraction,
        "bits": bits,
        "payload_bytes": len(payload),
        "ratio": fp32_bytes(update) / len(payload),
        "encode_s": median["encode"],
        "decode_s": median["decode"],
        "encode_vs_copy": median["encode"] / median["copy"],
        "decode_vs_copy": median["decode"] / median["copy"],
        "rel_l2_left_out": (left / ref) ** 0.5 if ref else 0.0,
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
        "| encode ÷ copy | decode ÷ copy | max error (steps) | rel. L2 error "
        "| zstd: extra ratio | zstd: fp32 / payload | zstd: encode ÷ copy | zstd: decode ÷ copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        name = f"{m['preset']} {m['image_size']}px ({m['elements'] / 1e6:.2f} M)"
        lines += [
            f"| {name} | int{r['bits']} | {r['block_size']} | {r['payload_bytes']:,} "
            f"| {r['ratio']:.3f} | {r['encode_vs_copy']:.1f} | {r['decode_vs_copy']:.1f} "
            f"| {r['max_error_in_steps']:.3f} | {r['rel_l2_error']:.4f} "
            f"| {r['lossless_gain']:.3f}{'' if r['lossless_used'] else ' (off)'} "
            f"| {r['lossless_ratio']:.3f} | {r['lossless_encode_vs_copy']:.1f} "
            f"| {r['lossless_decode_vs_copy']:.1f} |"
            for r in m["runs"]
        ]
    lines += [
        "",
        "| model (parameters) | sparse share | bits | payload bytes | fp32 / payload "
        "| encode s | decode s | encode ÷ copy | decode ÷ copy | rel. L2 left out |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        name = f"{m['preset']} {m['image_size']}px ({m['elements'] / 1e6:.2f} M)"
        lines += [
            f"| {name} | {r['fraction']:g} | int{r['bits']} | {r['payload_bytes']:,} "
            f"| {r['ratio']:.1f} | {r['encode_s']:.3f} | {r['decode_s']:.3f} "
            f"| {r['encode_vs_copy']:.1f} | {r['decode_vs_copy']:.1f} "
            f"| {r['rel_l2_left_out']:.3f} |"
            for r in m.get("sparse_runs", [])
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
        _log(f"codecs: {preset} {image_size}px update ({args.source})")
        update = model_update(
            preset, image_size, channels, args.source, args.train_steps, args.data_root
        )
        runs = []
        for bits in BITS:
            for block_size in BLOCK_SIZES:
                _log(f"codecs: {preset} {image_size}px bits={bits} block_size={block_size}")
                clock = CLOCKS[args.clock]
                runs.append(
                    bench_codec(update, bits, block_size, args.repeats, clock, args.zstd_level)
                )
        sparse_runs = []
        for fraction, bits in SPARSE_SETTINGS:
            _log(f"codecs: {preset} {image_size}px sparse {fraction:g} int{bits}")
            clock = CLOCKS[args.clock]
            sparse_runs.append(bench_sparse(update, fraction, bits, args.repeats, clock))
        models.append(
            {
                "preset": preset,
                "image_size": image_size,
                "channels": channels,
                "tensors": len(update),
                "elements": sum(v.numel() for v in update.values()),
                "fp32_bytes": fp32_bytes(update),
                "train_steps": (
                    (TRAIN_STEPS[preset] if args.train_steps is None else args.train_steps)
                    if args.source == "train"
                    else None
                ),
                "train_batch": TRAIN_BATCH[preset] if args.source == "train" else None,
                "runs": runs,
                "sparse_runs": sparse_runs,
            }
        )
    return {
        "benchmark": "codecs",
        "source": args.source,
        "repeats": args.repeats,
        "clock": args.clock,
        "zstd_level": args.zstd_level,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_pressure_avg10": {"before": pressure_before, "after": _cpu_pressure()},
        "targets": targets(models),
        "models": models,
    }


# ------------------------------------------------------------------------- server memory

SERVER_MODELS: dict[str, tuple[str, int, int]] = {
    "paper-32": ("paper", 32, 3),
    "tiny": ("tiny", 28, 1),
}
# Target: a streamed aggregation's round peak grows by at most this share of the fp32 model
# per extra reply. Rules that hold every reply (median, trimmed mean, Krum) have no target.
MAX_GROWTH_PER_REPLY = 0.1
STREAMED_AGGREGATIONS = ("mean",)
MIB = 2**20


def _proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS: resident now, VmHWM: its high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_hiwater() -> bool:
    """Reset this process's peak RSS (VmHWM, ru_maxrss) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") <= _proc_status_kib("VmRSS") + 1024  # within 1 MiB


class RssSampler(threading.Thread):
    """Samples this process's RSS every ``interval`` seconds until :meth:`stop`; ``peak``.

    Each sample is one ``pread`` of /proc/self/statm and creates about one container object,
    so that the sampler barely moves the cyclic GC's schedule: a reply whose records were
    read through ``RecordDict.metric_records``/``array_records`` sits in a reference cycle
    and is freed by the GC, not when the strategy drops it.
    """

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._running = True
        self.peak = self.rss()

    def rss(self) -> int:
        return int(os.pread(self._fd, 256, 0).split()[1]) * self._page

    def run(self) -> None:
        while self._running:
            time.sleep(self.interval)
            self.peak = max(self.peak, self.rss())

    def stop(self) -> int:
        self._running = False
        self.join()
        self.peak = max(self.peak, self.rss())
        os.close(self._fd)
        return self.peak


def measure_server_round(model: str, uplink: str, aggregation: str, replies: int) -> dict[str, Any]:
    """Peak RSS growth of this process over one round of the real strategy with ``replies``.

    Everything the round does not need to allocate is set up first (model, strategy, initial
    ArrayRecord, one warm-up reply encoded and decoded); then the kernel's peak-RSS mark is
    reset and the round runs: ``FedDMStrategy.start(num_rounds=1)`` against a
    :class:`ReplyingGrid`. The peak is read from the kernel (VmHWM, ru_maxrss) and from a
    thread sampling VmRSS every 5 ms; the round is then checked to have aggregated them all.
    """
    from feddm_flower.app.server_app import build_strategy
    from feddm_flower.config import RunConfig

    preset, image_size, channels = SERVER_MODELS[model]
    state = build_unet(preset, image_size, channels, seed=0).state_dict()
    initial = {k: v.clone() for k, v in state.items()}
    model_bytes = fp32_bytes(state)
    parameters = sum(v.numel() for v in state.values())
    cfg = RunConfig.from_mapping(
        {"uplink": uplink, "aggregation": aggregation, "min-nodes": 2, "model-preset": preset}
    )
    strategy = build_strategy(cfg)
    grid = ReplyingGrid(replies, uplink, block_size=cfg.quant_block_size)
    # Warm-up: one reply built and decoded, so codec layouts and allocator pools exist.
    grid.hold(state)
    warm = grid.train_content(seed=12345)
    decode_uplink(warm[uplink_key(uplink)], uplink, state)
    del warm, state
    grid.hold({})
    gc.collect()

    rss_before = _proc_status_kib("VmRSS") * 1024
    maxrss_before = _maxrss_bytes()
    hiwater_reset = _reset_hiwater()
    sampler = RssSampler()
    sampler.start()
    seconds, new = _timed(time.perf_counter, run_rounds, strategy, grid, initial, 1)
    sampled_peak = sampler.stop()
    hwm = _proc_status_kib("VmHWM") * 1024
    maxrss_after = _maxrss_bytes()
    rss_after = _proc_status_kib("VmRSS") * 1024

    kernel_valid = hiwater_reset or maxrss_after > maxrss_before
    kernel_peak = max(hwm, maxrss_after) if hiwater_reset else maxrss_after
    peak = max(kernel_peak, sampled_peak) if kernel_valid else sampled_peak
    rejected = [r for r in strategy.history[1].get("rejected", []) if r["phase"] == "train"]
    round_one = strategy.history[1]
    aggregated = TRAIN_LOSS in round_one  # the round's aggregated train metrics
    update_norm = math.nan
    if aggregated:
        update_norm = math.sqrt(
            sum(
                float(torch.linalg.vector_norm(new[k].double() - v.double())) ** 2
                for k, v in initial.items()
                if v.is_floating_point()
            )
        )
    return {
        "model": model,
        "uplink": uplink,
        "aggregation": aggregation,
        "replies": replies,
        "parameters": parameters,
        "fp32_model_bytes": model_bytes,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "peak_delta_bytes": peak - rss_before,
        "sampled_peak_delta_bytes": sampled_peak - rss_before,
        "maxrss_delta_bytes": maxrss_after - rss_before if kernel_valid else None,
        "hiwater_reset": hiwater_reset,
        "seconds": seconds,
        "train_replies_served": grid.served["train"],
        "evaluate_replies_served": grid.served["evaluate"],
        "rejected_train_replies": len(rejected),
        "accepted_train_replies": grid.served["train"] - len(rejected),
        "aggregated": aggregated,
        "noise_std": grid.noise,
        "global_update_norm": update_norm,
        "train_metrics": {k: v for k, v in round_one.items() if k in TRAIN_METRICS},
        "evaluate_metrics": {k: v for k, v in round_one.items() if k in EVAL_METRICS},
    }


def _run_cell(
    model: str, uplink: str, aggregation: str, replies: int, threads: int | None
) -> dict[str, Any]:
    """:func:`measure_server_round` in a fresh Python process (its own peak RSS)."""
    command = [sys.executable, "-m", "feddm_flower.tools.bench", "server-memory"]
    command += ["--cell", f"{model}:{uplink}:{aggregation}:{replies}"]
    if threads:
        command += ["--threads", str(threads)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the repository
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"server-memory cell {model}:{uplink}:{aggregation}:{replies} failed "
            f"(exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    return json.loads(done.stdout)


_MEDIAN_KEYS = (
    "peak_delta_bytes",
    "sampled_peak_delta_bytes",
    "rss_before_bytes",
    "rss_after_bytes",
    "seconds",
)


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated measurements of one setting (fresh processes) as one cell: medians of the
    measurements, every run's peak, and the round checks that must hold in all of them."""
    cell = dict(runs[0])
    for key in _MEDIAN_KEYS:
        cell[key] = statistics.median(run[key] for run in runs)
    maxrss = [run["maxrss_delta_bytes"] for run in runs]
    cell["maxrss_delta_bytes"] = None if None in maxrss else statistics.median(maxrss)
    for key in ("train_replies_served", "evaluate_replies_served", "accepted_train_replies"):
        cell[key] = min(run[key] for run in runs)
    cell["rejected_train_replies"] = max(run["rejected_train_replies"] for run in runs)
    cell["aggregated"] = all(run["aggregated"] for run in runs)
    cell["hiwater_reset"] = all(run["hiwater_reset"] for run in runs)
    cell["repeats"] = len(runs)
    cell["peak_delta_bytes_runs"] = [run["peak_delta_bytes"] for run in runs]
    return cell


def growth(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak growth per extra reply, as a share of the fp32 model, for one series of cells
    (same model, uplink and aggregation): from the fewest to the most replies, and between
    neighbouring reply counts."""
    cells = sorted(cells, key=lambda c: c["replies"])
    model_bytes = cells[0]["fp32_model_bytes"]

    def slope(a: dict[str, Any], b: dict[str, Any]) -> float:
        added = b["replies"] - a["replies"]
        return (b["peak_delta_bytes"] - a["peak_delta_bytes"]) / added / model_bytes

    first, last = cells[0], cells[-1]
    aggregation = first["aggregation"]
    streamed = aggregation in STREAMED_AGGREGATIONS
    per_reply = slope(first, last) if len(cells) > 1 else None
    passed = per_reply <= MAX_GROWTH_PER_REPLY if streamed and per_reply is not None else None
    if not streamed:
        verdict = "holds every reply (no streaming target)"
    else:
        verdict = "n/a" if passed is None else ("PASS" if passed else "FAIL")
    return {
        "model": first["model"],
        "uplink": first["uplink"],
        "aggregation": aggregation,
        "fp32_model_bytes": model_bytes,
        "replies": [c["replies"] for c in cells],
        "peak_delta_bytes": [c["peak_delta_bytes"] for c in cells],
        "peak_delta_bytes_runs": [c.get("peak_delta_bytes_runs", []) for c in cells],
        "growth_per_reply": per_reply,
        "pairwise_growth": [
            {"from": a["replies"], "to": b["replies"], "growth_per_reply": slope(a, b)}
            for a, b in zip(cells, cells[1:], strict=False)
        ],
        "target": MAX_GROWTH_PER_REPLY if streamed else None,
        "pass": passed,
        "verdict": verdict,
    }


def run_server_memory(args: argparse.Namespace) -> dict[str, Any]:
    """The ``server-memory`` subcommand: one fresh process per model x uplink x aggregation x
    reply count (or, with ``--cell``, the measurement of one of them)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cell:
        model, uplink, aggregation, replies = args.cell.split(":")
        return measure_server_round(model, uplink, aggregation, int(replies))
    todo, skipped = [], []
    settings = itertools.product(
        args.model, args.aggregations, args.uplinks, sorted(set(args.replies))
    )
    for model, aggregation, uplink, replies in settings:
        if aggregation not in STREAMED_AGGREGATIONS and replies > args.max_held_replies:
            _log(f"server-memory: {model} {uplink} {aggregation} N={replies}: skipped "
                 "(N > --max-held-replies)")  # fmt: skip
            skipped.append(f"{model}:{uplink}:{aggregation}:{replies}")
        else:
            todo.append((model, uplink, aggregation, replies))

    def cell(setting: tuple[str, str, str, int]) -> dict[str, Any]:
        name = f"{' '.join(map(str, setting[:3]))} N={setting[3]}"
        _log(f"server-memory: {name} ...")
        result = _run_cell(*setting, args.threads)
        _log(
            f"server-memory: {name}: peak +{result['peak_delta_bytes'] / MIB:.0f} MiB "
            f"({result['peak_delta_bytes'] / result['fp32_model_bytes']:.2f}x model), "
            f"{result['accepted_train_replies']} replies aggregated, {result['seconds']:.1f} s"
        )
        return result

    # Each process measures its own RSS: cells may run side by side (given the memory).
    # Repeats go round-robin, so that a slow patch of the machine hits every setting alike.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = list(pool.map(cell, todo * max(1, args.repeats)))
    cells = [combine_runs(runs[i :: len(todo)]) for i in range(len(todo))]
    series: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for cell in cells:
        series.setdefault((cell["model"], cell["uplink"], cell["aggregation"]), []).append(cell)
    results = [growth(group) for group in series.values()]
    judged = [s["pass"] for s in results if s["pass"] is not None]
    return {
        "benchmark": "server-memory",
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "jobs": args.jobs,
        "repeats": max(1, args.repeats),
        "max_growth_per_reply": MAX_GROWTH_PER_REPLY,
        "targets": {"streamed_growth": all(judged) if judged else None},
        "series": results,
        "cells": cells,
        "skipped": skipped,
    }


def _peak_text(peak: float, runs: list[float]) -> str:
    """A peak in MiB, with the range of the runs when there were several."""
    if len(runs) > 1:
        return f"{peak / MIB:,.0f} MiB ({min(runs) / MIB:,.0f}–{max(runs) / MIB:,.0f})"
    return f"{peak / MIB:,.0f} MiB"


def server_memory_markdown(report: dict[str, Any]) -> str:
    """The ``server-memory`` report as a Markdown table, one row per series."""
    counts = sorted({n for s in report["series"] for n in s["replies"]})
    lines = [
        "| model (fp32 size) | uplink | aggregation | "
        + " | ".join(f"peak Δ N={n}" for n in counts)
        + " | growth per extra reply (× model) | pairwise | target | result |",
        "|---|---|---|" + "---|" * len(counts) + "---|---|---|---|",
    ]
    for s in report["series"]:
        size = s["fp32_model_bytes"] / MIB
        peaks = dict(zip(s["replies"], s["peak_delta_bytes"], strict=True))
        runs = dict(zip(s["replies"], s.get("peak_delta_bytes_runs", []), strict=False))
        cols = [_peak_text(peaks[n], runs.get(n, [])) if n in peaks else "—" for n in counts]
        per_reply = "—" if s["growth_per_reply"] is None else f"{s['growth_per_reply']:.3f}"
        pairwise = ", ".join(
            f"{p['from']}→{p['to']}: {p['growth_per_reply']:.3f}" for p in s["pairwise_growth"]
        )
        target = "—" if s["target"] is None else f"≤ {s['target']}"
        verdict = f"**{s['verdict']}**" if s["pass"] is not None else s["verdict"]
        lines.append(
            f"| {s['model']} ({size:.0f} MiB) | {s['uplink']} | {s['aggregation']} | "
            + " | ".join(cols)
            + f" | {per_reply} | {pairwise or '—'} | {target} | {verdict} |"
        )
    return "\n".join(lines)


# --- training speed --------------------------------------------------------------------------

# Goal (issue 18): the 32 px `paper` preset (35.7 M parameters) trains at >= 3000 img/s in bf16
# on one H100/H200, and no slower than a plain diffusers loop timed in the same process.
TRAIN_SPEED_TARGET = 3000.0
VS_PLAIN_TARGET = 1.0
PEAK_MATMUL_SIZE = 8192
SPEED_RUNS = {"eager": "ours, eager", "compiled": "ours, torch.compile", "plain": "plain diffusers",
              "lora": "ours, eager, LoRA (lora-* defaults)"}  # fmt: skip


def _stamp(message: str) -> None:
    _log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} train-speed: {message}")


def peak_bf16_tflops(device: torch.device, n: int = PEAK_MATMUL_SIZE, iters: int = 20) -> float:
    """Measured bf16 matmul rate of a CUDA ``device``, TFLOP/s: ``n`` x ``n`` products timed
    with CUDA events over ``iters`` runs after a warm-up."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(3):
        torch.mm(a, b, out=out)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        torch.mm(a, b, out=out)
    end.record()
    end.synchronize()
    return 2 * n**3 / (start.elapsed_time(end) / 1000 / iters) / 1e12


def training_flops_per_image(unet: UNet2DModel, batch: int = 2) -> float:
    """FLOPs of one training step per image (forward and backward; matmuls, convolutions and
    attention), counted by FlopCounterMode on a small batch."""
    size, channels = unet.config.sample_size, unet.config.in_channels
    x = torch.randn(batch, channels, size, size, device=unet.device)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), device=unet.device)
    with FlopCounterMode(display=False) as counter:
        unet(x, t).sample.square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def plain_diffusers_loop(
    unet_config: dict[str, Any],
    scheduler_config: dict[str, Any],
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    lr: float,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    device: torch.device,
) -> dict[str, float]:
    """Time a plain diffusers training loop, nothing of ours (only torch and diffusers).

    ``UNet2DModel(**unet_config)``, ``DDPMScheduler.from_config(scheduler_config)``, AdamW with
    its default options, autocast to ``amp_dtype`` (None = off; no loss scaling),
    epsilon-prediction MSE, on random images in [-1, 1] already on ``device``; the loss is
    read back at the end only.
    """
    unet = UNet2DModel(**unet_config).to(device)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    scheduler = DDPMScheduler.from_config(scheduler_config)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    shape = (8 * batch_size, unet_config["in_channels"], *(2 * [unet_config["sample_size"]]))
    pool = torch.randint(0, 256, shape, dtype=torch.uint8, device=device).float() / 127.5 - 1
    dtype = amp_dtype or torch.bfloat16
    unet.train()

    def step(i: int) -> torch.Tensor:
        x0 = pool[i % 8 * batch_size : (i % 8 + 1) * batch_size]
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=amp_dtype is not None):
            pred = unet(scheduler.add_noise(x0, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(steps):
        total += step(i)
    mean_loss = total.item() / steps
    return {"seconds": time.perf_counter() - start, "mean_loss": mean_loss}


def _time_ours(
    unet: torch.nn.Module, images: torch.Tensor, args: argparse.Namespace
) -> dict[str, float]:
    """Time ``train_local`` (the clients' loop) on ``images``, after ``--warmup`` steps."""
    settings = {"batch_size": args.batch_size, "lr": args.lr, "label": "train-speed"}
    settings["mixed_precision"] = args.mixed_precision
    if args.warmup:  # compilation, cuDNN's algorithm choice, the allocator's first blocks
        train_local(unet, build_scheduler(), images, steps=args.warmup, seed=0, **settings)
    log_every = max(args.steps // 5, 1)
    result = train_local(
        unet, build_scheduler(), images, steps=args.steps, seed=1, log_every=log_every, **settings
    )
    return {"seconds": result.seconds, "mean_loss": result.mean_loss}


def _speed_row(
    timed: dict[str, float], args: argparse.Namespace, device: torch.device, flops: float
) -> dict[str, Any]:
    """One loop's figures: img/s, ms/step, TFLOP/s, peak memory since the last reset."""
    rate = args.steps * args.batch_size / timed["seconds"]
    return {
        "seconds": timed["seconds"],
        "img_per_s": round(rate, 2),
        "step_ms": round(1000 * timed["seconds"] / args.steps, 2),
        "tflops": rate * flops / 1e12,
        "mean_loss": timed["mean_loss"],
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
    }


def _speed_verdict(report: dict[str, Any]) -> dict[str, Any]:
    """The top-level figures from the loops timed so far: the faster of ours (its row's
    fields), ``vs_plain`` (ours / plain), the share of the peak bf16 rate, and ``pass``.
    Each row of ``report["runs"]`` gets its own ``vs_plain`` and ``peak_share``."""
    runs, peak = report["runs"], report["peak_bf16_tflops"]
    ours = [name for name in ("eager", "compiled") if name in runs]
    if not ours:
        return {}
    best = max(ours, key=lambda name: runs[name]["img_per_s"])
    plain = runs.get("plain")
    for name in ours:
        runs[name]["vs_plain"] = runs[name]["img_per_s"] / plain["img_per_s"] if plain else None
    for row in runs.values():
        row["peak_share"] = row["tflops"] / peak if peak else None
    judged = report["device"].startswith("cuda") and report["preset"] == "paper"
    judged = judged and report["image_size"] == 32 and plain is not None
    rate, vs_plain = runs[best]["img_per_s"], runs[best]["vs_plain"]
    return {
        "best": best,
        **{k: runs[best][k] for k in ("seconds", "img_per_s", "step_ms", "mean_loss")},
        "peak_memory_bytes": runs[best]["peak_memory_bytes"],
        "vs_plain": vs_plain,
        "peak_share": runs[best]["peak_share"],
        "pass": rate >= TRAIN_SPEED_TARGET and vs_plain >= VS_PLAIN_TARGET if judged else None,
    }


def _write_json(path: str, report: dict[str, Any]) -> None:
    """``report`` to ``path``, replaced atomically: a reader never sees half a file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def run_train_speed(args: argparse.Namespace) -> dict[str, Any]:
    """The ``train-speed`` subcommand: training img/s of ``train_local`` (the clients' loop),
    eager and, with ``--compile``, compiled, beside a plain diffusers loop (``--plain``), all
    in this process on the same random images, with the share of the peak bf16 matmul rate.

    Each phase logs a timestamped start and end on stderr; ``--out`` is rewritten after each,
    so a run killed mid-way keeps the phases it finished."""
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    config = unet_config(args.preset, args.image_size, args.channels)
    shape = (args.batch_size * 8, args.channels, args.image_size, args.image_size)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)
    report: dict[str, Any] = {
        "benchmark": "train-speed",
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "preset": args.preset,
        "image_size": args.image_size,
        "channels": args.channels,
        "parameters": None,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "steps": args.steps,
        "mixed_precision": args.mixed_precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "target_img_per_s": TRAIN_SPEED_TARGET,
        "target_vs_plain": VS_PLAIN_TARGET,
        "peak_bf16_tflops": None,
        "train_flops_per_image": None,
        "runs": {},
    }

    def phase(name: str, measure: Callable[[], Any]) -> Any:
        _stamp(f"{name}: start")
        start = time.perf_counter()
        result = measure()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        _stamp(f"{name}: done in {time.perf_counter() - start:.1f} s")
        return result

    def save() -> None:
        report.update(_speed_verdict(report))
        if args.out:
            _write_json(args.out, report)

    def unet() -> UNet2DModel:
        return build_unet(args.preset, args.image_size, args.channels).to(
            device, memory_format=layout
        )

    def flops() -> float:
        model = unet()
        report["parameters"] = count_parameters(model)
        return training_flops_per_image(model)

    def timed(name: str, measure: Callable[[], dict[str, float]]) -> None:
        def run() -> dict[str, Any]:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            return _speed_row(measure(), args, device, report["train_flops_per_image"])

        row = report["runs"][name] = phase(name, run)
        _stamp(f"{name}: {row['img_per_s']:.0f} img/s, {row['step_ms']} ms/step")
        save()

    if cuda:
        report["peak_bf16_tflops"] = phase("peak bf16 matmul", lambda: peak_bf16_tflops(device))
    report["train_flops_per_image"] = phase("flops", flops)
    save()
    timed("eager", lambda: _time_ours(unet(), images, args))
    if args.plain:
        amp = AMP_DTYPES.get(args.mixed_precision)
        timed(
            "plain",
            lambda: plain_diffusers_loop(
                config,
                dict(build_scheduler().config),
                batch_size=args.batch_size,
                steps=args.steps,
                warmup=args.warmup,
                lr=args.lr,
                amp_dtype=amp,
                channels_last=args.channels_last,
                device=device,
            ),
        )
    if args.compile:
        timed("compiled", lambda: _time_ours(compile_unet(unet(), "default"), images, args))
    if args.lora:  # trainable='lora' with the lora-* defaults; the same loop and images
        cfg = RunConfig.from_mapping({"trainable": "lora"})

        def lora() -> UNet2DModel:
            model = add_lora(build_unet(args.preset, args.image_size, args.channels), cfg)
            return model.to(device, memory_format=layout)

        timed("lora", lambda: _time_ours(lora(), images, args))
    return report


def train_speed_markdown(report: dict[str, Any]) -> str:
    """The ``train-speed`` report as a Markdown table, one row per loop, and the verdict."""
    r = report
    options = ", ".join([r["mixed_precision"]] + (["channels-last"] if r["channels_last"] else []))
    peak = f"{r['peak_bf16_tflops']:.0f} TFLOP/s" if r["peak_bf16_tflops"] else "not measured"
    lines = [
        f"{r['preset']} {r['image_size']}px ({r['parameters'] / 1e6:.1f} M parameters), "
        f"{r['device_name']}, batch {r['batch_size']}, {options}, {r['steps']} steps; "
        f"{r['train_flops_per_image'] / 1e9:.2f} GFLOP per image; peak bf16 matmul {peak}",
        "",
        "| loop | img/s | ms/step | ours ÷ plain | TFLOP/s | share of peak bf16 |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in r["runs"].items():
        vs_plain = "–" if row.get("vs_plain") is None else f"{row['vs_plain']:.2f}"
        share = "–" if row.get("peak_share") is None else f"{100 * row['peak_share']:.1f} %"
        lines.append(
            f"| {SPEED_RUNS[name]} | {row['img_per_s']:,.0f} | {row['step_ms']} | {vs_plain} "
            f"| {row['tflops']:.1f} | {share} |"
        )
    verdict = {True: "**pass**", False: "**fail**", None: "not judged"}[r.get("pass")]
    lines += [
        "",
        f"Target ≥ {r['target_img_per_s']:.0f} img/s and ≥ {r['target_vs_plain']:.1f} × plain "
        f"(32 px paper preset on a GPU): {verdict}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m feddm_flower.tools.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    codecs = commands.add_parser(
        "codecs", help="dense and sparse update codecs: size, speed, error"
    )
    codecs.add_argument("--repeats", type=int, default=7, help="timed repeats per setting")
    codecs.add_argument(
        "--source",
        choices=("train", "diff", "normal"),
        default="train",
        help="update = trained minus initial weights (AdamW, lr 3e-3, on the first "
        f"{TRAIN_IMAGES} FashionMNIST training images, padded and channel-repeated for 32 px "
        "RGB models), the difference of two seeds' weights, or N(0, 1e-3^2) noise",
    )
    codecs.add_argument(
        "--train-steps",
        type=int,
        help="training steps for --source train (default: "
        + ", ".join(f"{p} {n} steps of batch {TRAIN_BATCH[p]}" for p, n in TRAIN_STEPS.items())
        + ")",
    )
    codecs.add_argument("--data-root", default="", help="dataset directory ('' = the cache)")
    codecs.add_argument(
        "--zstd-level",
        type=int,
        default=DEFAULT_ZSTD_LEVEL,
        help=f"zstd level of the lossless stage (default {DEFAULT_ZSTD_LEVEL})",
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
    codecs.set_defaults(run=run_codecs, markdown_fn=markdown)

    server = commands.add_parser(
        "server-memory",
        help="ServerApp peak memory in one round vs the number of replies",
        description="Peak RSS growth of the ServerApp process over one round of the real "
        "FedDM strategy, each setting in a fresh process, against a grid that builds each "
        "reply when it is pulled.",
    )
    server.add_argument(
        "--model",
        nargs="+",
        choices=sorted(SERVER_MODELS),
        default=["paper-32"],
        help="paper-32: build_unet('paper', 32, 3); tiny: build_unet('tiny', 28, 1)",
    )
    server.add_argument(
        "--replies", nargs="+", type=int, default=[2, 8, 32], metavar="N", help="replies per round"
    )
    server.add_argument("--uplinks", nargs="+", choices=UPLINKS, default=["fp32", "int8"])
    server.add_argument("--aggregations", nargs="+", choices=AGGREGATIONS, default=["mean"])
    server.add_argument(
        "--max-held-replies",
        type=int,
        default=8,
        help="skip larger N for the aggregations that hold every reply (their peak grows by "
        "about two fp32 models per reply)",
    )
    server.add_argument("--threads", type=int, help="torch intra-op threads in each process")
    server.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="fresh processes per setting; the median peak is reported (the table adds the "
        "range): where the C allocator places blocks, and when the cyclic GC runs, move the "
        "peak of identical runs by up to about two fp32 models",
    )
    server.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="settings measured at once, each in its own process (RSS is per process; the "
        "machine needs the memory of all of them)",
    )
    server.add_argument("--markdown", action="store_true", help="a table instead of JSON")
    server.add_argument("--cell", help=argparse.SUPPRESS)  # model:uplink:aggregation:N
    server.set_defaults(run=run_server_memory, markdown_fn=server_memory_markdown)

    speed = commands.add_parser(
        "train-speed",
        help="training img/s of the clients' loop on random images (GPU: bf16 and friends)",
        description="Training img/s of the clients' loop (train_local), eager and with "
        "--compile compiled, beside a plain diffusers loop, in one process; with the share of "
        "the measured peak bf16 matmul rate on CUDA.",
    )
    speed.add_argument("--preset", choices=("tiny", "paper"), default="paper")
    speed.add_argument("--image-size", type=int, default=32)
    speed.add_argument("--channels", type=int, default=3)
    speed.add_argument("--batch-size", type=int, default=256)
    speed.add_argument("--steps", type=int, default=300, help="timed steps")
    speed.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    speed.add_argument("--lr", type=float, default=2e-4)
    speed.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="bf16")
    speed.add_argument("--channels-last", action="store_true")
    speed.add_argument(
        "--compile", action="store_true", help="also time ours with torch.compile (mode default)"
    )
    speed.add_argument(
        "--lora", action="store_true", help="also time ours under trainable='lora' (defaults)"
    )
    speed.add_argument(
        "--plain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a plain diffusers loop (the reference of vs_plain and pass)",
    )
    speed.add_argument("--out", default="", help="JSON file rewritten after each phase")
    speed.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    speed.add_argument("--markdown", action="store_true", help="a table instead of JSON")
    speed.set_defaults(run=run_train_speed, markdown_fn=train_speed_markdown)

    rounds = commands.add_parser(
        "round-overhead",
        help="a real federation per engine: share of each round not spent training",
        description=round_overhead.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rounds.add_argument(
        "--engine",
        choices=("deployment", "simulation"),
        action="append",
        required=True,
        help="repeat for both; each runs one federation",
    )
    rounds.add_argument("--nodes", type=int, default=2, help="SuperNodes")
    rounds.add_argument("--threads", type=int, default=1, help="CPU threads (Ray CPUs) per node")
    rounds.add_argument(
        "--no-worker",
        dest="worker",
        action="store_false",
        help="deployment: no node worker (a full process start per message)",
    )
    rounds.add_argument(
        "--run-config",
        default="num-server-rounds=3 local-steps=100",
        help="the run-config of both engines' runs (default: %(default)s)",
    )
    rounds.add_argument("--out", default="", help="where the runs go (default: a temp dir)")
    rounds.add_argument("--markdown", action="store_true", help="tables instead of JSON")
    rounds.set_defaults(run=round_overhead.run, markdown_fn=round_overhead.markdown)

    memory = commands.add_parser(
        "simulation-memory",
        help="a real simulation per node count: peak memory and its growth per extra node",
        description=simulation_memory.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    memory.add_argument("--nodes", type=int, nargs="+", default=[2, 8, 32])
    memory.add_argument("--threads", type=int, default=1, help="CPUs (Ray) per node")
    memory.add_argument(
        "--run-config",
        default=simulation_memory.DEFAULT_RUN_CONFIG,
        help="every run's run-config (default: %(default)s)",
    )
    memory.add_argument("--out", default="", help="where the runs go (default: a temp dir)")
    memory.add_argument("--markdown", action="store_true", help="a table instead of JSON")
    memory.set_defaults(run=simulation_memory.run, markdown_fn=simulation_memory.markdown)

    shrink = commands.add_parser(
        "compressibility",
        help="one round's update through each compressor once: the global loss it keeps",
        description=compressibility.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shrink.add_argument("--steps", type=int, default=200, help="local steps of the round")
    shrink.add_argument("--seed", type=int, default=0)
    shrink.add_argument("--eval-examples", type=int, default=500, help="test images of the loss")
    shrink.add_argument("--markdown", action="store_true", help="a table instead of JSON")
    shrink.set_defaults(run=compressibility.run, markdown_fn=compressibility.markdown)

    lora = commands.add_parser(
        "lora-bytes",
        help="a round's exact bytes under LoRA against FedAvg full fine-tuning",
        description=lora_bytes.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lora.add_argument("--preset", default="paper", help="U-Net preset (default: %(default)s)")
    lora.add_argument("--size", type=int, default=32, help="pixels (default: %(default)s)")
    lora.add_argument("--channels", type=int, default=3, help="image channels")
    lora.add_argument("--rounds", type=int, default=6, help="rounds of the totals")
    lora.add_argument(
        "--setting",
        action="append",
        default=[],
        help="run-config text of one cell, e.g. 'uplink=int8 downlink=int8' (repeat)",
    )
    lora.add_argument("--markdown", action="store_true", help="a table instead of JSON")
    lora.set_defaults(run=lora_bytes.run, markdown_fn=lora_bytes.markdown)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    report = args.run(args)
    as_table = args.markdown and not getattr(args, "cell", None)
    print(args.markdown_fn(report) if as_table else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
