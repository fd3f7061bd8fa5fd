"""ClientApp: records in, the diffusion task on this node's partition, records out.

The task itself is :mod:`feddm_flower.app.node_tasks`. With node-config ``worker`` (a socket
path), the node's long-lived :mod:`feddm_flower.app.worker` runs it, and this process, which
Flower's deployment engine starts afresh for every message, imports Flower alone; without
it, or if the worker cannot be reached, the task runs here.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from feddm_flower import configure_logging
from feddm_flower.app.worker import NODE_CONFIG_KEY, WorkerUnavailable, request
from feddm_flower.fed.timings import Stopwatch, process_start

app = ClientApp()
log = logging.getLogger(__name__)
# This process's start, for its first message only: a process that serves many (a Ray actor
# in simulation) times the later ones from their handler's entry.
_UNCLAIMED_START = [process_start()]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global U-Net on this node's partition (see ``node_tasks.train``)."""
    return _handle("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out denoising loss of the received global U-Net (see ``node_tasks.evaluate``)."""
    return _handle("evaluate", msg, context)


def _handle(kind: str, msg: Message, context: Context) -> Message:
    """Run task ``kind`` in the node's worker if it has one, else here; reply with its
    records, or with the error that makes the server resend the full model."""
    clock = Stopwatch(_UNCLAIMED_START.pop() if _UNCLAIMED_START else time.time())
    clock.mark("startup")
    configure_logging()
    address = str(context.node_config.get(NODE_CONFIG_KEY, ""))
    outcome = None
    if address:
        try:
            *outcome, state = request(address, (kind, msg.content, context, clock))
        except WorkerUnavailable as exc:
            log.warning("node worker %s unavailable (%s): running %s here", address, exc, kind)
        else:
            context.state.clear()
            context.state.update(state)
    if outcome is None:
        from feddm_flower.app.node_tasks import (
            run_task,  # torch, diffusers: only where the task runs
        )

        outcome = run_task(kind, msg.content, context, clock)
    status, payload = outcome
    if status == "ok":
        return Message(payload, reply_to=msg)
    if status == "refused":
        from feddm_flower.app.records import REFUSED

        log.warning("this node refuses the run: %s", payload)
        return Message(Error(code=REFUSED, reason=f"node refused: {payload}"), reply_to=msg)
    if status in ("out-of-sync", "no-base"):
        from feddm_flower.app.records import NO_BASE, OUT_OF_SYNC

        code = OUT_OF_SYNC if status == "out-of-sync" else NO_BASE
        return Message(Error(code=code, reason=f"model {status}: {payload}"), reply_to=msg)
    raise RuntimeError(f"node worker: {kind} failed: {payload}")
