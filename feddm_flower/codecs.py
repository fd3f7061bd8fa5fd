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

For speed, all float tensors are processed as one virtual matrix of blocks, each tensor
zero-padded to whole blocks, in slabs of about ``_CHUNK`` elements: a fixed handful of
vectorised ops per slab, temporaries that stay in cache, and no per-block Python work.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import struct
import sys
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
# Elements per slab: large enough that per-op overhead is amortised, small enough that
# the float temporaries stay in the last-level cache.
_CHUNK = 1 << 20

_FLOAT_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}
_RAW_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
}


def _largest_scale(qmax: int) -> float:
    """Largest float32 scale whose top level ``qmax * scale`` is still finite."""
    scale = torch.tensor(torch.finfo(torch.float32).max / qmax, dtype=torch.float32)
    while not torch.isfinite(scale * qmax):
        scale = torch.nextafter(scale, torch.zeros(()))
    return scale.item()


_MAX_SCALE = {bits: _largest_scale(qmax) for bits, qmax in _QMAX.items()}
_INF = torch.tensor(math.inf)


@dataclass(frozen=True)
class _Entry:
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
    """Whole padded blocks processed together.

    ``pieces`` are the ``(tensor index, start, length)`` runs of data in the slab;
    ``sizes`` alternates their lengths with the zero padding that follows each one, or is
    None when the slab is a single run without padding, which needs no gathering.
    """

    blocks: slice
    elements: slice
    pieces: tuple[tuple[int, int, int], ...]
    sizes: tuple[int, ...] | None

    @property
    def rows(self) -> int:
        return self.blocks.stop - self.blocks.start


