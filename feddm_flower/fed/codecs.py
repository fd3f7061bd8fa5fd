"""Quantized model-update codec (int8/int4), both directions (changes.py picks it).

Clients send their update (local weights minus the received global weights) as one
self-describing payload: float tensors are quantized blockwise to int8 or int4 with one
absmax scale per block, every other tensor travels losslessly as raw bytes. Optionally
(``encode_update(..., lossless=True)``) the scales and levels then pass through zstd, kept
only when that makes the payload smaller.

Payload layout (all little-endian)::

    header    16 B: magic b"FDMQ", u8 FORMAT_VERSION, u8 bits, u16 flags,
              u32 block_size, u32 metadata length (before padding)
    metadata  zlib-compressed JSON ``[[name, dtype, shape], ...]`` in payload order,
              zero-padded so that the data starts 8-byte aligned
    scales    float32, one per block
    levels    int8: one signed byte per element in [-127, 127];
              int4: offset-binary nibbles (level + 8, level in [-7, 7]), two per byte, low
              nibble first; an odd total count is padded with a level-0 nibble
    raw       native bytes of the non-float tensors, in order

The float tensors, flattened and concatenated in payload order, form one stream of values;
blocks are ``block_size`` consecutive values of that stream (the last one may be shorter),
so a block may cross from one tensor into the next. Every value is still within half a
quantization step of its block's absmax / qmax, and the stream needs no per-tensor padding:
each stage is a handful of torch ops over slabs of whole blocks (about ``_CHUNK`` values),
used in place when a slab lies inside one tensor. Offsets are not stored because they
follow from the shapes; the decoder checks that the sections add up to the payload length
exactly, and rejects metadata that claims more than the payload's length can hold before
laying anything out. Layouts and metadata are cached between calls, since every round
repeats them (up to a size that real models stay well within).

Lossless stage (flag bit 0, ``FLAG_ZSTD``): the scales and levels sections, ``D`` bytes
together as the metadata implies, are replaced by one zstd frame of them, preceded by zero
bytes only as described below; the header, metadata and raw sections are unchanged. Flags
are a header bit rather than a new FORMAT_VERSION because a payload without the flag is
byte for byte the format-2 payload it always was (old payloads decode, and
``lossless=False`` writes exactly what older encoders wrote), while a decoder from before
the flag refuses a flagged payload at its "reserved header field must be 0" check instead of
misreading it. Other flag bits must be 0. The decoder learns the frame's section length
``S`` as the payload length minus the other sections, and before it decompresses or lays
out anything it requires, in plain integers:

* ``D <= 64 * S`` (``_MAX_ZSTD_RATIO``): the claim is bounded by the payload's length, as
  for plain payloads, only 64 times looser. Without it a payload of one megabyte could
  claim some 32 GB (zstd's own format allows about 32768:1: a 4-byte RLE block
  regenerates 128 KiB), all legitimately declared. Real updates compress far less (1.01-1.34x
  measured, see docs/benchmarks.md); an update so sparse that zstd squeezes its section
  below ``ceil(D / 64)`` bytes is not sent raw instead: the encoder puts zero bytes in
  front of the frame up to exactly that length (a frame starts with the nonzero byte 0x28,
  so the decoder strips them unambiguously; they are allowed only when ``S`` is exactly
  ``ceil(D / 64)``), so such payloads stay 64 times smaller than the plain section.
* ``S < D``: the encoder compresses only when that makes the payload smaller, so a
  flagged payload that is not smaller is refused (this also rules out empty sections and
  zstd's skippable frames, which hold their content uncompressed).
* The frame is a zstd frame (magic 0xFD2FB528, no dictionary) whose header declares its
  content size, and that size is exactly ``D``: the decompressor allocates what a frame
  declares, so a frame declaring more than the metadata implies is refused before any
  allocation, and one without a declared size is refused outright.

The frame is then decompressed into exactly ``D`` bytes: one that regenerates more fails
when the output is full, one that regenerates less or is followed by any stray byte fails
too; the result goes through the same checks as a plain section (scales finite and in range,
levels in range, int4 padding nibble). So a decoder holds at most ``D <= 64 * S`` bytes of
inflated data beside its output tensors, whatever a frame holds.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import math
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import zstandard

FORMAT_VERSION: int = 2
MAGIC = b"FDMQ"
ALLOWED_BITS = (8, 4)
# The run-config names of the codec, both directions (uplink / downlink keys).
CODEC_BITS = {"int8": 8, "int4": 4}
FLAG_ZSTD = 1  # header flag: the scales and levels are one zstd frame
# zstd level 1: zstd's default (3) makes trained paper-model payloads another 1-3 % smaller
# for 1.4-2.5 times the compression time (docs/benchmarks.md).
DEFAULT_ZSTD_LEVEL = 1


class CodecError(ValueError):
    """A payload the decoder does not accept; the message says what is wrong."""


_HEADER = struct.Struct("<4sBBHII")
_ALIGN = 8
_QMAX = {8: 127, 4: 7}
_INT4_OFFSET = 8
_MAX_NDIM = 64
# Cap on the inflated metadata, so a tiny hostile payload cannot inflate to gigabytes.
_MAX_METADATA = 64 << 20
# The scales and levels a zstd section claims are at most this many times its length (see the
# module docstring); zstd levels the encoder accepts.
_MAX_ZSTD_RATIO = 64
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_LEVELS = range(1, zstandard.MAX_COMPRESSION_LEVEL + 1)
# Metadata and layouts are cached between calls (every round repeats them) for
# payloads whose metadata inflates to at most _CACHED_METADATA bytes and lists at most
# _CACHED_TENSORS float tensors: real models fit easily (about 70 bytes a tensor), while the
# millions of tiny entries or the huge names of a hostile payload would otherwise stay in
# memory, 32 payloads' worth, long after the call.
_CACHED_METADATA = 256 << 10
_CACHED_TENSORS = 1 << 12
_CACHE_SLOTS = 32
# Values per slab: large enough to amortise per-op overhead, small enough that the float
# temporaries stay in the last-level cache.
_CHUNK = 1 << 20
# Large tensors with at least this many values in whole blocks are quantized in place;
# smaller ones are gathered, which saves per-op overhead.
_DIRECT_MIN = 1 << 18
# Decoded floats up to this many values share one allocation (fewer calls); beyond it each
# tensor gets its own, because one huge block is mapped afresh by the C allocator on every
# call and its page faults would cost more than the decoding.
_ONE_ALLOCATION = 1 << 22

_FLOAT_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}
_RAW_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
}
_DTYPE_NAMES = {d: name for name, d in (_FLOAT_DTYPES | _RAW_DTYPES).items()}


def _largest_scale(qmax: int) -> float:
    """Largest float32 scale whose top level ``qmax * scale`` is still finite."""
    scale = torch.tensor(torch.finfo(torch.float32).max / qmax, dtype=torch.float32)
    while not torch.isfinite(scale * qmax):
        scale = torch.nextafter(scale, torch.zeros(()))
    return scale.item()


_MAX_SCALE = {bits: _largest_scale(qmax) for bits, qmax in _QMAX.items()}
_SMALLEST_NORMAL = torch.finfo(torch.float32).tiny
_scratch = threading.local()


def _scratch_buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread work buffer of ``numel`` elements, kept for later calls.

    Rounds repeat the same sizes, and reusing memory saves the page faults of fresh
    allocations, which on virtual machines can cost as much as the codec's arithmetic.
    The buffers grow to the largest model seen and are never freed.
    """
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        buffer = torch.empty(numel, dtype=dtype)
        setattr(_scratch, name, buffer)
    return buffer[:numel]


