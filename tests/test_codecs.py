"""Property tests for the quantized-update codec (feddm_flower.fed.codecs).

Expected values come from the format's definition (absmax / qmax block scales, the documented
byte layout), recomputed here independently of the codec's own code paths.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from unittest import mock

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from feddm_flower.fed import codecs
from feddm_flower.fed.codecs import (
    FLAG_ZSTD,
    FORMAT_VERSION,
    MAGIC,
    CodecError,
    decode_update,
    encode_update,
    fp32_bytes,
    quantize_dequantize,
)
from feddm_flower.task.models import build_unet

QMAX = {8: 127, 4: 7}
HEADER = struct.Struct("<4sBBHII")  # magic, version, bits, flags, block_size, metadata length
FLT_MAX = float(np.finfo(np.float32).max)
FLT_TRUE_MIN = 2.0**-149

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
bits_st = st.sampled_from([8, 4])
block_st = st.one_of(st.integers(1, 300), st.sampled_from([64, 256, 1024, 10**6]))
# Full float32 range: subnormals, zeros, +-FLT_MAX; magnitudes mixed within a block.
float32_arrays = hnp.arrays(
    np.float32,
    st.integers(0, 600),
    elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
)


# --- helpers: the format as documented, written out independently ---------------------------------


def reference_steps(x: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """Per-element quantization step (block absmax / qmax), from the definition."""
    flat = x.detach().double().reshape(-1)
    n = flat.numel()
    pad = -n % block_size if n else 0
    blocks = torch.cat([flat.abs(), flat.new_zeros(pad)]).view(-1, block_size)
    steps = blocks.amax(dim=1) / QMAX[bits]
    return steps.repeat_interleave(block_size)[:n]


def assert_within_half_step(x: torch.Tensor, y: torch.Tensor, bits: int, block_size: int) -> None:
    """|x - y| <= step / 2, up to float32 rounding.

    Slack: x / scale and level * scale each round to float32 (|x| * 2^-24 apiece), and a
    subnormal scale may be nudged up by one ulp (2^-149).
    """
    x = x.detach().double().reshape(-1)
    err = (x - y.double().reshape(-1)).abs()
    bound = 0.5 * reference_steps(x, bits, block_size) + x.abs() * 2**-22 + FLT_TRUE_MIN
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def sections(payload: bytes) -> dict[str, int]:
    """Offsets of a payload's sections, parsed from the documented layout."""
    _, _, bits, _, block_size, meta_len = HEADER.unpack_from(payload)
    meta = json.loads(zlib.decompress(payload[HEADER.size : HEADER.size + meta_len]))
    floats = [math.prod(shape) for _, dtype, shape in meta if dtype.startswith(("float", "bfloat"))]
    n_levels = sum(floats)
    data = -(-(HEADER.size + meta_len) // 8) * 8
    levels = data + 4 * -(-n_levels // block_size)
    level_bytes = n_levels if bits == 8 else (n_levels + 1) // 2
    return {"meta_len": meta_len, "data": data, "levels": levels, "raw": levels + level_bytes}


def replace_metadata(payload: bytes, meta: object) -> bytes:
    """``payload`` with its metadata section swapped (a JSON value, or raw bytes as is)."""
    blob = meta if isinstance(meta, bytes) else zlib.compress(json.dumps(meta).encode())
    magic, version, bits, reserved, block_size, _ = HEADER.unpack_from(payload)
    head = HEADER.pack(magic, version, bits, reserved, block_size, len(blob)) + blob
    return head + bytes(-len(head) % 8) + payload[sections(payload)["data"] :]


def patched(payload: bytes, offset: int, data: bytes) -> bytes:
    """``payload`` with the bytes at ``offset`` overwritten by ``data``."""
    return payload[:offset] + data + payload[offset + len(data) :]


def sample_update(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small state-dict-like update with every kind of tensor."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=gen),
        "conv.bias": torch.randn(8, generator=gen) * 1e-3,
        "scalar": torch.tensor(0.25),
        "empty": torch.zeros(0, 4),
        "steps": torch.tensor([3, -(2**63), 2**63 - 1]),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(5, generator=gen).half(),
    }


# --- layout ---------------------------------------------------------------------------------------


def test_header_layout() -> None:
    payload = encode_update({"x": torch.ones(3)}, bits=4, block_size=1000)
    assert HEADER.unpack_from(payload)[:5] == (MAGIC, FORMAT_VERSION, 4, 0, 1000)


# --- round trips ----------------------------------------------------------------------------------


@SETTINGS
@given(x=float32_arrays, bits=bits_st, block_size=block_st)
def test_roundtrip_error_at_most_half_a_step(x: np.ndarray, bits: int, block_size: int) -> None:
    t = torch.from_numpy(x)
    decoded = decode_update(encode_update({"x": t}, bits=bits, block_size=block_size))["x"]
    assert decoded.dtype == torch.float32 and decoded.shape == t.shape
    assert bool(torch.isfinite(decoded).all())
    assert_within_half_step(t, decoded, bits, block_size)
    assert torch.equal(decoded, quantize_dequantize(t, bits=bits, block_size=block_size))


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """Mixed mappings: float tensors of every supported dtype (0-dim, empty, odd sizes)
    alongside integer and bool tensors at their extremes."""
    out: dict[str, torch.Tensor] = {}
    for i in range(draw(st.integers(0, 6))):
        shape = tuple(draw(st.lists(st.integers(0, 9), max_size=3)))
        kind = draw(st.sampled_from(["float32", "float16", "bfloat16", "float64", "int", "bool"]))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
        if kind == "int":
            dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.int8]))
            info = torch.iinfo(dtype)
            t = torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)
        elif kind == "bool":
            t = torch.rand(shape, generator=gen) < 0.5
        else:
            magnitude = 10.0 ** draw(st.integers(-30, 30)) if kind in ("float32", "float64") else 1
            t = (torch.randn(shape, generator=gen) * magnitude).to(getattr(torch, kind))
        out[f"t{i}.{kind}"] = t
    return out