@dataclass(frozen=True)
class _Plan:
    """How float tensors of given sizes map onto a padded block matrix, cut into slabs.

    The matrix width is ``min(block_size, largest tensor)``: when blocks are longer than
    every tensor, each tensor is one block either way, and a narrower matrix needs less
    padding.
    """

    width: int
    n_blocks: int
    n_elements: int
    slabs: tuple[_Slab, ...]

    @property
    def slab_capacity(self) -> int:
        """Elements in the largest slab, the size of the temporaries."""
        return max((s.rows for s in self.slabs), default=0) * self.width

    @classmethod
    def of(cls, sizes: Sequence[int], block_size: int) -> _Plan:
        width = max(1, min(block_size, max(sizes, default=0)))
        rows_per_slab = max(1, _CHUNK // width)
        slabs: list[_Slab] = []
        pieces: list[tuple[int, int, int]] = []
        pads: list[int] = []
        block = element = 0  # next unassigned block and compact element
        slab_block = slab_element = 0  # where the open slab starts

        def close() -> None:
            nonlocal slab_block, slab_element
            if len(pieces) == 1 and pads[0] == 0:
                sizes_ = None
            else:
                sizes_ = tuple(
                    x for (_, _, n), pad in zip(pieces, pads, strict=True) for x in (n, pad)
                )
            slabs.append(
                _Slab(
                    slice(slab_block, block),
                    slice(slab_element, element),
                    tuple(pieces),
                    sizes_,
                )
            )
            pieces.clear()
            pads.clear()
            slab_block, slab_element = block, element

        for index, n in enumerate(sizes):
            start = 0
            while start < n:
                # Take whole blocks up to the slab's end; the tensor's last block may be short.
                room = (rows_per_slab - (block - slab_block)) * width
                length = min(room, n - start)
                rows = -(-length // width)
                pieces.append((index, start, length))
                pads.append(rows * width - length)
                start += length
                block += rows
                element += length
                if block - slab_block == rows_per_slab:
                    close()
        if pieces:
            close()
        return cls(width, block, element, tuple(slabs))


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


def _with_pads(
    runs: Sequence[torch.Tensor], sizes: Sequence[int], zeros: torch.Tensor
) -> list[torch.Tensor]:
    """Interleave data runs with the zero padding that follows each, for ``torch.cat``."""
    out: list[torch.Tensor] = []
    for run, pad in zip(runs, sizes[1::2], strict=True):
        out.append(run)
        if pad:
            out.append(zeros[:pad])
    return out


def _scales_from_absmax(absmax: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Write per-block scales ``absmax / qmax``, nudged so that no level leaves ``±qmax``."""
    qmax = _QMAX[bits]
    torch.div(absmax, qmax, out=out)
    # A subnormal absmax / qmax can round down by many ulps (even to 0); one step up restores
    # qmax * scale >= absmax, which keeps the rounding error within half a step.
    out.copy_(torch.where(out * qmax < absmax, torch.nextafter(out, _INF), out))
    # Cap so that qmax * scale, the largest decoded magnitude, stays finite.
    out.clamp_(max=_MAX_SCALE[bits])


def _uniform_noise(
    xs: Sequence[torch.Tensor], generator: torch.Generator, n_elements: int
) -> torch.Tensor:
    """U[0, 1) noise for all elements, drawn tensor by tensor as ``quantize_dequantize`` does."""
    noise = torch.empty(n_elements)
    offset = 0
    for x in xs:
        torch.rand(x.numel(), generator=generator, out=noise[offset : offset + x.numel()])
        offset += x.numel()
    return noise


def _encode_floats(
    xs: Sequence[torch.Tensor],
    names: Sequence[str],
    plan: _Plan,
    *,
    bits: int,
    generator: torch.Generator | None,
    scales: torch.Tensor,
    levels: torch.Tensor,
) -> None:
    """Quantize flat float32 vectors ``xs`` into ``scales`` and back-to-back int8 ``levels``.

    Without a generator this rounds to nearest; with one it rounds stochastically, drawing
    one uniform per element, tensor by tensor, so a seed fixes the result.
    """
    qmax, width, capacity = _QMAX[bits], plan.width, plan.slab_capacity
    gathered, work = torch.empty(capacity), torch.empty(capacity)
    work_levels = torch.empty(capacity, dtype=torch.int8)
    zeros = torch.zeros(width)
    absmax = torch.empty(plan.n_blocks)
    noise = None if generator is None else _uniform_noise(xs, generator, plan.n_elements)
    gathered_noise = None if noise is None else torch.empty(capacity)

    for slab in plan.slabs:
        count = slab.rows * width
        if slab.sizes is None:
            index, start, length = slab.pieces[0]
            x = xs[index][start : start + length]
        else:
            runs = [xs[i][s : s + n] for i, s, n in slab.pieces]
            x = torch.cat(_with_pads(runs, slab.sizes, zeros), out=gathered[:count])
        x = x.view(slab.rows, width)
        t = work[:count].view(slab.rows, width)
        torch.amax(torch.abs(x, out=t), dim=1, out=absmax[slab.blocks])
        s = scales[slab.blocks]
        _scales_from_absmax(absmax[slab.blocks], bits, out=s)
        # All-zero blocks have scale 0; dividing them by 1 gives level 0 instead of NaN.
        torch.div(x, torch.where(s > 0, s, 1.0)[:, None], out=t)
        if noise is None:
            t.round_()
        else:
            u = noise[slab.elements]
            if slab.sizes is not None:
                u = torch.cat(
                    _with_pads(u.split(slab.sizes[0::2]), slab.sizes, zeros),
                    out=gathered_noise[:count],
                )
            t.add_(u.view(slab.rows, width)).floor_()
        # Stochastic rounding can step one past qmax; the clamp also guards the int8 cast.
        t.clamp_(-qmax, qmax)
        if slab.sizes is None:
            levels[slab.elements].view(slab.rows, width).copy_(t)
        else:
            q = work_levels[:count].copy_(t.view(-1))
            torch.cat(q.split(slab.sizes)[0::2], out=levels[slab.elements])

    bad = torch.nonzero(~torch.isfinite(absmax))
    if bad.numel():
        ends = list(itertools.accumulate(-(-x.numel() // width) for x in xs))
        name = names[bisect.bisect_right(ends, int(bad[0]))]
        raise ValueError(
            f"tensor {name!r} has non-finite values (NaN/inf, or beyond the float32 range)"
        )


def _decode_floats(levels: torch.Tensor, scales: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Rebuild the compact float32 stream from back-to-back int8 levels and block scales."""
    width, capacity = plan.width, plan.slab_capacity
    out = torch.empty(plan.n_elements)
    # int8 * float32 in one op takes a slow mixed-dtype path; converting slabwise is faster.
    work = torch.empty(capacity)
    gathered = torch.empty(capacity, dtype=torch.int8)
    zeros = torch.zeros(width, dtype=torch.int8)
    for slab in plan.slabs:
        count = slab.rows * width
        q = levels[slab.elements]
        s = scales[slab.blocks, None]
        t = work[:count].view(slab.rows, width)
        if slab.sizes is None:
            t.copy_(q.view(slab.rows, width))
            torch.mul(t, s, out=out[slab.elements].view(slab.rows, width))
        else:
            q = torch.cat(
                _with_pads(q.split(slab.sizes[0::2]), slab.sizes, zeros), out=gathered[:count]
            )
            t.copy_(q.view(slab.rows, width)).mul_(s)
            torch.cat(t.view(-1).split(slab.sizes)[0::2], out=out[slab.elements])
    return out


def _pack_int4(levels: torch.Tensor, out: torch.Tensor) -> None:
    """Pack an even number of int8 levels in [-7, 7] into offset-binary nibble pairs.

    Overwrites ``levels`` with its nibbles to save a temporary.
    """
    nibbles = levels.add_(_INT4_OFFSET).view(torch.uint8)
    torch.bitwise_left_shift(nibbles[1::2], 4, out=out)
    out.bitwise_or_(nibbles[0::2])


def _unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Unpack ``n`` int8 levels from nibble pairs; a padding nibble must hold level 0."""
    nibbles = torch.empty(2 * packed.numel(), dtype=torch.uint8)
    torch.bitwise_and(packed, 0x0F, out=nibbles[0::2])
    torch.bitwise_right_shift(packed, 4, out=nibbles[1::2])
    levels = nibbles.view(torch.int8).sub_(_INT4_OFFSET)
    if n % 2 and levels[n].item() != 0:
        raise CodecError("int4 padding nibble does not hold level 0")
    return levels[:n]


def _as_float32_vector(t: torch.Tensor) -> torch.Tensor:
    """Flat float32 CPU view of ``t``, copying only when dtype, device or layout require it."""
    return t.detach().to(device="cpu", dtype=torch.float32).reshape(-1)


def _rng(stochastic: bool, generator: torch.Generator | None) -> torch.Generator | None:
    """The noise source for rounding: None for round-to-nearest, else a CPU generator."""
    if not stochastic:
        return None
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    return generator


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
    flat = _as_float32_vector(x)
    plan = _Plan.of([flat.numel()], block_size)
    scales = torch.empty(plan.n_blocks)
    levels = torch.empty(plan.n_elements, dtype=torch.int8)
    _encode_floats(
        [flat],
        ["x"],
        plan,
        bits=bits,
        generator=_rng(stochastic, generator),
        scales=scales,
        levels=levels,
    )
    return _decode_floats(levels, scales, plan).view(x.shape).to(x.device)


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
    entries: list[_Entry] = []
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be str, got {name!r}")
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _FLOAT_DTYPES and dtype not in _RAW_DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        entries.append(_Entry(name, dtype, tuple(t.shape)))

    metadata = zlib.compress(
        json.dumps(
            [[e.name, e.dtype, list(e.shape)] for e in entries], separators=(",", ":")
        ).encode()
    )
    layout = _Layout.of(entries, bits, block_size, _align(_HEADER.size + len(metadata)))
    payload = bytearray(layout.total)
    _HEADER.pack_into(payload, 0, MAGIC, FORMAT_VERSION, bits, 0, block_size, len(metadata))
    payload[_HEADER.size : _HEADER.size + len(metadata)] = metadata

    floats = [
        (e.name, _as_float32_vector(t))
        for e, t in zip(entries, tensors.values(), strict=True)
        if e.quantized
    ]
    plan = _Plan.of([x.numel() for _, x in floats], block_size)
    scales = _buffer_view(payload, torch.float32, layout.data_start, layout.n_blocks)
    if bits == 8:
        levels = _buffer_view(payload, torch.int8, layout.levels_offset, layout.n_levels)
    else:
        # The padding level is 0, which packs to the level-0 nibble the decoder expects.
        levels = torch.zeros(2 * layout.level_bytes, dtype=torch.int8)
    _encode_floats(
        [x for _, x in floats],
        [name for name, _ in floats],
        plan,
        bits=bits,
        generator=_rng(stochastic, None if seed is None else torch.Generator().manual_seed(seed)),
        scales=scales,
        levels=levels[: layout.n_levels],
    )
    if bits == 4:
        packed = _buffer_view(payload, torch.uint8, layout.levels_offset, layout.level_bytes)
        _pack_int4(levels, packed)

    offset = layout.raw_offset
    for e, t in zip(entries, tensors.values(), strict=True):
        if not e.quantized:
            raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            _buffer_view(payload, torch.uint8, offset, e.raw_nbytes).copy_(raw)
            offset += e.raw_nbytes
    return bytes(payload)


def decode_update(
    payload: bytes,
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
) -> dict[str, torch.Tensor]:
    """Decode a payload from ``encode_update``.

    Floats come back as float32 views into one shared buffer (clone one to keep it alone);
    other tensors come back with their own dtype and storage. If ``expected`` is given, it
    must name exactly the payload's tensors, each with its shape and the dtype it had before
    encoding. Raises CodecError for anything malformed.
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

    qmax = _QMAX[bits]
    scales = _buffer_view(payload, torch.float32, layout.data_start, layout.n_blocks)
    # NaN fails both comparisons, so this also rejects non-finite scales.
    if not bool(((scales >= 0) & (scales <= _MAX_SCALE[bits])).all()):
        raise CodecError(f"scales must be finite and in [0, {_MAX_SCALE[bits]:.6g}]")
    if bits == 8:
        levels = _buffer_view(payload, torch.int8, layout.levels_offset, layout.n_levels)
    else:
        packed = _buffer_view(payload, torch.uint8, layout.levels_offset, layout.level_bytes)
        levels = _unpack_int4(packed, layout.n_levels)
    if levels.numel() and int(levels.min()) < -qmax:
        raise CodecError(f"level below -{qmax} in a {bits}-bit payload")

    floats = [e for e in entries if e.quantized]
    stream = _decode_floats(levels, scales, _Plan.of([e.numel for e in floats], block_size))
    decoded = {
        e.name: run.view(e.shape)
        for e, run in zip(floats, stream.split([e.numel for e in floats]), strict=True)
    }
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


def _parse_metadata(blob: bytes) -> list[_Entry]:
    """Inflate and validate the metadata section."""
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
    entries = [_parse_entry(item) for item in items]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
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
