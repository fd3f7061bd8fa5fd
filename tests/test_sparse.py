"""Property tests for the sparse update codec (feddm_flower.fed.sparse).

Payloads with chosen positions are written here from the documented layout, independently of
the encoder, so that every malformation the decoder must refuse can be built on purpose.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feddm_flower.fed.changes import ChangeCodec, decode_change
from feddm_flower.fed.codecs import CodecError, encode_update
from feddm_flower.fed.sparse import (
    BITMAP,
    FLAG_ZSTD,
    GAPS,
    MAGIC,
    decode_sparse,
    encode_sparse,
    schema_digest,
)
from feddm_flower.task.models import build_unet

HEADER = struct.Struct("<4sBBBB12sQQQ")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QMAX = {8: 127, 4: 7}


def expected_of(tensors: dict[str, torch.Tensor]) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


@st.composite
def updates(draw) -> dict[str, torch.Tensor]:
    """1-4 float tensors (some empty) and maybe an int tensor, random values."""
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        shape = draw(st.lists(st.integers(0, 12), min_size=1, max_size=3))
        out[f"t{i}"] = torch.randn(shape, generator=g) * draw(st.sampled_from([1e-4, 1.0, 50.0]))
    if draw(st.booleans()):
        out["steps"] = torch.randint(0, 100, (3,), generator=g)
    return out


def varints(values: list[int]) -> bytes:
    """LEB128 of each value mod 2**64, written out plainly."""
    out = bytearray()
    for v in values:
        v %= 2**64
        while True:
            byte, v = v & 0x7F, v >> 7
            out.append(byte | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def written(
    n: int, index: list[int], *, coding: int = GAPS, count: int | None = None, bits: int = 8
) -> bytes:
    """A payload for one float tensor ``w`` of ``n`` values, sending ``index`` (any list)."""
    if coding == GAPS:
        section = varints([b - a for a, b in zip([0, *index], index, strict=False)])
    else:
        mask = np.zeros(-(-n // 8) * 8, bool)
        mask[[i for i in index if 0 <= i < mask.size]] = True
        section = np.packbits(mask, bitorder="little").tobytes()
    k = len(index) if count is None else count
    values = encode_update({"values": torch.linspace(-1, 1, k)}, bits=bits, block_size=256)
    digest = schema_digest({"w": ((n,), torch.float32)})
    header = HEADER.pack(MAGIC, 1, bits, coding, 0, digest, k, len(section), len(section))
    return header + section + values


@SETTINGS
@given(tensors=updates(), fraction=st.floats(0.001, 1.0), bits=st.sampled_from([8, 4]))
def test_round_trip_sends_the_top_share_of_each_tensor(tensors, fraction, bits) -> None:
    payload = encode_sparse(tensors, fraction=fraction, bits=bits, block_size=16)
    out = decode_sparse(payload, expected_of(tensors))
    assert list(out) == sorted(tensors)
    # Blocks run across tensors in the stream of values sent: a step is at most the largest.
    top = max((t.abs().max() for t in tensors.values() if t.is_floating_point() and t.numel()),
              default=torch.tensor(0.0))  # fmt: skip
    for name, t in tensors.items():
        if not t.is_floating_point():
            assert torch.equal(out[name], t)
            continue
        flat, got = t.reshape(-1), out[name].reshape(-1)
        assert got.shape == flat.shape and got.dtype == torch.float32
        if not flat.numel():
            continue
        k = math.ceil(fraction * flat.numel())
        sent = got != 0
        assert int(sent.sum()) <= k
        # Every value sent is one of the largest k (ties aside), within a quantization step.
        kth = flat.abs().topk(k).values[-1]
        assert (flat.abs()[sent] >= kth).all()
        if sent.any():
            assert (got[sent] - flat[sent]).abs().max() <= top / QMAX[bits] * (1 + 1e-5)


def test_positions_use_the_smaller_coding_then_zstd() -> None:
    tensors = {"w": torch.randn(10_000, generator=torch.Generator().manual_seed(0))}
    for fraction, coding in ((0.02, GAPS), (0.5, BITMAP)):
        payload = encode_sparse(tensors, fraction=fraction, bits=8)
        _, _, _, got, flags, _, count, length, raw = HEADER.unpack_from(payload)
        assert got == coding and count == math.ceil(fraction * 10_000)
        gaps_bound = count  # a varint per index, at least one byte each
        assert raw >= (gaps_bound if coding == GAPS else 10_000 // 8)
        assert raw <= (10_000 // 8 if coding == GAPS else 2 * count)
        assert length == raw and flags == 0  # random positions: zstd does not pay, not kept
    # Positions in runs (the largest values at both ends) compress: the frame is kept.
    ends = encode_sparse({"w": torch.linspace(-1, 1, 10_000)}, fraction=0.5, bits=8)
    _, _, _, got, flags, _, count, length, raw = HEADER.unpack_from(ends)
    assert (got, flags, raw) == (BITMAP, FLAG_ZSTD, 1250) and length < raw / 20
    assert (decode_sparse(ends, {"w": ((10_000,), torch.float32)})["w"] != 0).sum() == 5000


@SETTINGS
@given(n=st.integers(1, 300), index=st.lists(st.integers(-3, 303), max_size=40))
def test_gaps_out_of_range_repeated_or_unsorted_are_rejected(n, index) -> None:
    payload = written(n, index)
    valid = all(0 <= i < n for i in index) and all(
        a < b for a, b in zip(index, index[1:], strict=False)
    )
    if valid:
        out = decode_sparse(payload, {"w": ((n,), torch.float32)})["w"]
        assert torch.equal(out != 0, torch.isin(torch.arange(n), torch.tensor(index, dtype=int)))
    else:
        with pytest.raises(CodecError, match="out of range|unsorted|repeated"):
            decode_sparse(payload, {"w": ((n,), torch.float32)})


@SETTINGS
@given(n=st.integers(1, 300), index=st.lists(st.integers(0, 330), max_size=40, unique=True))
def test_bitmap_bits_past_the_end_are_rejected(n, index) -> None:
    index = sorted(index)
    payload = written(n, index, coding=BITMAP)
    if all(i < n for i in index):
        decode_sparse(payload, {"w": ((n,), torch.float32)})
    else:
        with pytest.raises(CodecError):
            decode_sparse(payload, {"w": ((n,), torch.float32)})


@SETTINGS
@given(
    n=st.integers(2, 300),
    data=st.data(),
    coding=st.sampled_from([GAPS, BITMAP]),
    delta=st.integers(-5, 5).filter(bool),
)
def test_counts_that_do_not_match_are_rejected(n, data, coding, delta) -> None:
    index = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1)))
    count = len(index) + delta
    if count < 0:
        return
    with pytest.raises(CodecError):
        decode_sparse(written(n, index, coding=coding, count=count), {"w": ((n,), torch.float32)})
    # The header's count right, the values section holding another number of values.
    good = written(n, index, coding=coding)
    values = encode_update({"values": torch.ones(count)}, bits=8, block_size=256)
    start = len(good) - len(
        encode_update({"values": torch.ones(len(index))}, bits=8, block_size=256)
    )
    with pytest.raises(CodecError, match="values"):
        decode_sparse(good[:start] + values, {"w": ((n,), torch.float32)})


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0])
def test_values_that_are_not_finite_are_rejected(scale: float) -> None:
    payload = bytearray(written(50, [1, 7, 30]))
    values_start = len(payload) - len(
        encode_update({"values": torch.ones(3)}, bits=8, block_size=256)
    )
    meta_len = struct.unpack_from("<I", payload, values_start + 12)[0]
    scale_at = values_start + -(-(16 + meta_len) // 8) * 8
    struct.pack_into("<f", payload, scale_at, scale)
    with pytest.raises(CodecError, match="values"):
        decode_sparse(bytes(payload), {"w": ((50,), torch.float32)})


def test_claims_the_payload_cannot_hold_are_rejected_before_allocating() -> None:
    expected = {"w": ((100,), torch.float32)}
    good = written(100, [3, 50, 99])
    fields = list(HEADER.unpack_from(good))
    for i, value in ((6, 2**62), (6, 101), (7, 2**60), (8, 2**60)):  # count, lengths
        bad = HEADER.pack(*fields[:i], value, *fields[i + 1 :]) + good[HEADER.size :]
        with pytest.raises(CodecError):
            decode_sparse(bad, expected)
    # A zstd frame claiming more than 64 times its size, or other than the header says.
    section = b"\x05" * 4000
    frame = zstandard.ZstdCompressor().compress(section)
    assert len(frame) * 64 < len(section)
    for raw_length in (len(section), len(frame) + 3):
        fields[4], fields[7], fields[8] = FLAG_ZSTD, len(frame), raw_length
        with pytest.raises(CodecError, match="positions"):
            decode_sparse(HEADER.pack(*fields) + frame + good[-40:], expected)
    # A model the payload was not made for: refused by the schema digest, before sizes.
    with pytest.raises(CodecError, match="schema"):
        decode_sparse(good, {"w": ((10**12,), torch.float32)})


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_corruption_is_rejected_or_decodes_to_the_model_shape(data) -> None:
    tensors = {"a": torch.randn(40, 3), "b": torch.randn(17), "n": torch.arange(4)}
    payload = bytearray(encode_sparse(tensors, fraction=data.draw(st.sampled_from([0.05, 0.6])),
                                      bits=data.draw(st.sampled_from([8, 4]))))  # fmt: skip
    cut = data.draw(st.integers(0, len(payload)))
    if data.draw(st.booleans()):
        payload = payload[:cut]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(payload) - 1))
            payload[at] = data.draw(st.integers(0, 255))
    try:
        out = decode_sparse(bytes(payload), expected_of(tensors))
    except CodecError:
        return
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in tensors.items()}
    assert all(torch.isfinite(v).all() for v in out.values() if v.is_floating_point())


def test_trailing_bytes_and_bad_header_fields_are_rejected() -> None:
    tensors = {"w": torch.randn(300)}
    payload = encode_sparse(tensors, fraction=0.05, bits=8)
    with pytest.raises(CodecError):
        decode_sparse(payload + b"\0", expected_of(tensors))
    fields = list(HEADER.unpack_from(payload))
    for i, value in ((0, b"FDMX"), (1, 2), (2, 5), (3, 2), (4, 2)):
        bad = HEADER.pack(*fields[:i], value, *fields[i + 1 :]) + payload[HEADER.size :]
        with pytest.raises(CodecError):
            decode_sparse(bad, expected_of(tensors))


def test_codec_choices_and_parameters() -> None:
    update = {"w": torch.randn(1000)}
    expected = expected_of(update)
    sparse = ChangeCodec("sparse", fraction=0.01, sparse_bits=4).encode(update)
    dense = ChangeCodec("int8").encode(update)
    assert len(sparse) < len(dense) / 5
    assert (decode_change(sparse, expected)["w"] != 0).sum() == 10
    assert (decode_change(dense, expected)["w"] != 0).sum() > 900
    with pytest.raises(ValueError, match="fraction"):
        encode_sparse(update, fraction=0.0001, bits=8)
    with pytest.raises(ValueError, match="bits"):
        encode_sparse(update, fraction=0.1, bits=2)
    with pytest.raises(ValueError, match="non-finite"):
        encode_sparse({"w": torch.tensor([1.0, float("nan")])}, fraction=0.5, bits=8)
    with pytest.raises(ValueError, match="codec"):
        ChangeCodec("int2")


def test_the_tiny_unet_update_at_the_defaults_is_small() -> None:
    """At the default keys (5%, int4) an update of the tiny U-Net is at least 60x smaller than
    its fp32 weights (positions about 1.3 bytes a value, values half a byte)."""
    unet = build_unet("tiny", 28, 1, seed=0)
    g = torch.Generator().manual_seed(1)
    update = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in unet.state_dict().items()}
    payload = encode_sparse(update, fraction=0.05, bits=4)
    fp32 = 4 * sum(v.numel() for v in update.values())
    assert fp32 / len(payload) > 60
    out = decode_sparse(payload, expected_of(update))
    kept = sum(int((v != 0).sum()) for v in out.values())
    assert kept == sum(math.ceil(0.05 * v.numel()) for v in update.values())
