"""Sparse update codec: the largest-magnitude share of an update, block-quantized.

Each float tensor sends its ``ceil(fraction * numel)`` largest-magnitude values (top-k per
tensor, so no layer is starved by another's scale); the values are quantized by the dense
block codec (:func:`~feddm_flower.fed.codecs.encode_update`, int8 or int4), their positions are
coded as a bitmap of the float stream or as delta-coded indices (LEB128 varints), whichever
is smaller, and that section passes through zstd where it gets smaller. What is not sent is
the sender's residual: the client keeps it for its next update (error feedback) and the
server's downlink keeps it in ``global - reference`` (downlink.ModelChain).

Written by hand because no maintained library codes a sparse state dict this way: torch's
sparse tensors serialize int64 indices (8 bytes per value), and Deep Gradient Compression /
sparse ternary compression exist as research code, not as libraries.

Payload layout (little-endian)::

    header     44 B: magic b"FDMS", u8 FORMAT_VERSION, u8 bits, u8 coding (0 bitmap,
               1 gaps), u8 flags (bit 0: positions are one zstd frame), 12-byte schema
               digest, u64 values sent K, u64 positions length, u64 positions raw length
    positions  bitmap: one bit per value of the float stream, least significant bit first;
               gaps: K varints, the first index, then each index minus the previous one
    raw        native bytes of the non-float tensors, sent whole, in name order
    values     an encode_update payload of one float32 tensor "values" of K values

The float stream is the float tensors, flattened, in name order. The payload carries no
names or shapes, only the digest of the schema (names, dtypes, shapes): both ends know the
model, and the decoder checks the digest against the one it expects before it reads
anything else, so every size it then lays out is the model's, never the payload's claim.
Every index must be in range, strictly increasing (a gap of 0 repeats an index; a gap that
would wrap around is out of range), counted exactly K times, and the values are the dense
codec's, finite by construction; the zstd frame must declare exactly the raw length, at most
64 times its own.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping

import numpy as np
import torch
import zstandard

from feddm_flower.config import MIN_SPARSE_FRACTION, QUANT_BLOCK_SIZE
from feddm_flower.fed.codecs import (
    ALLOWED_BITS,
    CodecError,
    decode_update,
    encode_update,
    schema_of,
)

MAGIC = b"FDMS"
FORMAT_VERSION = 1
BITMAP, GAPS = 0, 1
FLAG_ZSTD = 1
# A payload sends at least this share of each tensor: the floor of run-config sparse-fraction.
_HEADER = struct.Struct("<4sBBBB12sQQQ")
_MAX_VARINT = 9  # bytes of a 63-bit LEB128 varint: any gap below 2**63, without overflow
_MAX_ZSTD_RATIO = 64
_ZSTD_LEVEL = 3

Expected = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def schema_digest(expected: Expected) -> bytes:
    """12-byte digest of names, dtypes and shapes, in name order."""
    h = hashlib.blake2b(digest_size=12)
    for name in sorted(expected):
        shape, dtype = expected[name]
        h.update(f"{name}|{dtype}|{tuple(shape)}|".encode())
    return h.digest()


@torch.no_grad()
def encode_sparse(
    tensors: Mapping[str, torch.Tensor],
    *,
    fraction: float,
    bits: int,
    block_size: int = QUANT_BLOCK_SIZE,
    lossless: bool = False,
) -> bytes:
    """The ``fraction`` largest-magnitude values of each float tensor of ``tensors`` (CPU),
    quantized to ``bits``, and every other tensor whole, as one payload. ``lossless``: the
    values' zstd stage (codecs); the positions always pass zstd where it makes them smaller."""
    if not MIN_SPARSE_FRACTION <= fraction <= 1:
        raise ValueError(f"fraction {fraction!r}: allowed is in [{MIN_SPARSE_FRACTION}, 1]")
    if bits not in ALLOWED_BITS:
        raise ValueError(f"bits {bits!r}: allowed is one of {ALLOWED_BITS}")
    names = sorted(tensors)
    positions, values, offset = [], [], 0
    for name in names:
        t = tensors[name]
        if not t.is_floating_point():
            continue
        flat = t.detach().reshape(-1).float()
        if not torch.isfinite(flat).all():
            raise ValueError(f"{name}: non-finite values cannot be encoded")
        if flat.numel():
            k = math.ceil(fraction * flat.numel())
            top = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
            positions.append(top + offset)
            values.append(flat[top])
        offset += flat.numel()
    index = torch.cat(positions).numpy() if positions else np.zeros(0, np.int64)
    bitmap = np.packbits(_mask(index, offset), bitorder="little").tobytes()
    gaps = _varints(np.diff(index, prepend=0).astype(np.uint64)) if index.size else b""
    coding, section = (GAPS, gaps) if len(gaps) < len(bitmap) else (BITMAP, bitmap)
    raw_length, flags = len(section), 0
    frame = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(section) if section else b""
    if len(frame) < raw_length <= _MAX_ZSTD_RATIO * len(frame):
        section, flags = frame, FLAG_ZSTD
    raw = b"".join(
        tensors[n].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for n in names
        if not tensors[n].is_floating_point()
    )
    kept = torch.cat(values) if values else torch.zeros(0)
    dense = encode_update({"values": kept}, bits=bits, block_size=block_size, lossless=lossless)
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, bits, coding, flags, schema_digest(schema_of(tensors)),
        index.size, len(section), raw_length,
    )  # fmt: skip
    return header + section + raw + dense