class _Entry(NamedTuple):
    """One tensor's metadata: its name, original dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def quantized(self) -> bool:
        return self.dtype in _FLOAT_DTYPES

    @property
    def raw_nbytes(self) -> int:
        return 0 if self.quantized else self.numel * _RAW_DTYPES[self.dtype].itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        return _FLOAT_DTYPES.get(self.dtype) or _RAW_DTYPES[self.dtype]


class _Stream(NamedTuple):
    """The float tensors of a payload as one stream of values, cut into slabs.

    Each slab is ``(start, length, pieces)``: whole blocks of the stream (only the stream's
    last block may be short), drawn from the runs ``(tensor index, start, length)``.
    """

    sizes: tuple[int, ...]
    block_size: int
    slabs: tuple[tuple[int, int, tuple[tuple[int, int, int], ...]], ...]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block_size)


@functools.lru_cache(maxsize=_CACHE_SLOTS)
def _stream(sizes: tuple[int, ...], block_size: int) -> _Stream:
    """Cut a stream of tensors with ``sizes`` values into slabs (cached: rounds repeat it).

    The whole blocks inside a large tensor form slabs of that tensor alone, used in place;
    the rest (the blocks that straddle tensors, and small tensors) is gathered. Slabs start
    at even positions, so that every int4 slab starts on a byte boundary.
    """
    unit = block_size if block_size % 2 == 0 else 2 * block_size
    step = max(1, _CHUNK // unit) * unit
    ends = tuple(itertools.accumulate(sizes))
    total = sum(sizes)
    ranges, pos = [], 0  # consecutive [start, stop) ranges of the stream
    for end, n in zip(ends, sizes, strict=True):
        lo, hi = -(-(end - n) // unit) * unit, end // unit * unit
        if hi - lo >= _DIRECT_MIN:
            ranges += [(pos, lo), (lo, hi)] if lo > pos else [(lo, hi)]
            pos = hi
    if pos < total:
        ranges.append((pos, total))
    i, slabs = 0, []
    for first, last in ranges:
        for start in range(first, last, step):
            stop, pos, pieces = min(start + step, last), start, []
            while pos < stop:
                while ends[i] <= pos:
                    i += 1
                take = min(stop, ends[i]) - pos
                pieces.append((i, pos - (ends[i] - sizes[i]), take))
                pos += take
            slabs.append((start, stop - start, tuple(pieces)))
    return _Stream(sizes, block_size, tuple(slabs))


class _Schema(NamedTuple):
    """What encoding tensors with given names, dtypes and shapes needs (cached per model)."""

    entries: tuple[_Entry, ...]
    floats: tuple[int, ...]  # positions of the float tensors
    raws: tuple[int, ...]  # positions of the other tensors
    all_float32: bool
    metadata: bytes  # the compressed metadata section
    padding: bytes  # zeros after it, up to the data's alignment


@functools.lru_cache(maxsize=_CACHE_SLOTS)
def _schema(key: tuple[tuple[object, torch.dtype, torch.Size], ...]) -> _Schema:
    entries = tuple(_entry(name, dtype, shape) for name, dtype, shape in key)
    floats = tuple(i for i, e in enumerate(entries) if e.quantized)
    items = [[e.name, e.dtype, list(e.shape)] for e in entries]
    metadata = zlib.compress(json.dumps(items, separators=(",", ":")).encode())
    return _Schema(
        entries,
        floats,
        tuple(i for i, e in enumerate(entries) if not e.quantized),
        all(entries[i].dtype == "float32" for i in floats),
        metadata,
        bytes(-(_HEADER.size + len(metadata)) % _ALIGN),
    )


def _entry(name: object, dtype: torch.dtype, shape: torch.Size) -> _Entry:
    if not isinstance(name, str):
        raise ValueError(f"tensor names must be str, got {name!r}")
    dtype_name = _DTYPE_NAMES.get(dtype)
    if dtype_name is None:
        raise ValueError(f"tensor {name!r} has unsupported dtype {dtype}")
    if not _fits_torch(shape):  # the decoder could not rebuild it
        raise ValueError(f"tensor {name!r} has shape {tuple(shape)}, too large to decode")
    return _Entry(name, dtype_name, tuple(shape))


def _fits_torch(shape: Sequence[int]) -> bool:
    """Whether torch can build every tensor of ``shape``: its sizes and strides are int64, so
    the dimensions, zeros counted as 1, must multiply to less than 2**63 (even with no
    elements: torch refuses ``empty(0, 2**62, 2**62)``)."""
    return math.prod(max(d, 1) for d in shape) < 2**63


def _shape_text(shape: object) -> str:
    """``shape`` for a message, cut short: a hostile one may hold thousands of digits."""
    text = repr(shape)
    return text if len(text) <= 200 else f"{text[:200]}..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_params(bits: int, block_size: int) -> None:
    if not _is_int(bits) or bits not in _QMAX:
        raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {bits!r}")
    if not _is_int(block_size) or not 1 <= block_size < 2**32:
        raise ValueError(f"block_size must be an int in [1, 2**32), got {block_size!r}")


def _check_byteorder() -> None:
    # Raw tensors and scales are copied in native order; the format says little-endian.
    if sys.byteorder != "little":
        raise NotImplementedError("the update codec only runs on little-endian hosts")


def _scales_from_absmax(absmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block scales ``absmax / qmax`` and the divisors to quantize with.

    All-zero blocks keep scale 0 but divide by 1, giving level 0 rather than NaN. The fixes
    for extreme magnitudes run only when some block needs them.
    """
    qmax = _QMAX[bits]
    scales = absmax / qmax
    smallest, largest = (float(v) for v in torch.aminmax(scales))
    if smallest < _SMALLEST_NORMAL:
        # A subnormal quotient can round down by many ulps (even to 0); stepping one ulp
        # towards absmax restores qmax * scale >= absmax, so round-to-nearest stays within
        # half a step and never leaves [-qmax, qmax].
        scales = torch.where(scales * qmax < absmax, torch.nextafter(scales, absmax), scales)
    if largest > _MAX_SCALE[bits]:
        scales.clamp_(max=_MAX_SCALE[bits])  # so that qmax * scale stays finite
    divisors = scales if smallest > 0 else torch.where(scales > 0, scales, 1.0)
    return scales, divisors


