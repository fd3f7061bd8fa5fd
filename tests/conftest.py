"""Shared fixtures: a real `flwr run` against a local SuperLink in a throw-away FLWR_HOME."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLWR = str(Path(sys.executable).with_name("flwr"))


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def stop_local_superlink(flwr_home: Path) -> None:
    """End the local SuperLink that `flwr run` started for ``flwr_home`` (no CLI does this)."""
    out = subprocess.run(["pgrep", "-f", f"flower-superlink.*{flwr_home}"], capture_output=True)
    for pid in out.stdout.split():
        os.kill(int(pid), signal.SIGTERM)


@pytest.fixture(scope="session")
def flwr_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("flwr-home")
    yield home
    stop_local_superlink(home)


@pytest.fixture(scope="session")
def flwr_run(flwr_home: Path):
    """Run the app with `flwr run . --stream` on the simulation engine; return the process."""

    def run(
        run_config: dict[str, object], num_supernodes: int = 2, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        env = {
            **os.environ,
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        cmd = [FLWR, "run", ".", "--stream", "--run-config", overrides, "--federation-config"]
        cmd.append(f"num-supernodes={num_supernodes} client-resources-num-cpus=1")
        return subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )

    return run
