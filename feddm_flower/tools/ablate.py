"""Ablations from one command: a grid of run-configs, one `flwr run` per cell and seed.

    python -m feddm_flower.tools.ablate --out outputs/ablation
    python -m feddm_flower.tools.ablate --grid "uplink=fp32,int8,int4 proximal-mu=0,0.01"
    python -m feddm_flower.tools.ablate --cells "fp32: ; int8: uplink=int8 downlink=int8"
    python -m feddm_flower.tools.ablate --seeds 0,1,2 --partitions iid
    python -m feddm_flower.tools.ablate --protocol cpu90 --out outputs/cpu90

The paper's comparison (default) is strategies x partitionings (--strategies, --partitions);
--grid takes the product of the values listed for any run-config keys instead, and --cells a
list of named cells (either optionally times --partitions). Every cell runs the same app,
seed, model, rounds and local work through `flwr run . --stream` (simulation engine); only
its own keys differ. With --seeds every cell runs once per seed (run-config `seed`), all cells
of one seed before the next seed, and the table gives each cell's mean and sample standard
deviation over its seeds and says which differences from the baseline exceed that spread.
--protocol runs a named, fixed comparison (PROTOCOLS). Every run's run-config
is validated before the first one runs. Finished runs (those with a summary.json) are
skipped and half-finished ones resumed, so rerunning the command after an interruption
completes the grid; a run that does not finish makes the command exit 1 after the others
ran. Writes results.csv (one row per run), results.md, fid_vs_round.png, fid_vs_bytes.png,
global_loss_vs_round.png and drift_vs_round.png (with --seeds also results_by_cell.csv, the
Pareto front of bytes against global loss in results.md, and loss_vs_bytes.png) into --out.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from tqdm import tqdm  # noqa: E402

from feddm_flower import configure_logging  # noqa: E402
from feddm_flower.app.launch import (  # noqa: E402
    flwr_executable,
    run_config_text,
    stop_local_superlink,
    toml_value,
)
from feddm_flower.app.overrides import parse as parse_run_config  # noqa: E402
from feddm_flower.config import ConfigError, RunConfig, Value  # noqa: E402
from feddm_flower.protocol import (
    BYTES_DOWN_CUMULATIVE,
    BYTES_UP_CUMULATIVE,
    DRIFT_MEAN,
    EVAL_LOSS,
    FID,
    FID_NUM_FAKE,
    FINAL_EVAL_LOSS,
    GLOBAL_LOSS,
    GLOBAL_LOSS_EMA,
    KID,
    WALL_SECONDS,
)

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
# The table's columns after the ones naming a cell; {base} is what ratios compare against:
# "vanilla" (strategies x partitions) or "first_cell" (a --grid).
RESULT_COLUMNS = [
    "rounds",
    "fid",
    "kid",
    "kid_std",
    "fid_n",
    "eval_loss",
    "global_loss",
    "global_loss_ema",
    "drift",
    "bytes_down",
    "bytes_up",
    "bytes_total",
    "uplink_compression_vs_{base}",
    "traffic_compression_vs_{base}",
    "traffic_compression_vs_fedavg",
    "fid_ratio_vs_{base}",
    "wall_seconds",
]
COLUMNS = ["cell", "strategy", "partition"] + [c.format(base="vanilla") for c in RESULT_COLUMNS]
# With --seeds: the per-run metrics that results_by_cell.csv and results.md give as mean and
# sample standard deviation over seeds, with the verdict against the baseline (lower is better,
# but for drift: the final round's mean client drift ‖w_local − w_global‖).
SEED_METRICS = ["fid", "kid", "global_loss", "global_loss_ema", "eval_loss", "drift"]
# The per-run metrics a run may not have logged (no FID without eval-every, no EMA without
# server-ema, no global-loss from older runs).
RUN_METRICS = ["kid_std", "fid_n", "fid_ratio_vs_{base}", *SEED_METRICS]


@dataclass(frozen=True)
class Protocol:
    """A named ablation whose cells, seeds, nodes and run-config are fixed, so its results
    compare across machines and commits; --set may only add keys it leaves open (data-root)."""

    strategies: str
    partitions: str
    seeds: str
    num_supernodes: int
    settings: str  # --set

    def args(self) -> list[str]:
        """The options it stands for."""
        return ["--strategies", self.strategies, "--partitions", self.partitions,
                "--seeds", self.seeds, "--num-supernodes", str(self.num_supernodes),
                "--set", self.settings]  # fmt: skip


PROTOCOLS: dict[str, Protocol] = {
    # vanilla, prox, int8 and int4 uplink, IID and Dirichlet 0.1, 3 seeds: 24 runs in about
    # 90 minutes on a 2-core CPU machine (the estimate: docs/results.md, "Protocol cpu90").
    "cpu90": Protocol(
        strategies="vanilla,prox,quant8,quant4",
        partitions="iid,dir0.1",
        seeds="0,1,2",
        num_supernodes=2,
        settings=(
            "num-server-rounds=3 local-steps=60 eval-every=3 fid-samples=1000 sample-steps=25"
        ),
    ),
}


@dataclass(frozen=True)
class Cell:
    """One `flwr run` of the ablation."""

    name: str  # its directory under <out>/cells and its row in the table
    describe: dict[str, object]  # the table's columns naming it (strategy, partition, grid keys)
    config: dict[str, object]  # its run-config keys, over --set
    panel: str  # its plot panel (the partitioning)
    line: str  # its line in that panel
    baseline: str  # the cell its ratios compare against


def strategy_cells(strategies: list[str], partitions: list[str]) -> list[Cell]:
    """The paper's comparison: every strategy on every partitioning, ratios vs vanilla."""
    return [
        Cell(
            name=f"{s}-{p}",
            describe={"strategy": s, "partition": p},
            config={**STRATEGY_CELLS[s], **PARTITION_CELLS[p]},
            panel=p,
            line=s,
            baseline=f"vanilla-{p}",
        )
        for p in partitions
        for s in strategies
    ]


