"""Attacks against defences: ``python -m feddm_flower.tools.attack_table`` writes the table of
docs/robustness.md.

Each cell is one federation run in this process: the real :class:`FedDMStrategy` with its
real round loop, guard, bounds and last check, built from the run-config as the ServerApp
builds it, and real nodes (:mod:`feddm_flower.app.node_tasks` on FashionMNIST partitions)
behind an :class:`~feddm_flower.app.hostile.AttackGrid` that delivers their replies in the
order the attack chooses. K of the N nodes are hostile (:mod:`feddm_flower.fed.attacks`). A
cell reports the final ``global-loss`` relative to the all-honest run under the same defence
and seed, and how far the final model is from the all-honest one, in units of the honest
training distance.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from feddm_flower import configure_logging
from feddm_flower.app.hostile import run_in_process
from feddm_flower.config import RunConfig
from feddm_flower.fed.attacks import (
    ATTACKS,
)
from feddm_flower.protocol import (
    GLOBAL_LOSS,
)

DEFENCES = {
    "mean": {},
    "median": {"aggregation": "median"},
    "trimmed-mean": {"aggregation": "trimmed-mean"},
    "krum": {"aggregation": "krum"},
}
# "off": no norm or count bound and no last check; the rule alone.
BOUNDS = {"on": {}, "off": {"norm-bound": 0.0, "weight-bound": 0.0, "max-loss-ratio": 0.0}}
BASE = {"fraction-evaluate": 0.0}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum())
                         for k in a if a[k].is_floating_point()))  # fmt: skip


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (defence, bounds, attack, seed), written to ``--out`` as it completes."""
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        cache: dict[tuple, object] = {}
        for defence in args.defences:
            for bounds in args.bounds:
                config = {**BASE, **args.set, **DEFENCES[defence], **BOUNDS[bounds], "seed": seed}
                honest = run_in_process(config, args.nodes, "none", 0, cache)
                moved = _distance(honest.final, honest.initial)
                for attack in args.attacks:
                    begun = time.monotonic()
                    run = run_in_process(config, args.nodes, attack, args.colluders, cache)
                    rows.append({
                        "defence": defence, "bounds": bounds, "attack": attack, "seed": seed,
                        "nodes": args.nodes, "colluders": args.colluders,
                        GLOBAL_LOSS: run.loss, "honest-global-loss": honest.loss,
                        "relative-loss": run.loss / honest.loss,
                        "distance-to-honest": _distance(run.final, honest.final) / moved,
                        "seconds": round(time.monotonic() - begun, 1),
                        **_server_work(run.strategy.history),
                    })  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
                    if args.out:
                        report = {"config": vars_text(args), "rows": rows}
                        args.out.write_text(json.dumps(report, indent=1))
    return rows


def _server_work(history: dict[int, dict[str, object]]) -> dict[str, list[int]]:
    """Per round: the models the server's last check measured, the replies it rejected."""
    rounds = sorted(history)
    return {
        "server-evaluations": [int(history[r].get("server-evaluations", 0)) for r in rounds],
        "rejected": [len(history[r].get("rejected", [])) for r in rounds],  # type: ignore[arg-type]
    }


def vars_text(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def _cell(rows: list[dict[str, Any]]) -> str:
    """Mean relative loss (and distance in honest training distances) over seeds."""
    rel = [r["relative-loss"] for r in rows]
    dist = [r["distance-to-honest"] for r in rows]
    if not all(math.isfinite(x) for x in rel):
        return f"NaN ({len(rows)})"
    spread = f" ±{statistics.stdev(rel):.2f}" if len(rel) > 1 else ""
    return f"{statistics.mean(rel):.2f}{spread} / {statistics.mean(dist):.1f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """Attacks as rows, defences x bounds as columns."""
    columns = sorted({(r["defence"], r["bounds"]) for r in rows},
                     key=lambda c: (list(DEFENCES).index(c[0]), c[1] != "on"))  # fmt: skip
    attacks = [a for a in ATTACKS if any(r["attack"] == a for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    head = "| attack | " + " | ".join(f"{d}, bounds {b}" for d, b in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for attack in attacks:
        cells = [_cell([r for r in rows if r["attack"] == attack
                        and (r["defence"], r["bounds"]) == c]) for c in columns]  # fmt: skip
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    n, k = rows[0]["nodes"], rows[0]["colluders"]
    lines.append("")
    lines.append(f"Each cell: final global-loss / the all-honest run's under the same defence "
                 f"(mean ± sd over {len(seeds)} seeds {seeds}) / distance of the final model "
                 f"from the all-honest one, in honest training distances. {k} hostile nodes "
                 f"of {n}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m feddm_flower.tools.attack_table",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--nodes", type=int, default=7)
    parser.add_argument("--colluders", type=int, default=2, help="hostile nodes (K)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS))
    parser.add_argument("--defences", nargs="+", choices=list(DEFENCES), default=list(DEFENCES))
    parser.add_argument("--bounds", nargs="+", choices=list(BOUNDS), default=list(BOUNDS))
    parser.add_argument("--set", type=json.loads, default={"num-server-rounds": 2,
                        "local-steps": 20, "batch-size": 32, "server-eval-examples": 200},
                        help="run-config keys for every cell, as JSON")  # fmt: skip
    parser.add_argument("--out", type=Path, help="JSON file, rewritten after every cell")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: the table of these --out files together")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    args = build_parser().parse_args(argv)
    if args.render:
        rows = [row for path in args.render for row in json.loads(path.read_text())["rows"]]
    else:
        RunConfig.from_mapping({**BASE, **args.set})  # a bad key fails here, before any run
        rows = measure(args)
    table = markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
