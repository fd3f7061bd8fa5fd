"""The paper-scale comparison on one GPU machine that has no internet and no package index.

Here (a machine with internet access and this app's .venv)::

    python -m feddm_flower.tools.gpu_kit pack    # gpu-kit/: wheels + FashionMNIST, < 64 MiB

There (``scripts/gpu_paper.sh`` runs these)::

    python -m feddm_flower.tools.gpu_kit sample MODEL_DIR --num 1000 --out samples.npz
    python -m feddm_flower.tools.gpu_kit report WORK          # WORK/summary.json, img/s per client

Here again, on what came back::

    python -m feddm_flower.tools.gpu_kit fid gpu-paper.tar.gz # FID/KID per cell: fid.md, fid.json

The kit carries the wheels of what the app imports that a PyTorch GPU image lacks (Flower,
diffusers, flwr-datasets, ...), pinned to the versions installed here, and FashionMNIST's
original IDX files; the GPU machine's own torch is used. docs/results.md, "Paper scale on one
GPU", has the whole procedure.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

from feddm_flower.fed.timings import OVERHEAD_KEY
from feddm_flower.protocol import (
    BYTES_DOWN_CUMULATIVE,
    BYTES_UP_CUMULATIVE,
    COMPRESSION_UP,
    GLOBAL_LOSS,
    ROUND_SECONDS,
    WALL_SECONDS,
)

MIB = 2**20
CARRY_LIMIT = 64 * MIB  # what the GPU machine's transfer takes: the repository plus the kit
# What the app and Flower's deployment CLIs import, found through their declared dependencies.
ROOTS = ("flwr", "diffusers", "flwr-datasets", "torch-fidelity", "zstandard")
# Left out of the kit. torch and its CUDA libraries come with the GPU image; uv only serves
# runtime dependency installation, which is off; uvicorn's optional speedups are optional.
# The rest a PyTorch GPU image has (numpy, pandas, pyarrow, matplotlib, requests, httpx,
# aiohttp, huggingface-hub, ...): large wheels, whose versions there are compatible with the
# app's loose requirements. Small pure-Python packages that Flower bounds (click, typer, rich,
# protobuf, typing-extensions) do travel, so the CLI runs with the versions tested here.
NOT_CARRIED_PREFIXES = ("nvidia-", "cuda-")
NOT_CARRIED = frozenset(
    """
    torch torchvision triton uv httptools watchfiles websockets python-dotenv
    numpy pandas pyarrow matplotlib contourpy cycler fonttools kiwisolver pyparsing
    python-dateutil six tzdata pillow seaborn scipy networkx sympy mpmath jinja2 markupsafe
    grpcio aiohttp aiohappyeyeballs aiosignal frozenlist multidict propcache yarl attrs fsspec
    requests certifi charset-normalizer idna urllib3 httpx httpcore h11 anyio sniffio
    huggingface-hub hf-xet filelock safetensors regex pyyaml tqdm packaging pathspec xxhash
    markdown-it-py mdurl pygments shellingham annotated-doc setuptools zipp uvloop
    """.split()
)
GPU_PYTHON = "3.12"  # the GPU image's python3
PLATFORMS = (  # manylinux tags pip may take for an x86-64 Linux machine
    "manylinux_2_34_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
FASHION_MNIST_GZ = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# train_local's progress line, the last of a ClientApp call: cumulative images per second.
TRAIN_LINE = re.compile(
    r"client (?P<client>\d+) round (?P<round>\d+): epoch \d+, step (?P<step>\d+)/(?P<total>\d+), "
    r"loss [0-9.naife+-]+, (?P<rate>[0-9.]+) img/s"
)


# --- pack (here) ----------------------------------------------------------------------------


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_packages(roots: tuple[str, ...] = ROOTS) -> dict[str, str]:
    """{name: installed version} of ``roots`` and their dependencies (extras included, those
    whose markers apply here), less what the GPU image has (:data:`NOT_CARRIED`)."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    todo = [(r, frozenset()) for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = _canonical(name)
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"pack: {name} is not installed here; run scripts/setup.sh") from None
        if key not in NOT_CARRIED and not key.startswith(NOT_CARRIED_PREFIXES):
            found[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            wanted = extras or frozenset({""})
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in wanted):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return dict(sorted(found.items()))


