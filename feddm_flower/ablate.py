"""The paper's comparison from one command: strategies x partitionings, one `flwr run` per cell.

    python -m feddm_flower.ablate --out outputs/ablation

Every cell runs the same app, seed, model, rounds and local work through `flwr run . --stream`
(simulation engine); only the strategy and partitioning keys differ. Finished cells (those with
a summary.json) are skipped and half-finished ones resumed, so rerunning the command after an
interruption completes the grid. Writes results.csv, results.md, fid_vs_round.png and
fid_vs_bytes.png into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from . import configure_logging  # noqa: E402

log = logging.getLogger(__name__)

STRATEGY_CELLS: dict[str, dict[str, object]] = {
    "vanilla": {"strategy": "vanilla"},
    "prox": {"strategy": "prox"},
    "quant8": {"strategy": "quant", "uplink": "int8"},
    "quant4": {"strategy": "quant", "uplink": "int4"},
}
PARTITION_CELLS: dict[str, dict[str, object]] = {
    "iid": {"partitioning": "iid"},
    "dir0.5": {"partitioning": "dirichlet", "dirichlet-alpha": 0.5},
    "dir0.1": {"partitioning": "dirichlet", "dirichlet-alpha": 0.1},
}
COLUMNS = [
    "cell",
    "strategy",
    "partition",
    "rounds",
    "fid",
    "kid",
    "kid_std",
    "fid_n",
    "eval_loss",
    "bytes_down",
    "bytes_up",
    "uplink_compression_vs_vanilla",
    "fid_ratio_vs_vanilla",
    "wall_seconds",
]


def toml_value(value: object) -> str:
    """A run-config value as `flwr run --run-config` expects it (TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def parse_overrides(text: str) -> dict[str, object]:
    """``"k=v k2=v2"`` with TOML values into a dict (as `flwr run --run-config` reads them)."""
    import tomllib

    return tomllib.loads("\n".join(text.split())) if text else {}


def run_cell(app: Path, cell_dir: Path, config: dict[str, object], supernodes: int) -> None:
    """One `flwr run` for one cell; resumes it if it has a checkpoint but no summary."""
    config = dict(config)
    if (cell_dir / "checkpoint").exists():
        config["resume"] = str(cell_dir)
    else:
        config["output-dir"] = str(cell_dir)
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in config.items())
    cmd = [str(Path(sys.executable).with_name("flwr")), "run", str(app), "--stream"]
    cmd += ["--run-config", overrides, "--federation-config"]
    cmd.append(f"num-supernodes={supernodes} client-resources-num-cpus=1")
    cell_dir.mkdir(parents=True, exist_ok=True)
    with (cell_dir / "flwr.log").open("a") as logfile:
        proc = subprocess.run(cmd, stdout=logfile, stderr=subprocess.STDOUT, cwd=app)
    if proc.returncode != 0 or not (cell_dir / "summary.json").exists():
        raise RuntimeError(f"cell {cell_dir.name} failed; see {cell_dir / 'flwr.log'}")


def collect(out: Path, cells: list[tuple[str, str]]) -> list[dict[str, object]]:
    """One results row per finished cell, with ratios against vanilla on the same partition."""
    rows, summaries = [], {}
    for strategy, partition in cells:
        path = out / "cells" / f"{strategy}-{partition}" / "summary.json"
        if path.exists():
            summaries[strategy, partition] = json.loads(path.read_text())
    for (strategy, partition), s in summaries.items():
        base = summaries.get(("vanilla", partition), {})
        rows.append(
            {
                "cell": f"{strategy}-{partition}",
                "strategy": strategy,
                "partition": partition,
                "rounds": s["round"],
                "fid": s.get("fid"),
                "kid": s.get("kid"),
                "kid_std": s.get("kid-std"),
                "fid_n": s.get("fid-num-fake"),
                "eval_loss": s.get("eval-loss"),
                "bytes_down": s["bytes-down-cumulative"],
                "bytes_up": s["bytes-up-cumulative"],
                "uplink_compression_vs_vanilla": _ratio(
                    base.get("bytes-up-cumulative"), s["bytes-up-cumulative"]
                ),
                "fid_ratio_vs_vanilla": _ratio(s.get("fid"), base.get("fid")),
                "wall_seconds": s["wall-seconds"],
            }
        )
    return rows


