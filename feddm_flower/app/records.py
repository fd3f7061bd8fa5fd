"""Conversions between Flower records and plain tensors/bytes, shared by both apps.

The downlink (downlink.py) is a ConfigRecord ``config`` naming the digest of the weights the
node must hold afterwards (``model-digest``) and, for a change, the digest it applies to
(``model-base``). With it comes the full model as an ArrayRecord ``arrays``, or the chain of
encoded changes as an ArrayRecord ``model-change``, or no model at all when the node is
current. A node that cannot rebuild the weights answers with an error of code
:data:`OUT_OF_SYNC`.

The uplink is what a client sends back after training: its weights as an ArrayRecord
``arrays`` (``fp32`` or ``fp16``), or under a codec (``int8``, ``int4``, ``sparse``) its coded
update (local - received weights) as one payload in an ArrayRecord ``update``. Under differential
privacy the update is clipped before either (:func:`clipped_update`).
"""

from __future__ import annotations

import json
import math

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from feddm_flower.fed.aggregation import InvalidReply, State, check_like, clip_update
from feddm_flower.fed.changes import CODED, ChangeCodec, decode_change
from feddm_flower.fed.codecs import CodecError, schema_of
from feddm_flower.fed.downlink import Delivery, OutOfSync, apply_changes, digest
from feddm_flower.fed.sparse import is_sparse
from feddm_flower.protocol import ARRAYS, CHANGE, CONFIG, MODEL_BASE, MODEL_DIGEST, UPDATE

# The stype of an Array that carries a codec payload (see codecs.py) instead of a tensor.
PAYLOAD_STYPE = "feddm.codec"
# The error code of a node's reply when it cannot rebuild the model a message describes
# (Flower's own codes are 0-8); the server then resends the full model.
OUT_OF_SYNC = 409
# ... and when it lacks the base model the message names: the server resends it with the model.
NO_BASE = 410
# A node whose operator's settings refuse the run (node_settings.py): a rejected reply.
REFUSED = 403
_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# A model as a packed ArrayRecord (to_record): its layout and one flat Array per dtype.
LAYOUT_KEY = "layout"
LAYOUT_STYPE = "feddm.layout"
DATA_PREFIX = "data."
MAX_LAYOUT_BYTES = 16 << 20
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool)
}


def message_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: tensor data, keys and values as Flower counts them."""
    return sum(record.count_bytes() for record in content.values())


def array_bytes(content: RecordDict) -> int:
    """Bytes of the message's ArrayRecords alone."""
    # Not content.array_records: its view keeps the message alive in a reference cycle.
    return sum(r.count_bytes() for r in content.values() if isinstance(r, ArrayRecord))


def to_record(state: State, dtype: str = "fp32") -> ArrayRecord:
    """A state dict as a packed ArrayRecord (float tensors cast to ``dtype``, 'fp32' or
    'fp16'): its ``layout`` (a JSON list of [name, dtype, shape], as raw bytes) and one flat
    Array ``data.<dtype>`` per dtype, the tensors concatenated in layout order.

    Flower's transport moves every Array as separate objects, several requests each between
    ClientApp, SuperNode, SuperLink and ServerApp, and an object pulled before it has arrived
    is retried only after a back-off of a second or more. A model of hundreds of tensors
    therefore took tens of seconds per reply where the same bytes as one Array took a few
    (docs/results.md, "Paper scale on one GPU"): hence a few large Arrays. Undone by
    :func:`from_record`.
    """
    cast = _FLOAT_DTYPES[dtype]
    tensors = {k: (v.to(cast) if v.is_floating_point() else v) for k, v in state.items()}
    layout = [[k, _dtype_name(v.dtype), list(v.shape)] for k, v in tensors.items()]
    groups: dict[str, list[torch.Tensor]] = {}
    for (_, name, _), v in zip(layout, tensors.values(), strict=True):
        groups.setdefault(name, []).append(v.detach().reshape(-1).cpu())
    text = json.dumps(layout, separators=(",", ":")).encode()
    record = {LAYOUT_KEY: Array(dtype="uint8", shape=(len(text),), stype=LAYOUT_STYPE, data=text)}
    for name, parts in groups.items():
        record[DATA_PREFIX + name] = Array(torch.cat(parts).numpy())
    return ArrayRecord(record)