def download_wheels(packages: dict[str, str], dest: Path) -> None:
    """``pip download`` each pinned package's wheel for the GPU machine's Python into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--python-version", GPU_PYTHON]
    cmd += ["--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + [f"{n}=={v}" for n, v in packages.items()], check=True)


def tree_size(root: Path) -> int:
    """Bytes of every file under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def repository_size(repo: Path) -> int:
    """Bytes of the files git would hand over: tracked, and untracked but not ignored."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout
    files = {repo / f for f in out.decode().split("\0") if f}
    return sum(f.stat().st_size for f in files if f.is_file())


def check_size(kit: int, repo: int, limit: int = CARRY_LIMIT) -> str:
    """The size line; ``SystemExit`` (exit 1) if the kit and the repository exceed ``limit``."""
    total = kit + repo
    line = (
        f"kit {kit / MIB:.1f} MiB + repository {repo / MIB:.1f} MiB = {total / MIB:.1f} MiB "
        f"of {limit / MIB:.0f} MiB"
    )
    if total > limit:
        raise SystemExit(f"pack: too large to carry: {line}")
    return line


def run_pack(args: argparse.Namespace) -> None:
    kit: Path = args.kit
    wheels, data = kit / "wheels", kit / "data"
    shutil.rmtree(kit, ignore_errors=True)
    packages = carried_packages()
    download_wheels(packages, wheels)
    data.mkdir(parents=True)
    for name in FASHION_FILES:
        src = args.fashion_mnist / name
        if not src.is_file():
            raise SystemExit(f"pack: {src} not found (apt-get install dataset-fashion-mnist)")
        shutil.copyfile(src, data / name)
    lines = [f"{p.name}\t{p.stat().st_size}" for p in sorted(kit.rglob("*")) if p.is_file()]
    (kit / "MANIFEST.tsv").write_text("\n".join(lines) + "\n")
    for line in lines:
        print(line.replace("\t", "  "))
    print(check_size(tree_size(kit), repository_size(args.repo)))


# --- sample (there) -------------------------------------------------------------------------


def load_unet(model_dir: Path):
    """The U-Net of a saved pipeline (``pipeline/``) or checkpoint (``checkpoint/``)."""
    from diffusers import UNet2DModel

    sub = model_dir / "unet"
    return UNet2DModel.from_pretrained(sub if sub.is_dir() else model_dir, low_cpu_mem_usage=False)


def run_sample(args: argparse.Namespace) -> None:
    """DDIM samples of a run's model as uint8 (N, C, H, W) in an npz, for FID elsewhere."""
    import numpy as np
    import torch

    from feddm_flower.task.diffusion import sample
    from feddm_flower.task.models import build_scheduler, resolve_device

    unet = load_unet(args.model_dir).to(resolve_device(args.device))
    images = sample(
        unet,
        build_scheduler(),
        args.num,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    pixels = images.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=pixels, steps=args.steps, seed=args.seed)
    print(f"{len(pixels)} samples of {args.model_dir} -> {args.out}")


# --- report (there) -------------------------------------------------------------------------


def client_speeds(logs: list[Path]) -> dict[str, dict[str, Any]]:
    """Training img/s per client, from train_local's last progress line of each ClientApp call
    in the SuperNodes' logs: every round's rate (warm-up included) and their median."""
    rates: dict[str, dict[int, float]] = {}
    for path in logs:
        for m in TRAIN_LINE.finditer(path.read_text(errors="replace")):
            if m["step"] == m["total"]:
                rates.setdefault(m["client"], {})[int(m["round"])] = float(m["rate"])
    return {
        client: {
            "img-per-s-by-round": [rounds[r] for r in sorted(rounds)],
            "img-per-s-median": statistics.median(rounds.values()),
        }
        for client, rounds in sorted(rates.items(), key=lambda kv: int(kv[0]))
    }


def cell_summary(cell: Path) -> dict[str, Any]:
    """One cell: its last metrics line, its clients' speeds and what it produced."""
    run = cell / "run"
    rows = []
    if (run / "metrics.jsonl").exists():
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    last = rows[-1] if rows else {}
    speeds = client_speeds(sorted(cell.glob("supernode-*.log")))
    keep = (
        "round",
        "train-loss",
        "eval-loss",
        "final-eval-loss",
        GLOBAL_LOSS,
        "global-loss-initial",
        BYTES_DOWN_CUMULATIVE,
        BYTES_UP_CUMULATIVE,
        COMPRESSION_UP,
        "train-steps",
        "train-seconds",
        WALL_SECONDS,
    )
    summary: dict[str, Any] = {"cell": cell.name, "finished": (run / "summary.json").exists()}
    summary |= {k: last[k] for k in keep if k in last}
    summary["global-loss-by-round"] = [r.get(GLOBAL_LOSS) for r in rows]
    summary["round-seconds-by-round"] = [r.get(ROUND_SECONDS) for r in rows]
    summary["overhead-share-by-round"] = [r.get(OVERHEAD_KEY) for r in rows]
    # Where the clients' time went, per round: mean seconds per phase of a message.
    summary["client-phases-by-round"] = [
        {k: v for k, v in r.items() if k.startswith(("train-time-", "evaluate-time-"))}
        for r in rows
    ]
    summary["clients"] = speeds
    medians = [c["img-per-s-median"] for c in speeds.values()]
    summary["img-per-s-all-clients"] = round(sum(medians), 1) if medians else None
    summary["samples"] = (cell / "samples.npz").exists()
    return summary