def is_sparse(payload: bytes) -> bool:
    """Whether ``payload`` is a sparse payload (by its magic)."""
    return bytes(payload[:4]) == MAGIC


def decode_sparse(payload: bytes, expected: Expected) -> dict[str, torch.Tensor]:
    """The tensors of an :func:`encode_sparse` payload: floats as float32, zero where no
    value was sent, other tensors with their own dtype. ``expected`` (name -> (shape, dtype
    before encoding)) is the model both ends know. Raises CodecError for anything malformed,
    before allocating anything the payload claims."""
    if len(payload) < _HEADER.size:
        raise CodecError(f"payload truncated: {len(payload)} bytes, header needs {_HEADER.size}")
    magic, version, bits, coding, flags, schema, count, length, raw_length = _HEADER.unpack_from(
        payload
    )
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported sparse version {version}, this decoder reads 1")
    if bits not in ALLOWED_BITS or coding not in (BITMAP, GAPS) or flags & ~FLAG_ZSTD:
        raise CodecError(f"bad header: bits {bits}, coding {coding}, flags 0x{flags:02x}")
    if schema != schema_digest(expected):
        raise CodecError("the payload's schema digest is not the model's (names/dtypes/shapes)")
    names = sorted(expected)
    floats = [n for n in names if expected[n][1].is_floating_point]
    numel = sum(math.prod(expected[n][0]) for n in floats)
    raw_sizes = {
        n: math.prod(expected[n][0]) * expected[n][1].itemsize for n in names if n not in floats
    }
    raw_start = _HEADER.size + length
    values_start = raw_start + sum(raw_sizes.values())
    if values_start > len(payload):
        raise CodecError(f"payload truncated: {len(payload)} bytes, sections need {values_start}")
    if count > numel:
        raise CodecError(f"{count} values claimed, out of range of the model's {numel} floats")
    section = _positions_section(payload[_HEADER.size : raw_start], flags, raw_length)
    if coding == BITMAP:
        index = _from_bitmap(section, numel)
    else:
        index = _from_gaps(section, count, numel)
    if index.size != count:
        raise CodecError(f"positions hold {index.size} indices, the header counts {count}")
    try:
        kept = decode_update(payload[values_start:], {"values": ((count,), torch.float32)})
    except CodecError as exc:
        raise CodecError(f"values: {exc}") from exc
    flat = torch.zeros(numel)
    flat[torch.from_numpy(index)] = kept["values"]
    out, offset, at = {}, 0, raw_start
    for name in names:
        shape, dtype = expected[name]
        size = math.prod(shape)
        if name in raw_sizes:
            data = bytearray(payload[at : at + raw_sizes[name]])
            tensor = torch.frombuffer(data, dtype=dtype) if size else torch.empty(0, dtype=dtype)
            out[name] = tensor.reshape(shape)
            at += raw_sizes[name]
        else:
            out[name] = flat[offset : offset + size].reshape(shape)
            offset += size
    return out