def float_stream(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The payload's value stream: the float tensors flattened and joined, as float32."""
    floats = [t.float().reshape(-1) for t in tensors.values() if t.is_floating_point()]
    return torch.cat(floats) if floats else torch.empty(0)


@SETTINGS
@given(tensors=state_dicts(), bits=bits_st, block_size=block_st)
def test_floats_decode_as_their_joint_stream(
    tensors: dict[str, torch.Tensor], bits: int, block_size: int
) -> None:
    expected = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    decoded = decode_update(encode_update(tensors, bits=bits, block_size=block_size), expected)
    assert list(decoded) == list(tensors)
    for name, t in tensors.items():
        assert decoded[name].shape == t.shape
        if t.is_floating_point():
            assert decoded[name].dtype == torch.float32
        else:
            assert decoded[name].dtype == t.dtype and torch.equal(decoded[name], t)
    # Blocks run over the joint stream of float values, across tensor boundaries.
    stream = float_stream(tensors)
    out = float_stream({k: v for k, v in decoded.items() if tensors[k].is_floating_point()})
    assert torch.equal(out, quantize_dequantize(stream, bits=bits, block_size=block_size))
    assert_within_half_step(stream, out, bits, block_size)


@contextlib.contextmanager
def small_slabs(chunk: int, direct_min: int) -> Iterator[None]:
    """Shrink the codec's working slabs, so small inputs cross slab boundaries and take both
    the in-place and the gathered path (white-box: patches private tuning constants)."""
    saved = codecs._CHUNK, codecs._DIRECT_MIN
    codecs._CHUNK, codecs._DIRECT_MIN = chunk, direct_min
    codecs._stream.cache_clear()
    try:
        yield
    finally:
        codecs._CHUNK, codecs._DIRECT_MIN = saved
        codecs._stream.cache_clear()


@pytest.mark.parametrize("direct_min", [1, 10**9])
def test_non_contiguous_inputs_encode_like_their_copies(direct_min: int) -> None:
    base = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    views = {"t": base.t(), "strided": base[::3, 1::2], "flat_step": base.view(-1)[::7]}
    copies = {k: v.contiguous() for k, v in views.items()}
    with small_slabs(64, direct_min):  # in place and gathered
        for bits in (8, 4):
            payload = encode_update(views, bits=bits, block_size=16)
            assert payload == encode_update(copies, bits=bits, block_size=16)


@SETTINGS
@given(
    tensors=state_dicts(),
    bits=bits_st,
    block_size=st.integers(1, 20),
    chunk=st.integers(1, 64),
    direct_min=st.sampled_from([1, 8, 10**9]),
)
def test_slab_layout_does_not_change_results(
    tensors: dict[str, torch.Tensor], bits: int, block_size: int, chunk: int, direct_min: int
) -> None:
    # Round to nearest: stochastic rounding draws its noise slab by slab.
    kwargs = {"bits": bits, "block_size": block_size}
    reference = encode_update(tensors, **kwargs)
    with small_slabs(chunk, direct_min):
        payload = encode_update(tensors, **kwargs)
        decoded = decode_update(reference)
    assert payload == reference
    for name, value in decode_update(reference).items():
        assert torch.equal(decoded[name], value)


@pytest.mark.parametrize("bits", [8, 4])
def test_large_tensors_round_trip(bits: int) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "small": torch.randn(7, generator=gen),
        "big": torch.randn(1_234_567, generator=gen) * 1e-3,  # several slabs, odd length
        "mid": torch.randn(3, 33_335, generator=gen),
    }
    decoded = decode_update(encode_update(tensors, bits=bits, block_size=256))
    stream, out = float_stream(tensors), float_stream(decoded)
    assert torch.equal(out, quantize_dequantize(stream, bits=bits, block_size=256))
    assert_within_half_step(stream, out, bits, 256)


@pytest.mark.parametrize("bits", [8, 4])
def test_results_outlive_later_calls(bits: int) -> None:
    # The codec reuses work buffers between calls; payloads and decoded tensors must not.
    gen = torch.Generator().manual_seed(0)
    a, b = ({"w": torch.randn(5000, generator=gen) * s} for s in (1.0, 1e3))
    payload_a = encode_update(a, bits=bits, block_size=64)
    decoded_a = decode_update(payload_a)["w"]
    snapshot = decoded_a.clone()
    decode_update(encode_update(b, bits=bits, block_size=64))
    quantize_dequantize(b["w"], bits=bits, block_size=64)
    assert torch.equal(decoded_a, snapshot)
    assert torch.equal(decode_update(payload_a)["w"], snapshot)
    assert torch.equal(snapshot, quantize_dequantize(a["w"], bits=bits, block_size=64))


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_dim_empty_and_all_zero_blocks(bits: int) -> None:
    x = torch.zeros(10)
    x[7] = -3.0  # blocks of 4: [0 0 0 0] [0 0 0 -3] [0 0]
    tensors = {
        "x": x,
        "scalar": torch.tensor(-2.5),
        "empty": torch.empty(0, 3),
        "zero": torch.zeros(()),
    }
    decoded = decode_update(encode_update(tensors, bits=bits, block_size=4))
    assert torch.equal(decoded["x"], x)  # the non-zero element sits on the top level
    assert decoded["scalar"].shape == () and decoded["scalar"].item() == pytest.approx(-2.5)
    assert decoded["empty"].shape == (0, 3)
    assert decoded["zero"].shape == () and decoded["zero"].item() == 0.0
    payload = encode_update({"x": x}, bits=bits, block_size=4)
    scales = np.frombuffer(payload, np.float32, 3, sections(payload)["data"])
    assert scales.tolist() == [0.0, pytest.approx(3 / QMAX[bits]), 0.0]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "values",
    [
        [1e30, -1e30, 3e29, 0.0],
        [1e-30, -1e-30, 3e-31, 0.0],
        [FLT_MAX, -FLT_MAX, 1.0, 0.0],
        [FLT_TRUE_MIN, 3 * FLT_TRUE_MIN, -2 * FLT_TRUE_MIN, 0.0],
        [1e30, 1e-30, -1e-30, 1.0],
    ],
)
def test_huge_tiny_and_subnormal_magnitudes(bits: int, values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    for block_size in (1, 2, 4):
        out = decode_update(encode_update({"x": x}, bits=bits, block_size=block_size))["x"]
        assert bool(torch.isfinite(out).all())
        assert_within_half_step(x, out, bits, block_size)


@SETTINGS
@given(
    levels=st.lists(st.integers(-7, 7), min_size=1, max_size=101),
    scale=st.sampled_from([1.0, 0.5, 2.0**-20, 2.0**40]),
)
def test_int4_packing_exact_for_every_level(levels: list[int], scale: float) -> None:
    # One block, its top level pinned to 7, so scale == `scale` and every value is a level.
    values = torch.tensor([7, *levels], dtype=torch.float32) * scale
    payload = encode_update({"x": values}, bits=4, block_size=len(values))
    assert torch.equal(decode_update(payload)["x"], values)
    # The documented packing: nibble = level + 8, low nibble first, odd count padded with 8.
    nibbles = [lv + 8 for lv in [7, *levels]] + [8] * (len(values) % 2)
    expected = bytes(lo | hi << 4 for lo, hi in zip(nibbles[0::2], nibbles[1::2], strict=True))
    offsets = sections(payload)
    assert payload[offsets["levels"] : offsets["raw"]] == expected


def test_int8_every_level_exact() -> None:
    levels = torch.arange(-127, 128, dtype=torch.float32)
    values = torch.cat([levels, levels[:-1].flip(0)]) * 0.125  # odd length, absmax 127/8
    payload = encode_update({"x": values}, bits=8, block_size=values.numel())
    assert torch.equal(decode_update(payload)["x"], values)
    offsets = sections(payload)
    raw = np.frombuffer(payload, np.int8, values.numel(), offsets["levels"])
    assert raw.tolist() == (values * 8).to(torch.int64).tolist()


@SETTINGS
@given(
    dtype=st.sampled_from([torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]),
    shape=st.lists(st.integers(0, 7), max_size=3),
    seed=st.integers(0, 2**32),
)
def test_non_float_tensors_are_lossless(dtype: torch.dtype, shape: list[int], seed: int) -> None:
    info = torch.iinfo(dtype)
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)
    t.view(-1)[:1] = info.max  # the extremes must survive too
    tensors = {"t": t, "mask": torch.rand(shape, generator=gen) < 0.5, "counter": torch.tensor(7)}
    decoded = decode_update(encode_update(tensors, bits=4, block_size=3))
    for name, value in tensors.items():
        assert decoded[name].dtype == value.dtype and torch.equal(decoded[name], value)


