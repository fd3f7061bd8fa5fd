"""This app under Flower's CLI on one machine: run-config text for ``flwr run`` and the end of
the local SuperLink it starts (the tools' and the tests' real runs)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def flwr_executable(name: str = "flwr") -> str:
    """A Flower CLI beside this interpreter (a venv), else the one on PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def toml_value(value: object) -> str:
    """A run-config value as `flwr run --run-config` expects it (TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def run_config_text(config: Mapping[str, object]) -> str:
    """``{"k": v, ...}`` as one `--run-config` argument: ``k=v k2=v2``, values in TOML."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


def stop_local_superlink(flwr_home: Path) -> None:
    """End the local SuperLink that `flwr run` started for ``flwr_home`` (no CLI does this)."""
    subprocess.run(["pkill", "-f", f"flower-superlink.*{flwr_home}"], check=False)