def from_record(record: object) -> State:
    """The state dict of a :func:`to_record` record; ``ValueError`` with the reason if it is
    not one: keys, layout, dtypes and lengths must agree exactly, checked before the data are
    read (a layout cannot make the reader allocate more than the data Arrays hold)."""
    if not isinstance(record, ArrayRecord) or LAYOUT_KEY not in record:
        raise ValueError(f"expected a packed ArrayRecord with a {LAYOUT_KEY!r} Array")
    array = record[LAYOUT_KEY]
    if array.stype != LAYOUT_STYPE or len(array.data) > MAX_LAYOUT_BYTES:
        raise ValueError(f"layout: stype {array.stype!r} or over {MAX_LAYOUT_BYTES} bytes")
    try:
        layout = json.loads(bytes(array.data))
        entries = [(str(k), _DTYPES[d], tuple(int(n) for n in shape)) for k, d, shape in layout]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"layout does not parse: {exc}") from exc
    if len({k for k, _, _ in entries}) != len(entries):
        raise ValueError("layout names a tensor twice")
    sizes: dict[torch.dtype, int] = {}
    for _, dtype, shape in entries:
        if any(n < 0 for n in shape) or len(shape) > 64:
            raise ValueError(f"layout shape {shape} is invalid")
        sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
    keys = {LAYOUT_KEY} | {DATA_PREFIX + _dtype_name(d) for d in sizes}
    if set(record.keys()) != keys:
        raise ValueError(f"arrays {sorted(record.keys())}, expected {sorted(keys)}")
    flat = {}
    for dtype, size in sizes.items():
        data = record[DATA_PREFIX + _dtype_name(dtype)]
        if data.stype != "numpy.ndarray" or list(data.shape) != [size]:
            raise ValueError(f"{_dtype_name(dtype)} data: shape {data.shape}, expected [{size}]")
        values = torch.from_numpy(data.numpy())
        if values.dtype != dtype or values.shape != (size,):
            raise ValueError(f"data: {values.dtype} {tuple(values.shape)}, expected {dtype}")
        flat[dtype] = iter(values.split([math.prod(s) for _, d, s in entries if d == dtype]))
    return {name: next(flat[dtype]).reshape(shape) for name, dtype, shape in entries}


def fedavg_record_bytes(state: State) -> int:
    """Bytes of ``state`` as the fp32 ArrayRecord of one Array per tensor that Flower's
    FedAvg sends: the baseline of the traffic ledger."""
    fp32 = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    return ArrayRecord(fp32).count_bytes()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def payloads_record(payloads: tuple[bytes, ...]) -> ArrayRecord:
    """A chain of codec payloads as one ArrayRecord, Arrays named "0", "1", ... in order."""
    return ArrayRecord({str(i): payload_record(p)["payload"] for i, p in enumerate(payloads)})


def payloads_from(record: object) -> list[bytes]:
    """The payloads of :func:`payloads_record`; ``ValueError`` if ``record`` is not one."""
    if not isinstance(record, ArrayRecord):
        raise ValueError("expected an ArrayRecord of codec payloads")
    if list(record.keys()) != [str(i) for i in range(len(record))]:
        raise ValueError(f"payload names {list(record.keys())[:5]}, expected '0', '1', ...")
    return [payload_from(ArrayRecord({"payload": record[k]})) for k in record]


def downlink_content(
    delivery: Delivery, target: str, config: ConfigRecord, full: ArrayRecord | None = None
) -> RecordDict:
    """The message content that brings a node to the weights with digest ``target``
    (``full``: the whole model, needed for a "full" delivery only)."""
    config = ConfigRecord({**config, MODEL_DIGEST: target})
    if delivery.kind == "full":
        if full is None:
            raise ValueError("a full delivery needs the full model record")
        return RecordDict({ARRAYS: full, CONFIG: config})
    config[MODEL_BASE] = delivery.base  # (not for a full model: Flower counts no '' values)
    if delivery.kind == "change":
        return RecordDict({CHANGE: payloads_record(delivery.payloads), CONFIG: config})
    return RecordDict({CONFIG: config})