def _blocks(values: torch.Tensor, block_size: int) -> list[tuple[int, torch.Tensor]]:
    """A slab's values as (first block offset, 2-D rows of one block): its whole blocks, then
    the stream's short last block if the slab ends with it."""
    whole = values.numel() // block_size * block_size
    parts = [(0, values[:whole].view(-1, block_size))] if whole else []
    if whole < values.numel():
        parts.append((whole // block_size, values[whole:].view(1, -1)))
    return parts


def _slab_values(
    floats: Sequence[torch.Tensor], pieces: Sequence[tuple[int, int, int]]
) -> torch.Tensor:
    """The slab's values as one flat vector: a view when it lies in one tensor, else a copy."""
    runs = [
        floats[i] if n == floats[i].numel() else floats[i].reshape(-1)[start : start + n]
        for i, start, n in pieces
    ]
    if len(runs) == 1:
        return runs[0].reshape(-1)
    return torch.cat([run.reshape(-1) for run in runs])


def _quantize(
    floats: Sequence[torch.Tensor],
    names: Sequence[str],
    stream: _Stream,
    bits: int,
    generator: torch.Generator | None,
    packed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the float32 tensors' stream; return the block scales and the level section:
    int8 levels, or with ``packed`` the int4 nibble pairs (odd counts padded with level 0).

    The section is a scratch buffer, valid until the next call. Without a generator this
    rounds to nearest; with one it rounds stochastically, one uniform per value, slab by slab.
    """
    qmax, size = _QMAX[bits], stream.block_size
    capacity = max((length for _, length, _ in stream.slabs), default=0)
    noise = _scratch_buffer("noise", capacity if generator else 0, torch.float32)
    work = _scratch_buffer("work", capacity + 1, torch.float32)  # + an int4 padding level
    levels = _scratch_buffer("int4_levels", capacity + 1 if packed else 0, torch.int8)
    pairs = _scratch_buffer("pairs", capacity // 2 + 1 if packed else 0, torch.int16)
    n = stream.numel
    section = (
        _scratch_buffer("packed", (n + 1) // 2, torch.uint8)
        if packed
        else _scratch_buffer("levels", n, torch.int8)
    )
    absmax, scales = torch.empty(stream.n_blocks), torch.empty(stream.n_blocks)
    s_buf = torch.empty(-(-capacity // size))
    for start, length, pieces in stream.slabs:
        t = work[:length]
        for offset, x in _blocks(_slab_values(floats, pieces), size):
            b0 = start // size + offset
            rows = t[offset * size : offset * size + x.numel()].view(x.shape)
            # max(max, -min) reads the values twice but, unlike max(abs), writes nothing.
            a = torch.amax(x, dim=1, out=absmax[b0 : b0 + len(x)])
            a = torch.maximum(a, torch.amin(x, dim=1, out=s_buf[: len(x)]).neg_(), out=a)
            s, divisors = _scales_from_absmax(a, bits)
            scales[b0 : b0 + len(x)] = s
            torch.div(x, divisors[:, None], out=rows)
        if generator is None:
            t.round_()  # |t| < qmax + 1/2 (see _scales_from_absmax): no clamp needed
        else:
            t.add_(torch.rand(length, generator=generator, out=noise[:length])).floor_()
            t.clamp_(-qmax, qmax)  # u close to 1 can round the sum up past qmax
        if not packed:
            section[start : start + length].copy_(t)
            continue
        if length % 2:  # the stream's odd last value gets a level-0 partner
            work[length] = 0
            t = work[: length + 1]
        # A little-endian int16 holds nibble pair lo + 256 * hi; the packed byte lo | hi << 4
        # is the low byte of pairs | pairs >> 4, masked so that the uint8 cast is exact.
        words = levels[: t.numel()].copy_(t).add_(_INT4_OFFSET).view(torch.int16)
        p = torch.bitwise_right_shift(words, 4, out=pairs[: words.numel()])
        section[start // 2 : start // 2 + p.numel()].copy_(p.bitwise_or_(words).bitwise_and_(0xFF))
    if not bool(torch.isfinite(absmax).all()):
        name = next(n for n, t in zip(names, floats, strict=True) if not t.isfinite().all())
        raise ValueError(
            f"tensor {name!r} has non-finite values (NaN/inf, or beyond the float32 range)"
        )
    return scales, section


def _dequantize(
    section: torch.Tensor,
    bits: int,
    scales: torch.Tensor,
    stream: _Stream,
    out: torch.Tensor | Sequence[torch.Tensor],
) -> None:
    """Dequantize a level section (int8, or packed int4 bytes) into float32: ``out`` is the
    flat stream, or one flat tensor per float tensor of the stream."""
    qmax, size = _QMAX[bits], stream.block_size
    capacity = max((length for _, length, _ in stream.slabs), default=0)
    # Each int4 slab unpacks whole bytes: an odd length carries one nibble more.
    unpacked = _scratch_buffer("unpacked", capacity + 2 if bits == 4 else 0, torch.int8)
    work = _scratch_buffer("work", capacity, torch.float32)
    for start, length, pieces in stream.slabs:
        if bits == 8:
            q = section[start : start + length]
        else:
            q = _unpack_int4(section[start // 2 : -(-(start + length) // 2)], unpacked)[:length]
        if int(q.min()) < -qmax:
            raise CodecError(f"level below -{qmax} in a {bits}-bit payload")
        if isinstance(out, torch.Tensor):
            t = out[start : start + length]
        elif len(pieces) == 1:
            i, first, n = pieces[0]
            t = out[i][first : first + n]
        else:
            t = work[:length]
        t.copy_(q)
        for offset, x in _blocks(t, size):
            b0 = start // size + offset
            x.mul_(scales[b0 : b0 + len(x), None])
        if t.data_ptr() == work.data_ptr():
            for (i, first, n), run in zip(pieces, t.split([n for *_, n in pieces]), strict=True):
                out[i][first : first + n].copy_(run)


def _unpack_int4(packed: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """Unpack nibble pairs into int8 levels in ``buffer``, low nibble first."""
    words = buffer[: 2 * packed.numel()].view(torch.int16).copy_(packed)
    # Spread byte b to the little-endian int16 (b & 0x0F) + 256 * (b >> 4).
    words.bitwise_or_(words << 4).bitwise_and_(0x0F0F)
    return words.view(torch.int8).sub_(_INT4_OFFSET)


def _rng(stochastic: bool, generator: torch.Generator | None) -> torch.Generator | None:
    """The noise source for rounding: None for round-to-nearest, else a CPU generator."""
    if not stochastic:
        return None
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    return generator


@torch.no_grad()
def quantize_dequantize(
    x: torch.Tensor,
    *,
    bits: int,
    block_size: int,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """What the receiver reconstructs for float tensor ``x`` sent alone: float32, same shape
    and device.

    For a payload of several float tensors, apply it to their flattened concatenation (the
    payload's value stream). Stochastic rounding draws ``x.numel()`` uniforms from
    ``generator``, exactly as ``encode_update(..., stochastic=True, seed=s)`` does from a
    generator seeded ``s``.
    """
    _check_params(bits, block_size)
    if not x.is_floating_point():
        raise ValueError(f"quantize_dequantize needs a float tensor, got {x.dtype}")
    flat = x.detach().reshape(-1).to("cpu", torch.float32)
    stream = _stream((flat.numel(),), block_size)
    rng = _rng(stochastic, generator)
    # Unpacked int4 levels are the same int8 values, so skip the nibble round trip.
    scales, levels = _quantize([flat], ["x"], stream, bits, rng, packed=False)
    out = torch.empty(x.shape)
    _dequantize(levels, 8, scales, stream, out.view(-1))
    return out.to(x.device)


@torch.no_grad()
def encode_update(
    tensors: Mapping[str, torch.Tensor],
    *,
    bits: int,
    block_size: int,
    stochastic: bool = False,
    seed: int | None = None,
    lossless: bool = False,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
) -> bytes:
    """Encode a state-dict-like mapping of CPU tensors into one self-describing payload.

    Float tensors (float16/bfloat16/float32/float64) are quantized to ``bits`` in blocks of
    ``block_size`` values of their joint stream; other tensors are copied losslessly.
    ``stochastic`` rounds with noise from a generator seeded with ``seed`` (random when None),
    so one seed gives one payload. ``lossless`` compresses the scales and levels with zstd at
    ``zstd_level`` (1-22) and keeps that only if the payload gets smaller (header flag
    FLAG_ZSTD); either way the payload decodes to the same tensors. Raises ValueError for bad
    parameters, unsupported dtypes or non-finite floats.
    """
    _check_params(bits, block_size)
    _check_lossless(lossless, zstd_level)
    _check_byteorder()
    schema = _schema(tuple((name, t.dtype, t.shape) for name, t in tensors.items()))
    values = list(tensors.values())
    floats = [values[i] for i in schema.floats]
    if not schema.all_float32:
        floats = [t.float() for t in floats]
    stream = _stream(tuple(schema.entries[i].numel for i in schema.floats), block_size)
    rng = _rng(stochastic, None if seed is None else torch.Generator().manual_seed(seed))
    names = [schema.entries[i].name for i in schema.floats]
    scales, levels = _quantize(floats, names, stream, bits, rng, packed=bits == 4)
    raw = [values[i].to("cpu").contiguous().reshape(-1).view(torch.uint8) for i in schema.raws]
    data, flags = [scales.numpy(), levels.numpy()], 0
    if lossless:
        section = _zstd_section(data, 4 * scales.numel() + levels.numel(), zstd_level)
        if section is not None:
            data, flags = section, FLAG_ZSTD
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, bits, flags, block_size, len(schema.metadata))
    return b"".join([header, schema.metadata, schema.padding, *data, *(r.numpy() for r in raw)])


def _check_lossless(lossless: bool, zstd_level: int) -> None:
    if not isinstance(lossless, bool):
        raise ValueError(f"lossless must be a bool, got {lossless!r}")
    if not _is_int(zstd_level) or zstd_level not in _ZSTD_LEVELS:
        raise ValueError(
            f"zstd_level must be an int in [1, {_ZSTD_LEVELS[-1]}], got {zstd_level!r}"
        )


def _zstd_section(parts: Sequence[object], size: int, level: int) -> list[bytes] | None:
    """The ``size`` bytes of ``parts`` (buffers) as a zstd section, zero bytes in front of the
    frame up to ``ceil(size / _MAX_ZSTD_RATIO)``; None where that is not smaller."""
    floor = -(-size // _MAX_ZSTD_RATIO)
    if floor >= size:  # nothing a frame could save (a frame takes at least 9 bytes anyway)
        return None
    stream = _zstd_compressor(level).compressobj(size=size)  # declares the content size
    frame = b"".join([*(stream.compress(part) for part in parts), stream.flush()])
    if max(len(frame), floor) >= size:
        return None
    return [bytes(max(0, floor - len(frame))), frame]


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    """A per-thread compressor for ``level`` (they hold a context and are not thread-safe)."""
    compressors = _scratch.__dict__.setdefault("zstd_compressors", {})
    if level not in compressors:
        compressors[level] = zstandard.ZstdCompressor(level=level)
    return compressors[level]


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    decompressor = getattr(_scratch, "zstd_decompressor", None)
    if decompressor is None:
        decompressor = _scratch.zstd_decompressor = zstandard.ZstdDecompressor()
    return decompressor


def decode_update(
    payload: bytes,
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
) -> dict[str, torch.Tensor]:
    """Decode a payload from ``encode_update``.

    Floats come back as float32, other tensors with their own dtype. If ``expected`` is
    given, it must name exactly the payload's tensors, each with its shape and the dtype it
    had before encoding. Raises CodecError for anything malformed.
    """
    _check_byteorder()
    if len(payload) < _HEADER.size:
        raise CodecError(f"payload truncated: {len(payload)} bytes, header needs {_HEADER.size}")
    magic, version, bits, flags, block_size, meta_len = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CodecError(
            f"unsupported format version {version}, this decoder reads {FORMAT_VERSION}"
        )
    if bits not in _QMAX:
        raise CodecError(f"unsupported bits {bits}, allowed: {ALLOWED_BITS}")
    if flags & ~FLAG_ZSTD:
        raise CodecError(
            f"header flags 0x{flags:04x} set reserved bits (known: 0x{FLAG_ZSTD:04x}), must be 0"
        )
    if block_size == 0:
        raise CodecError("block_size is 0")
    data_start = -(-(_HEADER.size + meta_len) // _ALIGN) * _ALIGN
    if len(payload) < data_start:
        raise CodecError(f"payload truncated inside the metadata ({len(payload)} < {data_start})")
    if any(payload[_HEADER.size + meta_len : data_start]):
        raise CodecError("metadata padding is not zero")
    entries = _parse_metadata(bytes(payload[_HEADER.size : _HEADER.size + meta_len]))
    if expected is not None:
        _check_expected(entries, expected)

    # A payload claims at most what its own length can hold (a zstd section: 64 times its
    # length): the sizes follow from the metadata alone, in plain integers, before anything
    # is laid out, allocated or decompressed from them.
    floats = tuple(e for e in entries if e.quantized)
    numel = sum(e.numel for e in floats)
    n_blocks = -(-numel // block_size)
    level_bytes = numel if bits == 8 else (numel + 1) // 2
    data_bytes = 4 * n_blocks + level_bytes  # scales and levels
    raw_bytes = sum(e.raw_nbytes for e in entries)
    values = numel + sum(e.numel for e in entries if not e.quantized)
    if flags & FLAG_ZSTD:
        zstd_bytes = len(payload) - data_start - raw_bytes
        if zstd_bytes < 0 or data_bytes > _MAX_ZSTD_RATIO * zstd_bytes:
            raise CodecError(
                f"payload truncated: metadata claims {_count(values)} values needing "
                f"{_count(data_bytes)} bytes of scales and levels, over {_MAX_ZSTD_RATIO} "
                f"times the {max(zstd_bytes, 0)} bytes left for their zstd section and "
                f"{_count(raw_bytes)} bytes of raw data, payload has {len(payload)}"
            )
        if zstd_bytes >= data_bytes:
            raise CodecError(
                f"zstd section of {zstd_bytes} bytes is not smaller than the {data_bytes} "
                "bytes of scales and levels it holds (only smaller sections are compressed)"
            )
        data, data_at = _inflate(payload, data_start, zstd_bytes, data_bytes), 0
        raw_at = data_start + zstd_bytes
    else:
        total = data_start + data_bytes + raw_bytes
        if len(payload) < total:
            raise CodecError(
                f"payload truncated: metadata claims {_count(values)} values needing "
                f"{_count(total)} bytes, payload has {len(payload)}"
            )
        if len(payload) > total:
            raise CodecError(f"{len(payload) - total} trailing bytes after the data")
        data, data_at = payload, data_start
        raw_at = data_start + data_bytes
    cached = len(floats) <= _CACHED_TENSORS
    layout = _stream if cached else _stream.__wrapped__
    stream = layout(tuple(e.numel for e in floats), block_size)
    scales = _buffer_view(data, torch.float32, data_at, n_blocks)
    # NaN fails both comparisons, so this also rejects non-finite scales.
    if not bool(((scales >= 0) & (scales <= _MAX_SCALE[bits])).all()):
        raise CodecError(f"scales must be finite and in [0, {_MAX_SCALE[bits]:.6g}]")
    level_dtype = torch.int8 if bits == 8 else torch.uint8
    section = _buffer_view(data, level_dtype, data_at + 4 * n_blocks, level_bytes)
    if bits == 4 and numel % 2 and section[-1].item() >> 4 != _INT4_OFFSET:
        raise CodecError("int4 padding nibble does not hold level 0")

    if numel <= _ONE_ALLOCATION:
        flat = torch.empty(numel)
        _dequantize(section, bits, scales, stream, flat)
        pieces = flat.split([e.numel for e in floats])
        decoded = iter(piece.view(e.shape) for piece, e in zip(pieces, floats, strict=True))
    else:
        tensors = [torch.empty(e.shape) for e in floats]
        _dequantize(section, bits, scales, stream, [t.view(-1) for t in tensors])
        decoded = iter(tensors)
    out: dict[str, torch.Tensor] = {}
    offset = raw_at
    for e in entries:
        if e.quantized:
            out[e.name] = next(decoded)
            continue
        raw = _buffer_view(payload, torch.uint8, offset, e.raw_nbytes).clone()
        if e.dtype == "bool" and bool((raw > 1).any()):
            raise CodecError(f"bool tensor {e.name!r} holds bytes other than 0 and 1")
        out[e.name] = raw.view(e.torch_dtype).reshape(e.shape)
        offset += e.raw_nbytes
    return out


def _inflate(payload: bytes, start: int, length: int, size: int) -> bytes:
    """The ``size`` bytes of scales and levels held by the zstd section of ``length`` bytes at
    ``start`` (``size <= _MAX_ZSTD_RATIO * length`` and ``length < size``: checked already)."""
    frame = memoryview(payload).cast("B")[start : start + length]
    if length == -(-size // _MAX_ZSTD_RATIO) and not frame[0]:  # zeros before a short frame
        frame = frame[length - len(bytes(frame).lstrip(b"\0")) :]
    if bytes(frame[: len(_ZSTD_MAGIC)]) != _ZSTD_MAGIC:
        raise CodecError("zstd section does not hold a zstd frame (bad magic)")
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd frame header is invalid: {exc}") from exc
    # The decompressor allocates what the frame declares: it must be exactly what the
    # metadata implies. An unknown size reads as 2**64 - 1 (or -1, depending on the backend).
    if params.content_size != size:
        unknown = params.content_size in (-1, 2**64 - 1)
        declared = "none" if unknown else f"{params.content_size} bytes"
        raise CodecError(
            f"zstd frame declares a content size of {declared}, metadata implies {size} "
            "bytes of scales and levels"
        )
    if params.dict_id:
        raise CodecError(f"zstd frame needs dictionary {params.dict_id}")
    try:
        data = _zstd_decompressor().decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd frame does not inflate to exactly {size} bytes: {exc}") from exc
    if len(data) != size:
        raise CodecError(f"zstd frame inflated to {len(data)} bytes, expected {size}")
    return data


def _count(n: int) -> str:
    """``n`` for a message: in digits, or by its power of two when that is too long."""
    if n < 2**64:
        return str(n)
    k = n.bit_length() - 1
    return f"2^{k}" if n == 1 << k else f"over 2^{k}"


def schema_of(
    tensors: Mapping[str, torch.Tensor],
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The ``expected`` argument of the decoders for ``tensors``: name -> (shape, dtype)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


def fp32_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes the tensors take as raw data, floats counted as float32: the ratio baseline."""
    return sum(
        t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in tensors.values()
    )


def _buffer_view(
    buffer: bytes | bytearray, dtype: torch.dtype, offset: int, count: int
) -> torch.Tensor:
    """A tensor over ``count`` items of ``buffer`` at ``offset``, sharing its memory."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        # Views of an immutable payload are only ever read, never written.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)


_metadata_cache: collections.OrderedDict[bytes, tuple[_Entry, ...]] = collections.OrderedDict()
_metadata_lock = threading.Lock()


def _parse_metadata(blob: bytes) -> tuple[_Entry, ...]:
    """Inflate and validate the metadata section, cached (least recently used first out)
    when it inflates to at most _CACHED_METADATA bytes."""
    with _metadata_lock:
        entries = _metadata_cache.get(blob)
        if entries is not None:
            _metadata_cache.move_to_end(blob)
            return entries
    text = _inflate_metadata(blob)
    entries = _parse_entries(text)
    if len(text) <= _CACHED_METADATA:
        with _metadata_lock:
            _metadata_cache[blob] = entries
            if len(_metadata_cache) > _CACHE_SLOTS:
                _metadata_cache.popitem(last=False)
    return entries


def _inflate_metadata(blob: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(blob, _MAX_METADATA)
    except zlib.error as exc:
        raise CodecError(f"metadata is not valid zlib data: {exc}") from exc
    if not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise CodecError("metadata is truncated, too large or followed by stray bytes")
    return text


def _parse_entries(text: bytes) -> tuple[_Entry, ...]:
    try:
        items = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"metadata is not valid JSON: {exc}") from exc
    if not isinstance(items, list):
        raise CodecError("metadata must be a JSON list of [name, dtype, shape]")
    entries = tuple(_parse_entry(item) for item in items)
    if len({e.name for e in entries}) != len(entries):
        raise CodecError("metadata repeats a tensor name")
    return entries


def _parse_entry(item: object) -> _Entry:
    if not (isinstance(item, list) and len(item) == 3):
        raise CodecError(f"metadata entry {item!r} is not [name, dtype, shape]")
    name, dtype, shape = item
    if not isinstance(name, str):
        raise CodecError(f"tensor name {name!r} is not a string")
    if dtype not in _FLOAT_DTYPES and dtype not in _RAW_DTYPES:
        raise CodecError(f"tensor {name!r} has unknown dtype {dtype!r}")
    # type() rather than isinstance(): JSON true/false must not pass as 1/0.
    if not (
        isinstance(shape, list)
        and len(shape) <= _MAX_NDIM
        # Sizes are int64 in torch; the bound also keeps products to a few thousand bits.
        and all(type(d) is int and 0 <= d < 2**63 for d in shape)
        # Too many values for torch are too many for the payload: the length check says so.
        and (math.prod(shape) > 0 or _fits_torch(shape))
    ):
        raise CodecError(f"tensor {name!r} has invalid shape {_shape_text(shape)}")
    return _Entry(name, dtype, tuple(shape))


def _check_expected(
    entries: Sequence[_Entry], expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
) -> None:
    names = {e.name for e in entries}
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or extra:
        raise CodecError(
            f"tensor names differ from expected: {len(missing)} missing {missing[:3]}, "
            f"{len(extra)} extra {extra[:3]}"
        )
    for e in entries:
        shape, dtype = expected[e.name]
        if tuple(shape) != e.shape:
            raise CodecError(f"tensor {e.name!r} has shape {e.shape}, expected {tuple(shape)}")
        if dtype != e.torch_dtype:
            raise CodecError(f"tensor {e.name!r} has dtype {e.torch_dtype}, expected {dtype}")