# --- stochastic rounding --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased(bits: int) -> None:
    # Values sit at fractional positions between levels (block top pinned to qmax, step 1),
    # where round-to-nearest is off by up to half a step.
    qmax = QMAX[bits]
    frac = torch.linspace(0.05, 0.95, 40)
    x = torch.cat([torch.tensor([float(qmax)]), torch.arange(40) % (2 * qmax) - qmax + frac])
    seeds = 400
    total = torch.zeros_like(x)
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        out = quantize_dequantize(
            x, bits=bits, block_size=x.numel(), stochastic=True, generator=gen
        )
        assert bool(((out - x).abs() < 1).all())  # always the level just below or just above
        total += out
    # Per-draw variance <= step^2 / 4, so the mean's std <= 1 / (2 sqrt(seeds)); 5 sigma.
    bound = 5 / (2 * math.sqrt(seeds))
    assert (total / seeds - x).abs().max().item() < bound
    nearest = quantize_dequantize(x, bits=bits, block_size=x.numel())
    assert (nearest - x).abs().max().item() > bound  # the test can tell biased rounding apart


@SETTINGS
@given(tensors=state_dicts(), bits=bits_st, block_size=block_st, seed=st.integers(0, 2**63))
def test_same_seed_same_bytes_and_matches_quantize_dequantize(
    tensors: dict[str, torch.Tensor], bits: int, block_size: int, seed: int
) -> None:
    kwargs = {"bits": bits, "block_size": block_size, "stochastic": True}
    payload = encode_update(tensors, **kwargs, seed=seed)
    assert payload == encode_update(tensors, **kwargs, seed=seed)
    decoded = decode_update(payload)
    out = float_stream({k: v for k, v in decoded.items() if tensors[k].is_floating_point()})
    gen = torch.Generator().manual_seed(seed)
    expected = quantize_dequantize(float_stream(tensors), **kwargs, generator=gen)
    assert torch.equal(out, expected)


def test_different_seeds_differ() -> None:
    x = {"x": torch.randn(1000, generator=torch.Generator().manual_seed(0))}
    a, b = (encode_update(x, bits=4, block_size=64, stochastic=True, seed=s) for s in (1, 2))
    assert a != b


# --- error feedback -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("stochastic", [False, True])
def test_error_feedback_telescopes(bits: int, stochastic: bool) -> None:
    """A client keeps e_t = (u_t + e_{t-1}) - quantize_dequantize(u_t + e_{t-1}) and sends
    u_t + e_{t-1}: the sum of what the server decodes equals the sum of true updates minus
    only the last residual."""
    gen = torch.Generator().manual_seed(0)
    shape, rounds, block_size, step = (6, 50), 30, 64, 1.0 / QMAX[bits]
    kwargs = {"bits": bits, "block_size": block_size, "stochastic": stochastic}
    residual = torch.zeros(shape)
    true_sum, sent_sum, plain_sum = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    for t in range(rounds):
        # The 1.0 entry pins its block's step; its neighbours drift by 0.3 steps per round,
        # which round-to-nearest alone would drop every time.
        update = (0.3 + 0.05 * torch.randn(shape, generator=gen)) * step
        update[0, 0] = 1.0
        target = update + residual
        rng = torch.Generator().manual_seed(t)
        predicted = quantize_dequantize(target, **kwargs, generator=rng)
        sent = decode_update(encode_update({"w": target}, **kwargs, seed=t))["w"]
        assert torch.equal(sent, predicted)  # the client knows exactly what the server gets
        residual = target - predicted
        true_sum += update
        sent_sum += sent
        plain = encode_update({"w": update}, bits=bits, block_size=block_size)
        plain_sum += decode_update(plain)["w"]
    torch.testing.assert_close(sent_sum, true_sum - residual, rtol=0, atol=1e-5)
    # The residual stays within about a step (its block's top may exceed 1.0 a little);
    # without feedback the dropped drift piles up to about 0.3 * rounds steps.
    assert (sent_sum - true_sum).abs().max().item() <= 1.2 * step
    assert (plain_sum - true_sum).abs().max().item() > 5 * step


# --- sizes ----------------------------------------------------------------------------------------


