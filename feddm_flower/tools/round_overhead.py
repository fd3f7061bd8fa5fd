"""``python -m feddm_flower.tools.bench round-overhead``: where a real federation's rounds go.

Runs the app once with ``flwr run`` on one engine, on this machine:

- ``simulation``: Flower's simulation engine (a local SuperLink, Ray), ``--nodes`` SuperNodes
  of ``--threads`` CPUs each;
- ``deployment``: a real ``flower-superlink`` and ``--nodes`` ``flower-supernode`` processes on
  loopback, started with ``scripts/deploy/`` as users start them (each with its worker unless
  ``--no-worker``, and ``NUM_THREADS=--threads``),

then reads the run's ``metrics.jsonl`` and reports per round the wall time, the clients' mean
training seconds, the overhead share (1 - training / wall) and the clients' mean seconds per
phase (process start, handoff to the worker, data, model, train, encode; evaluation too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from feddm_flower.app.launch import flwr_executable, start_on_free_port, stop_local_superlink
from feddm_flower.fed.timings import OVERHEAD_KEY, PHASES
from feddm_flower.protocol import (
    ROUND_SECONDS,
)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "scripts" / "deploy"
# The CPU targets, rounds 2 and later: deployment overhead share <= 10% and a deployment
# round <= 1.10x the simulation round of the same run-config on the same machine.
TARGET_OVERHEAD = 0.10
TARGET_VS_SIMULATION = 1.10


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and pattern in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{path.stem} exited ({proc.returncode}); see {path}")
        time.sleep(0.2)
    raise RuntimeError(f"{path.stem} not ready after {timeout:.0f} s; see {path}")


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop every started process group (a script, its SuperNode/SuperLink, their children)."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_federation(
    engine: str,
    out: Path,
    run_config: str,
    nodes: int,
    threads: int,
    worker: bool = True,
    timeout: float = 3600.0,
) -> Path:
    """One ``flwr run`` of this app on ``engine``; its output directory (``out/run``)."""
    out.mkdir(parents=True, exist_ok=True)
    run_dir, logs = out / "run", out / "logs"
    logs.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "FLWR_HOME": str(out / "flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [flwr_executable("flwr"), "run", str(REPO)]
    config = f"{run_config} output-dir='{run_dir}'"
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str], extra: dict[str, str]) -> subprocess.Popen:
        log = (logs / f"{name}.log").open("w")
        proc = subprocess.Popen(
            args, env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append(proc)
        return proc

    try:
        if engine == "deployment":
            _, port = start_on_free_port(
                lambda p: start(
                    "superlink",
                    ["bash", str(DEPLOY / "superlink.sh")],
                    {"HOST": "127.0.0.1", "PORT": str(p), "STATE_DIR": "", "INSECURE": "1"},
                ),
                lambda link: _wait_for(logs / "superlink.log", "Uvicorn running on", link, 120),
                lambda: (logs / "superlink.log").read_text(errors="replace"),
            )
            for i in range(nodes):
                extra = {
                    "SUPERLINK": f"127.0.0.1:{port}",
                    "INSECURE": "1",
                    "WORKER": str(int(worker)),
                    "NUM_THREADS": str(threads),
                }
                node_log = logs / f"supernode-{i}.log"
                start_on_free_port(
                    lambda p, i=i, extra=extra: start(
                        f"supernode-{i}",
                        ["bash", str(DEPLOY / "supernode.sh"), str(i), str(nodes)],
                        {**extra, "PORT": str(p)},
                    ),
                    lambda node, node_log=node_log: _wait_for(node_log, "SuperNode ID:", node, 300),
                    lambda node_log=node_log: node_log.read_text(errors="replace"),
                )
            subprocess.run(
                [
                    "bash",
                    str(DEPLOY / "add-connection.sh"),
                    "bench",
                    f"127.0.0.1:{port}",
                    "--insecure",
                ],
                env=env,
                check=True,
                capture_output=True,
            )
            cmd.append("bench")
            config += f" min-nodes={nodes}"
        else:
            cmd += [
                "--federation-config",
                f"num-supernodes={nodes} client-resources-num-cpus={threads}",
            ]
        cmd += ["--stream", "--run-config", config]
        with (logs / "flwr-run.log").open("w") as log:
            subprocess.run(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                cwd=REPO,
                check=False,
            )
    finally:
        _stop(procs)
        if engine == "simulation":  # `flwr run` started a local SuperLink for this FLWR_HOME
            stop_local_superlink(out / "flwr-home")
    if not (run_dir / "summary.json").exists():
        raise RuntimeError(f"the {engine} run did not finish; see {logs / 'flwr-run.log'}")
    return run_dir


def round_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Per round: wall seconds, clients' mean training seconds, overhead share and the mean
    seconds per phase of the training and evaluation replies."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        row = {
            "round": m["round"],
            "round_seconds": m[ROUND_SECONDS],
            "train_seconds": m.get("train-seconds"),
            "overhead_share": m.get(OVERHEAD_KEY),
        }
        for phase in ("train", "evaluate"):
            for p in PHASES:
                if (v := m.get(f"{phase}-time-{p}")) is not None:
                    row[f"{phase}_{p}"] = v
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]], skip_first: bool = True) -> dict[str, float | None]:
    """Means over the rounds after the first (which also loads data and starts processes)."""
    later = rows[1:] if skip_first and len(rows) > 1 else rows

    def mean(key: str) -> float | None:
        values = [r[key] for r in later if r.get(key) is not None]
        return round(sum(values) / len(values), 4) if values else None

    return {
        "round_seconds": mean("round_seconds"),
        "train_seconds": mean("train_seconds"),
        "overhead_share": mean("overhead_share"),
    }


def run(args: Any) -> dict[str, Any]:
    """The subcommand: one federation per ``--engine`` given, and their comparison."""
    out = Path(args.out or tempfile.mkdtemp(prefix="round-overhead-"))
    report: dict[str, Any] = {
        "benchmark": "round-overhead",
        "run_config": args.run_config,
        "nodes": args.nodes,
        "threads": args.threads,
        "engines": {},
    }
    for engine in args.engine:
        start = time.perf_counter()
        run_dir = run_federation(
            engine, out / engine, args.run_config, args.nodes, args.threads, args.worker
        )
        rows = round_rows(run_dir)
        report["engines"][engine] = {
            "rounds": rows,
            "later_rounds": summarize(rows),
            "wall_seconds": round(time.perf_counter() - start, 1),
            "output_dir": str(run_dir),
        }
    engines = report["engines"]
    if {"deployment", "simulation"} <= engines.keys():
        d = engines["deployment"]["later_rounds"]["round_seconds"]
        s = engines["simulation"]["later_rounds"]["round_seconds"]
        report["deployment_vs_simulation"] = round(d / s, 3) if d and s else None
    if "deployment" in engines:
        share = engines["deployment"]["later_rounds"]["overhead_share"]
        report["targets"] = {
            "overhead_share": TARGET_OVERHEAD,
            "deployment_vs_simulation": TARGET_VS_SIMULATION,
        }
        report["deployment_overhead_ok"] = share is not None and share <= TARGET_OVERHEAD
    return report


def markdown(report: dict[str, Any]) -> str:
    """Per engine and round: wall, training, overhead share and the phases' means."""
    lines = []
    for engine, r in report["engines"].items():
        lines += [f"\n### {engine} ({report['nodes']} nodes, {report['threads']} threads each)\n"]
        phases = sorted(
            {
                k
                for row in r["rounds"]
                for k in row
                if "_" in k and k.split("_", 1)[0] in ("train", "evaluate") and k != "train_seconds"
            }
        )
        head = ["round", "wall s", "train s", "overhead", *phases]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in r["rounds"]:
            share = row["overhead_share"]
            cells = [
                row["round"],
                row["round_seconds"],
                row["train_seconds"],
                f"{share:.1%}" if share is not None else "–",
                *(row.get(p, "–") for p in phases),
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if (ratio := report.get("deployment_vs_simulation")) is not None:
        lines.append(f"\ndeployment round / simulation round (rounds 2+): {ratio:.2f}x")
    return "\n".join(lines)
