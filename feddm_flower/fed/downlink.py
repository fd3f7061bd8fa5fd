"""The downlink: keeping every node's copy of the global model in sync, bit for bit.

The server keeps a *reference*: the weights an up-to-date node holds. Each time the global
model changes, the reference moves towards it. Under ``fp32`` it becomes the global model, and
under ``fp16`` the global model rounded to fp16. Under ``int8``/``int4`` the reference takes
one block-quantized *change* ``Q(global - reference)``, decoded and added (codecs.py); under
``sparse`` only the largest share of each tensor's change (sparse.py). What was not sent
stays in ``global - reference`` and is part of the next change: this is error feedback kept
on the server, so the error never accumulates.

A node that holds the previous reference is sent only what changed since, which may be nothing
when the model has not changed (the train message after an evaluate message). A node several
versions behind is sent the chain of changes, as long as the chain is smaller than the full
model. A node with no copy, or with a copy nobody can account for, is sent the full reference.
Every message names the digest of the weights the node must hold afterwards; the node checks
it (:class:`OutOfSync` if not).

Nodes train from the reference, not the global model. Their updates are taken against the
reference and applied to the exact global model.

Written by hand because no maintained library does this: Flower sends whole ArrayRecords.
Compression libraries code one tensor; they keep no per-node reference. The chain, the digests
and the fallback to a full model are FedDM's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from feddm_flower.config import QUANT_BLOCK_SIZE, SPARSE_BITS, SPARSE_FRACTION
from feddm_flower.fed.aggregation import State
from feddm_flower.fed.changes import CODED, ChangeCodec, decode_change
from feddm_flower.fed.codecs import schema_of

DOWNLINKS = ("fp32", "fp16", *CODED)


class OutOfSync(Exception):
    """A node cannot rebuild the model a message describes (no copy, another version, a change
    that does not decode, or a result whose digest differs)."""


class NoBase(OutOfSync):
    """A node holds no base model with the digest a message names, and the message has none."""


def digest(state: State) -> str:
    """Short content hash of a state dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.blake2b(digest_size=12)
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def apply_change(held: State, change: State) -> State:
    """``held`` + ``change`` for float tensors; other tensors take the change's value. Server
    and nodes both call this, on CPU float32, so their results agree bit for bit."""
    return {k: (v + change[k] if v.is_floating_point() else change[k].clone())
            for k, v in held.items()}  # fmt: skip


def apply_changes(held: State, payloads: list[bytes]) -> State:
    """``held`` after each encoded change in turn; :class:`OutOfSync` if one does not decode
    to ``held``'s names, shapes and dtypes."""
    expected = schema_of(held)
    for i, payload in enumerate(payloads):
        try:
            change = decode_change(payload, expected)
        except ValueError as exc:  # CodecError included
            raise OutOfSync(f"model change {i} does not decode: {exc}") from exc
        held = apply_change(held, change)
    return held


def cast_state(state: State, downlink: str) -> State:
    """``state`` as a node holds it after a full model in ``downlink``'s dtype: float32
    values (fp16 rounding included under fp16), other tensors unchanged."""
    if downlink != "fp16":
        return {k: v.clone() for k, v in state.items()}
    return {k: (v.half().float() if v.is_floating_point() else v.clone())
            for k, v in state.items()}  # fmt: skip


@dataclass(frozen=True)
class Delivery:
    """What one node is sent so that it holds the reference.

    ``kind``: "current" (nothing: it already holds it), "change" (``payloads`` applied in turn
    to the weights with digest ``base``) or "full" (the whole reference).
    """

    kind: str
    base: str = ""
    payloads: tuple[bytes, ...] = ()


class ModelChain:
    """Server side of the downlink: the reference, its digest and the recent changes.

    Parameters
    ----------
    downlink : str
        "fp32"/"fp16" (a node that is behind gets the full model in that dtype) or
        "int8"/"int4"/"sparse" (it gets the coded changes since the version it holds).
    block_size, lossless, fraction, sparse_bits
        The change codec's options (changes.ChangeCodec).
    """

    def __init__(
        self,
        downlink: str,
        *,
        block_size: int = QUANT_BLOCK_SIZE,
        lossless: bool = False,
        fraction: float = SPARSE_FRACTION,
        sparse_bits: int = SPARSE_BITS,
    ) -> None:
        if downlink not in DOWNLINKS:
            raise ValueError(f"downlink {downlink!r}: allowed is one of {DOWNLINKS}")
        self.downlink = downlink
        self.codec = (
            ChangeCodec(downlink, block_size, lossless, fraction=fraction, sparse_bits=sparse_bits)
            if downlink in CODED
            else None
        )
        self.ref: State = {}
        self.digest = ""
        self.version = 0  # how many times the reference moved
        self.start_digest = ""  # what a node with no copy rebuilds itself (see start)
        self._global: State = {}
        self._changes: list[tuple[str, bytes]] = []  # (digest applied to, payload), oldest first
        self.full_bytes = 0

    @classmethod
    def from_config(cls, downlink: str, config: Mapping[str, object]) -> ModelChain:
        """``downlink`` with the codec options of a run-config or message config
        (:meth:`ChangeCodec.from_config`); the downlink always rounds to nearest."""
        chain = cls(downlink)
        if chain.codec is not None:
            chain.codec = replace(ChangeCodec.from_config(downlink, config), stochastic=False)
        return chain

    def start(self, weights: State, *, nodes_have_it: bool) -> None:
        """Make ``weights`` the first reference. ``nodes_have_it``: every node can rebuild
        them itself (a fresh run's seeded initialisation), so they are never sent in full
        to a node with no copy; a node's rebuild that differs is caught by the digest."""
        self._global = {k: v.clone() for k, v in weights.items()}
        self.ref = cast_state(weights, self.downlink)
        self.digest = digest(self.ref)
        # Under fp16 the rebuilt weights are not the (rounded) reference: it is sent in full.
        self.start_digest = digest(weights) if nodes_have_it else ""
        wide = 2 if self.downlink == "fp16" else 4
        self.full_bytes = sum(v.numel() * (wide if v.is_floating_point() else v.element_size())
                              for v in weights.values())  # fmt: skip

    def update(self, global_state: State) -> bool:
        """Move the reference to ``global_state`` if it changed; True if it moved."""
        if not self.ref:
            raise RuntimeError("ModelChain.update before start")
        if all(torch.equal(global_state[k], v) for k, v in self._global.items()):
            return False
        self._global = {k: v.clone() for k, v in global_state.items()}
        if self.codec is not None:
            change = {k: (g - self.ref[k] if g.is_floating_point() else g)
                      for k, g in global_state.items()}  # fmt: skip
            payload = self.codec.encode(change)
            self._changes.append((self.digest, payload))
            self.ref = apply_changes(self.ref, [payload])
            while sum(len(p) for _, p in self._changes) >= self.full_bytes:
                self._changes.pop(0)  # a chain from further back would cost more than the model
        else:
            self.ref = cast_state(global_state, self.downlink)
        self.digest = digest(self.ref)
        self.version += 1
        return True

    def plan(self, held: str | None) -> Delivery:
        """What a node holding weights with digest ``held`` (None: unknown or none) needs."""
        held = held or self.start_digest
        if held == self.digest:
            return Delivery("current", held)
        for i, (base, _) in enumerate(self._changes):
            if base == held:
                return Delivery("change", held, tuple(p for _, p in self._changes[i:]))
        return Delivery("full")