@SETTINGS
@given(tensors=state_dicts(), bits=bits_st, block_size=block_st)
def test_payload_size_follows_the_layout(
    tensors: dict[str, torch.Tensor], bits: int, block_size: int
) -> None:
    payload = encode_update(tensors, bits=bits, block_size=block_size)
    n = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    raw = sum(t.numel() * t.element_size() for t in tensors.values() if not t.is_floating_point())
    meta_len = HEADER.unpack_from(payload)[-1]
    expected = (
        -(-(HEADER.size + meta_len) // 8) * 8
        + 4 * -(-n // block_size)
        + (n if bits == 8 else (n + 1) // 2)
        + raw
    )
    assert len(payload) == expected


def test_fp32_bytes_counts_floats_as_float32() -> None:
    tensors = {
        "h": torch.zeros(3, dtype=torch.float16),
        "d": torch.zeros(2).double(),
        "i": torch.zeros(5, dtype=torch.int64),
        "b": torch.zeros(4, dtype=torch.bool),
    }
    assert fp32_bytes(tensors) == 3 * 4 + 2 * 4 + 5 * 8 + 4


@pytest.mark.parametrize("block_size", [256, 1024, 4096])
def test_compression_ratio_on_the_tiny_unet(block_size: int) -> None:
    base = build_unet("tiny", 28, 1, seed=0).state_dict()
    other = build_unet("tiny", 28, 1, seed=1).state_dict()
    update = {k: other[k] - v for k, v in base.items()}
    for bits, minimum in ((8, 3.9), (4, 7.5)):
        payload = encode_update(update, bits=bits, block_size=block_size)
        assert fp32_bytes(update) / len(payload) >= minimum
        # ... and never better than the level bits alone allow.
        assert fp32_bytes(update) / len(payload) < 32 / bits


# --- rejections -----------------------------------------------------------------------------------


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    return encode_update(
        draw(state_dicts()), bits=draw(bits_st), block_size=draw(st.integers(1, 40))
    )


@SETTINGS
@given(payload=payloads(), data=st.data())
def test_any_truncation_is_rejected(payload: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(CodecError):
        decode_update(payload[:cut])


@SETTINGS
@given(payload=payloads(), extra=st.binary(min_size=1, max_size=17))
def test_trailing_bytes_are_rejected(payload: bytes, extra: bytes) -> None:
    with pytest.raises(CodecError, match="trailing"):
        decode_update(payload + extra)


HEADER_FIELDS = {"magic": 0, "version": 4, "bits": 5, "flags": 6}


@SETTINGS
@given(payload=payloads(), field=st.sampled_from(sorted(HEADER_FIELDS)), data=st.data())
def test_header_fields_are_checked(payload: bytes, field: str, data: st.DataObject) -> None:
    offset = HEADER_FIELDS[field] + (data.draw(st.integers(0, 3)) if field == "magic" else 0)
    if field == "flags":
        offset += data.draw(st.integers(0, 1))  # u16: bit 0 is FLAG_ZSTD, the rest reserved
    allowed = {payload[offset]} | ({4, 8} if field == "bits" else set())
    if field == "flags" and offset == 6:
        allowed |= {b ^ FLAG_ZSTD for b in allowed}  # toggling the known flag: see below
    value = data.draw(st.integers(0, 255).filter(lambda b: b not in allowed))
    with pytest.raises(CodecError, match=field):
        decode_update(patched(payload, offset, bytes([value])))


def test_swapping_bits_or_zero_block_size_is_rejected() -> None:
    payload = encode_update(sample_update(), bits=8, block_size=16)
    with pytest.raises(CodecError):
        decode_update(patched(payload, 5, bytes([4])))
    with pytest.raises(CodecError, match="block_size"):
        decode_update(patched(payload, 8, struct.pack("<I", 0)))


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        (b"not zlib", "zlib"),
        (zlib.compress(b"[1, 2"), "JSON"),
        (zlib.compress(b"[]") + b"x", "stray"),
        (zlib.compress(b"[" * 100_000 + b"]" * 100_000), "JSON"),
        ({"x": 1}, "list"),
        ([["x", "float32"]], "name, dtype, shape"),
        ([[1, "float32", [2]]], "not a string"),
        ([["x", "complex64", [2]]], "dtype"),
        ([["x", "float32", [-1]]], "shape"),
        ([["x", "float32", [True]]], "shape"),
        ([["x", "float32", [2.0]]], "shape"),
        ([["x", "float32", [1] * 65]], "shape"),
        # No elements, but sizes or strides beyond int64: torch cannot build these.
        ([["x", "float32", [2**62, 2**62, 0]]], "shape"),
        ([["x", "int8", [0, 2**62, 2**62]]], "shape"),
        ([["x", "float32", [2**63, 0]]], "shape"),
        ([["x", "float32", [2]], ["x", "float32", [2]]], "repeats"),
    ],
)
def test_malformed_metadata_is_rejected(meta: object, match: str) -> None:
    payload = encode_update({"x": torch.ones(2)}, bits=8, block_size=2)
    with pytest.raises(CodecError, match=match):
        decode_update(replace_metadata(payload, meta))


@pytest.mark.parametrize("bits", [8, 4])
def test_metadata_inconsistent_with_data_is_rejected(bits: int) -> None:
    tensors = {"w": torch.randn(10), "n": torch.tensor([1, 2])}
    payload = encode_update(tensors, bits=bits, block_size=4)
    assert decode_update(replace_metadata(payload, [["w", "float32", [10]], ["n", "int64", [2]]]))
    for meta in (
        [["w", "float32", [11]], ["n", "int64", [2]]],  # more floats than data
        [["w", "float32", [8]], ["n", "int64", [2]]],  # fewer
        [["w", "float32", [10]], ["n", "int64", [3]]],
        [["w", "float32", [10]]],
        [["w", "float32", [10]], ["n", "int32", [2]], ["m", "int32", [3]]],
        [["w", "float32", [10**12]], ["n", "int64", [2]]],
    ):
        with pytest.raises(CodecError, match="truncated|trailing"):
            decode_update(replace_metadata(payload, meta))


def no_layouts(*args: object) -> None:
    raise AssertionError("a layout was built for metadata the payload cannot hold")


@pytest.mark.parametrize("with_expected", [False, True])
def test_huge_claims_are_rejected_before_any_layout(with_expected: bool) -> None:
    # One float32 tensor of 2^80 values in a payload of a few dozen bytes: laying out its
    # slabs would take minutes and gigabytes, so the claim must fail on arithmetic alone.
    blob = zlib.compress(json.dumps([["x", "float32", [2**40, 2**40]]]).encode())
    head = HEADER.pack(MAGIC, FORMAT_VERSION, 8, 0, 256, len(blob)) + blob
    payload = head + bytes(-len(head) % 8)
    expected = {"x": ((2**40, 2**40), torch.float32)} if with_expected else None
    start = time.perf_counter()
    with mock.patch.object(codecs, "_stream", no_layouts):
        with pytest.raises(CodecError, match=rf"2\^80 values.*payload has {len(payload)}$"):
            decode_update(payload, expected)
    assert time.perf_counter() - start < 1.0


def needed_bytes(payload: bytes) -> int:
    """The length a payload's metadata calls for, from the documented layout."""
    _, _, bits, _, block_size, meta_len = HEADER.unpack_from(payload)
    meta = json.loads(zlib.decompress(payload[HEADER.size : HEADER.size + meta_len]))
    n = raw = 0
    for _, dtype, shape in meta:
        if dtype.startswith(("float", "bfloat")):
            n += math.prod(shape)
        else:
            raw += math.prod(shape) * getattr(torch, dtype).itemsize
    levels = n if bits == 8 else (n + 1) // 2
    return sections(payload)["data"] + 4 * -(-n // block_size) + levels + raw


# A tensor's claimed shape: a few values more, far more, or sizes many times over (each size
# an int64, as in torch: larger ones are malformed, see test_malformed_metadata_is_rejected).
claimed_shapes = st.one_of(
    st.integers(0, 64).map(lambda n: [n]),
    st.integers(1, 2**63 - 1).map(lambda n: [n]),
    st.lists(st.integers(1, 2**62), min_size=2, max_size=64),
    st.lists(st.integers(0, 2**62), min_size=2, max_size=6),  # with zeros: no values
)


@SETTINGS
@given(tensors=state_dicts().filter(bool), bits=bits_st, block_size=block_st, data=st.data())
def test_claims_beyond_the_payload_length_are_rejected(
    tensors: dict[str, torch.Tensor], bits: int, block_size: int, data: st.DataObject
) -> None:
    payload = encode_update(tensors, bits=bits, block_size=block_size)
    meta = [
        [name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()
    ]
    meta[data.draw(st.integers(0, len(meta) - 1))][2] = data.draw(claimed_shapes)
    forged = replace_metadata(payload, meta)
    expected = None
    if data.draw(st.booleans()):
        expected = {name: (tuple(shape), getattr(torch, dtype)) for name, dtype, shape in meta}
    needed = needed_bytes(forged)
    if needed > len(forged):
        with mock.patch.object(codecs, "_stream", no_layouts):
            with pytest.raises(CodecError, match=rf"truncated.*payload has {len(forged)}$"):
                decode_update(forged, expected)
        return
    # A claim the payload can hold (or one with no values): decoded or refused, nothing else.
    with contextlib.suppress(CodecError):
        decode_update(forged, expected)


def test_oversized_metadata_and_layouts_are_not_kept() -> None:
    """White-box: the caches only keep what real models need, not the millions of entries or
    huge names a small hostile payload can list."""
    cases = [  # tensors, metadata kept, layouts kept
        ({"x" * (codecs._CACHED_METADATA + 1): torch.ones(2)}, False, True),
        ({f"t{i}": torch.zeros(1) for i in range(codecs._CACHED_TENSORS + 1)}, True, False),
        ({"w": torch.ones(3), "n": torch.zeros(2, dtype=torch.int64)}, True, True),
    ]
    for tensors, metadata_kept, layouts_kept in cases:
        payload = encode_update(tensors, bits=8, block_size=64)
        codecs._stream.cache_clear()  # the encoder shares it
        assert list(decode_update(payload)) == list(tensors)
        blob = payload[HEADER.size : HEADER.size + sections(payload)["meta_len"]]
        assert (blob in codecs._metadata_cache) == metadata_kept
        assert codecs._stream.cache_info().currsize == layouts_kept


def test_shapes_torch_cannot_rebuild_are_refused() -> None:
    # torch itself holds such a tensor (no elements), but could not rebuild it from its shape.
    with pytest.raises(ValueError, match="too large to decode"):
        encode_update({"x": torch.empty(2**62, 0, 2**62)}, bits=8, block_size=4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, -1.0, FLT_MAX])
def test_bad_scales_are_rejected(bits: int, scale: float) -> None:
    payload = encode_update({"x": torch.randn(20)}, bits=bits, block_size=8)
    offset = sections(payload)["data"] + 4  # the second block's scale
    with pytest.raises(CodecError, match="scales"):
        decode_update(patched(payload, offset, struct.pack("<f", scale)))


def test_out_of_range_levels_and_padding_are_rejected() -> None:
    payload = encode_update({"x": torch.randn(5)}, bits=8, block_size=5)
    with pytest.raises(CodecError, match="level"):
        decode_update(patched(payload, sections(payload)["levels"] + 2, b"\x80"))  # -128
    payload = encode_update({"x": torch.randn(5)}, bits=4, block_size=5)
    start = sections(payload)["levels"]
    byte = payload[start + 1]
    with pytest.raises(CodecError, match="level"):
        decode_update(patched(payload, start + 1, bytes([byte & 0xF0])))  # nibble 0 = -8
    last = payload[start + 2]
    with pytest.raises(CodecError, match="padding"):
        decode_update(patched(payload, start + 2, bytes([last & 0x0F | 0x30])))


def test_bad_bool_bytes_and_metadata_padding_are_rejected() -> None:
    payload = encode_update({"m": torch.tensor([True, False])}, bits=8, block_size=4)
    with pytest.raises(CodecError, match="bool"):
        decode_update(patched(payload, sections(payload)["raw"] + 1, b"\x02"))
    offsets = sections(payload)
    assert offsets["data"] > HEADER.size + offsets["meta_len"], "sample needs metadata padding"
    with pytest.raises(CodecError, match="padding"):
        decode_update(patched(payload, offsets["data"] - 1, b"\x01"))


def test_expected_names_shapes_and_dtypes_are_enforced() -> None:
    tensors = sample_update()
    payload = encode_update(tensors, bits=4, block_size=16)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    assert list(decode_update(payload, expected)) == list(tensors)
    missing = dict(expected)
    del missing["steps"]
    wrong_shape = {**expected, "conv.bias": ((9,), torch.float32)}
    wrong_dtype = {**expected, "half": ((5,), torch.float32)}
    for bad, match in (
        (missing, "extra \\['steps'\\]"),
        ({**expected, "new": ((1,), torch.float32)}, "missing \\['new'\\]"),
        (wrong_shape, "shape"),
        (wrong_dtype, "dtype"),
    ):
        with pytest.raises(CodecError, match=match):
            decode_update(payload, bad)


@settings(max_examples=150, deadline=None)
@given(payload=payloads(), data=st.data())
def test_corruption_is_rejected_or_decodes_to_finite_tensors(
    payload: bytes, data: st.DataObject
) -> None:
    """Flipped bytes anywhere: a CodecError or a well-formed result, never another failure."""
    corrupted = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 3))):
        corrupted[data.draw(st.integers(0, len(payload) - 1))] ^= data.draw(st.integers(1, 255))
    try:
        decoded = decode_update(bytes(corrupted))
    except CodecError:
        return
    for t in decoded.values():
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all())