def received_model(content: RecordDict, held: State) -> State:
    """The fp32 weights a downlink message describes, from the full model it carries or from
    ``held`` (the node's copy) and the changes; :class:`OutOfSync` if they cannot be rebuilt
    exactly (``held`` is not the base, a change does not decode, the digest differs)."""
    config = content[CONFIG]
    target = str(config.get(MODEL_DIGEST, ""))
    if "arrays" in content:
        try:
            weights = {k: v.float() if v.is_floating_point() else v
                       for k, v in from_record(content[ARRAYS]).items()}  # fmt: skip
        except ValueError as exc:
            raise OutOfSync(f"full model: {exc}") from exc
    else:
        base, have = str(config.get(MODEL_BASE, "")), digest(held)
        if have != base:
            raise OutOfSync(f"the node holds model {have}, the message changes model {base}")
        try:
            payloads = payloads_from(content[CHANGE]) if CHANGE in content else []
        except ValueError as exc:
            raise OutOfSync(f"model change: {exc}") from exc
        weights = apply_changes(held, payloads)
    if (have := digest(weights)) != target:
        raise OutOfSync(f"rebuilt model {have}, the server holds {target}")
    return weights


def uplink_key(uplink: str) -> str:
    """Name of the ArrayRecord that carries the model contribution under ``uplink``."""
    return UPDATE if uplink in CODED else ARRAYS


def clipped_update(local: State, received: State, clip_norm: float = 0.0) -> State:
    """``local - received``, scaled to L2 norm <= ``clip_norm`` when it is > 0 (see
    :func:`~feddm_flower.fed.aggregation.clip_update`, Flower's ``fixedclipping_mod``)."""
    update = {k: local[k] - received[k] for k in local}
    if clip_norm > 0:
        clip_update(update, clip_norm)
    return update


def encode_uplink(
    local: State,
    received: State,
    uplink: str,
    *,
    codec: ChangeCodec | None = None,
    seed: int | None = None,
    clip_norm: float = 0.0,
) -> tuple[ArrayRecord, State]:
    """The reply record for ``uplink`` and the update as the server will decode it (for a
    codec: what the client keeps its error-feedback residual against; else empty).

    With ``clip_norm`` > 0 (differential privacy) the update is clipped first, as Flower's
    ``fixedclipping_mod`` does: a codec quantizes the clipped update (rounding then adds at
    most half a step per value, a full one with stochastic rounding; the server clips the
    decoded update again), fp32/fp16 send ``received`` + the clipped update. ``codec``: the
    coded uplink's options (default: ``ChangeCodec(uplink)``); ``seed``: stochastic rounding.
    """
    if uplink not in CODED:
        if clip_norm > 0:
            update = clipped_update(local, received, clip_norm)
            local = {k: received[k] + u if u.is_floating_point() else local[k]
                     for k, u in update.items()}  # fmt: skip
        return to_record(local, uplink), {}
    codec = codec or ChangeCodec(uplink)
    if codec.kind != uplink:
        raise ValueError(f"uplink {uplink!r} with a {codec.kind!r} codec")
    update = clipped_update(local, received, clip_norm)
    payload = codec.encode(update, seed)
    expected = schema_of(update)
    return payload_record(payload), decode_change(payload, expected)


def decode_uplink(record: object, uplink: str, base: State) -> State:
    """The fp32 update (contribution - ``base``, the weights the node trained from) a reply's
    record carries under ``uplink``.

    Checks names, shapes, dtypes (those the uplink sends) and finiteness, before and after
    the subtraction; raises :class:`InvalidReply` with the reason.
    """
    if uplink in CODED:
        try:
            expected = schema_of(base)
            payload = payload_from(record)
            if is_sparse(payload) != (uplink == "sparse"):
                raise CodecError(f"the payload is not the {uplink} uplink's codec")
            update = decode_change(payload, expected)
        except (ValueError, CodecError) as exc:
            raise InvalidReply(f"update: {exc}") from exc
        # Floats decode as float32 within the scales' range: finite. Non-float tensors
        # are not aggregated (the global model keeps its own).
        return {k: v for k, v in update.items() if base[k].is_floating_point()}
    if not isinstance(record, ArrayRecord):
        raise InvalidReply("no ArrayRecord 'arrays'")
    try:
        weights = from_record(record)
    except Exception as exc:  # any undecodable Array is the client's fault
        raise InvalidReply(f"arrays do not decode: {exc}") from exc
    cast = _FLOAT_DTYPES[uplink]
    dtypes = {k: cast if v.is_floating_point() else v.dtype for k, v in base.items()}
    check_like(weights, base, dtypes)
    update = {}
    for name, g in base.items():
        if g.is_floating_point():
            update[name] = weights[name].float().sub_(g)
            if not torch.isfinite(update[name]).all():
                raise InvalidReply(f"{name}: update overflows float32")
    return update
