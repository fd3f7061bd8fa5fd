"""The ablation command on a micro-grid: a consistent table, plots, and resuming skips cells."""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from feddm_flower.config import ConfigError
from feddm_flower.evaluation.artifacts import RunDirectory
from feddm_flower.fed.accounting import CommLedger
from feddm_flower.protocol import (
    DRIFT_MEAN,
    EVAL_LOSS,
    FID,
    FID_NUM_FAKE,
    GLOBAL_LOSS,
    GLOBAL_LOSS_EMA,
    KID,
    ROUND,
    WALL_SECONDS,
)
from feddm_flower.tools import ablate

REPO = Path(__file__).resolve().parents[1]
MICRO = (
    "num-server-rounds=1 local-steps=2 batch-size=16 eval-max-examples=16 "
    "sample-steps=3 grid-samples=4 fid-samples=8"
)


@pytest.fixture()
def isolated_flwr_home(flwr_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLWR_HOME", str(flwr_home))
    return flwr_home


def _grid(out: Path) -> None:
    ablate.main(
        [
            "--out",
            str(out),
            "--app",
            str(REPO),
            "--strategies",
            "vanilla,quant8",
            "--partitions",
            "iid",
            "--num-supernodes",
            "2",
            "--set",
            MICRO,
        ]
    )


def test_micro_grid_writes_a_consistent_table_and_resumes(
    isolated_flwr_home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ablation"
    _grid(out)
    with (out / "results.csv").open() as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"vanilla-iid", "quant8-iid"}
    vanilla, quant = rows["vanilla-iid"], rows["quant8-iid"]
    assert float(vanilla["fid_ratio_vs_vanilla"]) == 1.0
    assert float(quant["fid"]) > 0 and quant["fid_n"] == "8"
    assert float(quant["global_loss"]) > 0  # the server's global-loss, from summary.json
    assert 3.5 < float(quant["uplink_compression_vs_vanilla"]) < 4.5
    assert int(quant["bytes_up"]) < int(vanilla["bytes_up"])
    assert "python -m feddm_flower.tools.ablate" in (out / "results.md").read_text()
    for plot in ("fid_vs_round.png", "fid_vs_bytes.png"):
        assert (out / plot).stat().st_size > 0

    # Resume: real finished cells are not run again (a removed cell runs again: FakeRuns).
    logs = {c: (out / "cells" / c / "flwr.log").read_text() for c in rows}
    _grid(out)
    assert {c: (out / "cells" / c / "flwr.log").read_text() for c in rows} == logs


def test_unknown_cell_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        ablate.main(["--out", str(tmp_path), "--strategies", "fedsgd"])


# --- Grids over any key, validation before anything runs, failed cells (no real runs) -------

BYTES_UP = {"fp32": 4000, "fp16": 2000, "int8": 1000, "int4": 500}
SEED_NOISE = {0: -1.0, 1: 0.0, 2: 2.0}  # x FakeRuns.spread: FID and global-loss by seed (or 0)


class FakeRuns:
    """Stands in for `run_cell`: records the runs ("cell" or "cell/seedK"), "finishes" them
    with a summary whose bytes follow the uplink and whose FID is 100 + 10 * proximal-mu +
    ``spread`` * SEED_NOISE[seed], or fails those named in ``fail``."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.fail, self.spread, self.ran, self.configs = fail, 0.0, [], {}
        self.global_loss = True  # False: a summary from before the server wrote global-loss
        self.fid = True  # False: runs with eval-every=0

    def __call__(self, app: Path, cell_dir: Path, config: dict, supernodes: int) -> None:
        seeded = cell_dir.name.startswith("seed")
        name = f"{cell_dir.parent.name}/{cell_dir.name}" if seeded else cell_dir.name
        self.ran.append(name)
        self.configs[name] = {**config, "supernodes": supernodes}
        if name in self.fail:
            raise RuntimeError(f"cell {name} did not finish")
        down = 2000 if config.get("downlink") == "fp16" else 4000
        mu, noise = config.get("proximal-mu", 0.0), SEED_NOISE.get(config.get("seed", 0), 0.0)
        fid = 100.0 + 10 * mu + self.spread * noise
        global_loss = 0.05 + 0.01 * mu + 0.001 * self.spread * noise
        ledger = CommLedger()  # the server's own fields: bytes beside fp32 FedAvg's
        ledger.add(1, "down", 1, down, fp32_bytes=8000)  # the model in train and evaluate
        ledger.add(1, "up", 1, BYTES_UP[config.get("uplink", "fp32")], fp32_bytes=4000)
        line = {
            ROUND: 1,
            **({FID: fid, KID: fid / 1000, FID_NUM_FAKE: 1000} if self.fid else {}),
            EVAL_LOSS: 0.1,
            **({GLOBAL_LOSS: global_loss} if self.global_loss else {}),
            # the server's EMA scores 0.002 lower; drift grows with mu (as far as the plot cares)
            **({GLOBAL_LOSS_EMA: global_loss - 0.002} if config.get("server-ema") else {}),
            DRIFT_MEAN: 1.0 + mu,
            **ledger.round_summary(1),
            WALL_SECONDS: 1.0,
        }
        run = RunDirectory(cell_dir)
        run.append_metrics(line)
        run.write_summary()


@pytest.fixture()
def fake_runs(monkeypatch: pytest.MonkeyPatch) -> FakeRuns:
    runs = FakeRuns()
    monkeypatch.setattr(ablate, "run_cell", runs)
    monkeypatch.setattr(ablate, "stop_local_superlink", lambda home: None)
    return runs


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "results.csv").open() as f:
        return {r["cell"]: r for r in csv.DictReader(f)}


def test_grid_values_take_the_type_of_their_key() -> None:
    grid = ablate.parse_grid(
        "uplink=fp32,'int8' proximal-mu=0,0.01 seed=3 channels-last=false,true"
    )
    assert grid == {
        "uplink": ["fp32", "int8"],
        "proximal-mu": [0.0, 0.01],
        "seed": [3],
        "channels-last": [False, True],
    }
    assert all(type(v) is float for v in grid["proximal-mu"])
    assert type(grid["seed"][0]) is int


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("uplnk=fp32,int8", "unknown run-config key 'uplnk'; did you mean 'uplink'?"),
        ("proximal-mu=0,abc", "--grid proximal-mu='abc': proximal-mu is a float"),
        ("seed=0,1.5", "--grid seed='1.5': seed is a int"),
        ("channels-last=yes", "channels-last is true or false"),
        ("uplink", "--grid 'uplink' is not key=value1,value2,..."),
        ("uplink=fp32 uplink=int8", "--grid key 'uplink' given twice"),
        ("uplink=int8,int8", "a value is listed twice"),
        ("", "--grid is empty"),
    ],
)
def test_grid_parsing_refuses_unknown_keys_and_bad_values(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        ablate.parse_grid(text)
    assert message in str(err.value)


def test_grid_is_the_product_named_by_the_keys_that_vary() -> None:
    grid = ablate.parse_grid("uplink=fp32,int8,int4 seed=7 downlink=fp32,fp16")
    cells = ablate.grid_cells(grid, [])
    assert [c.name for c in cells] == [
        f"uplink={u},downlink={d}" for u in ("fp32", "int8", "int4") for d in ("fp32", "fp16")
    ]
    assert cells[3].config == {"uplink": "int8", "downlink": "fp16", "seed": 7}
    assert {c.baseline for c in cells} == {"uplink=fp32,downlink=fp32"}
    assert [c.name for c in ablate.grid_cells(ablate.parse_grid("proximal-mu=0.01"), [])] == [
        "proximal-mu=0.01"
    ]

    by_partition = ablate.grid_cells(ablate.parse_grid("uplink=fp32,int8"), ["iid", "dir0.1"])
    assert [(c.name, c.baseline) for c in by_partition] == [
        ("uplink=fp32,partition=iid", "uplink=fp32,partition=iid"),
        ("uplink=int8,partition=iid", "uplink=fp32,partition=iid"),
        ("uplink=fp32,partition=dir0.1", "uplink=fp32,partition=dir0.1"),
        ("uplink=int8,partition=dir0.1", "uplink=fp32,partition=dir0.1"),
    ]
    assert by_partition[3].config["dirichlet-alpha"] == 0.1
    with pytest.raises(ConfigError, match="'partitioning' is set by --partitions"):
        ablate.grid_cells(ablate.parse_grid("partitioning=iid,shards"), ["iid"])


def test_grid_runs_every_cell_with_total_traffic_columns(fake_runs: FakeRuns, tmp_path: Path):
    out = tmp_path / "grid"
    grid = "uplink=fp32,int8,int4 downlink=fp32,fp16 proximal-mu=0,0.01"
    ablate.main(["--out", str(out), "--grid", grid, "--set", "seed=5"])
    assert len(fake_runs.ran) == 12
    rows = _rows(out)
    base = rows["uplink=fp32,downlink=fp32,proximal-mu=0.0"]
    cell = rows["uplink=int8,downlink=fp16,proximal-mu=0.01"]
    assert (cell["uplink"], cell["downlink"], cell["proximal-mu"]) == ("int8", "fp16", "0.01")
    assert int(base["bytes_total"]) == 8000 and int(cell["bytes_total"]) == 3000
    assert float(base["traffic_compression_vs_first_cell"]) == 1.0
    assert float(cell["traffic_compression_vs_first_cell"]) == round(8000 / 3000, 3)
    assert float(cell["uplink_compression_vs_first_cell"]) == 4.0
    assert float(cell["fid_ratio_vs_first_cell"]) == round(100.1 / 100.0, 3)
    md = (out / "results.md").read_text()
    assert "| cell | uplink | downlink | proximal-mu | rounds |" in md
    assert "bytes_total" in md and "traffic_compression_vs_first_cell" in md
    assert "the first cell (uplink=fp32,downlink=fp32,proximal-mu=0.0)" in md
    for plot in ("fid_vs_round.png", "fid_vs_bytes.png"):
        assert (out / plot).stat().st_size > 0

    ablate.main(["--out", str(out), "--grid", grid, "--set", "seed=5"])  # rerun: all done
    assert len(fake_runs.ran) == 12


def test_named_cells_run_in_order_against_the_first(fake_runs: FakeRuns, tmp_path: Path):
    out = tmp_path / "cells"
    cells = "base: ; small: uplink=int4 downlink=fp16; half: uplink=fp16"
    ablate.main(["--out", str(out), "--cells", cells, "--partitions", "iid"])
    assert fake_runs.ran == ["base-iid", "small-iid", "half-iid"]
    rows = _rows(out)
    assert rows["small-iid"]["keys"] == "uplink=int4 downlink=fp16"
    assert float(rows["small-iid"]["traffic_compression_vs_first_cell"]) == round(8000 / 2500, 3)
    assert float(rows["small-iid"]["traffic_compression_vs_fedavg"]) == round(12000 / 2500, 3)
    assert float(rows["base-iid"]["traffic_compression_vs_fedavg"]) == 1.5
    for text, message in [
        ("a: uplink=int8; a: uplink=int4", "two cells are named 'a'"),
        ("a uplink=int8", "is not name: key=value"),
        ("a: uplink=int8,int4", "is not key=value (one value)"),
        ("a: uplnk=int8", "did you mean 'uplink'"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ablate.named_cells(ablate.parse_cells(text), [])


def test_strategy_cells_get_total_traffic_columns_too(fake_runs: FakeRuns, tmp_path: Path):
    out = tmp_path / "paper"
    ablate.main(["--out", str(out), "--strategies", "vanilla,quant4", "--partitions", "iid"])
    rows = _rows(out)
    assert list(rows["quant4-iid"])[:3] == ["cell", "strategy", "partition"]
    assert int(rows["quant4-iid"]["bytes_total"]) == 4500
    assert float(rows["quant4-iid"]["traffic_compression_vs_vanilla"]) == round(8000 / 4500, 3)
    assert float(rows["quant4-iid"]["uplink_compression_vs_vanilla"]) == 8.0


def test_a_failed_cell_fails_the_command_after_the_others_ran(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    runs = FakeRuns(fail=("uplink=int8",))
    monkeypatch.setattr(ablate, "run_cell", runs)
    monkeypatch.setattr(ablate, "stop_local_superlink", lambda home: None)
    out = tmp_path / "grid"
    with pytest.raises(SystemExit) as err:
        ablate.main(["--out", str(out), "--grid", "uplink=fp32,int8,int4"])
    assert runs.ran == ["uplink=fp32", "uplink=int8", "uplink=int4"]
    assert "1 of 3 cells did not finish: uplink=int8" in str(err.value.code)
    assert set(_rows(out)) == {"uplink=fp32", "uplink=int4"}  # the table has what finished

    runs.fail = ()  # rerunning retries only the failed cell
    ablate.main(["--out", str(out), "--grid", "uplink=fp32,int8,int4"])
    assert runs.ran[3:] == ["uplink=int8"]


def test_run_cell_without_a_summary_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """`flwr run` exits 0 when the ServerApp raised: no summary.json is a failure."""
    done = subprocess.CompletedProcess(args=[], returncode=0)
    monkeypatch.setattr(ablate.subprocess, "run", lambda *a, **k: done)
    with pytest.raises(RuntimeError, match="exit code 0, summary.json missing"):
        ablate.run_cell(REPO, tmp_path / "cell", {"seed": 0}, 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "uplnk=fp32,int8"], "did you mean 'uplink'?"),
        (["--grid", "uplink=fp32,int3"], "uplink='int3' is invalid"),
        (["--set", "num-server-round=2"], "did you mean 'num-server-rounds'?"),
        (["--set", "uplink=int8"], "a string needs quotes"),
        (["--set", "dirichlet-alpha=0.0"], "dirichlet-alpha=0.0 is invalid"),
        (["--grid", "uplink=int8", "--strategies", "vanilla"], "exclude each other"),
        (["--partitions", "dir9"], "unknown partition cell 'dir9'"),
    ],
)
def test_bad_overrides_are_refused_before_any_cell_runs(
    fake_runs: FakeRuns,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    with pytest.raises(SystemExit) as err:
        ablate.main(["--out", str(tmp_path / "out"), *args])
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert fake_runs.ran == []


def test_every_invalid_cell_is_reported_at_once(
    fake_runs: FakeRuns, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit):
        ablate.main(
            ["--out", str(tmp_path), "--grid", "strategy=vanilla,prox,quant uplink=fp32,int4"]
        )
    lines = capsys.readouterr().err.splitlines()
    for strategy in ("vanilla", "prox"):
        [line] = [x for x in lines if x.endswith(f"(cell strategy={strategy},uplink=int4)")]
        assert f"strategy={strategy!r} contradicts uplink='int4'" in line
    assert not any("(cell strategy=quant" in x for x in lines)
    assert fake_runs.ran == []


def test_cells_that_run_the_same_configuration_are_refused(
    fake_runs: FakeRuns, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit):
        ablate.main(["--out", str(tmp_path), "--grid", "strategy=quant uplink=fp32,int8"])
    err = capsys.readouterr().err
    assert "runs the same configuration as cell uplink=fp32" in err
    assert "(cell uplink=int8)" in err
    assert fake_runs.ran == []


def test_set_is_read_as_flower_reads_it() -> None:
    assert ablate.parse_overrides("data-root='/a b' seed=2") == {"data-root": "/a b", "seed": 2}


# --- Seeds: one run per cell and seed, mean ± sd per cell, the verdict, the protocol ----------

TWO_CELLS = "base: ; prox: proximal-mu=0.3"  # FakeRuns: FID 100 and 103 at spread 0


def _by_cell(out: Path) -> dict[str, dict[str, str]]:
    with (out / "results_by_cell.csv").open() as f:
        return {r["cell"]: r for r in csv.DictReader(f)}


def _seeded(out: Path, *extra: str) -> None:
    args = ["--out", str(out), "--cells", TWO_CELLS, "--partitions", "iid", "--seeds", "0,1,2"]
    ablate.main([*args, *extra])


def test_seeds_run_every_cell_once_per_seed_and_a_rerun_skips_them(
    fake_runs: FakeRuns, tmp_path: Path
) -> None:
    out = tmp_path / "seeds"
    _seeded(out)
    runs = [f"{c}-iid/seed{k}" for k in (0, 1, 2) for c in ("base", "prox")]
    assert fake_runs.ran == runs  # all cells of a seed before the next seed
    assert [fake_runs.configs[r]["seed"] for r in runs] == [0, 0, 1, 1, 2, 2]
    assert (out / "cells" / "prox-iid" / "seed2" / "summary.json").exists()
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["cell"], r["seed"]) for r in rows] == [
        (c, str(k)) for c in ("base-iid", "prox-iid") for k in (0, 1, 2)
    ]
    assert set(_by_cell(out)) == {"base-iid", "prox-iid"}
    for plot in ("fid_vs_round.png", "fid_vs_bytes.png"):
        assert (out / plot).stat().st_size > 0

    _seeded(out)  # rerun: every run is done
    assert len(fake_runs.ran) == 6
    shutil.rmtree(out / "cells" / "base-iid" / "seed1")
    _seeded(out)  # only the removed run again
    assert fake_runs.ran[6:] == ["base-iid/seed1"]


def test_the_cell_table_is_the_mean_and_sd_over_seeds(fake_runs: FakeRuns, tmp_path: Path):
    fake_runs.spread = 1.5
    out = tmp_path / "stats"
    _seeded(out)
    base, prox = _by_cell(out)["base-iid"], _by_cell(out)["prox-iid"]
    # FIDs by seed: base 98.5, 100, 103; prox 101.5, 103, 106 (mu=0.3 adds 3)
    assert float(base["fid_mean"]) == pytest.approx(100.5)
    assert float(base["fid_seed_sd"]) == pytest.approx(math.sqrt((2**2 + 0.5**2 + 2.5**2) / 2))
    assert float(prox["fid_mean"]) == pytest.approx(103.5)
    assert float(prox["fid_diff_vs_first_cell"]) == pytest.approx(3.0)
    assert float(prox["kid_mean"]) == pytest.approx(0.1035)
    # global-loss by seed: base 0.0485, 0.05, 0.053; prox 0.003 higher
    assert float(base["global_loss_mean"]) == pytest.approx(0.0505)
    assert float(base["global_loss_seed_sd"]) == pytest.approx(0.001 * math.sqrt(5.25))
    assert float(prox["global_loss_diff_vs_first_cell"]) == pytest.approx(0.003)
    assert float(base["eval_loss_seed_sd"]) == 0.0
    assert (base["seeds"], base["fid_n"], base["fid_vs_first_cell"]) == ("3", "1000", "baseline")
    assert int(prox["bytes_total"]) == 8000
    md = (out / "results.md").read_text()
    assert "| prox-iid | proximal-mu=0.3 | iid | 3 | 1 | 103.5 ± 2.3 | 1000 |" in md
    assert "## Per run" in md and "| cell | keys | partition | seed | rounds |" in md
    assert "Pareto front of bytes_total against the mean global_loss" in md
    assert (out / "loss_vs_bytes.png").stat().st_size > 0


def test_the_pareto_front_keeps_the_cells_no_other_beats_on_both() -> None:
    rows = [
        {"cell": "fp32", "bytes_total": 100, "global_loss_mean": 0.050},
        {"cell": "int8", "bytes_total": 30, "global_loss_mean": 0.050},  # beats fp32
        {"cell": "int4", "bytes_total": 15, "global_loss_mean": 0.052},
        {"cell": "bad", "bytes_total": 20, "global_loss_mean": 0.060},  # int4 beats it
        {"cell": "sparse", "bytes_total": 2, "global_loss_mean": 0.053},
        {"cell": "old", "bytes_total": 1, "global_loss_mean": None},  # no loss: not placed
    ]
    assert ablate.pareto_front(rows) == ["sparse", "int4", "int8"]


def test_drift_and_ema_loss_are_columns_and_every_run_plots_loss_and_drift(
    fake_runs: FakeRuns, tmp_path: Path
) -> None:
    ablate.main(["--out", str(tmp_path / "plain"), "--cells", TWO_CELLS, "--seeds", "0,1"])
    assert "global_loss_ema" not in (tmp_path / "plain" / "results.md").read_text()
    prox = _by_cell(tmp_path / "plain")["prox"]  # drift: the last round's drift-mean, 1 + mu
    assert float(prox["drift_mean"]) == pytest.approx(1.3)
    assert float(prox["drift_diff_vs_first_cell"]) == pytest.approx(0.3)
    out = tmp_path / "ema"
    ablate.main(["--out", str(out), "--cells", "raw: ; ema: server-ema=0.9", "--seeds", "0,1"])
    raw, ema = _by_cell(out)["raw"], _by_cell(out)["ema"]
    assert raw["global_loss_ema_mean"] == ""
    assert float(ema["global_loss_ema_mean"]) == pytest.approx(0.048)
    assert float(ema["global_loss_mean"]) == pytest.approx(0.05)
    md = (out / "results.md").read_text()
    assert "| global_loss | global_loss_ema | eval_loss |" in md
    assert "| 0.048 ± 0 |" in md
    for plot in ("global_loss_vs_round.png", "drift_vs_round.png"):
        assert (out / plot).stat().st_size > 0


def test_runs_without_fid_get_no_fid_plots_or_columns(fake_runs: FakeRuns, tmp_path: Path):
    fake_runs.fid = False
    ablate.main(["--out", str(tmp_path), "--cells", TWO_CELLS, "--seeds", "0,1"])
    assert not list(tmp_path.glob("fid_*.png"))
    assert (tmp_path / "drift_vs_round.png").stat().st_size > 0
    header = next(line for line in (tmp_path / "results.md").open() if line.startswith("| cell"))
    assert "fid" not in header and "| global_loss |" in header


@pytest.mark.parametrize(("spread", "verdict"), [(0.5, "exceeds"), (2.0, "within")])
def test_the_verdict_says_whether_a_difference_exceeds_the_spread_between_seeds(
    fake_runs: FakeRuns, tmp_path: Path, spread: float, verdict: str
) -> None:
    # Δ = 3 for FID, sd = spread * 1.53 in each cell: exceeds iff 3 > 2 * 1.53 * spread
    fake_runs.spread = spread
    _seeded(tmp_path)
    prox = _by_cell(tmp_path)["prox-iid"]
    assert prox["fid_vs_first_cell"] == prox["global_loss_vs_first_cell"] == verdict
    assert prox["eval_loss_vs_first_cell"] == "within"  # equal means, no spread
    assert f"| +3 {verdict} |" in (tmp_path / "results.md").read_text()


def test_the_spread_is_the_sum_of_the_sample_sds() -> None:
    assert ablate.exceeds_spread([1.0, 3.0], [3.0, 5.0]) is False  # |2 - 4| < 1.41 + 1.41
    assert ablate.exceeds_spread([1.0, 3.0], [4.0, 6.0]) is True  # |2 - 5| > 2.83
    assert ablate.exceeds_spread([1.0], [5.0, 6.0]) is None


def test_one_seed_and_older_runs_leave_spread_and_global_loss_empty(
    fake_runs: FakeRuns, tmp_path: Path
) -> None:
    fake_runs.global_loss = False
    ablate.main(["--out", str(tmp_path), "--cells", TWO_CELLS, "--seeds", "0"])
    prox = _by_cell(tmp_path)["prox"]
    assert prox["fid_seed_sd"] == "" and prox["fid_vs_first_cell"] == ""
    assert prox["global_loss_mean"] == "" and _rows(tmp_path)["prox"]["global_loss"] == ""
    assert "| 103 ± n/a | 1000 |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "seed=1,2"], "--seeds and cell seed=1 exclude each other"),
        (["--cells", "a: ; b: seed=3"], "the cell sets seed=3 itself"),
        (["--set", "seed=4"], "--seeds and --set seed=... exclude each other"),
    ],
)
def test_seeds_refuse_a_seed_set_elsewhere(
    fake_runs: FakeRuns,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    _refused(["--out", str(tmp_path), "--seeds", "0,1,2", *args], message, capsys, fake_runs)


def _refused(argv: list[str], message: str, capsys, fake_runs: FakeRuns) -> None:
    """``ablate.main(argv)`` exits 2 with ``message`` on stderr before running anything."""
    with pytest.raises(SystemExit) as err:
        ablate.main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert fake_runs.ran == []


def test_seeds_are_listed_not_counted() -> None:
    assert ablate.parse_seeds("0,1,2") == [0, 1, 2]
    assert ablate.parse_seeds("3") == [3]  # seed 3, not three seeds


@pytest.mark.parametrize("text", ["0,1,1", "-1,0", "0,,1", "a", ""])
def test_seeds_are_distinct_non_negative_integers(text: str) -> None:
    with pytest.raises(ConfigError, match="--seeds"):
        ablate.parse_seeds(text)


def test_protocol_cpu90_expands_to_the_documented_cells(fake_runs: FakeRuns, tmp_path: Path):
    out = tmp_path / "cpu90"
    ablate.main(["--out", str(out), "--protocol", "cpu90", "--set", "data-root='/d'"])
    cells = [f"{s}-{p}" for p in ("iid", "dir0.1") for s in ("vanilla", "prox", "quant8", "quant4")]
    assert fake_runs.ran == [f"{c}/seed{k}" for k in (0, 1, 2) for c in cells]
    config = fake_runs.configs["quant4-dir0.1/seed2"]
    assert config == {
        "eval-every": 3,
        "num-server-rounds": 3,
        "local-steps": 60,
        "fid-samples": 1000,
        "sample-steps": 25,
        "data-root": "/d",
        "strategy": "quant",
        "uplink": "int4",
        "partitioning": "dirichlet",
        "dirichlet-alpha": 0.1,
        "seed": 2,
        "supernodes": 2,
    }
    assert len(_by_cell(out)) == 8
    options = " ".join(ablate.PROTOCOLS["cpu90"].args()[:-1])  # all but --set's value
    assert options in (out / "results.md").read_text()
    assert "--protocol cpu90" in (REPO / "README.md").read_text()
    documented = (REPO / "docs" / "results.md").read_text()
    assert "--protocol cpu90" in documented
    protocol = ablate.PROTOCOLS["cpu90"]
    for value in (protocol.strategies, protocol.partitions, protocol.seeds, protocol.settings):
        assert value in documented


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategies", "vanilla"], "--protocol cpu90 fixes --strategies"),
        (["--num-supernodes", "4"], "--protocol cpu90 fixes --num-supernodes"),
        (["--set", "fid-samples=100"], "--set fid-samples: --protocol cpu90 fixes it"),
        (["--set", "seed=1"], "--set seed: --protocol cpu90 fixes it"),
    ],
)
def test_protocol_options_are_fixed(
    fake_runs: FakeRuns,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    _refused(["--out", str(tmp_path), "--protocol", "cpu90", *args], message, capsys, fake_runs)