def _mask(index: np.ndarray, numel: int) -> np.ndarray:
    mask = np.zeros(numel, dtype=bool)
    mask[index] = True
    return mask


def _positions_section(section: bytes, flags: int, raw_length: int) -> bytes:
    """The positions section, inflated from its zstd frame when flagged (bounded first)."""
    if not flags & FLAG_ZSTD:
        if raw_length != len(section):
            raise CodecError(f"positions: raw length {raw_length}, section has {len(section)}")
        return bytes(section)
    if not len(section) < raw_length <= _MAX_ZSTD_RATIO * len(section):
        raise CodecError(
            f"positions: a {len(section)}-byte zstd frame may hold {len(section) + 1} to "
            f"{_MAX_ZSTD_RATIO * len(section)} bytes, header claims {raw_length}"
        )
    try:
        declared = zstandard.frame_content_size(section)
        if declared != raw_length:
            raise CodecError(f"positions: frame declares {declared} bytes, header {raw_length}")
        out = zstandard.ZstdDecompressor().decompressobj()
        inflated = out.decompress(section)
    except zstandard.ZstdError as exc:
        raise CodecError(f"positions: {exc}") from exc
    if len(inflated) != raw_length or out.unused_data or not out.eof:
        raise CodecError(f"positions: the frame does not hold exactly {raw_length} bytes")
    return inflated


def _from_bitmap(section: bytes, numel: int) -> np.ndarray:
    if len(section) != -(-numel // 8):
        raise CodecError(f"bitmap of {len(section)} bytes for {numel} values")
    bits = np.unpackbits(np.frombuffer(section, np.uint8), bitorder="little")
    if bits[numel:].any():
        raise CodecError("bitmap sets positions past the end of the model (out of range)")
    return np.flatnonzero(bits[:numel]).astype(np.int64)


def _varints(values: np.ndarray) -> bytes:
    """LEB128 varints of unsigned 64-bit ``values``, vectorized."""
    sizes = np.ones(values.size, np.int64)
    for i in range(1, _MAX_VARINT):
        sizes += values >= np.uint64(1) << np.uint64(7 * i)
    starts = np.cumsum(sizes) - sizes
    shift = (np.arange(sizes.sum()) - np.repeat(starts, sizes)).astype(np.uint64)
    out = ((np.repeat(values, sizes) >> (np.uint64(7) * shift)) & np.uint64(0x7F)).astype(np.uint8)
    more = shift < np.repeat(sizes - 1, sizes).astype(np.uint64)
    out[more] |= 0x80
    return out.tobytes()


def _from_gaps(section: bytes, count: int, numel: int) -> np.ndarray:
    """Indices from ``count`` varint gaps; CodecError unless all are in range and strictly
    increasing and the varints fill ``section`` exactly."""
    data = np.frombuffer(section, np.uint8)
    if count == 0 or data.size == 0:
        if count or data.size:
            raise CodecError(f"{data.size} bytes of gaps for {count} indices")
        return np.zeros(0, np.int64)
    ends = np.flatnonzero(data < 0x80)
    if ends.size != count or ends[-1] != data.size - 1:
        raise CodecError(f"gaps section holds {ends.size} complete varints, header counts {count}")
    starts = np.concatenate(([0], ends[:-1] + 1))
    sizes = ends - starts + 1
    if sizes.max() > _MAX_VARINT:
        raise CodecError(f"a gap of {sizes.max()} bytes (at most {_MAX_VARINT}): out of range")
    if (data[ends[sizes > 1]] == 0).any():
        raise CodecError("a gap has a redundant zero byte (varints are minimal)")
    shift = (np.arange(data.size) - np.repeat(starts, sizes)).astype(np.uint64)
    parts = (data & 0x7F).astype(np.uint64) << (np.uint64(7) * shift)
    gaps = np.add.reduceat(parts, starts)
    if (gaps >= numel).any():
        raise CodecError(f"a gap reaches past the {numel} values (out of range or unsorted)")
    if (gaps[1:] == 0).any():
        raise CodecError("an index is repeated (a gap of 0)")
    index = np.cumsum(gaps.astype(np.int64))
    if index[-1] >= numel:
        raise CodecError(f"index {index[-1]} is out of range for {numel} values")
    return index
