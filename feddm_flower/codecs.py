"""Quantized model-update codec used by the FedDMQuant strategy.

Clients send their update (local weights minus the received global weights) as one
self-describing payload: float tensors are quantized blockwise to int8 or int4 with one
absmax scale per block, every other tensor travels losslessly as raw bytes.

Payload layout (all little-endian)::

    header    16 B: magic b"FDMQ", u8 FORMAT_VERSION, u8 bits, u16 reserved (0),
              u32 block_size, u32 metadata length (before padding)
    metadata  zlib-compressed JSON ``[[name, dtype, shape], ...]`` in payload order,
              zero-padded so that the data starts 8-byte aligned
    scales    float32, one per block, blocks of all float tensors in order
    levels    int8: one signed byte per element in [-127, 127];
              int4: offset-binary nibbles (level + 8, level in [-7, 7]), two per byte, low
              nibble first; an odd total count is padded with a level-0 nibble
    raw       native bytes of the non-float tensors, in order

Blocks never span tensors: each float tensor is flattened and cut into ``block_size``
blocks (the last one may be shorter). What the receiver reconstructs for a tensor is
therefore exactly ``quantize_dequantize(tensor)`` whichever tensors share the payload, which
is what error feedback relies on. Offsets are not stored because they follow from the
shapes; the decoder checks that the sections add up to the payload length exactly.

For speed the work is vectorised over a virtual matrix of blocks, one block per row, cut
into slabs of about ``_CHUNK`` elements so that temporaries stay in cache. Large tensors are
viewed in place as rows; small tensors and the short last blocks are gathered, zero-padded
to whole rows, into shared slabs. Each slab costs a fixed handful of torch ops, and nothing
loops over blocks or elements in Python. Layouts, metadata and work buffers are cached
between calls, since every federated round repeats the same tensors.
"""

from __future__ import annotations

import bisect
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
from dataclasses import dataclass
from typing import NamedTuple

import torch

FORMAT_VERSION: int = 1
MAGIC = b"FDMQ"
ALLOWED_BITS = (8, 4)


class CodecError(ValueError):
    """A payload the decoder does not accept; the message says what is wrong."""


_HEADER = struct.Struct("<4sBBHII")
_ALIGN = 8
_QMAX = {8: 127, 4: 7}
_INT4_OFFSET = 8
_MAX_NDIM = 64
# Cap on the inflated metadata, so a tiny hostile payload cannot inflate to gigabytes.
_MAX_METADATA = 64 << 20
# Elements per slab: large enough to amortise per-op overhead, small enough that the
# float temporaries stay in the last-level cache.
_CHUNK = 1 << 20
# Tensors with at least this many elements in whole blocks are used in place; gathering
# smaller ones into shared slabs saves per-op overhead.
_DIRECT_MIN = 1 << 18

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


