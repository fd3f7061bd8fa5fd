"""Conversions between Flower records and plain tensors/bytes, shared by both apps."""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, RecordDict

# The stype of an Array that carries a codec payload (see codecs.py) instead of a tensor.
PAYLOAD_STYPE = "feddm.codec"


def message_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: tensor data, keys and values as Flower counts them."""
    return sum(record.count_bytes() for record in content.values())


def array_bytes(content: RecordDict) -> int:
    """Bytes of the message's ArrayRecords alone."""
    return sum(record.count_bytes() for record in content.array_records.values())


def to_record(state: dict[str, torch.Tensor], dtype: str = "fp32") -> ArrayRecord:
    """A state dict as an ArrayRecord, float tensors cast to ``dtype`` ('fp32' or 'fp16')."""
    cast = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    return ArrayRecord({k: (v.to(cast) if v.is_floating_point() else v) for k, v in state.items()})


def payload_record(payload: bytes) -> ArrayRecord:
    """One codec payload as an ArrayRecord holding a single raw-bytes Array."""
    array = Array(dtype="uint8", shape=(len(payload),), stype=PAYLOAD_STYPE, data=payload)
    return ArrayRecord({"payload": array})


def payload_from(record: object) -> bytes:
    """The payload bytes of :func:`payload_record`; ``ValueError`` if ``record`` is not one."""
    if not isinstance(record, ArrayRecord) or list(record.keys()) != ["payload"]:
        raise ValueError("expected an ArrayRecord with exactly one Array named 'payload'")
    array = record["payload"]
    if array.stype != PAYLOAD_STYPE:
        raise ValueError(f"payload stype {array.stype!r}, expected {PAYLOAD_STYPE!r}")
    return bytes(array.data)
