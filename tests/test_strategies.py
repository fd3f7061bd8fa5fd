"""Server-side aggregation: hand-computed weighted means, and every kind of bad reply."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from hypothesis import given, settings
from hypothesis import strategies as st

from feddm_flower.aggregation import weighted_mean
from feddm_flower.codecs import decode_update, encode_update
from feddm_flower.records import payload_record
from feddm_flower.strategies import FedDMQuant, FedDMVanilla

GLOBAL = {"w": torch.zeros(3, 4), "b": torch.ones(5), "steps": torch.tensor([7])}


def _reply(node: int, content: RecordDict | Error) -> Message:
    meta = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="i",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    if isinstance(content, Error):
        return Message(metadata=meta, error=content)
    return Message(metadata=meta, content=content)


def _metrics(n: float) -> MetricRecord:
    return MetricRecord({"num-examples": n, "train-loss": 0.5})


def _weights_reply(node: int, state: dict[str, torch.Tensor], n: float = 10) -> Message:
    return _reply(node, RecordDict({"arrays": ArrayRecord(state), "metrics": _metrics(n)}))


def _random_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
        for k, v in GLOBAL.items()
    }


def _strategy(cls: type[FedDMVanilla] = FedDMVanilla, **kwargs: object) -> FedDMVanilla:
    strategy = cls(**kwargs)
    strategy.global_state = {k: v.clone() for k, v in GLOBAL.items()}
    return strategy


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 10_000), st.integers(0, 2**31 - 1)), min_size=1, max_size=5)
)
def test_weighted_mean_matches_numpy(clients: list[tuple[int, int]]) -> None:
    states = [_random_state(seed) for _, seed in clients]
    weights = [float(n) for n, _ in clients]
    mean = weighted_mean(states, weights)
    for k in ("w", "b"):
        expected = np.average(np.stack([s[k].numpy() for s in states]), axis=0, weights=weights)
        np.testing.assert_allclose(mean[k].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(mean["steps"], GLOBAL["steps"])


def test_vanilla_aggregates_the_weighted_mean_of_replies() -> None:
    states = [_random_state(s) for s in (1, 2, 3)]
    replies = [
        _weights_reply(i, s, n) for i, (s, n) in enumerate(zip(states, (10, 20, 70), strict=True))
    ]
    arrays, metrics = _strategy().aggregate_train(1, replies)
    result = arrays.to_torch_state_dict()
    expected = 0.1 * states[0]["w"] + 0.2 * states[1]["w"] + 0.7 * states[2]["w"]
    torch.testing.assert_close(result["w"], expected)
    assert metrics["train-loss"] == pytest.approx(0.5)


def _bad_replies() -> dict[str, Message]:
    good = _random_state(9)
    missing = {k: v for k, v in good.items() if k != "b"}
    extra = {**good, "c": torch.zeros(2)}
    shape = {**good, "w": torch.zeros(4, 3)}
    nan = {**good, "w": torch.full((3, 4), float("nan"))}
    inf = {**good, "b": torch.tensor([1.0, float("inf"), 0, 0, 0])}
    raw = ArrayRecord({"w": Array(dtype="x", shape=(1,), stype="?", data=b"z")})
    return {
        "missing": _weights_reply(11, missing),
        "extra": _weights_reply(12, extra),
        "shape": _weights_reply(13, shape),
        "nan": _weights_reply(14, nan),
        "inf": _weights_reply(15, inf),
        "zero-examples": _weights_reply(16, good, n=0),
        "no-metrics": _reply(17, RecordDict({"arrays": ArrayRecord(good)})),
        "no-arrays": _reply(18, RecordDict({"metrics": _metrics(5)})),
        "undecodable": _reply(19, RecordDict({"arrays": raw, "metrics": _metrics(5)})),
        "client-error": _reply(20, Error(code=1, reason="out of memory")),
    }


@pytest.mark.parametrize("case", sorted(_bad_replies()))
def test_a_bad_reply_is_rejected_and_the_rest_aggregated(case: str) -> None:
    good = _random_state(4)
    strategy = _strategy()
    arrays, _ = strategy.aggregate_train(3, [_bad_replies()[case], _weights_reply(1, good)])
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], good["w"])
    [rejected] = strategy.history[3]["rejected"]
    assert rejected["node"] == str(_bad_replies()[case].metadata.src_node_id)
    assert rejected["reason"]


def test_with_nothing_valid_the_global_model_stays() -> None:
    strategy = _strategy()
    arrays, metrics = strategy.aggregate_train(2, list(_bad_replies().values()))
    assert arrays is None and metrics is None  # Flower's start() then keeps the global model
    assert len(strategy.history[2]["rejected"]) == len(_bad_replies())


def _update_reply(node: int, update: dict[str, torch.Tensor], n: float, **codec: int) -> Message:
    payload = encode_update(update, **codec)
    return _reply(node, RecordDict({"update": payload_record(payload), "metrics": _metrics(n)}))


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_adds_the_weighted_mean_of_decoded_updates(bits: int) -> None:
    codec = {"bits": bits, "block_size": 4}
    updates = [_random_state(s) for s in (5, 6)]
    for u in updates:
        u["steps"] = GLOBAL["steps"].clone()
    strategy = _strategy(FedDMQuant, **codec)
    arrays, _ = strategy.aggregate_train(
        1, [_update_reply(1, updates[0], 30, **codec), _update_reply(2, updates[1], 10, **codec)]
    )
    result = arrays.to_torch_state_dict()
    decoded = [decode_update(encode_update(u, **codec)) for u in updates]
    for k in ("w", "b"):
        expected = GLOBAL[k] + 0.75 * decoded[0][k] + 0.25 * decoded[1][k]
        torch.testing.assert_close(result[k], expected)


def test_quant_rejects_bad_payloads_and_keeps_the_good_one() -> None:
    codec = {"bits": 8, "block_size": 4}
    update = {k: v.clone() for k, v in _random_state(7).items()}
    payload = encode_update(update, **codec)
    version = bytearray(payload)
    version[4] = 99  # header byte 4 is the format version
    wrong_shape = encode_update({**update, "w": torch.zeros(2, 6)}, **codec)
    missing = encode_update({k: v for k, v in update.items() if k != "b"}, **codec)
    bad = {
        31: payload[:-3],
        32: bytes(version),
        33: wrong_shape,
        34: missing,
        35: payload + b"\x00",
    }
    replies = [
        _reply(node, RecordDict({"update": payload_record(p), "metrics": _metrics(5)}))
        for node, p in bad.items()
    ]
    replies.append(_reply(36, RecordDict({"arrays": ArrayRecord(update), "metrics": _metrics(5)})))
    replies.append(_update_reply(1, update, 5, **codec))
    strategy = _strategy(FedDMQuant, **codec)
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = GLOBAL["w"] + decode_update(payload)["w"]
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], expected)
    rejected = {int(r["node"]) for r in strategy.history[1]["rejected"]}
    assert rejected == {31, 32, 33, 34, 35, 36}


def test_min_replies_and_missing_nodes_are_reported() -> None:
    strategy = _strategy(min_replies=2)
    strategy.sampled[4] = [1, 2, 3]
    arrays, _ = strategy.aggregate_train(4, [_weights_reply(1, _random_state(1))])
    assert arrays is None  # one accepted reply < min-replies=2
    assert strategy.history[4]["missing"] == ["2", "3"]


def test_superlink_stand_in_errors_count_the_node_as_missing() -> None:
    """A dead node's "reply" is an error the SuperLink (node 1) makes in its place: it must
    name the node the message went to, as missing, not as a bad reply from node 1."""
    strategy = _strategy()
    strategy.sampled[2] = [70, 80]
    strategy.sent = [_reply(0, RecordDict()).metadata for _ in (70, 80)]
    for metadata, node in zip(strategy.sent, (70, 80), strict=True):
        metadata.dst_node_id = node
        metadata.__dict__["_message_id"] = f"to-{node}"  # as the grid does when pushing
    stand_in = _reply(SUPERLINK_NODE_ID, Error(code=ErrorCode.NODE_UNAVAILABLE, reason="gone"))
    stand_in.metadata.__dict__["_reply_to_message_id"] = "to-70"
    good = _random_state(3)
    arrays, _ = strategy.aggregate_train(2, [stand_in, _weights_reply(80, good)])
    assert arrays is not None
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], good["w"])
    assert strategy.history[2]["missing"] == ["70"]
    assert "rejected" not in strategy.history[2]
