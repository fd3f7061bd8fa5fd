"""Ablations from one command: a grid of run-configs, one `flwr run` per cell.

    python -m feddm_flower.ablate --out outputs/ablation
    python -m feddm_flower.ablate --grid "uplink=fp32,int8,int4 proximal-mu=0,0.01"
    python -m feddm_flower.ablate --cells "fp32: ; int8: uplink=int8 downlink=int8"

The paper's comparison (default) is strategies x partitionings (--strategies, --partitions);
--grid takes the product of the values listed for any run-config keys instead, and --cells a
list of named cells (either optionally times --partitions). Every cell runs the same app,
seed, model, rounds and local work through `flwr run . --stream` (simulation engine); only
its own keys differ. Every cell's run-config
is validated before the first one runs. Finished cells (those with a summary.json) are
skipped and half-finished ones resumed, so rerunning the command after an interruption
completes the grid; a cell that does not finish makes the command exit 1 after the others
ran. Writes results.csv, results.md, fid_vs_round.png and fid_vs_bytes.png into --out.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from . import configure_logging  # noqa: E402
from .config import ConfigError, RunConfig, Value  # noqa: E402
from .overrides import parse as parse_run_config  # noqa: E402

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


def toml_value(value: object) -> str:
    """A run-config value as `flwr run --run-config` expects it (TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def parse_overrides(text: str) -> dict[str, object]:
    """``"k=v k2=v2"`` with TOML values into a dict, read as `flwr run --run-config` reads it."""
    return dict(parse_run_config([text])) if text else {}


def run_cell(app: Path, cell_dir: Path, config: dict[str, object], supernodes: int) -> None:
    """One `flwr run` for one cell; resumes it if it has a checkpoint but no summary.

    Raises ``RuntimeError`` unless the run finished (wrote summary.json).
    """
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
        raise RuntimeError(
            f"cell {cell_dir.name} did not finish (flwr run exit code {proc.returncode}, "
            f"summary.json {'present' if (cell_dir / 'summary.json').exists() else 'missing'}); "
            f"see {cell_dir / 'flwr.log'}"
        )


def collect(out: Path, cells: list[Cell], base: str = "vanilla") -> list[dict[str, object]]:
    """One results row per finished cell, with ratios against its baseline cell."""
    summaries = {}
    for cell in cells:
        path = out / "cells" / cell.name / "summary.json"
        if path.exists():
            summaries[cell.name] = json.loads(path.read_text())
    rows = []
    for cell in cells:
        if cell.name not in summaries:
            continue
        s, b = summaries[cell.name], summaries.get(cell.baseline, {})
        total = s["bytes-down-cumulative"] + s["bytes-up-cumulative"]
        base_total = _total(b)
        rows.append(
            {
                "cell": cell.name,
                **cell.describe,
                "rounds": s["round"],
                "fid": s.get("fid"),
                "kid": s.get("kid"),
                "kid_std": s.get("kid-std"),
                "fid_n": s.get("fid-num-fake"),
                "eval_loss": s.get("eval-loss"),
                "bytes_down": s["bytes-down-cumulative"],
                "bytes_up": s["bytes-up-cumulative"],
                "bytes_total": total,
                f"uplink_compression_vs_{base}": _ratio(
                    b.get("bytes-up-cumulative"), s["bytes-up-cumulative"]
                ),
                f"traffic_compression_vs_{base}": _ratio(base_total, total),
                "traffic_compression_vs_fedavg": _ratio(_fedavg_total(s), total),
                f"fid_ratio_vs_{base}": _ratio(s.get("fid"), b.get("fid")),
                "wall_seconds": s["wall-seconds"],
            }
        )
    return rows


def _total(summary: dict[str, object]) -> int | None:
    down, up = summary.get("bytes-down-cumulative"), summary.get("bytes-up-cumulative")
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
) -> None:
    """results.csv and results.md (with the command that produced them)."""
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# FedDM ablation",
        "",
        f"Command: `{command}`",
        "",
        f"Ratios compare each cell with its baseline, {baseline}: `uplink_compression` and "
        "`traffic_compression` are the baseline's bytes ÷ the cell's (uplink; `bytes_total` = "
        "down + up), above 1 = less traffic; `traffic_compression_vs_fedavg` compares with "
        "what Flower's FedAvg sends (the fp32 model in every train and evaluate message and "
        "every reply); `fid_ratio` is the cell's FID ÷ the baseline's.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell_text(row.get(c)) for c in columns) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _cell_text(value: object) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot(out: Path, cells: list[Cell]) -> None:
    """FID vs round and FID vs cumulative bytes (down + up), one panel per partitioning."""
    panels = list(dict.fromkeys(c.panel for c in cells))
    for name, xlabel in (("fid_vs_round", "round"), ("fid_vs_bytes", "cumulative bytes (MB)")):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6))
        for ax, panel in zip(list(getattr(axes, "flat", [axes])), panels, strict=True):
            for cell in cells:
                metrics = out / "cells" / cell.name / "metrics.jsonl"
                if cell.panel != panel or not metrics.exists():
                    continue
                rows = [json.loads(x) for x in metrics.read_text().splitlines()]
                rows = [r for r in rows if "fid" in r]
                if name == "fid_vs_round":
                    xs = [r["round"] for r in rows]
                else:
                    xs = [
                        (r["bytes-down-cumulative"] + r["bytes-up-cumulative"]) / 1e6 for r in rows
                    ]
                ax.plot(xs, [r["fid"] for r in rows], marker="o", label=cell.line)
            ax.set(title=panel, xlabel=xlabel, ylabel="FID")
            ax.legend(fontsize="small")
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
    parser.add_argument("--num-supernodes", type=int, default=4)
    parser.add_argument(
        "--set",
        default="",
        help='run-config for every cell, as for flwr run, e.g. "num-server-rounds=5 eval-every=1"',
    )
    args = parser.parse_args(argv)
    configure_logging()

    out, app = args.out.resolve(), args.app.resolve()
    try:
        common = {"eval-every": 1, **parse_overrides(args.set)}
    except ConfigError as err:
        parser.error(f"--set: {err}")
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
        columns = ["cell", *cells[0].describe] + [c.format(base=base) for c in RESULT_COLUMNS]
    else:
        strategies = (args.strategies or ",".join(STRATEGY_CELLS)).split(",")
        for name in strategies:
            if name not in STRATEGY_CELLS:
                parser.error(
                    f"unknown strategy cell {name!r}; allowed: {', '.join(STRATEGY_CELLS)}"
                )
        cells = strategy_cells(strategies, partitions)
        base, baseline, columns = "vanilla", "vanilla on the same partitioning", COLUMNS
    problems = validate(cells, common, out)
    if problems:
        parser.error("invalid run-config, nothing ran:\n  " + "\n  ".join(problems))

    out.mkdir(parents=True, exist_ok=True)
    flwr_home = Path(os.environ.setdefault("FLWR_HOME", str(app / ".flwr")))
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    failed = []
    try:
        for cell in (bar := tqdm(cells, desc="ablation", unit="cell")):
            cell_dir = out / "cells" / cell.name
            bar.set_postfix_str(cell.name)
            if (cell_dir / "summary.json").exists():
                log.info("%s: done before, skipped", cell.name)
                continue
            start = time.perf_counter()
            try:
                run_cell(app, cell_dir, {**common, **cell.config}, args.num_supernodes)
            except RuntimeError as err:
                log.error("%s", err)
                failed.append(cell.name)
                continue
            log.info("%s: finished in %.0f s", cell.name, time.perf_counter() - start)
    finally:
        stop_local_superlink(flwr_home)
    rows = collect(out, cells, base)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m feddm_flower.ablate", *given])
    write_tables(out, rows, command, columns, baseline)
    plot(out, cells)
    log.info("Wrote %s", ", ".join(str(out / f) for f in ("results.csv", "results.md")))
    if failed:
        raise SystemExit(
            f"ablation: {len(failed)} of {len(cells)} cells did not finish: {', '.join(failed)} "
            f"(see {out / 'cells'}/<cell>/flwr.log); rerun the command to retry them"
        )


if __name__ == "__main__":
    main()