def parse_grid(text: str) -> dict[str, list[Value]]:
    """``"key=v1,v2 key2=v3"`` into {key: values}, each value of the key's RunConfig type.

    Values are written as in --run-config, quotes optional for strings (no spaces or commas).
    Raises ``ConfigError`` naming an unknown key (and the closest known one) or a bad value.
    """
    grid: dict[str, list[Value]] = {}
    for item in text.split():
        key, sep, values = item.partition("=")
        if not key or not sep or not values:
            raise ConfigError(f"--grid {item!r} is not key=value1,value2,...")
        kind = RunConfig.key_type(key)
        if key in grid:
            raise ConfigError(f"--grid key {key!r} given twice; list all its values once")
        parsed = [_grid_value(key, v, kind) for v in values.split(",")]
        if len(set(parsed)) < len(parsed):
            raise ConfigError(f"--grid {item}: a value is listed twice")
        grid[key] = parsed
    if not grid:
        raise ConfigError("--grid is empty; give key=value1,value2,... pairs")
    return grid


def parse_cells(text: str) -> dict[str, dict[str, Value]]:
    """``"name: key=v key2=v; name2: key=v"`` into {name: run-config}, in order (the first is
    the baseline; it may set nothing). Values as in --grid; ``ConfigError`` names the problem."""
    cells: dict[str, dict[str, Value]] = {}
    for item in filter(str.strip, text.split(";")):
        name, sep, keys = item.partition(":")
        name = name.strip()
        if not sep or not name or "/" in name:
            raise ConfigError(f"--cells {item.strip()!r} is not name: key=value key=value ...")
        if name in cells:
            raise ConfigError(f"--cells: two cells are named {name!r}")
        cells[name] = {}
        for pair in keys.split():
            key, eq, value = pair.partition("=")
            if not key or not eq or not value or "," in value:
                raise ConfigError(f"--cells {name}: {pair!r} is not key=value (one value)")
            cells[name][key] = _grid_value(key, value, RunConfig.key_type(key))
    if not cells:
        raise ConfigError("--cells is empty; give name: key=value ...; name2: ...")
    return cells


def named_cells(cells: dict[str, dict[str, Value]], partitions: list[str]) -> list[Cell]:
    """The named cells, on each partitioning if given; ratios against the first cell."""
    first = next(iter(cells))
    out = []
    for p in partitions or [""]:
        for name, config in cells.items():
            suffix = f"-{p}" if p else ""
            describe = {"keys": " ".join(f"{k}={_value_text(v)}" for k, v in config.items())}
            out.append(Cell(f"{name}{suffix}", describe | ({"partition": p} if p else {}),
                            {**config, **(PARTITION_CELLS[p] if p else {})}, p, name,
                            f"{first}{suffix}"))  # fmt: skip
    return out


def _grid_value(key: str, text: str, kind: type) -> Value:
    """``text`` as a value of ``kind`` (TOML spelling: true/false, quotes optional)."""
    if kind is str:
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        return text[1:-1] if quoted else text
    if kind is bool and text in ("true", "false"):
        return text == "true"
    if kind is not bool:
        try:
            return kind(text)
        except ValueError:
            pass
    spelled = "true or false" if kind is bool else f"a {kind.__name__}"
    raise ConfigError(f"--grid {key}={text!r}: {key} is {spelled}")


