"""This app under Flower's CLI on one machine: run-config text for ``flwr run``, the end of
the local SuperLink it starts, and free ports for the Flower processes that the tools and the
tests start themselves (their real runs)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

# What a Flower process logs when its port was taken (gRPC: "Port in server address ... is
# already in use."; HTTP: "address already in use"), lower-cased.
PORT_TAKEN = "already in use"
_handed_out: set[int] = set()


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and that this process has not
    handed out before: two processes started one after the other never get the same port,
    even when the first has not bound it yet."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def start_on_free_port(
    start: Callable[[int], subprocess.Popen],
    wait: Callable[[subprocess.Popen], object],
    log: Callable[[], str],
    attempts: int = 3,
) -> tuple[subprocess.Popen, int]:
    """``start(port)`` on a :func:`free_port`, then ``wait(process)`` until it is ready; if it
    ended because another process took the port between pick and bind (its ``log`` says
    so), again on a new port, up to ``attempts`` times. The process and its port."""
    for _ in range(attempts - 1):
        proc = start(port := free_port())
        try:
            wait(proc)
            return proc, port
        except Exception:
            if proc.poll() is None or PORT_TAKEN not in log().lower():
                raise
    proc = start(port := free_port())
    wait(proc)
    return proc, port