def _ratio(a: object, b: object) -> float | None:
    return round(a / b, 3) if isinstance(a, int | float) and isinstance(b, int | float) else None


def write_tables(out: Path, rows: list[dict[str, object]], command: str) -> None:
    """results.csv and results.md (with the command that produced them)."""
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# FedDM ablation",
        "",
        f"Command: `{command}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell_text(row[c]) for c in COLUMNS) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _cell_text(value: object) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot(out: Path, cells: list[tuple[str, str]]) -> None:
    """FID vs round and FID vs cumulative bytes (down + up), one panel per partitioning."""
    partitions = sorted({p for _, p in cells}, key=[p for _, p in cells].index)
    for name, xlabel in (("fid_vs_round", "round"), ("fid_vs_bytes", "cumulative bytes (MB)")):
        fig, axes = plt.subplots(1, len(partitions), figsize=(4.5 * len(partitions), 3.6))
        for ax, partition in zip(list(getattr(axes, "flat", [axes])), partitions, strict=True):
            for strategy, p in cells:
                metrics = out / "cells" / f"{strategy}-{p}" / "metrics.jsonl"
                if p != partition or not metrics.exists():
                    continue
                rows = [json.loads(x) for x in metrics.read_text().splitlines()]
                rows = [r for r in rows if "fid" in r]
                if name == "fid_vs_round":
                    xs = [r["round"] for r in rows]
                else:
                    xs = [
                        (r["bytes-down-cumulative"] + r["bytes-up-cumulative"]) / 1e6 for r in rows
                    ]
                ax.plot(xs, [r["fid"] for r in rows], marker="o", label=strategy)
            ax.set(title=partition, xlabel=xlabel, ylabel="FID")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)


def stop_local_superlink(flwr_home: Path) -> None:
    """End the local SuperLink that `flwr run` started for ``flwr_home`` (no CLI does this)."""
    subprocess.run(["pkill", "-f", f"flower-superlink.*{flwr_home}"], check=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/ablation"))
    parser.add_argument("--app", type=Path, default=Path("."))
    parser.add_argument("--strategies", default=",".join(STRATEGY_CELLS))
    parser.add_argument("--partitions", default=",".join(PARTITION_CELLS))
    parser.add_argument("--num-supernodes", type=int, default=4)
    parser.add_argument(
        "--set",
        default="",
        help='run-config for every cell, as for flwr run, e.g. "num-server-rounds=5 eval-every=1"',
    )
    args = parser.parse_args(argv)
    configure_logging()

    common = {"eval-every": 1, **parse_overrides(args.set)}
    strategies, partitions = args.strategies.split(","), args.partitions.split(",")
    for name in strategies:
        if name not in STRATEGY_CELLS:
            parser.error(f"unknown strategy cell {name!r}; allowed: {', '.join(STRATEGY_CELLS)}")
    for name in partitions:
        if name not in PARTITION_CELLS:
            parser.error(f"unknown partition cell {name!r}; allowed: {', '.join(PARTITION_CELLS)}")
    cells = [(s, p) for p in partitions for s in strategies]
    out, app = args.out.resolve(), args.app.resolve()
    out.mkdir(parents=True, exist_ok=True)
    flwr_home = Path(os.environ.setdefault("FLWR_HOME", str(app / ".flwr")))
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"

    try:
        for strategy, partition in (bar := tqdm(cells, desc="ablation", unit="cell")):
            cell_dir = out / "cells" / f"{strategy}-{partition}"
            bar.set_postfix_str(cell_dir.name)
            if (cell_dir / "summary.json").exists():
                log.info("%s: done before, skipped", cell_dir.name)
                continue
            start = time.perf_counter()
            config = {**common, **STRATEGY_CELLS[strategy], **PARTITION_CELLS[partition]}
            run_cell(app, cell_dir, config, args.num_supernodes)
            log.info("%s: finished in %.0f s", cell_dir.name, time.perf_counter() - start)
    finally:
        stop_local_superlink(flwr_home)
    rows = collect(out, cells)
    given = sys.argv[1:] if argv is None else argv
    write_tables(out, rows, " ".join(["python -m feddm_flower.ablate", *given]))
    plot(out, cells)
    log.info("Wrote %s", ", ".join(str(out / f) for f in ("results.csv", "results.md")))


if __name__ == "__main__":
    main()