def grid_cells(grid: dict[str, list[Value]], partitions: list[str]) -> list[Cell]:
    """The product of the grid's values (first key slowest), on each partitioning if given.

    A cell is named by the keys that vary (all keys when none does), e.g.
    ``uplink=int8,proximal-mu=0.01``; its ratios compare with the grid's first cell on the same
    partitioning, so list the baseline value (e.g. fp32) first.
    """
    taken = {k for p in partitions for k in PARTITION_CELLS[p]} & set(grid)
    if taken:
        raise ConfigError(
            f"--grid key {sorted(taken)[0]!r} is set by --partitions; leave one of them out"
        )
    varying = [k for k, values in grid.items() if len(values) > 1] or list(grid)
    cells = []
    for p in partitions or [""]:
        first = None
        for combo in itertools.product(*grid.values()):
            config = dict(zip(grid, combo, strict=True))
            line = ",".join(f"{k}={_value_text(config[k])}" for k in varying)
            name = (f"{line},partition={p}" if p else line).replace("/", "_")
            first = first or name
            describe = {k: config[k] for k in varying} | ({"partition": p} if p else {})
            config.update(PARTITION_CELLS[p] if p else {})
            cells.append(Cell(name, describe, config, p, line, first))
    if len({c.name for c in cells}) < len(cells):
        raise ConfigError("--grid: two cells get the same name; spell the values differently")
    return cells


def _value_text(value: Value) -> str:
    return toml_value(value).strip("'")


def validate(cells: list[Cell], common: dict[str, object], out: Path) -> list[str]:
    """Every cell's run-config through ``RunConfig.from_mapping``; one line per problem."""
    problems: dict[str, list[str]] = {}
    seen: dict[RunConfig, str] = {}
    for cell in cells:
        config = {**common, **cell.config, "output-dir": str(out / "cells" / cell.name)}
        try:
            cfg = dataclasses.replace(RunConfig.from_mapping(config), output_dir="")
        except ConfigError as err:
            problems.setdefault(str(err), []).append(cell.name)
            continue
        if cfg in seen:  # e.g. strategy='quant' fills uplink='fp32', its default, with int8
            msg = f"runs the same configuration as cell {seen[cfg]} (a preset filled a default)"
            problems.setdefault(msg, []).append(cell.name)
        seen.setdefault(cfg, cell.name)
    return [f"{msg} (cell {', '.join(names)})" for msg, names in problems.items()]


