"""`python -m feddm_flower.tools.attack_table`: one real cell, its JSON and its table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from feddm_flower.tools.attack_table import main

SMALL = {"num-server-rounds": 1, "local-steps": 2, "batch-size": 8, "server-eval-examples": 20}


def test_one_cell_writes_rows_and_a_table_and_render_rebuilds_it(tmp_path: Path) -> None:
    """Sign flips of 1 of 3 nodes, the mean with the bounds on and off: each row has finite
    figures, the table has one row and two columns, and --render gives the same table."""
    out, table = tmp_path / "cells.json", tmp_path / "table.md"
    main(["--nodes", "3", "--colluders", "1", "--seeds", "0", "--attacks", "sign-flip",
          "--defences", "mean", "--set", json.dumps(SMALL), "--out", str(out),
          "--markdown", str(table)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["bounds"], r["attack"]) for r in rows] == [("on", "sign-flip"), ("off", "sign-flip")]
    assert all(math.isfinite(r["relative-loss"]) and r["honest-global-loss"] > 0 for r in rows)
    text = table.read_text()
    assert "| sign-flip |" in text and "mean, bounds on | mean, bounds off" in text
    main(["--render", str(out), "--markdown", str(tmp_path / "again.md")])
    assert (tmp_path / "again.md").read_text() == text
