"""A node's long-lived worker: the ClientApp's tasks without a process start per message.

Flower's deployment engine starts a fresh ``flwr-clientapp`` process for every message. Each
one would import torch and diffusers, load and partition the data, build the U-Net, start
CUDA (and compile), then train for a while and exit, losing all of it. Started once beside a
SuperNode, this worker keeps all of that; the ClientApp process, given the node-config key
``worker`` (this socket's path), only imports Flower and hands each message over
(:func:`request`), with the node's Context, and writes back the reply and the node state.

Flower has no such mode for ClientApps (its warm executor pools are for Kubernetes and other
task types), hence this small module. The transport is the standard library's
:mod:`multiprocessing.connection` on a Unix socket, authenticated with a random key that only
the owner can read (``<socket>.key``, mode 0600); requests are served one at a time, as a
SuperNode runs one message at a time. The node's copy of the global model (what lets the
server send changes instead of the model) is a file of the node's store (node_store.py), whose
directory the node state names; a node whose state is lost is sent the full model again.

    python -m feddm_flower.app.worker --socket /tmp/feddm-node0.sock [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import threading
import time
import traceback
from collections.abc import Sequence
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from feddm_flower import configure_logging

log = logging.getLogger(__name__)
NODE_CONFIG_KEY = "worker"  # node-config key: the worker's socket path ("" or absent: none)


class WorkerUnavailable(RuntimeError):
    """The node's worker could not be reached or broke off; the caller runs the task itself."""


def key_path(address: str) -> Path:
    return Path(f"{address}.key")


def request(address: str, message: tuple[Any, ...]) -> tuple[Any, ...]:
    """Send ``message`` to the worker at ``address`` and return its answer."""
    try:
        key = key_path(address).read_bytes()
        with Client(address, family="AF_UNIX", authkey=key) as conn:
            conn.send(message)
            return conn.recv()
    except (OSError, EOFError, AuthenticationError) as exc:
        raise WorkerUnavailable(f"{type(exc).__name__}: {exc}") from exc


def serve(address: str, parent_pid: int | None = None) -> None:
    """Answer task requests on ``address`` until killed (or ``parent_pid`` has gone)."""
    from feddm_flower.app.node_tasks import run_task  # the heavy imports, once

    path = Path(address)
    path.unlink(missing_ok=True)
    key = secrets.token_bytes(32)
    keyfile = key_path(address)
    keyfile.unlink(missing_ok=True)
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    if parent_pid:
        threading.Thread(target=_exit_with, args=(parent_pid,), daemon=True).start()
    with Listener(address, family="AF_UNIX", authkey=key) as listener:
        os.chmod(address, 0o600)
        log.info("node worker ready on %s (pid %d)", address, os.getpid())
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError, AuthenticationError) as exc:  # not our ClientApp
                log.warning("node worker: refused a connection (%s)", exc)
                continue
            with conn:
                try:
                    kind, content, context, clock = conn.recv()
                except (OSError, EOFError, ValueError, TypeError) as exc:
                    log.warning("node worker: unreadable request (%s)", exc)
                    continue
                clock.mark("handoff")
                try:
                    outcome = run_task(kind, content, context, clock)
                except Exception as exc:  # noqa: BLE001 - the ClientApp raises it as its own
                    log.error("node worker: %s failed:\n%s", kind, traceback.format_exc())
                    outcome = ("error", f"{type(exc).__name__}: {exc}")
                try:
                    conn.send((*outcome, context.state))
                except OSError as exc:
                    log.warning("node worker: the ClientApp went away (%s)", exc)


def _exit_with(parent_pid: int) -> None:
    """End this process once ``parent_pid`` is no longer its parent (the SuperNode's script
    was stopped): a worker must not outlive its node."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m feddm_flower.app.worker", description=__doc__)
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this parent ends")
    args = parser.parse_args(argv)
    configure_logging()
    serve(args.socket, args.parent_pid or None)


if __name__ == "__main__":
    main()