def run_report(args: argparse.Namespace) -> None:
    work: Path = args.work
    report: dict[str, Any] = {}
    for name in ("environment", "bench"):
        path = work / f"{name}.json"
        if path.exists():
            try:
                report[name] = json.loads(path.read_text())
            except json.JSONDecodeError:
                report[name] = {"error": f"{path.name} is not JSON"}
    cells = sorted(p for p in (work / "cells").glob("*") if p.is_dir())
    report["cells"] = [cell_summary(c) for c in cells]
    (work / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print(report_text(report))


def report_text(report: dict[str, Any]) -> str:
    """The figures a reader of the GPU run's log wants, as plain lines."""
    lines = []
    b = report.get("bench")
    if b and "img_per_s" in b:
        goal = {True: "reaches", False: "misses", None: "not judged for"}[b["pass"]]
        runs = ", ".join(
            f"{name} {r['img_per_s']:.0f} img/s"
            + (f" ({r['peak_share']:.1%} of peak bf16)" if r.get("peak_share") else "")
            for name, r in b["runs"].items()
        )
        lines.append(
            f"bench: {runs} ({b['preset']} {b['image_size']} px, "
            f"{b['parameters'] / 1e6:.1f} M parameters, batch {b['batch_size']}, "
            f"{b['mixed_precision']}, {b['device_name']}); ours vs plain "
            f"{b.get('vs_plain') or float('nan'):.2f}x: {goal} the goal of "
            f"{b['target_img_per_s']:.0f} img/s and {b['target_vs_plain']:.1f}x plain"
        )
    elif b:
        lines.append(f"bench: {b.get('error', 'no result')}")
    for c in report["cells"]:
        speeds = ", ".join(
            f"client {k} {v['img-per-s-median']:.0f}" for k, v in c["clients"].items()
        )
        lines.append(
            f"cell {c['cell']}: {'finished' if c['finished'] else 'NOT finished'}, "
            f"round {c.get('round', 0)}, global-loss {c.get('global-loss', 'n/a')}, "
            f"training img/s per client (median over rounds): {speeds or 'n/a'} "
            f"(all clients: {c['img-per-s-all-clients']})"
        )
        for r, (wall, share, phases) in enumerate(
            zip(
                c["round-seconds-by-round"],
                c["overhead-share-by-round"],
                c["client-phases-by-round"],
                strict=True,
            ),
            start=1,
        ):
            where = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
            shown = f"{share:.1%}" if share is not None else "n/a"
            lines.append(f"  round {r}: {wall} s, {shown} outside training; clients: {where}")
    return "\n".join(lines)


# --- fid (here) -----------------------------------------------------------------------------


def _results_dir(path: Path, stack: list[tempfile.TemporaryDirectory]) -> Path:
    """The results folder: ``path`` itself, or a .tar.gz of it unpacked into a temp folder."""
    if path.is_dir():
        return path
    tmp = tempfile.TemporaryDirectory(prefix="feddm-gpu-")
    stack.append(tmp)
    with tarfile.open(path) as tar:
        tar.extractall(tmp.name, filter="data")
    return Path(tmp.name)


def run_fid(args: argparse.Namespace) -> None:
    """FID and KID of every cell's samples against the first N real test images."""
    import numpy as np
    import torch

    from feddm_flower.data.loading import load_dataset
    from feddm_flower.evaluation.fid import fid_kid, real_stats_name

    stack: list[tempfile.TemporaryDirectory] = []
    results = _results_dir(args.results, stack)
    out: Path = args.out or (args.results if args.results.is_dir() else args.results.parent)
    out.mkdir(parents=True, exist_ok=True)
    summary_file = results / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"cells": []}
    by_cell = {c["cell"]: c for c in summary["cells"]}
    real = load_dataset("fashion-mnist", args.data_root, train=False, limit=args.real)
    real_images = real.images.float() / 255
    rows = []
    for npz in sorted(results.glob("cells/*/samples.npz")):
        cell = npz.parent.name
        with np.load(npz) as f:
            fake = torch.from_numpy(f["images"]).float() / 255
        scores = fid_kid(
            fake,
            real_images,
            cache_dir=args.cache_dir,
            real_cache_name=real_stats_name("fashion-mnist-test", 28, len(real_images)),
        )
        rows.append({"cell": cell, **scores, **_cell_columns(by_cell.get(cell, {}))})
        print(f"{cell}: FID {scores['fid']:.2f}, KID {scores['kid']:.4f} "
              f"(N = {scores['num-fake']} vs {scores['num-real']})")  # fmt: skip
    (out / "fid.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "fid.md").write_text(fid_table(rows, summary) + "\n")
    print(f"wrote {out / 'fid.md'} and {out / 'fid.json'}")
    for tmp in stack:
        tmp.cleanup()


def _cell_columns(cell: dict[str, Any]) -> dict[str, Any]:
    speeds = [c["img-per-s-median"] for c in cell.get("clients", {}).values()]
    return {
        "rounds": cell.get("round"),
        GLOBAL_LOSS: cell.get(GLOBAL_LOSS),
        "bytes-up": cell.get(BYTES_UP_CUMULATIVE),
        "client-img-per-s": round(statistics.mean(speeds)) if speeds else None,
        # Rounds 2 and later: round 1 also starts the workers' CUDA and loads the data.
        "overhead-share": _mean_later(cell.get("overhead-share-by-round", [])),
        ROUND_SECONDS: _mean_later(cell.get("round-seconds-by-round", [])),
    }


def _mean_later(values: list[float | None]) -> float | None:
    later = [v for v in values[1:] if v is not None]
    return round(statistics.mean(later), 4) if later else None


def fid_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The cells as a Markdown table, with the throughput benchmark's figures below it."""

    def fmt(v: object, spec: str) -> str:
        return "–" if v is None else format(v, spec)

    lines = [
        "| cell | rounds | FID | KID (± std) | N fake / real | global-loss | bytes up "
        "| training img/s per client (mean) | round s (2+) | outside training (2+) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {fmt(r['rounds'], 'd')} | {r['fid']:.2f} "
            f"| {r['kid']:.4f} ± {r['kid-std']:.4f} | {r['num-fake']} / {r['num-real']} "
            f"| {fmt(r['global-loss'], '.4f')} | {fmt(r['bytes-up'], ',d')} "
            f"| {fmt(r['client-img-per-s'], 'd')} | {fmt(r['round-seconds'], '.1f')} "
            f"| {fmt(r['overhead-share'], '.1%')} |"
        )
    b = summary.get("bench") or {}
    for name, r in b.get("runs", {}).items():
        share = f", {r['peak_share']:.1%} of peak bf16" if r.get("peak_share") else ""
        lines.append(
            f"\nbench {name}: {r['img_per_s']:.0f} img/s{share} ({b['preset']} "
            f"{b['image_size']} px, {b['parameters'] / 1e6:.1f} M parameters, batch "
            f"{b['batch_size']}, {b['mixed_precision']}, {b['steps']} steps, {b['device_name']})"
        )
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m feddm_flower.tools.gpu_kit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    repo = Path(__file__).resolve().parents[2]

    pack = commands.add_parser("pack", help="wheels + FashionMNIST for the GPU machine")
    pack.add_argument("--kit", type=Path, default=repo / "gpu-kit", help="kit folder (replaced)")
    pack.add_argument("--fashion-mnist", type=Path, default=FASHION_MNIST_GZ)
    pack.add_argument("--repo", type=Path, default=repo, help="repository that travels too")
    pack.set_defaults(run=run_pack)

    smp = commands.add_parser("sample", help="DDIM samples of a saved model into an npz")
    smp.add_argument("model_dir", type=Path, help="a run's pipeline/ or checkpoint/")
    smp.add_argument("--out", type=Path, required=True)
    smp.add_argument("--num", type=int, default=1000)
    smp.add_argument("--steps", type=int, default=50, help="DDIM steps")
    smp.add_argument("--batch-size", type=int, default=500)
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    smp.set_defaults(run=run_sample)

    rep = commands.add_parser("report", help="summary.json of a GPU run's work folder")
    rep.add_argument("work", type=Path)
    rep.set_defaults(run=run_report)

    fid = commands.add_parser("fid", help="FID/KID of the returned samples (CPU is fine)")
    fid.add_argument("results", type=Path, help="gpu-paper.tar.gz or its unpacked folder")
    fid.add_argument("--real", type=int, default=1000, help="real test images (the first N)")
    fid.add_argument("--data-root", default="", help="dataset directory ('' = the cache)")
    fid.add_argument("--cache-dir", type=Path, help="Inception weights and real features")
    fid.add_argument("--out", type=Path, help="where fid.md/fid.json go (default: beside)")
    fid.set_defaults(run=run_fid)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
