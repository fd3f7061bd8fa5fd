"""The packed model record: a state dict as its layout and one flat Array per dtype.

It is what travels wherever a whole model does (fp32/fp16 uplinks, full downlinks, the node's
copy); its reader is strict, since a hostile reply can hold anything.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from feddm_flower.app.records import (
    DATA_PREFIX,
    LAYOUT_KEY,
    LAYOUT_STYPE,
    fedavg_record_bytes,
    from_record,
    to_record,
)
from feddm_flower.task.models import build_unet


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 4, generator=g),
        "a.bias": torch.randn(4, generator=g),
        "steps": torch.tensor([7]),
        "empty": torch.zeros(0, 2),
    }


def test_a_model_round_trips_exactly_in_few_arrays() -> None:
    unet = build_unet("tiny", 28, 1).state_dict()
    record = to_record(unet)
    assert sorted(record.keys()) == ["data.float32", "layout"]
    back = from_record(record)
    assert list(back) == list(unet)  # names, in order
    assert all(torch.equal(back[k], v) for k, v in unet.items())
    # The same bytes as Flower's one-Array-per-tensor record, give or take the metadata.
    assert abs(record.count_bytes() - fedavg_record_bytes(unet)) < 0.05 * record.count_bytes()
    state = _state()
    back = from_record(to_record(state, "fp16"))
    assert back["a.weight"].dtype == torch.float16 and back["steps"].dtype == torch.int64
    assert back["empty"].shape == (0, 2)


def _layout_record(layout: object, arrays: dict[str, np.ndarray]) -> ArrayRecord:
    text = json.dumps(layout).encode()
    record = {LAYOUT_KEY: Array(dtype="uint8", shape=(len(text),), stype=LAYOUT_STYPE, data=text)}
    record |= {k: Array(v) for k, v in arrays.items()}
    return ArrayRecord(record)


BAD = {
    "no layout": ArrayRecord({"data.float32": Array(np.zeros(3, np.float32))}),
    "layout not json": ArrayRecord(
        {LAYOUT_KEY: Array(dtype="uint8", shape=(1,), stype=LAYOUT_STYPE, data=b"{")}
    ),
    "unknown dtype": _layout_record([["w", "float64", [2]]], {"data.float64": np.zeros(2)}),
    "short data": _layout_record([["w", "float32", [3]]], {"data.float32": np.zeros(2, "f4")}),
    "long data": _layout_record([["w", "float32", [3]]], {"data.float32": np.zeros(4, "f4")}),
    "wrong data dtype": _layout_record([["w", "float32", [2]]], {"data.float32": np.zeros(2)}),
    "missing data": _layout_record(
        [["w", "float32", [2]], ["n", "int64", [1]]], {"data.float32": np.zeros(2, "f4")}
    ),  # fmt: skip
    "extra array": _layout_record(
        [["w", "float32", [2]]], {"data.float32": np.zeros(2, "f4"), "x": np.zeros(1)}
    ),
    "name twice": _layout_record(
        [["w", "float32", [1]], ["w", "float32", [1]]], {"data.float32": np.zeros(2, "f4")}
    ),
    "negative shape": _layout_record([["w", "float32", [-2]]], {"data.float32": np.zeros(0, "f4")}),
    "huge claim": _layout_record(
        [["w", "float32", [2**40, 2**40]]], {"data.float32": np.zeros(1, "f4")}
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_record_is_refused_with_the_reason(case: str) -> None:
    with pytest.raises(ValueError, match=r".+"):
        from_record(BAD[case])


@settings(max_examples=60, deadline=None)
@given(
    layout=st.lists(
        st.tuples(
            st.sampled_from(["w", "b", "n"]),
            st.sampled_from(["float32", "float16", "int64", "float64", "bogus"]),
            st.lists(st.integers(-3, 1 << 40), max_size=3),
        ),
        max_size=4,
    ),
    length=st.integers(0, 64),
    dtype=st.sampled_from(["f4", "f2", "i8", "f8"]),
)
def test_any_layout_and_data_decode_or_are_refused(layout, length, dtype) -> None:
    """Whatever a reply claims, the reader returns tensors matching the layout exactly or
    raises ValueError: never another error, never more elements than the data hold."""
    names = sorted({d for _, d, _ in layout}) or ["float32"]
    record = _layout_record(
        [list(e) for e in layout],
        {DATA_PREFIX + n: np.zeros(length, dtype) for n in names},
    )
    try:
        state = from_record(record)
    except ValueError:
        return
    assert sum(t.numel() for t in state.values()) <= length * len(names)
    for name, dtype_name, shape in layout:
        assert tuple(state[name].shape) == tuple(shape)
        assert str(state[name].dtype) == f"torch.{dtype_name}"
