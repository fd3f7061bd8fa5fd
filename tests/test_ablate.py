"""The ablation command on a micro-grid: a consistent table, plots, and resuming skips cells."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from feddm_flower import ablate

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