# --- encode-time validation ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 2, 16, 32, 8.0, True, "8"])
def test_unsupported_bits_are_refused(bits: object) -> None:
    with pytest.raises(ValueError, match=r"\(8, 4\)"):
        encode_update({"x": torch.ones(3)}, bits=bits, block_size=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(8, 4\)"):
        quantize_dequantize(torch.ones(3), bits=bits, block_size=4)  # type: ignore[arg-type]


@pytest.mark.parametrize("block_size", [0, -1, 2**32, 1.5])
def test_bad_block_sizes_are_refused(block_size: object) -> None:
    with pytest.raises(ValueError, match="block_size"):
        encode_update({"x": torch.ones(3)}, bits=8, block_size=block_size)  # type: ignore[arg-type]


@SETTINGS
@given(
    n=st.integers(1, 200),
    data=st.data(),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
)
def test_non_finite_inputs_are_refused(
    n: int, data: st.DataObject, bad: float, dtype: torch.dtype
) -> None:
    x = torch.randn(n).to(dtype)
    x[data.draw(st.integers(0, n - 1))] = bad
    with pytest.raises(ValueError, match="'bad'.*non-finite"):
        encode_update({"ok": torch.ones(4), "bad": x}, bits=8, block_size=data.draw(block_st))


def test_float64_beyond_float32_range_and_odd_dtypes_are_refused() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        encode_update({"x": torch.tensor([1e300], dtype=torch.float64)}, bits=8, block_size=4)
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode_update({"x": torch.ones(2, dtype=torch.complex64)}, bits=8, block_size=4)


# --- lossless stage (zstd) -----------------------------------------------------------------------

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_ZSTD_RATIO = 64  # the documented cap: scales and levels <= 64 x their zstd section
RLE_RUN = 128 << 10  # zstd's largest block


def flags(payload: bytes) -> int:
    return HEADER.unpack_from(payload)[3]


def data_bytes(payload: bytes) -> int:
    """Bytes of scales and levels that a payload's metadata implies (the documented layout)."""
    _, _, bits, _, block_size, meta_len = HEADER.unpack_from(payload)
    meta = json.loads(zlib.decompress(payload[HEADER.size : HEADER.size + meta_len]))
    n = sum(math.prod(shape) for _, dtype, shape in meta if dtype.startswith(("float", "bfloat")))
    return 4 * -(-n // block_size) + (n if bits == 8 else (n + 1) // 2)


def zstd_section(payload: bytes) -> tuple[int, int]:
    """(start, length) of a flagged payload's zstd section: the data up to the raw tensors."""
    start = sections(payload)["data"]
    _, _, _, _, _, meta_len = HEADER.unpack_from(payload)
    meta = json.loads(zlib.decompress(payload[HEADER.size : HEADER.size + meta_len]))
    raw = sum(
        math.prod(shape) * getattr(torch, dtype).itemsize
        for _, dtype, shape in meta
        if not dtype.startswith(("float", "bfloat"))
    )
    return start, len(payload) - start - raw


def with_zstd_section(payload: bytes, section: bytes) -> bytes:
    """``payload`` (flagged) with its zstd section replaced."""
    start, length = zstd_section(payload)
    return payload[:start] + section + payload[start + length :]


def forged_zstd_payload(meta: list, bits: int, block_size: int, section: bytes) -> bytes:
    """A flagged payload built by hand from metadata and a zstd section (no raw tensors)."""
    blob = zlib.compress(json.dumps(meta).encode())
    head = HEADER.pack(MAGIC, FORMAT_VERSION, bits, FLAG_ZSTD, block_size, len(blob)) + blob
    return head + bytes(-len(head) % 8) + section


def rle_frame(declared: int | None, regenerated: int) -> bytes:
    """A zstd frame (RFC 8878) of RLE blocks that regenerates ``regenerated`` zero bytes and
    declares ``declared`` as its content size (None: no size). Each block takes 4 bytes for up
    to 128 KiB, zstd's own limit on the ratio (32768:1): a small frame, a huge output."""
    descriptor = 0xC0 if declared is not None else 0x00  # 8-byte content size; not single-segment
    head = ZSTD_MAGIC + bytes([descriptor, (17 - 10) << 3])  # window 2^17: room for a block
    head += struct.pack("<Q", declared) if declared is not None else b""
    sizes = [RLE_RUN] * (regenerated // RLE_RUN) + [regenerated % RLE_RUN] * bool(
        regenerated % RLE_RUN
    )

    def block(size: int, last: bool) -> bytes:
        return (last | 1 << 1 | size << 3).to_bytes(3, "little") + b"\0"  # type 1: RLE

    full = block(RLE_RUN, False)
    return head + b"".join([full * (len(sizes) - 1), block(sizes[-1], True)])


def sparse_update(seed: int = 0, density: float = 0.05, n: int = 50_000) -> dict[str, torch.Tensor]:
    """An update that is mostly zeros (levels and scales zstd shrinks), with a raw tensor."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen) * (torch.rand(n, generator=gen) < density)
    return {"w": w.view(50, -1), "steps": torch.tensor([3, 4]), "b": torch.randn(7, generator=gen)}


def unet_update() -> dict[str, torch.Tensor]:
    base = build_unet("tiny", 28, 1, seed=0).state_dict()
    other = build_unet("tiny", 28, 1, seed=1).state_dict()
    return {k: other[k] - v for k, v in base.items()}


def assert_same_decode(a: bytes, b: bytes) -> None:
    da, db = decode_update(a), decode_update(b)
    assert list(da) == list(db)
    for name, value in da.items():
        assert db[name].dtype == value.dtype and torch.equal(db[name], value)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("make", [sparse_update, unet_update])
@pytest.mark.parametrize("stochastic", [False, True])
def test_lossless_round_trip_decodes_like_the_plain_payload(
    bits: int, make: object, stochastic: bool
) -> None:
    update = make()  # type: ignore[operator]
    kwargs = {"bits": bits, "block_size": 256, "stochastic": stochastic, "seed": 5}
    plain = encode_update(update, **kwargs)
    packed = encode_update(update, **kwargs, lossless=True)
    assert flags(plain) == 0 and flags(packed) == FLAG_ZSTD and len(packed) < len(plain)
    # Header (but the flag) and metadata are those of the plain payload; the data is a frame.
    start = sections(plain)["data"]
    assert packed[:6] == plain[:6] and packed[8:start] == plain[8:start]
    assert packed[start : start + 4] == ZSTD_MAGIC
    assert_same_decode(plain, packed)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in update.items()}
    assert list(decode_update(packed, expected)) == list(update)
    # Deterministic: one input, one payload.
    assert packed == encode_update(update, **kwargs, lossless=True)


@SETTINGS
@given(
    tensors=state_dicts(),
    bits=bits_st,
    block_size=block_st,
    level=st.sampled_from([1, 3, 9, 19]),
    sparse=st.booleans(),
)
def test_lossless_is_used_only_when_smaller_and_decodes_the_same(
    tensors: dict[str, torch.Tensor], bits: int, block_size: int, level: int, sparse: bool
) -> None:
    if sparse:
        tensors = {**tensors, "sparse": sparse_update(n=3000)["w"]}
    plain = encode_update(tensors, bits=bits, block_size=block_size)
    packed = encode_update(
        tensors, bits=bits, block_size=block_size, lossless=True, zstd_level=level
    )
    if flags(packed) == 0:
        assert packed == plain  # not smaller: the plain payload, byte for byte
    else:
        assert len(packed) < len(plain)
        start, length = zstd_section(packed)
        frame = packed[start : start + length].lstrip(b"\0")
        dctx = zstandard.ZstdDecompressor()
        assert dctx.decompress(frame) == plain[start : start + data_bytes(plain)]
    assert_same_decode(plain, packed)


@pytest.mark.parametrize("bits", [8, 4])
def test_incompressible_levels_stay_plain(bits: int) -> None:
    # Uniform values give uniform levels: nothing for zstd to save (int4 nibble pairs still
    # carry some redundancy, so int4 is checked on a payload too small to pay for a frame).
    gen = torch.Generator().manual_seed(0)
    n = 100_000 if bits == 8 else 300
    update = {"x": torch.rand(n, generator=gen) * 2 - 1}
    for block_size in (64, 4096):
        plain = encode_update(update, bits=bits, block_size=block_size)
        assert encode_update(update, bits=bits, block_size=block_size, lossless=True) == plain
    # Mostly zeros: compressed, and much smaller.
    x = torch.rand(100_000, generator=gen) * 2 - 1
    sparse = {"x": x * (torch.rand(x.numel(), generator=gen) < 0.01)}
    packed = encode_update(sparse, bits=bits, block_size=64, lossless=True)
    assert flags(packed) == FLAG_ZSTD
    assert len(packed) < len(encode_update(sparse, bits=bits, block_size=64)) / 3


@pytest.mark.parametrize("bits", [8, 4])
def test_zstd_section_is_padded_up_to_the_ratio_cap(bits: int) -> None:
    # All zeros compress far beyond 64:1; the section is then exactly ceil(D / 64) bytes,
    # zero bytes and the frame, and still decodes.
    update = {"w": torch.zeros(200_000), "n": torch.tensor([1, 2, 3])}
    packed = encode_update(update, bits=bits, block_size=64, lossless=True)
    start, length = zstd_section(packed)
    assert flags(packed) == FLAG_ZSTD and length == -(-data_bytes(packed) // MAX_ZSTD_RATIO)
    section = packed[start : start + length]
    frame = section.lstrip(b"\0")
    assert frame.startswith(ZSTD_MAGIC) and len(frame) < length
    assert zstandard.get_frame_parameters(frame).content_size == data_bytes(packed)
    assert_same_decode(encode_update(update, bits=bits, block_size=64), packed)
    # Padding is allowed only at the cap, and only up to it.
    pad = length - len(frame)
    for bad in (section[1:], b"\0" + section, section[:pad] + b"\0" + frame):
        with pytest.raises(CodecError):
            decode_update(with_zstd_section(packed, bad))


def test_lossless_parameters_are_checked() -> None:
    for level in (0, -1, 23, 3.0, True):
        with pytest.raises(ValueError, match="zstd_level"):
            encode_update(
                {"x": torch.ones(3)}, bits=8, block_size=4, lossless=True, zstd_level=level
            )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lossless"):
        encode_update({"x": torch.ones(3)}, bits=8, block_size=4, lossless=1)  # type: ignore[arg-type]


def test_toggling_the_zstd_flag_is_rejected() -> None:
    plain = encode_update(sparse_update(), bits=8, block_size=64)
    packed = encode_update(sparse_update(), bits=8, block_size=64, lossless=True)
    assert flags(packed) == FLAG_ZSTD
    with pytest.raises(CodecError, match="not smaller"):
        decode_update(patched(plain, 6, bytes([FLAG_ZSTD])))
    with pytest.raises(CodecError, match="truncated"):
        decode_update(patched(packed, 6, b"\0"))


@pytest.mark.parametrize("bits", [8, 4])
def test_frame_content_size_must_equal_what_the_metadata_implies(bits: int) -> None:
    packed = encode_update(sparse_update(), bits=bits, block_size=64, lossless=True)
    start, length = zstd_section(packed)
    data = zstandard.ZstdDecompressor().decompress(packed[start : start + length])
    assert len(data) == data_bytes(packed)
    cctx = zstandard.ZstdCompressor()
    # A valid frame of the right data decodes (the helpers are right) ...
    assert_same_decode(packed, with_zstd_section(packed, cctx.compress(data)))
    # ... one of a byte more or less is refused, before it is decompressed.
    for other in (data[:-1], data + b"\0", data + data):
        with pytest.raises(CodecError, match="declares a content size"):
            decode_update(with_zstd_section(packed, cctx.compress(other)))
    # A frame that does not declare its size (streamed) is refused.
    stream = cctx.compressobj()
    unsized = stream.compress(data) + stream.flush()
    assert zstandard.get_frame_parameters(unsized).content_size in (-1, 2**64 - 1)
    with pytest.raises(CodecError, match="content size of none"):
        decode_update(with_zstd_section(packed, unsized))
    # Two frames, or a frame and a stray byte, are refused.
    half = len(data) // 2
    two = cctx.compress(data[:half]) + cctx.compress(data[half:])
    with pytest.raises(CodecError):
        decode_update(with_zstd_section(packed, two))
    with pytest.raises(CodecError, match="unused data"):
        decode_update(with_zstd_section(packed, cctx.compress(data) + b"\0"))
    with pytest.raises(CodecError, match="magic"):
        decode_update(with_zstd_section(packed, b"\0" + cctx.compress(data)))


@contextlib.contextmanager
def bomb_guard() -> Iterator[None]:
    """Time the block (< 1 s) and trace its Python allocations, the decompressor's output
    included: it must never have held more than 64 MiB at once."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 64 << 20, f"{peak} bytes allocated"


def no_decompression(*args: object) -> None:
    raise AssertionError("a frame was decompressed")


def test_rle_frames_are_valid_zstd() -> None:
    """The bombs below are valid frames: the decoder accepts one within the rules."""
    for size in (1, RLE_RUN, 3 * RLE_RUN + 5):
        frame = rle_frame(size, size)
        assert zstandard.ZstdDecompressor().decompress(frame) == bytes(size)
    # 2^20 zero levels and one zero scale: a 50-byte frame, padded in front to 1/64 of them.
    size = 4 + 2**20
    frame = rle_frame(size, size)
    section = bytes(-(-size // MAX_ZSTD_RATIO) - len(frame)) + frame
    payload = forged_zstd_payload([["x", "float32", [2**20]]], 8, 2**20, section)
    assert torch.equal(decode_update(payload)["x"], torch.zeros(2**20))
    with pytest.raises(CodecError, match="over 64 times"):  # the frame alone: 20000:1
        decode_update(forged_zstd_payload([["x", "float32", [2**20]]], 8, 2**20, frame))


@pytest.mark.parametrize("with_expected", [False, True])
def test_zstd_bomb_claiming_a_huge_update_is_rejected_before_inflating(
    with_expected: bool,
) -> None:
    # 2^33 zero levels (8 GiB) in a valid 256 KiB frame that declares them honestly and
    # metadata that claims them: only the 64:1 cap stands between it and 8 GiB of memory.
    claimed = 12 + 2**33  # 3 scales (block_size 2^32 - 1) and the levels
    frame = rle_frame(claimed, claimed)
    payload = forged_zstd_payload([["x", "float32", [2**33]]], 8, 2**32 - 1, frame)
    expected = {"x": ((2**33,), torch.float32)} if with_expected else None
    with (
        mock.patch.object(codecs, "_stream", no_layouts),
        mock.patch.object(codecs, "_zstd_decompressor", no_decompression),
        bomb_guard(),
        pytest.raises(CodecError, match=f"over 64 times the {len(frame)} bytes"),
    ):
        decode_update(payload, expected)


def test_zstd_bomb_frames_are_rejected_without_inflating() -> None:
    # Metadata claims 2^20 values (1 MiB of levels and one scale); each frame is ~32 KiB,
    # within the 64:1 cap, but regenerates 1 GiB.
    claimed, huge = 4 + 2**20, 2**30
    meta = [["x", "float32", [2**20]]]
    bombs = {
        "declares a content size of 1073741824": rle_frame(huge, huge),  # declares the truth
        "declares a content size of none": rle_frame(None, huge),
        "inflate to exactly": rle_frame(claimed, huge),  # declares what the metadata implies
    }
    for match, frame in bombs.items():
        assert len(frame) < claimed <= MAX_ZSTD_RATIO * len(frame)
        with bomb_guard(), pytest.raises(CodecError, match=match):
            decode_update(forged_zstd_payload(meta, 8, 2**20, frame))


@st.composite
def lossless_payloads(draw: st.DrawFn) -> bytes:
    """Flagged payloads: random tensors of every kind beside a mostly-zero one."""
    tensors = draw(state_dicts())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
    n = draw(st.integers(500, 3000))
    tensors["sparse"] = torch.randn(n, generator=gen) * (torch.rand(n, generator=gen) < 0.05)
    payload = encode_update(
        tensors,
        bits=draw(bits_st),
        block_size=draw(st.integers(1, 300)),
        lossless=True,
        zstd_level=draw(st.sampled_from([1, 3, 19])),
    )
    assume(flags(payload) == FLAG_ZSTD)
    return payload


@SETTINGS
@given(payload=lossless_payloads(), data=st.data())
def test_lossless_truncation_is_rejected(payload: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(CodecError):
        decode_update(payload[:cut])


@SETTINGS
@given(payload=lossless_payloads(), extra=st.binary(min_size=1, max_size=17))
def test_lossless_trailing_bytes_are_rejected(payload: bytes, extra: bytes) -> None:
    with pytest.raises(CodecError):
        decode_update(payload + extra)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=lossless_payloads(), data=st.data())
def test_lossless_corruption_is_rejected_or_decodes_to_finite_tensors(
    payload: bytes, data: st.DataObject
) -> None:
    """Flipped bytes anywhere in a flagged payload, the frame included: a CodecError or a
    well-formed result, never another exception."""
    corrupted = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 3))):
        corrupted[data.draw(st.integers(0, len(payload) - 1))] ^= data.draw(st.integers(1, 255))
    try:
        decoded = decode_update(bytes(corrupted))
    except CodecError:
        return
    for t in decoded.values():
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all())
