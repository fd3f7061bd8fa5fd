"""A node's own files: its copy of the global model and its error-feedback residual.

A node keeps both between messages. In Flower's node state (``Context.state``) they would
live in memory, and in a simulation every node's state lives in the one simulation process:
two models per node, 26 GB for 100 nodes of the 35.7 M-parameter U-Net. Here they are files,
written atomically and read back memory-mapped, so a node holds them in memory only while a
message is being handled. The node state keeps only the directory's path (node_tasks), so a
node whose state is lost (a restarted SuperNode, a fresh context) starts without a copy,
exactly as before: the server's digests then resend what it needs.

The directory is under node-config ``state-dir`` (default ``~/.cache/feddm-flower/nodes``, on
disk: a temporary directory may be a tmpfs, which is memory again), a fresh one per node and
state (its name starts ``run<run id>-node<node id>-``); delete it after the run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

State = dict[str, torch.Tensor]
DEFAULT_BASE = Path("~/.cache/feddm-flower/nodes").expanduser()


class NodeStore:
    """Named state dicts in one directory: ``save``, ``load`` (memory-mapped) and ``drop``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / f"{name}.pt"

    def save(self, name: str, state: State) -> None:
        """Write ``state`` (CPU tensors) under ``name``, replacing any earlier one atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        # A name of its own: nodes that share a store (bases) may write the same name at once.
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        torch.save({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, self._path(name))

    def load(self, name: str) -> State | None:
        """The state saved under ``name``, memory-mapped; None if there is none or it does not
        load (a half-written or corrupt file is dropped: the node then has no copy)."""
        path = self._path(name)
        if not path.exists():
            return None
        try:
            return torch.load(path, mmap=True, weights_only=True)
        except Exception:  # noqa: BLE001 - any unreadable file means no copy
            path.unlink(missing_ok=True)
            return None

    def drop(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    @classmethod
    def bases(cls, base: str) -> NodeStore:
        """The store of base models by digest under ``base`` ('' = DEFAULT_BASE): shared by the
        node's runs, so a run from a base the node already holds sends none."""
        return cls((Path(base).expanduser() if base else DEFAULT_BASE) / "bases")

    @classmethod
    def create(cls, base: str, prefix: str) -> NodeStore:
        """A new, empty store in a fresh directory under ``base`` ('' = DEFAULT_BASE)."""
        parent = Path(base).expanduser() if base else DEFAULT_BASE
        parent.mkdir(parents=True, exist_ok=True)
        return cls(Path(tempfile.mkdtemp(prefix=prefix, dir=parent)))
