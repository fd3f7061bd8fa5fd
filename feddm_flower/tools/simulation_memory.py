"""``python -m feddm_flower.tools.bench simulation-memory``: memory of a real simulation against N.

In Flower's simulation engine every node's state lives in the one simulation process, so
whatever a node keeps between messages costs memory per node. This runs the app with
``flwr run`` on the simulation engine once per node count (``--nodes 2 8 32``), each a run of
its own, and samples every 0.5 s the proportional set size (PSS: shared pages split between
the processes that map them) summed over all processes of that run: the local SuperLink, the
simulation process, Ray and its actors, found by the run's own ``FLWR_HOME`` in their
environment. It reports each run's peak and the growth per extra node, in models (fp32 bytes
of the run's U-Net): the target is at most 0.1 model per extra node. From each run's
metrics.jsonl it also reports, per round, the server's own seconds once every training reply
is in (``server-time-train-close``: the last check and the round's close) and the models the
last check measured (``server-evaluations``): neither should grow with N in honest rounds.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from feddm_flower.tools.round_overhead import run_federation

TARGET_MODELS_PER_NODE = 0.1
DEFAULT_RUN_CONFIG = (
    "model-preset='paper' num-server-rounds=1 local-steps=1 batch-size=8 eval-max-examples=8 "
    "server-eval-examples=50 grid-samples=1 sample-steps=1"
)
MIB = 1 << 20
# Per round, from metrics.jsonl: the server's seconds once every reply is in, the models the
# last check measured, and the whole training phase as the server saw it.
SERVER_FIELDS = ("server-time-train-close", "server-evaluations", "server-time-train")


def _pss_bytes(pid: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:  # the process ended, or is not ours
        pass
    return 0


def run_pss(marker: str) -> int:
    """Summed PSS of the processes whose environment holds ``marker`` (``FLWR_HOME=...``)."""
    total, needle = 0, marker.encode() + b"\0"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ + b"\0":
            total += _pss_bytes(proc.name)
    return total


class PeakSampler:
    """Samples :func:`run_pss` every ``interval`` seconds in a thread until :meth:`stop`."""

    def __init__(self, marker: str, interval: float = 0.5) -> None:
        self.marker, self.interval, self.peak = marker, interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, run_pss(self.marker))

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


def model_bytes(run_config: str) -> int:
    """fp32 bytes of the U-Net the run-config builds (FashionMNIST sizes)."""
    from feddm_flower.app.overrides import parse
    from feddm_flower.config import RunConfig
    from feddm_flower.data.loading import IMAGE_SHAPES
    from feddm_flower.task.latents import model_space
    from feddm_flower.task.models import build_unet

    cfg = RunConfig.from_mapping(parse([run_config]))
    vae, channels, size = model_space(cfg.autoencoder, IMAGE_SHAPES[cfg.dataset])
    unet = build_unet(cfg.model_preset, size, channels, seed=0, latent=vae is not None)
    return 4 * sum(p.numel() for p in unet.state_dict().values())


def run(args: Any) -> dict[str, Any]:
    """One simulation per node count; the peaks and the growth per extra node."""
    out = Path(args.out or tempfile.mkdtemp(prefix="feddm-simulation-memory-"))
    model = model_bytes(args.run_config)
    cells = []
    for nodes in args.nodes:
        cell_dir = out / f"nodes{nodes}"
        sampler = PeakSampler(f"FLWR_HOME={cell_dir / 'flwr-home'}")
        started = time.monotonic()
        try:
            run_federation("simulation", cell_dir, args.run_config, nodes, args.threads)
        finally:
            peak = sampler.stop()
        rounds = [json.loads(line) for line in (cell_dir / "run" / "metrics.jsonl").open()]
        server = {key: [r.get(key) for r in rounds] for key in SERVER_FIELDS}
        cells.append({"nodes": nodes, "peak_bytes": peak, "seconds": time.monotonic() - started,
                      **server})  # fmt: skip
        print(f"simulation-memory: {nodes} nodes: peak {peak / MIB:,.0f} MiB", flush=True)
    first, last = cells[0], cells[-1]
    extra = last["nodes"] - first["nodes"]
    growth = (last["peak_bytes"] - first["peak_bytes"]) / extra / model if extra else math.nan
    return {
        "run_config": args.run_config,
        "threads_per_node": args.threads,
        "model_bytes": model,
        "cells": cells,
        "models_per_extra_node": growth,
        "target_models_per_extra_node": TARGET_MODELS_PER_NODE,
        "pass": growth <= TARGET_MODELS_PER_NODE,
        "out": str(out),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| nodes | peak PSS (MiB) | peak / model | seconds | server s after the last reply, "
        "per round | evaluations per round |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for c in report["cells"]:
        close = ", ".join(f"{t:.2f}" for t in c.get("server-time-train-close", []) if t is not None)
        evals = ", ".join(str(e) for e in c.get("server-evaluations", []) if e is not None)
        lines.append(
            f"| {c['nodes']} | {c['peak_bytes'] / MIB:,.0f} | "
            f"{c['peak_bytes'] / report['model_bytes']:.1f} | {c['seconds']:.0f} | {close} | "
            f"{evals} |"
        )
    lines.append(
        f"\nGrowth: **{report['models_per_extra_node']:.3f} model per extra node** (target <= "
        f"{report['target_models_per_extra_node']}); model {report['model_bytes'] / MIB:.1f} MiB."
    )
    return "\n".join(lines)