def parse_overrides(text: str) -> dict[str, object]:
    """``"k=v k2=v2"`` with TOML values into a dict, read as `flwr run --run-config` reads it."""
    return dict(parse_run_config([text])) if text else {}


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` into [0, 1, 2]: the seeds themselves, distinct, each >= 0."""
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a list of seeds like 0,1,2") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) < len(seeds):
        raise ConfigError(f"--seeds {text!r}: seeds are distinct integers >= 0, like 0,1,2")
    return seeds


def run_dir(out: Path, cell: Cell, seed: int | None) -> Path:
    """Where one run of ``cell`` lands: <out>/cells/<cell>, or <out>/cells/<cell>/seed<k>."""
    path = out / "cells" / cell.name
    return path if seed is None else path / f"seed{seed}"


def run_cell(app: Path, cell_dir: Path, config: dict[str, object], supernodes: int) -> None:
    """One `flwr run` for one cell; resumes it if it has a checkpoint but no summary.

    Raises ``RuntimeError`` unless the run finished (wrote summary.json).
    """
    config = dict(config)
    if (cell_dir / "checkpoint").exists():
        config["resume"] = str(cell_dir)
    else:
        config["output-dir"] = str(cell_dir)
    cmd = [flwr_executable(), "run", str(app), "--stream"]
    cmd += ["--run-config", run_config_text(config), "--federation-config"]
    cmd.append(f"num-supernodes={supernodes} client-resources-num-cpus=1")
    cell_dir.mkdir(parents=True, exist_ok=True)
    with (cell_dir / "flwr.log").open("a") as logfile:
        proc = subprocess.run(cmd, stdout=logfile, stderr=subprocess.STDOUT, cwd=app)
    if proc.returncode != 0 or not (cell_dir / "summary.json").exists():
        raise RuntimeError(
            f"the run in {cell_dir} did not finish (flwr run exit code {proc.returncode}, "
            f"summary.json {'present' if (cell_dir / 'summary.json').exists() else 'missing'}); "
            f"see {cell_dir / 'flwr.log'}"
        )


def collect(
    out: Path, cells: list[Cell], base: str = "vanilla", seeds: list[int] | None = None
) -> list[dict[str, object]]:
    """One results row per finished run (cell, seed), with ratios against its baseline cell's
    run of the same seed."""
    rows = []
    for cell in cells:
        for seed in seeds or [None]:
            path = run_dir(out, cell, seed) / "summary.json"
            if not path.exists():
                continue
            s = json.loads(path.read_text())
            base_path = run_dir(out, _cell(cells, cell.baseline), seed) / "summary.json"
            b = json.loads(base_path.read_text()) if base_path.exists() else {}
            total = s[BYTES_DOWN_CUMULATIVE] + s[BYTES_UP_CUMULATIVE]
            rows.append(
                {
                    "cell": cell.name,
                    **cell.describe,
                    **({} if seed is None else {"seed": seed}),
                    "rounds": s["round"],
                    "fid": s.get(FID),
                    "kid": s.get(KID),
                    "kid_std": s.get("kid-std"),
                    "fid_n": s.get(FID_NUM_FAKE),
                    # The final model's: its own evaluate message (or the last round's).
                    "eval_loss": s.get(FINAL_EVAL_LOSS, s.get(EVAL_LOSS)),
                    "global_loss": s.get(GLOBAL_LOSS),
                    "global_loss_ema": s.get(GLOBAL_LOSS_EMA),
                    "drift": s.get(DRIFT_MEAN),
                    "bytes_down": s[BYTES_DOWN_CUMULATIVE],
                    "bytes_up": s[BYTES_UP_CUMULATIVE],
                    "bytes_total": total,
                    f"uplink_compression_vs_{base}": _ratio(
                        b.get(BYTES_UP_CUMULATIVE), s[BYTES_UP_CUMULATIVE]
                    ),
                    f"traffic_compression_vs_{base}": _ratio(_total(b), total),
                    "traffic_compression_vs_fedavg": _ratio(_fedavg_total(s), total),
                    f"fid_ratio_vs_{base}": _ratio(s.get(FID), b.get(FID)),
                    "wall_seconds": s[WALL_SECONDS],
                }
            )
    return rows


def _cell(cells: list[Cell], name: str) -> Cell:
    return next(c for c in cells if c.name == name)


_VERDICT = {True: "exceeds", False: "within", None: None}


def by_cell(
    rows: list[dict[str, object]], cells: list[Cell], base: str = "vanilla"
) -> list[dict[str, object]]:
    """One row per cell with a finished run: each of ``SEED_METRICS`` as mean and sample
    standard deviation over the cell's seeds (``_seed_sd``; None below 2 seeds), and against
    its baseline cell the difference of means (cell − baseline, ``_diff_vs_``) and whether it
    exceeds the spread (:func:`exceeds_spread`)."""
    runs = {c.name: [r for r in rows if r["cell"] == c.name] for c in cells}
    out = []
    for cell in cells:
        mine, theirs = runs[cell.name], runs[cell.baseline]
        if not mine:
            continue
        total = round(statistics.mean(r["bytes_total"] for r in mine))
        base_total = round(statistics.mean(r["bytes_total"] for r in theirs)) if theirs else None
        row = {"cell": cell.name, **cell.describe, "seeds": len(mine),
               "rounds": mine[0]["rounds"], "fid_n": _fid_n(mine)}  # fmt: skip
        for metric in SEED_METRICS:
            a = [r[metric] for r in mine if r[metric] is not None]
            b = [r[metric] for r in theirs if r[metric] is not None]
            row[f"{metric}_mean"] = statistics.mean(a) if a else None
            row[f"{metric}_seed_sd"] = statistics.stdev(a) if len(a) > 1 else None
            diff = statistics.mean(a) - statistics.mean(b) if a and b else None
            row[f"{metric}_diff_vs_{base}"] = diff
            verdict = "baseline" if cell.name == cell.baseline else _VERDICT[exceeds_spread(a, b)]
            row[f"{metric}_vs_{base}"] = verdict
        row["bytes_total"] = total
        row[f"traffic_compression_vs_{base}"] = _ratio(base_total, total)
        out.append(row)
    return out


def exceeds_spread(a: list[float], b: list[float]) -> bool | None:
    """Whether the means of ``a`` and ``b`` differ by more than the sum of their sample
    standard deviations; None when either has fewer than 2 values.

    A screening rule, not a test: with 3 seeds each and equal spreads it is Welch's t > 2.45,
    two-sided p ~= 0.07 at 4 degrees of freedom.
    """
    if len(a) < 2 or len(b) < 2:
        return None
    spread = statistics.stdev(a) + statistics.stdev(b)
    return abs(statistics.mean(a) - statistics.mean(b)) > spread


def _fid_n(rows: list[dict[str, object]]) -> object:
    """The FID sample count of the cell's runs; "min–max" if they differ."""
    counts = sorted({r["fid_n"] for r in rows if r["fid_n"] is not None})
    if len(counts) > 1:
        return f"{counts[0]}–{counts[-1]}"
    return counts[0] if counts else None


def _total(summary: dict[str, object]) -> int | None:
    down, up = summary.get(BYTES_DOWN_CUMULATIVE), summary.get(BYTES_UP_CUMULATIVE)
    return down + up if isinstance(down, int) and isinstance(up, int) else None


def _fedavg_total(summary: dict[str, object]) -> float | None:
    """What fp32 FedAvg would have sent (both directions; the full fp32 model in every
    message), from the ledger's ratios."""
    parts = [(summary.get(f"compression-{d}"), summary.get(f"bytes-{d}-cumulative"))
             for d in ("down", "up")]  # fmt: skip
    if all(isinstance(r, int | float) and isinstance(b, int) for r, b in parts):
        return sum(r * b for r, b in parts)
    return None


def _ratio(a: object, b: object) -> float | None:
    return round(a / b, 3) if isinstance(a, int | float) and isinstance(b, int | float) else None


def write_tables(
    out: Path,
    rows: list[dict[str, object]],
    command: str,
    columns: list[str] = COLUMNS,
    baseline: str = "vanilla on the same partitioning",
    cell_rows: list[dict[str, object]] | None = None,
    base: str = "vanilla",
    protocol: list[str] | None = None,
) -> None:
    """results.csv and results.md (with the command that produced them, and the options of
    its ``protocol``); with ``cell_rows`` (--seeds, from :func:`by_cell`) also
    results_by_cell.csv and their table in results.md."""
    _write_csv(out / "results.csv", rows, columns)
    # results.md leaves out the metrics no run logged (e.g. global_loss_ema without server-ema)
    optional = {c.format(base=base) for c in RUN_METRICS}
    columns = [c for c in columns if c not in optional or any(r.get(c) is not None for r in rows)]
    metrics = [m for m in SEED_METRICS if m in columns]
    expanded = f" (the protocol's options: `{shlex.join(protocol)}`)" if protocol else ""
    lines = ["# FedDM ablation", "", f"Command: `{command}`{expanded}", ""]
    if cell_rows is not None:
        names = columns[: columns.index("seed")]
        cell_columns = by_cell_columns(names, base)
        _write_csv(out / "results_by_cell.csv", cell_rows, cell_columns)
        scores = ["fid", "fid_n", *SEED_METRICS[1:]]  # the sample count beside FID
        shown = names + ["seeds", "rounds", *(c for c in scores if c in columns), "bytes_total",
                         f"traffic_compression_vs_{base}"]  # fmt: skip
        deltas = [f"Δ{m}_vs_{base}" for m in metrics]
        lines += [
            "## Per cell: mean ± sd over seeds",
            "",
            "Each cell ran once per seed (`seed` draws the partition, the initial weights and "
            "all noise). `mean ± sd`: mean and sample standard deviation (n − 1) over the "
            "cell's finished runs (`seeds`); `fid_n`: the FID sample count. `Δ`: the cell's mean "
            f"− that of its baseline, {baseline} (lower is better, but for `drift`, the final "
            "round's mean norm of the clients' updates), followed by "
            "`exceeds` if |Δ| > sd(cell) + sd(baseline), the difference exceeds the spread "
            "between seeds, else `within`; `n/a` with fewer than 2 seeds. A screening rule, not "
            "a test: with 3 seeds each and equal spreads it is Welch's t > 2.45 (two-sided "
            "p ≈ 0.07).",
            "",
            "| " + " | ".join(shown + deltas) + " |",
            "|" + "---|" * len(shown + deltas),
        ]
        for row in cell_rows:
            text = {c: _cell_text(row.get(c)) for c in shown}
            for m in metrics:
                text[m] = _mean_sd_text(row[f"{m}_mean"], row[f"{m}_seed_sd"])
            text |= {f"Δ{m}_vs_{base}": _delta_text(row, m, base) for m in metrics}
            lines.append("| " + " | ".join(text[c] for c in shown + deltas) + " |")
        front = pareto_front(cell_rows)
        if front:
            lines += [
                "",
                "Pareto front of bytes_total against the mean global_loss (no other cell has "
                f"both fewer bytes and a lower loss; loss_vs_bytes.png): {', '.join(front)}.",
            ]
        lines += ["", "## Per run", ""]
    lines += [
        f"Ratios compare each cell with its baseline, {baseline}"
        + (" (its run of the same seed)" if cell_rows is not None else "")
        + ": `uplink_compression` and "
        "`traffic_compression` are the baseline's bytes ÷ the cell's (uplink; `bytes_total` = "
        "down + up), above 1 = less traffic; `traffic_compression_vs_fedavg` compares with "
        "what Flower's FedAvg sends (the fp32 model in every message the run sent and "
        "every reply); `fid_ratio` is the cell's FID ÷ the baseline's.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell_text(row.get(c)) for c in columns) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def pareto_front(cell_rows: list[dict[str, object]], metric: str = "global_loss") -> list[str]:
    """The cells, by bytes, that no other cell beats on both mean ``bytes_total`` and mean
    ``metric`` (lower is better for both)."""
    points = [(r["bytes_total"], r[f"{metric}_mean"], r["cell"]) for r in cell_rows
              if r.get(f"{metric}_mean") is not None]  # fmt: skip

    def beaten(b: float, m: float) -> bool:
        return any(b2 <= b and m2 <= m and (b2, m2) != (b, m) for b2, m2, _ in points)

    return [c for b, m, c in sorted(points) if not beaten(b, m)]


def plot_front(out: Path, cell_rows: list[dict[str, object]], metric: str = "global_loss") -> None:
    """loss_vs_bytes.png: each cell's mean final ``metric`` (± sd over seeds) against its
    mean total bytes (log scale), the Pareto front joined by a line."""
    rows = [r for r in cell_rows if r.get(f"{metric}_mean") is not None]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, r in enumerate(rows):
        ax.errorbar(r["bytes_total"] / 1e6, r[f"{metric}_mean"], yerr=r[f"{metric}_seed_sd"],
                    marker="o", capsize=3, color=f"C{i % 10}", label=r["cell"])  # fmt: skip
    front = {c: i for i, c in enumerate(pareto_front(rows, metric))}
    line = sorted((r["bytes_total"] / 1e6, r[f"{metric}_mean"]) for r in rows if r["cell"] in front)
    ax.plot(*zip(*line, strict=True), color="0.5", linestyle=":", label="Pareto front")
    ax.set(xscale="log", xlabel="total bytes, down + up (MB)",
           ylabel=f"final {metric.replace('_', ' ')}")  # fmt: skip
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "loss_vs_bytes.png", dpi=120)
    plt.close(fig)


def by_cell_columns(names: list[str], base: str) -> list[str]:
    """results_by_cell.csv's columns: ``names`` (cell and what describes it), then those of
    :func:`by_cell`."""
    stats = [f"{m}_{x}" for m in SEED_METRICS
             for x in ("mean", "seed_sd", f"diff_vs_{base}", f"vs_{base}")]  # fmt: skip
    return names + ["seeds", "rounds", "fid_n", *stats, "bytes_total",
                    f"traffic_compression_vs_{base}"]  # fmt: skip


def _write_csv(path: Path, rows: list[dict[str, object]], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _cell_text(value: object) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _mean_sd_text(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4g} ± " + ("n/a" if sd is None else f"{sd:.2g}")


def _delta_text(row: dict[str, object], metric: str, base: str) -> str:
    diff, verdict = row[f"{metric}_diff_vs_{base}"], row[f"{metric}_vs_{base}"]
    if verdict == "baseline":
        return verdict
    if diff is None:
        return "–"
    return f"{diff:+.3g} {verdict or 'n/a'}"


# Per-round curves plot() draws besides FID: {file: (y label, {metrics.jsonl key: line style},
# log scale)}.
ROUND_PLOTS = {
    "global_loss_vs_round": ("global loss", {GLOBAL_LOSS: "-", GLOBAL_LOSS_EMA: "--"}, False),
    "drift_vs_round": ("client drift ‖w_local − w_global‖ (mean)", {DRIFT_MEAN: "-"}, True),
}


def plot(out: Path, cells: list[Cell], seeds: list[int] | None = None) -> None:
    """FID vs round and FID vs cumulative bytes (down + up), one panel per partitioning, and
    the ``ROUND_PLOTS``, each if the runs logged its metric (``global-loss-ema`` dashed, in its
    cell's colour); with ``seeds`` each point is the mean over the seeds that reached it, with
    ± sd error bars."""
    panels = list(dict.fromkeys(c.panel for c in cells))
    figures = {"fid_vs_round": ("round", "FID", {FID: "-"}, False),
               "fid_vs_bytes": ("cumulative bytes (MB)", "FID", {FID: "-"}, False)}  # fmt: skip
    figures |= {name: ("round", *spec) for name, spec in ROUND_PLOTS.items()}
    for name, (xlabel, ylabel, keys, log_scale) in figures.items():
        curves = {(c.name, key): _round_points(out, c, seeds, key) for c in cells for key in keys}
        if not any(curves.values()):
            continue  # e.g. no FID without eval-every, no drift in runs from before it
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6))
        for ax, panel in zip(list(getattr(axes, "flat", [axes])), panels, strict=True):
            mine = [c for c in cells if c.panel == panel]
            for (i, cell), key in itertools.product(enumerate(mine), keys):
                points = curves[cell.name, key]
                if not points:
                    continue
                mb = [statistics.mean(b for _, b in p) / 1e6 for p in points.values()]
                xs = mb if name == "fid_vs_bytes" else list(points)
                values = [[v for v, _ in p] for p in points.values()]
                sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
                ys = [statistics.mean(v) for v in values]
                label = cell.line + (" (EMA)" if key.endswith("-ema") else "")
                ax.errorbar(xs, ys, yerr=sds if any(sds) else None, marker="o", capsize=3,
                            linestyle=keys[key], color=f"C{i % 10}", label=label)  # fmt: skip
            ax.set(
                title=panel, xlabel=xlabel, ylabel=ylabel, yscale="log" if log_scale else "linear"
            )
            if xlabel == "round":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)


def _round_points(
    out: Path, cell: Cell, seeds: list[int] | None, key: str
) -> dict[int, list[tuple[float, int]]]:
    """{round: [(``key``'s value, cumulative bytes down + up) of each run that logged it]}."""
    points: dict[int, list[tuple[float, int]]] = {}
    for seed in seeds or [None]:
        metrics = run_dir(out, cell, seed) / "metrics.jsonl"
        if not metrics.exists():
            continue
        for r in map(json.loads, metrics.read_text().splitlines()):
            if key in r:
                total = r[BYTES_DOWN_CUMULATIVE] + r[BYTES_UP_CUMULATIVE]
                points.setdefault(r["round"], []).append((r[key], total))
    return dict(sorted(points.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/ablation"))
    parser.add_argument("--app", type=Path, default=Path("."))
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        help="a named comparison that fixes the cells, partitions, seeds, nodes and --set keys "
        "(README, Ablations); --set may add keys it leaves open",
    )
    parser.add_argument(
        "--strategies", help=f"strategy cells (default all: {','.join(STRATEGY_CELLS)})"
    )
    parser.add_argument(
        "--partitions",
        help=f"partition cells (default all: {','.join(PARTITION_CELLS)}; none with --grid)",
    )
    parser.add_argument(
        "--grid",
        help="instead of --strategies: the product of run-config values, e.g. "
        '"uplink=fp32,int8,int4 proximal-mu=0,0.01" (the first cell is the baseline)',
    )
    parser.add_argument(
        "--cells",
        help="instead of --strategies: named cells, e.g. "
        '"fp32: ; int8: uplink=int8 downlink=int8" (the first cell is the baseline)',
    )
    parser.add_argument(
        "--seeds",
        help="run every cell once per seed listed, e.g. 0,1,2 (three seeds), into "
        "<out>/cells/<cell>/seed<k>; the table gives mean ± sd over seeds",
    )
    parser.add_argument("--num-supernodes", type=int, help="SuperNodes per run (default 4)")
    parser.add_argument(
        "--set",
        default="",
        help='run-config for every cell, as for flwr run, e.g. "num-server-rounds=5 eval-every=1"',
    )
    args = parser.parse_args(argv)
    configure_logging()

    out, app = args.out.resolve(), args.app.resolve()
    try:
        given_set = parse_overrides(args.set)
    except ConfigError as err:
        parser.error(f"--set: {err}")
    common = {"eval-every": 1, **given_set}
    if args.protocol:
        fixed = [o for o in ("strategies", "partitions", "grid", "cells", "seeds",
                             "num_supernodes") if getattr(args, o) is not None]  # fmt: skip
        if fixed:
            parser.error(
                f"--protocol {args.protocol} fixes --{fixed[0].replace('_', '-')}; leave it "
                "out, or leave out --protocol and give every option yourself"
            )
        preset = PROTOCOLS[args.protocol]
        settings = parse_overrides(preset.settings)
        taken = sorted((set(settings) | {"seed"}) & set(given_set))
        if taken:
            parser.error(
                f"--set {taken[0]}: --protocol {args.protocol} fixes it "
                f"({preset.settings}, seeds {preset.seeds}); --set may only add other keys"
            )
        common = {"eval-every": 1, **settings, **given_set}
        args.strategies, args.partitions = preset.strategies, preset.partitions
        args.seeds, args.num_supernodes = preset.seeds, preset.num_supernodes
    supernodes = args.num_supernodes or 4
    try:
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    except ConfigError as err:
        parser.error(str(err))
    if seeds is not None and "seed" in common:
        parser.error("--seeds and --set seed=... exclude each other; list the seeds in --seeds")
    if args.grid and args.cells:
        parser.error("--grid and --cells exclude each other")
    chosen = args.grid or args.cells
    default_partitions = None if chosen else ",".join(PARTITION_CELLS)
    partitions = (args.partitions or default_partitions or "").split(",")
    partitions = [p for p in partitions if p]
    for name in partitions:
        if name not in PARTITION_CELLS:
            parser.error(f"unknown partition cell {name!r}; allowed: {', '.join(PARTITION_CELLS)}")
    if chosen:
        option = "--grid" if args.grid else "--cells"
        if args.strategies:
            parser.error(
                f"{option} and --strategies exclude each other; put strategy keys in the "
                f'cells, e.g. --grid "strategy=vanilla,prox uplink=fp32"'
            )
        try:
            if args.grid:
                cells = grid_cells(parse_grid(args.grid), partitions)
            else:
                cells = named_cells(parse_cells(args.cells), partitions)
        except ConfigError as err:
            parser.error(str(err))
        base, baseline = "first_cell", f"the first cell ({cells[0].name})"
        if partitions:
            baseline = "the first cell on the same partitioning"
    else:
        strategies = (args.strategies or ",".join(STRATEGY_CELLS)).split(",")
        for name in strategies:
            if name not in STRATEGY_CELLS:
                parser.error(
                    f"unknown strategy cell {name!r}; allowed: {', '.join(STRATEGY_CELLS)}"
                )
        cells = strategy_cells(strategies, partitions)
        base, baseline = "vanilla", "vanilla on the same partitioning"
    seeded = next((c for c in cells if "seed" in c.config), None)
    if seeds is not None and seeded is not None:
        parser.error(
            f"--seeds and cell {seeded.name} exclude each other: the cell sets "
            f"seed={seeded.config['seed']} itself; take seed out of the cells or leave out --seeds"
        )
    names = ["cell", *cells[0].describe]
    columns = names + (["seed"] if seeds else []) + [c.format(base=base) for c in RESULT_COLUMNS]
    problems = validate(cells, common | ({"seed": seeds[0]} if seeds else {}), out)
    if problems:
        parser.error("invalid run-config, nothing ran:\n  " + "\n  ".join(problems))

    out.mkdir(parents=True, exist_ok=True)
    flwr_home = Path(os.environ.setdefault("FLWR_HOME", str(app / ".flwr")))
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # All cells of one seed before the next: an interrupted command leaves whole comparisons.
    runs = [(cell, seed) for seed in seeds or [None] for cell in cells]
    failed = []
    try:
        for cell, seed in (bar := tqdm(runs, desc="ablation", unit="run")):
            label = cell.name if seed is None else f"{cell.name}/seed{seed}"
            path = run_dir(out, cell, seed)
            bar.set_postfix_str(label)
            if (path / "summary.json").exists():
                log.info("%s: done before, skipped", label)
                continue
            config = {**common, **cell.config, **({} if seed is None else {"seed": seed})}
            start = time.perf_counter()
            try:
                run_cell(app, path, config, supernodes)
            except RuntimeError as err:
                log.error("%s", err)
                failed.append(label)
                continue
            log.info("%s: finished in %.0f s", label, time.perf_counter() - start)
    finally:
        stop_local_superlink(flwr_home)
    rows = collect(out, cells, base, seeds)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "feddm_flower.tools.ablate", *given])
    protocol = PROTOCOLS[args.protocol].args() if args.protocol else None
    cell_rows = by_cell(rows, cells, base) if seeds else None
    write_tables(out, rows, command, columns, baseline, cell_rows, base, protocol)
    plot(out, cells, seeds)
    if cell_rows:
        plot_front(out, cell_rows)
    written = ["results.csv", "results.md"] + (["results_by_cell.csv"] if seeds else [])
    log.info("Wrote %s", ", ".join(str(out / f) for f in written))
    if failed:
        what = "cells" if seeds is None else "runs"
        raise SystemExit(
            f"ablation: {len(failed)} of {len(runs)} {what} did not finish: {', '.join(failed)} "
            f"(see {out / 'cells'}/<cell>{'/seed<k>' if seeds else ''}/flwr.log); rerun the "
            "command to retry them"
        )


if __name__ == "__main__":
    main()
