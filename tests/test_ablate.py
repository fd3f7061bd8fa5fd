"""The ablation command on a micro-grid: a consistent table, plots, and resuming skips cells."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from feddm_flower import ablate
from feddm_flower.config import ConfigError

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
    assert 3.5 < float(quant["uplink_compression_vs_vanilla"]) < 4.5
    assert int(quant["bytes_up"]) < int(vanilla["bytes_up"])
    assert "python -m feddm_flower.ablate" in (out / "results.md").read_text()
    for plot in ("fid_vs_round.png", "fid_vs_bytes.png"):
        assert (out / plot).stat().st_size > 0

    # Resume: the finished cell is not run again, the removed one is.
    kept_log = (out / "cells" / "vanilla-iid" / "flwr.log").read_text()
    shutil.rmtree(out / "cells" / "quant8-iid")
    _grid(out)
    assert (out / "cells" / "vanilla-iid" / "flwr.log").read_text() == kept_log
    assert (out / "cells" / "quant8-iid" / "summary.json").exists()


def test_unknown_cell_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        ablate.main(["--out", str(tmp_path), "--strategies", "fedsgd"])


# --- Grids over any key, validation before anything runs, failed cells (no real runs) -------

BYTES_UP = {"fp32": 4000, "fp16": 2000, "int8": 1000, "int4": 500}


class FakeRuns:
    """Stands in for `run_cell`: records the cells run, "finishes" them with a summary whose
    bytes follow the uplink, or fails those named in ``fail``."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.fail, self.ran = fail, []

    def __call__(self, app: Path, cell_dir: Path, config: dict, supernodes: int) -> None:
        self.ran.append(cell_dir.name)
        if cell_dir.name in self.fail:
            raise RuntimeError(f"cell {cell_dir.name} did not finish")
        down = 2000 if config.get("downlink") == "fp16" else 4000
        line = {
            "round": 1,
            "fid": 100.0 + 10 * config.get("proximal-mu", 0.0),
            "eval-loss": 0.1,
            "bytes-down-cumulative": down,
            "bytes-up-cumulative": BYTES_UP[config.get("uplink", "fp32")],
            # FedAvg would have sent 8000 down (the fp32 model in train and evaluate messages)
            "compression-down": 8000 / down,
            "compression-up": 4000 / BYTES_UP[config.get("uplink", "fp32")],
            "wall-seconds": 1.0,
        }
        cell_dir.mkdir(parents=True)
        (cell_dir / "metrics.jsonl").write_text(json.dumps(line) + "\n")
        (cell_dir / "summary.json").write_text(json.dumps(line))


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
