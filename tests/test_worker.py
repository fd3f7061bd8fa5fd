"""The node worker: a real ``python -m feddm_flower.app.worker`` process serving the ClientApp.

The ClientApp hands a message to the worker and gets back what it would have computed itself,
to the bit; a worker that is missing, or a client without its key, changes nothing else.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from test_client_app import _train_message

from feddm_flower.app.client_app import evaluate, train
from feddm_flower.app.node_tasks import MODEL_KEY, STORE_KEY, node_store
from feddm_flower.app.records import OUT_OF_SYNC, to_record
from feddm_flower.app.worker import WorkerUnavailable, request
from feddm_flower.fed.downlink import digest
from feddm_flower.task.models import build_unet


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A worker process listening on a socket in a fresh directory; its socket path."""
    sock = tmp_path_factory.mktemp("worker") / "node.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "feddm_flower.app.worker", "--socket", str(sock)]
    )
    deadline = time.monotonic() + 180
    while not sock.exists():
        assert proc.poll() is None, "the worker exited"
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.2)
    yield str(sock)
    proc.kill()
    proc.wait()


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    """The nodes below run torch on one thread (node-config num-threads), here and in the
    worker: CPU results depend on the thread count, and other tests change this process's."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _context(worker: str = "") -> Context:
    """Node 0 of 2 on real FashionMNIST, one local step of batch 8 (as test_client_app's),
    on one CPU thread."""
    node_config: dict[str, object] = {"partition-id": 0, "num-partitions": 2, "num-threads": 1}
    if worker:
        node_config["worker"] = worker
    run_config = {"local-steps": 1, "batch-size": 8, "eval-max-examples": 8}
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(),
                   run_config=run_config)  # fmt: skip


def test_the_worker_computes_what_the_clientapp_would(worker: str) -> None:
    """The same reply, bit for bit, the node's copy kept in its state, timings from both. A
    train message that asks for it measures the model it carries first: the eval-loss an
    evaluate message measures, to the bit."""
    message = _train_message(False, 1, "int8")
    other = build_unet("tiny", 28, 1, seed=1).state_dict()  # not what a node starts from
    message.content["arrays"] = to_record(other)
    message.content["config"]["model-digest"] = digest(other)
    message.content["config"]["evaluate-received"] = True
    here, there = _context(), _context(worker)
    local = train(message, here)
    remote = train(message, there)
    assert remote.content["update"]["payload"].data == local.content["update"]["payload"].data
    for key in ("train-loss", "num-examples", "train-steps"):
        assert remote.content["metrics"][key] == local.content["metrics"][key]
    # The node's copy is a file of its store, the state Flower moves around names only its
    # directory: a message that only names the model the node holds is served from it.
    assert set(there.state.config_records) == {STORE_KEY}
    held = node_store(there).load(MODEL_KEY)
    assert digest(held) == digest(other)
    current = _train_message(False, 2, "fp32")
    config = current.content["config"]
    config["model-base"] = config["model-digest"] = digest(held)
    current.content = RecordDict({"config": config})
    assert "eval-loss" not in train(current, there).content["metrics"]  # not asked
    assert train(current, _context(worker="")).error.code == OUT_OF_SYNC  # no copy here
    metrics = remote.content["metrics"]
    assert "time-handoff" in metrics and "time-handoff" not in local.content["metrics"]
    assert metrics["time-train"] > 0
    assert metrics["time-total"] >= metrics["time-train"] + metrics["time-startup"]
    # Only a process's first message counts its start-up; later ones start at their handler
    # (a long-lived process: a Ray actor in simulation, or this test's).
    assert metrics["time-startup"] < 0.5
    # Evaluate through the worker: the same loss as here, and as the train message measured.
    loss = evaluate(message, there).content["metrics"]["eval-loss"]
    evaluated = evaluate(message, here).content["metrics"]
    assert loss == evaluated["eval-loss"] == metrics["eval-loss"]
    assert evaluated["num-examples"] == metrics["eval-examples"] == 8
    assert metrics["time-eval"] > 0


def test_out_of_sync_through_the_worker(worker: str) -> None:
    """A change to a model the node does not hold: the error that asks for the full model."""
    config = ConfigRecord({"server-round": 2, "model-digest": "abc", "model-base": "def"})
    message = _train_message(False, 2)
    message.content = RecordDict({"config": config})
    reply = train(message, _context(worker))
    assert reply.has_error() and reply.error.code == OUT_OF_SYNC


def test_a_missing_worker_means_the_task_runs_here(tmp_path: Path, caplog) -> None:
    message = _train_message(False, 1, "fp32")
    with caplog.at_level(logging.WARNING, logger="feddm_flower"):
        reply = train(message, _context(str(tmp_path / "gone.sock")))
    assert "unavailable" in caplog.text
    assert reply.content["metrics"]["train-steps"] == 1


def test_a_client_without_the_key_is_refused_and_the_worker_serves_on(worker: str) -> None:
    key = Path(f"{worker}.key")
    assert key.stat().st_mode & 0o077 == 0  # only the owner can read it
    real = key.read_bytes()
    key.write_bytes(b"x" * len(real))
    try:
        with pytest.raises(WorkerUnavailable):
            request(worker, ("train", RecordDict(), _context(), None))
    finally:
        key.write_bytes(real)
    reply = train(_train_message(False, 1, "fp32"), _context(worker))
    assert reply.content["metrics"]["train-steps"] == 1
