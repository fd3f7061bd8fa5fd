"""docs/configuration.md is generated from config.py: the test fails when the two disagree on
a key, a default, an allowed value or a meaning."""

from __future__ import annotations

import dataclasses

import pytest

from feddm_flower.config import ConfigError, RunConfig
from feddm_flower.tools import config_docs


def test_the_page_is_what_config_py_says() -> None:
    assert config_docs.main(["--check"]) == 0, "run python -m feddm_flower.tools.config_docs"


def _rows(text: str) -> dict[str, list[str]]:
    """The key table's rows: key -> [default, allowed, meaning]."""
    table = text.split("\n## ")[0]
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| `")]
    return {cells[0].strip("`"): cells[1:] for cells in rows}


def test_every_key_is_on_the_page_with_its_default_and_what_its_check_allows() -> None:
    rows = _rows(config_docs.PAGE.read_text())
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(RunConfig)}
    assert list(rows) == list(fields)
    assert rows["uplink"][:2] == ["`'fp32'`", "one of 'fp32', 'fp16', 'int8', 'int4', 'sparse'"]
    assert rows["num-server-rounds"][:2] == ["`6`", ">= 1"]
    assert rows["lossless"][:2] == ["`false`", "true or false"]
    with pytest.raises(ConfigError, match=r"allowed is >= 1$"):  # the check's own words
        RunConfig.from_mapping({"num-server-rounds": 0})


@pytest.mark.parametrize("change", ["default", "allowed", "help", "key"])
def test_a_change_in_the_code_fails_the_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path, change: str
) -> None:
    page = tmp_path / "configuration.md"
    assert (
        config_docs.main(["--out", str(page)]) == 0
        and config_docs.main(["--check", "--out", str(page)]) == 0
    )
    field = next(f for f in dataclasses.fields(RunConfig) if f.name == "local_steps")
    if change == "default":
        monkeypatch.setattr(field, "default", 100)
    elif change == "allowed":
        monkeypatch.setattr(field, "metadata", {**field.metadata, "check": lambda v: ">= 5"})
    elif change == "help":
        monkeypatch.setattr(field, "metadata", {**field.metadata, "help": "something else"})
    else:
        monkeypatch.setattr(field, "name", "local_stepz")
    assert config_docs.main(["--check", "--out", str(page)]) == 1
