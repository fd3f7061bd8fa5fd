"""The codec benchmark runs end to end and reports what the targets are judged on."""

from __future__ import annotations

import json

import pytest

from feddm_flower import bench


def test_codec_benchmark_reports_sizes_speeds_and_errors(capsys: pytest.CaptureFixture) -> None:
    bench.main(["codecs", "--models", "tiny28", "--repeats", "1", "--threads", "1"])
    report = json.loads(capsys.readouterr().out)
    (model,) = report["models"]
    assert model["preset"] == "tiny" and len(model["runs"]) == 8
    for run in model["runs"]:
        assert run["max_error_in_steps"] <= 0.5 + 1e-6  # round to nearest: half a step at most
        assert 0 < run["rel_l2_error"] < (0.01 if run["bits"] == 8 else 0.2)
        assert run["ratio"] < 32 / run["bits"]
        assert run["copy_s"] > 0 and run["encode_vs_copy"] > 0 and run["decode_vs_copy"] > 0
    assert report["targets"]["ratio"]  # the size targets hold on every model
    worst = max(run["encode_vs_copy"] for run in model["runs"])
    assert report["targets"]["worst_encode_vs_copy"] == worst


def test_codec_benchmark_prints_a_markdown_table(capsys: pytest.CaptureFixture) -> None:
    bench.main(["codecs", "--models", "tiny28", "--repeats", "1", "--markdown"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("| model (parameters) | bits | block |")
    assert len(rows) == 2 + 8 and all(r.startswith("| tiny 28px (0.27 M) | int") for r in rows[2:])