@dataclass(frozen=True)
class _Layout:
    """Byte offsets of the data sections, derived from the metadata alone."""

    data_start: int
    n_blocks: int
    n_levels: int
    level_bytes: int
    raw_bytes: int

    @classmethod
    def of(cls, entries: Sequence[_Entry], bits: int, block_size: int, data_start: int) -> _Layout:
        floats = [e.numel for e in entries if e.quantized]
        n_levels = sum(floats)
        return cls(
            data_start=data_start,
            n_blocks=sum(-(-n // block_size) for n in floats),
            n_levels=n_levels,
            level_bytes=n_levels if bits == 8 else (n_levels + 1) // 2,
            raw_bytes=sum(e.raw_nbytes for e in entries),
        )

    @property
    def levels_offset(self) -> int:
        return self.data_start + 4 * self.n_blocks

    @property
    def raw_offset(self) -> int:
        return self.levels_offset + self.level_bytes

    @property
    def total(self) -> int:
        return self.raw_offset + self.raw_bytes


@dataclass(frozen=True)
class _Slab:
    """Rows of one block each, processed together.

    A direct slab is whole blocks of one tensor, viewed in place. A gathered slab packs runs
    of several tensors, each zero-padded to whole rows: ``lengths`` alternates run and
    padding lengths. ``spans`` groups runs that follow each other in the level stream, as
    ``[first, stop)`` run indices, so that they can be handled in one go.
    """

    rows: int
    width: int
    pieces: tuple[tuple[int, int, int], ...]  # (tensor index, start, length) of each run
    offsets: tuple[int, ...]  # each run's position in the payload's level stream
    blocks: slice | torch.Tensor  # payload-order block number of each row
    spans: tuple[tuple[int, int], ...] = ((0, 1),)
    lengths: tuple[int, ...] | None = None  # None for a direct slab


@dataclass(frozen=True)
class _Plan:
    """How float tensors of given sizes map onto slabs of block rows.

    Rows are ``width = min(block_size, largest tensor)`` elements wide: when blocks are
    longer than every tensor, each tensor is one block either way. Short last blocks may go
    to slabs of narrower rows, which need less padding.
    """

    sizes: tuple[int, ...]
    width: int
    block_starts: tuple[int, ...]  # each tensor's first block number
    n_blocks: int
    slabs: tuple[_Slab, ...]

    @property
    def slab_capacity(self) -> int:
        """Padded elements in the largest slab, the size of the temporaries."""
        return max((s.rows * s.width for s in self.slabs), default=0)

    @property
    def padded_elements(self) -> int:
        return sum(s.rows * s.width for s in self.slabs)

    @property
    def max_spans(self) -> int:
        return max((len(s.spans) for s in self.slabs), default=0)

    def runs(self, slab: _Slab, flats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The slab's runs as views of per-tensor flat vectors."""
        return [
            flats[i] if n == self.sizes[i] else flats[i][start : start + n]
            for i, start, n in slab.pieces
        ]


@functools.lru_cache(maxsize=32)
def _plan(sizes: tuple[int, ...], block_size: int) -> _Plan:
    """Lay out tensors with ``sizes`` elements as slabs (cached: every round repeats them)."""
    width = max(1, min(block_size, max(sizes, default=0)))
    element_starts = (0, *itertools.accumulate(sizes))
    block_starts = (0, *itertools.accumulate(-(-n // width) for n in sizes))
    slabs: list[_Slab] = []
    whole: list[tuple[int, int, int]] = []  # runs of whole blocks to gather
    short: list[tuple[int, int, int]] = []  # last blocks shorter than a row
    for i, n in enumerate(sizes):
        body = n // width * width
        if body >= _DIRECT_MIN:
            slab_len = max(1, _CHUNK // width) * width
            for start in range(0, body, slab_len):
                rows = min(slab_len, body - start) // width
                first = block_starts[i] + start // width
                offset = element_starts[i] + start
                piece = (i, start, rows * width)
                slabs.append(_Slab(rows, width, (piece,), (offset,), slice(first, first + rows)))
        elif body:
            whole.append((i, 0, body))
        if body < n:
            short.append((i, body, n - body))

    narrow = _narrow_width([n for *_, n in short], width)
    thin = [run for run in short if run[2] <= narrow < width]
    wide = sorted(whole + [run for run in short if not run[2] <= narrow < width])
    slabs += _gathered_slabs(wide, width, width, element_starts, block_starts)
    slabs += _gathered_slabs(thin, narrow, width, element_starts, block_starts)
    return _Plan(sizes, width, block_starts[:-1], block_starts[-1], tuple(slabs))


def _narrow_width(lengths: Sequence[int], width: int) -> int:
    """Row width for short last blocks that minimises the padded elements to process.

    Blocks up to the returned width share narrower rows, the rest get full ``width`` rows;
    an extra slab is charged as ``_DIRECT_MIN`` elements of work.
    """
    best, best_cost = width, len(lengths) * width
    row = 1
    while row < width:
        fit = sum(n <= row for n in lengths)
        cost = fit * row + (len(lengths) - fit) * width + (_DIRECT_MIN if fit else 0)
        if cost < best_cost:
            best, best_cost = row, cost
        row *= 2
    return best


def _gathered_slabs(
    runs: Sequence[tuple[int, int, int]],
    row: int,
    width: int,
    element_starts: Sequence[int],
    block_starts: Sequence[int],
) -> list[_Slab]:
    """Pack runs (tensor index, start, length) into slabs of ``row``-element rows, each run
    zero-padded to whole rows; long runs are cut at slab boundaries."""
    slab_rows = max(1, _CHUNK // row)
    slabs: list[_Slab] = []
    pieces: list[tuple[int, int, int]] = []
    rows = 0

    def close() -> None:
        nonlocal rows
        offsets = [element_starts[i] + start for i, start, _ in pieces]
        padded = [-(-n // row) * row for *_, n in pieces]
        blocks: list[int] = []
        for (i, start, _), p in zip(pieces, padded, strict=True):
            first = block_starts[i] + start // width
            blocks.extend(range(first, first + p // row))
        breaks = [
            k for k in range(1, len(pieces)) if offsets[k] != offsets[k - 1] + pieces[k - 1][2]
        ]
        slabs.append(
            _Slab(
                rows,
                row,
                tuple(pieces),
                tuple(offsets),
                torch.tensor(blocks, dtype=torch.int64),
                tuple(itertools.pairwise([0, *breaks, len(pieces)])),
                tuple(x for (*_, n), p in zip(pieces, padded, strict=True) for x in (n, p - n)),
            )
        )
        pieces.clear()
        rows = 0

    for i, start, n in runs:
        while n:
            # Whole rows up to the slab's end; the run's last row may be short.
            length = min((slab_rows - rows) * row, n)
            pieces.append((i, start, length))
            rows += -(-length // row)
            start, n = start + length, n - length
            if rows == slab_rows:
                close()
    if pieces:
        close()
    return slabs


def _gather(
    runs: Sequence[torch.Tensor], slab: _Slab, zeros: torch.Tensor, buffer: torch.Tensor
) -> torch.Tensor:
    """The slab as one padded vector: a direct slab's single run, else the runs with zero
    padding copied into ``buffer``."""
    if slab.lengths is None:
        return runs[0]
    parts: list[torch.Tensor] = []
    for run, pad in zip(runs, slab.lengths[1::2], strict=True):
        parts.append(run)
        if pad:
            parts.append(zeros[:pad])
    return torch.cat(parts, out=buffer[: slab.rows * slab.width])


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


def _align(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def _scales_from_absmax(absmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block scales ``absmax / qmax`` and the divisors to quantize with.

    All-zero blocks keep scale 0 but divide by 1, giving level 0 rather than NaN.
    """
    qmax = _QMAX[bits]
    scales = absmax / qmax
    # A subnormal quotient can round down by many ulps (even to 0); stepping one ulp towards
    # absmax restores qmax * scale >= absmax, so round-to-nearest stays within half a step
    # and never leaves [-qmax, qmax].
    scales = torch.where(scales * qmax < absmax, torch.nextafter(scales, absmax), scales)
    # Cap so that qmax * scale, the largest decoded magnitude, stays finite.
    scales.clamp_(max=_MAX_SCALE[bits])
    return scales, torch.where(scales > 0, scales, 1.0)


def _uniform_noise(
    flats: Sequence[torch.Tensor], generator: torch.Generator, n_elements: int
) -> torch.Tensor:
    """U[0, 1) noise for all elements, drawn tensor by tensor as ``quantize_dequantize`` does."""
    noise = torch.empty(n_elements)
    offset = 0
    for x in flats:
        torch.rand(x.numel(), generator=generator, out=noise[offset : offset + x.numel()])
        offset += x.numel()
    return noise


def _encode_floats(
    flats: Sequence[torch.Tensor],
    names: Sequence[str],
    plan: _Plan,
    *,
    bits: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Quantize flat float32 vectors; return the scales and the int8 level runs, both in
    payload order. The runs are views of a scratch buffer, valid until the next call.

    Without a generator this rounds to nearest; with one it rounds stochastically, drawing
    one uniform per element, tensor by tensor, so a seed fixes the result.
    """
    qmax, capacity = _QMAX[bits], plan.slab_capacity
    gathered = _scratch_buffer("gathered", capacity, torch.float32)
    work = _scratch_buffer("work", capacity, torch.float32)
    levels = _scratch_buffer("levels", plan.padded_elements, torch.int8)
    zeros = torch.zeros(plan.width)
    absmax, scales = torch.empty(plan.n_blocks), torch.empty(plan.n_blocks)
    noise = None if generator is None else _uniform_noise(flats, generator, sum(plan.sizes))
    runs: list[tuple[int, torch.Tensor]] = []
    at = 0  # where the slab's levels go in the levels buffer
    for slab in plan.slabs:
        shape = (slab.rows, slab.width)
        x = _gather(plan.runs(slab, flats), slab, zeros, gathered).view(shape)
        t = work[: slab.rows * slab.width].view(shape)
        a = torch.amax(torch.abs(x, out=t), dim=1)
        s, divisors = _scales_from_absmax(a, bits)
        absmax[slab.blocks], scales[slab.blocks] = a, s
        torch.div(x, divisors[:, None], out=t)
        if noise is None:
            t.round_()  # |t| < qmax + 1/2 (see _scales_from_absmax): no clamp needed
        else:
            # x is consumed, so the noise may reuse its buffer.
            u = [noise[o : o + n] for o, (_, _, n) in zip(slab.offsets, slab.pieces, strict=True)]
            t.add_(_gather(u, slab, zeros, gathered).view(shape)).floor_()
            t.clamp_(-qmax, qmax)  # u close to 1 can round the sum up past qmax
        q = levels[at : at + t.numel()]
        q.view(shape).copy_(t)
        at += t.numel()
        if slab.lengths is None:
            runs.append((slab.offsets[0], q))
            continue
        unpadded = q.split(slab.lengths)[0::2]
        for first, stop in slab.spans:
            run = unpadded[first] if stop - first == 1 else torch.cat(unpadded[first:stop])
            runs.append((slab.offsets[first], run))

    bad = torch.nonzero(~torch.isfinite(absmax))
    if bad.numel():
        name = names[bisect.bisect_right(plan.block_starts, int(bad[0])) - 1]
        raise ValueError(
            f"tensor {name!r} has non-finite values (NaN/inf, or beyond the float32 range)"
        )
    runs.sort(key=lambda run: run[0])
    return scales, [q for _, q in runs]


def _unpack_int4(packed: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """Unpack nibble pairs into int8 levels in ``buffer``, low nibble first."""
    words = buffer[: 2 * packed.numel()].view(torch.int16).copy_(packed)
    # Spread byte b to the little-endian int16 (b & 0x0F) + 256 * (b >> 4).
    words.bitwise_or_(words << 4).bitwise_and_(0x0F0F)
    return words.view(torch.int8).sub_(_INT4_OFFSET)


def _level_runs(
    section: torch.Tensor, packed: bool, slab: _Slab, buffer: torch.Tensor
) -> list[torch.Tensor]:
    """The slab's runs of int8 levels: views of an int8 level section, or of int4 nibbles
    unpacked into ``buffer`` span by span."""
    pieces = [(offset, n) for offset, (_, _, n) in zip(slab.offsets, slab.pieces, strict=True)]
    if not packed:
        return [section[offset : offset + n] for offset, n in pieces]
    runs: list[torch.Tensor] = []
    at = 0
    for first, stop in slab.spans:
        start, end = pieces[first][0], sum(pieces[stop - 1])
        nibbles = section[start // 2 : -(-end // 2)]
        levels = _unpack_int4(nibbles, buffer[at:])[start % 2 :]
        runs.extend(levels[offset - start : offset - start + n] for offset, n in pieces[first:stop])
        at += 2 * nibbles.numel()
    return runs


def _decode_floats(
    section: torch.Tensor,
    bits: int,
    scales: torch.Tensor,
    plan: _Plan,
    outs: Sequence[torch.Tensor],
) -> None:
    """Dequantize a level section into the flat float32 tensors ``outs``."""
    capacity, qmax = plan.slab_capacity, _QMAX[bits]
    packed = bits == 4
    if packed and section.numel() <= _CHUNK:
        # A small section unpacks in one go, cheaper than span by span.
        section = _unpack_int4(section, _scratch_buffer("nibbles", 2 * section.numel(), torch.int8))
        packed = False
    # int8 * float32 in one op takes a slow mixed-dtype path; converting slabwise is faster.
    work = _scratch_buffer("work", capacity, torch.float32)
    gathered = _scratch_buffer("gathered_levels", capacity, torch.int8)
    # Each span unpacks whole bytes, so it may carry a neighbour's nibble at either end.
    spans = capacity + 2 * plan.max_spans if packed else 0
    unpacked = _scratch_buffer("unpacked", spans, torch.int8)
    zeros = torch.zeros(plan.width, dtype=torch.int8)
    for slab in plan.slabs:
        shape = (slab.rows, slab.width)
        q = _gather(_level_runs(section, packed, slab, unpacked), slab, zeros, gathered)
        if int(q.min()) < -qmax:
            raise CodecError(f"level below -{qmax} in a {bits}-bit payload")
        t = work[: slab.rows * slab.width].view(shape).copy_(q.view(shape))
        s = scales[slab.blocks][:, None]
        if slab.lengths is None:
            torch.mul(t, s, out=plan.runs(slab, outs)[0].view(shape))
            continue
        t.mul_(s)
        padded_runs = t.view(-1).split(slab.lengths)[0::2]
        for out, run in zip(plan.runs(slab, outs), padded_runs, strict=True):
            out.copy_(run)


def _pack_int4(runs: Sequence[torch.Tensor], n_levels: int) -> torch.Tensor:
    """Pack payload-order int8 level runs in [-7, 7] into offset-binary nibble pairs, low
    nibble first, an odd total padded with level 0.

    Nibbles are staged through a slab-sized buffer; the result is a view of a scratch
    buffer, valid until the next call.
    """
    stage = _scratch_buffer("stage", 2 * max(1, _CHUNK // 2), torch.int8)  # even: pairs fit
    pairs = _scratch_buffer("pairs", stage.numel() // 2, torch.int16)
    packed = _scratch_buffer("packed", (n_levels + 1) // 2, torch.uint8)
    filled = written = 0

    def flush() -> None:
        nonlocal written
        # A little-endian int16 holds nibble pair lo + 256 * hi; the packed byte lo | hi << 4
        # is the low byte of pairs | pairs >> 4, masked so that the uint8 cast is exact.
        nibbles = stage[:filled].view(torch.int16)
        p = torch.bitwise_right_shift(nibbles, 4, out=pairs[: filled // 2])
        packed[written : written + p.numel()].copy_(p.bitwise_or_(nibbles).bitwise_and_(0xFF))
        written += p.numel()

    for run in [*runs, torch.zeros(n_levels % 2, dtype=torch.int8)]:
        start = 0
        while start < run.numel():
            n = min(stage.numel() - filled, run.numel() - start)
            torch.add(run[start : start + n], _INT4_OFFSET, out=stage[filled : filled + n])
            filled, start = filled + n, start + n
            if filled == stage.numel():
                flush()
                filled = 0
    flush()  # the padded total is even, so the last batch is too
    return packed


def _flat_float32(t: torch.Tensor) -> torch.Tensor:
    """Flat float32 CPU view of ``t``, copying only when dtype, device or layout require it."""
    flat = t.reshape(-1)
    if flat.dtype != torch.float32 or not flat.is_cpu:
        flat = flat.to("cpu", torch.float32)
    return flat


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
    """What the receiver reconstructs for float tensor ``x``: float32, same shape and device.

    Stochastic rounding draws ``x.numel()`` uniforms from ``generator``; calling this on each
    float tensor of a payload in order, with one generator seeded ``s``, reproduces exactly
    what ``encode_update(..., stochastic=True, seed=s)`` sends.
    """
    _check_params(bits, block_size)
    if not x.is_floating_point():
        raise ValueError(f"quantize_dequantize needs a float tensor, got {x.dtype}")
    flat = _flat_float32(x)
    plan = _plan((flat.numel(),), block_size)
    rng = _rng(stochastic, generator)
    scales, runs = _encode_floats([flat], ["x"], plan, bits=bits, generator=rng)
    out = torch.empty(x.shape)
    # int4 levels would unpack to these same int8 values, so skip the nibble round trip.
    levels = torch.cat(runs) if runs else torch.empty(0, dtype=torch.int8)
    _decode_floats(levels, 8, scales, plan, [out.view(-1)])
    return out.to(x.device)


@torch.no_grad()
def encode_update(
    tensors: Mapping[str, torch.Tensor],
    *,
    bits: int,
    block_size: int,
    stochastic: bool = False,
    seed: int | None = None,
) -> bytes:
    """Encode a state-dict-like mapping into one self-describing payload.

    Float tensors (float16/bfloat16/float32/float64) are quantized to ``bits`` in blocks of
    ``block_size`` elements; other tensors are copied losslessly. ``stochastic`` rounds with
    noise from a generator seeded with ``seed`` (random when None), so one seed gives one
    payload. Raises ValueError for bad parameters, unsupported dtypes or non-finite floats.
    """
    _check_params(bits, block_size)
    _check_byteorder()
    entries = tuple(_entry(name, t) for name, t in tensors.items())
    floats = [(e.name, t) for e, t in zip(entries, tensors.values(), strict=True) if e.quantized]
    flats = [_flat_float32(t) for _, t in floats]
    plan = _plan(tuple(x.numel() for x in flats), block_size)
    rng = _rng(stochastic, None if seed is None else torch.Generator().manual_seed(seed))
    names = [name for name, _ in floats]
    scales, runs = _encode_floats(flats, names, plan, bits=bits, generator=rng)
    levels = runs if bits == 8 else [_pack_int4(runs, sum(plan.sizes))]

    metadata = _metadata(entries)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, bits, 0, block_size, len(metadata))
    padding = bytes(-(len(header) + len(metadata)) % _ALIGN)
    raw = [
        t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
        for e, t in zip(entries, tensors.values(), strict=True)
        if not e.quantized
    ]
    parts = [scales, *levels, *raw]
    return b"".join([header, metadata, padding, *(part.numpy() for part in parts)])


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
    magic, version, bits, reserved, block_size, meta_len = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CodecError(
            f"unsupported format version {version}, this decoder reads {FORMAT_VERSION}"
        )
    if bits not in _QMAX:
        raise CodecError(f"unsupported bits {bits}, allowed: {ALLOWED_BITS}")
    if reserved:
        raise CodecError(f"reserved header field is {reserved}, must be 0")
    if block_size == 0:
        raise CodecError("block_size is 0")
    data_start = _align(_HEADER.size + meta_len)
    if len(payload) < data_start:
        raise CodecError(f"payload truncated inside the metadata ({len(payload)} < {data_start})")
    if any(payload[_HEADER.size + meta_len : data_start]):
        raise CodecError("metadata padding is not zero")
    entries = _parse_metadata(bytes(payload[_HEADER.size : _HEADER.size + meta_len]))
    if expected is not None:
        _check_expected(entries, expected)

    layout = _Layout.of(entries, bits, block_size, data_start)
    if len(payload) < layout.total:
        raise CodecError(
            f"payload truncated: metadata needs {layout.total} bytes, got {len(payload)}"
        )
    if len(payload) > layout.total:
        raise CodecError(f"{len(payload) - layout.total} trailing bytes after the data")
    scales = _buffer_view(payload, torch.float32, layout.data_start, layout.n_blocks)
    # NaN fails both comparisons, so this also rejects non-finite scales.
    if not bool(((scales >= 0) & (scales <= _MAX_SCALE[bits])).all()):
        raise CodecError(f"scales must be finite and in [0, {_MAX_SCALE[bits]:.6g}]")
    level_dtype = torch.int8 if bits == 8 else torch.uint8
    section = _buffer_view(payload, level_dtype, layout.levels_offset, layout.level_bytes)
    if bits == 4 and layout.n_levels % 2 and section[-1].item() >> 4 != _INT4_OFFSET:
        raise CodecError("int4 padding nibble does not hold level 0")

    decoded = {e.name: torch.empty(e.shape) for e in entries if e.quantized}
    plan = _plan(tuple(t.numel() for t in decoded.values()), block_size)
    _decode_floats(section, bits, scales, plan, [t.view(-1) for t in decoded.values()])
    out: dict[str, torch.Tensor] = {}
    offset = layout.raw_offset
    for e in entries:
        if e.quantized:
            out[e.name] = decoded[e.name]
            continue
        raw = _buffer_view(payload, torch.uint8, offset, e.raw_nbytes).clone()
        if e.dtype == "bool" and bool((raw > 1).any()):
            raise CodecError(f"bool tensor {e.name!r} holds bytes other than 0 and 1")
        out[e.name] = raw.view(e.torch_dtype).reshape(e.shape)
        offset += e.raw_nbytes
    return out


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


def _entry(name: object, t: torch.Tensor) -> _Entry:
    if not isinstance(name, str):
        raise ValueError(f"tensor names must be str, got {name!r}")
    dtype = _DTYPE_NAMES.get(t.dtype)
    if dtype is None:
        raise ValueError(f"tensor {name!r} has unsupported dtype {t.dtype}")
    return _Entry(name, dtype, tuple(t.shape))


@functools.lru_cache(maxsize=32)
def _metadata(entries: tuple[_Entry, ...]) -> bytes:
    """The compressed metadata section (cached: every round repeats it)."""
    items = [[e.name, e.dtype, list(e.shape)] for e in entries]
    return zlib.compress(json.dumps(items, separators=(",", ":")).encode())


@functools.lru_cache(maxsize=32)
def _parse_metadata(blob: bytes) -> tuple[_Entry, ...]:
    """Inflate and validate the metadata section (cached: every round repeats it)."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(blob, _MAX_METADATA)
    except zlib.error as exc:
        raise CodecError(f"metadata is not valid zlib data: {exc}") from exc
    if not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise CodecError("metadata is truncated, too large or followed by stray bytes")
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
        and all(type(d) is int and d >= 0 for d in shape)
    ):
        raise CodecError(f"tensor {name!r} has invalid shape {shape!r}")
    return _Entry(name, dtype, tuple(shape))


def _check_expected(
    entries: Sequence[_Entry], expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
) -> None:
    names = {e.name for e in entries}
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or extra:
        raise CodecError(f"tensor names differ from expected: missing {missing}, extra {extra}")
    for e in entries:
        shape, dtype = expected[e.name]
        if tuple(shape) != e.shape:
            raise CodecError(f"tensor {e.name!r} has shape {e.shape}, expected {tuple(shape)}")
        if dtype != e.torch_dtype:
            raise CodecError(f"tensor {e.name!r} has dtype {e.torch_dtype}, expected {dtype}")
