"""The FedDM strategy's real code on hand-built replies: means, bad and hostile replies."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdam, FedTrimmedAvg
from hypothesis import given, settings
from hypothesis import strategies as st

from feddm_flower.app.compat import STEP_STATE, SUPERLINK_NODE_ID, ErrorCode, assign_message_id
from feddm_flower.app.local_grid import ReplyingGrid, node_reply, train_metrics
from feddm_flower.app.presets import FedDMProx, FedDMQuant, FedDMVanilla
from feddm_flower.app.records import payload_record, to_record
from feddm_flower.app.resume import optimizer_arrays, restore, strategy_state
from feddm_flower.app.server_app import build_strategy
from feddm_flower.app.strategy import FedDMStrategy
from feddm_flower.config import RunConfig
from feddm_flower.fed.aggregation import (
    BoundedStream,
    Contribution,
    InfluenceBound,
    LossCheck,
    Reference,
    RunningMean,
)
from feddm_flower.fed.codecs import decode_update, encode_update
from feddm_flower.protocol import ARRAYS, METRICS, UPDATE

# What a ServerApp process has set before a strategy builds its messages.
pytestmark = pytest.mark.usefixtures("server_identity")


GLOBAL = {"w": torch.zeros(3, 4), "b": torch.ones(5), "steps": torch.tensor([7])}
OFF = InfluenceBound(norm_bound=0, weight_bound=0)


def _weights_reply(node: int, state: dict[str, torch.Tensor], n: float = 10) -> Message:
    return node_reply(node, RecordDict({ARRAYS: to_record(state), METRICS: train_metrics(n)}))


def _random_state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: (scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
        for k, v in GLOBAL.items()
    }


def _strategy(cls: type[FedDMStrategy] = FedDMStrategy, **kwargs: object) -> FedDMStrategy:
    strategy = cls(**kwargs)
    strategy.global_state = {k: v.clone() for k, v in GLOBAL.items()}
    return strategy


def _weights(arrays: ArrayRecord | None) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def test_vanilla_aggregates_the_weighted_mean_of_replies() -> None:
    states = [_random_state(s) for s in (1, 2, 3)]
    replies = [
        _weights_reply(i, s, n) for i, (s, n) in enumerate(zip(states, (10, 20, 70), strict=True))
    ]
    arrays, metrics = _strategy(FedDMVanilla, bound=OFF).aggregate_train(1, replies)
    result = _weights(arrays)
    expected = 0.1 * states[0]["w"] + 0.2 * states[1]["w"] + 0.7 * states[2]["w"]
    torch.testing.assert_close(result["w"], expected)
    assert torch.equal(result["steps"], GLOBAL["steps"])  # non-float tensors stay the global's
    assert metrics["train-loss"] == pytest.approx(0.1)  # every reply says 0.1


def test_client_drift_is_the_spread_of_update_norms_across_clients() -> None:
    """drift-* in the round's history: mean, population std, min and max over the accepted
    replies of ‖w_local − w_received‖, whatever the bounds then do with them."""
    states = [_random_state(s, scale=s) for s in (1, 2, 3)]
    replies = [_weights_reply(i, s) for i, s in enumerate(states)] + [
        node_reply(9, RecordDict({METRICS: train_metrics(10)}))  # rejected: not counted
    ]
    strategy = _strategy(bound=InfluenceBound())
    strategy.aggregate_train(1, replies)
    norms = [
        math.sqrt(sum(float((s[k] - GLOBAL[k]).pow(2).sum()) for k in ("w", "b"))) for s in states
    ]
    history = strategy.history[1]
    assert history["drift-mean"] == pytest.approx(np.mean(norms))
    assert history["drift-std"] == pytest.approx(np.std(norms))
    assert (history["drift-min"], history["drift-max"]) == pytest.approx((min(norms), max(norms)))


def _bad_replies() -> dict[str, Message]:
    good = _random_state(9)
    missing = {k: v for k, v in good.items() if k != "b"}
    extra = {**good, "c": torch.zeros(2)}
    shape = {**good, "w": torch.zeros(4, 3)}
    nan = {**good, "w": torch.full((3, 4), float("nan"))}
    inf = {**good, "b": torch.tensor([1.0, float("inf"), 0, 0, 0])}
    int64 = {**good, "w": torch.full((3, 4), 10**6, dtype=torch.int64)}
    fp16 = {**good, "w": good["w"].half()}
    raw = ArrayRecord({"w": Array(dtype="x", shape=(1,), stype="?", data=b"z")})
    two_metrics = RecordDict(
        {
            "extra": MetricRecord({"x": 1.0}),
            ARRAYS: to_record(good),
            METRICS: train_metrics(5),
        }
    )
    return {
        "missing": _weights_reply(11, missing),
        "extra": _weights_reply(12, extra),
        "shape": _weights_reply(13, shape),
        "nan": _weights_reply(14, nan),
        "inf": _weights_reply(15, inf),
        "zero-examples": _weights_reply(16, good, n=0),
        "no-metrics": node_reply(17, RecordDict({ARRAYS: to_record(good)})),
        "no-arrays": node_reply(18, RecordDict({METRICS: train_metrics(5)})),
        "undecodable": node_reply(19, RecordDict({ARRAYS: raw, METRICS: train_metrics(5)})),
        "client-error": node_reply(20, Error(code=1, reason="out of memory")),
        "int64-weights": _weights_reply(21, int64, n=10_000),
        "fp16-in-fp32-uplink": node_reply(
            22, RecordDict({ARRAYS: to_record(fp16, "fp16"), METRICS: train_metrics(10)})
        ),
        "huge-examples": _weights_reply(23, good, n=1.7e308),
        "nan-examples": _weights_reply(24, good, n=float("nan")),
        "nan-loss": node_reply(
            25,
            RecordDict(
                {
                    ARRAYS: to_record(good),
                    METRICS: train_metrics(5, **{"train-loss": math.nan}),
                }
            ),
        ),
        "second-metric-record-first": node_reply(26, two_metrics),
        # Asked for the received model's loss (the default), a reply must carry it.
        "no-eval-loss": _metrics_reply(27, good, without="eval-loss"),
        "nan-eval-loss": _metrics_reply(28, good, **{"eval-loss": math.nan}),
        "zero-eval-examples": _metrics_reply(29, good, **{"eval-examples": 0}),
        "huge-eval-examples": _metrics_reply(30, good, **{"eval-examples": 1.7e308}),
    }


def _metrics_reply(node: int, state: dict[str, torch.Tensor], without: str = "", **metrics):
    """A training reply whose metrics are ``train_metrics(10)`` with ``metrics`` replaced and
    the key ``without`` left out."""
    record = train_metrics(10, **metrics)
    if without:
        del record[without]
    return node_reply(node, RecordDict({ARRAYS: to_record(state), METRICS: record}))


def test_train_replies_report_the_received_models_loss_weighted_by_its_examples() -> None:
    """Asked for it, each accepted reply's loss of the model it received joins the round's
    eval-loss, weighted by its eval-examples (not its training examples); not asked (an
    evaluate message every round), the same keys are ignored."""
    replies = [
        _metrics_reply(1, _random_state(1), **{"eval-loss": 0.2, "eval-examples": 1}),
        _metrics_reply(2, _random_state(2), **{"eval-loss": 0.5, "eval-examples": 3}),
        _metrics_reply(3, _random_state(3), **{"eval-loss": math.inf}),
    ]
    strategy = _strategy()
    strategy.aggregate_train(2, replies)
    history = strategy.history[2]
    assert history["eval-loss"] == pytest.approx((0.2 * 1 + 0.5 * 3) / 4)
    assert not any(k.startswith("train-eval") for k in history)
    [rejected] = history["rejected"]
    assert rejected["node"] == "3" and "eval-loss" in rejected["reason"]
    per_round = _strategy(fraction_evaluate=1.0)
    per_round.aggregate_train(2, replies)
    assert "eval-loss" not in per_round.history[2] and "rejected" not in per_round.history[2]


@pytest.mark.parametrize("case", sorted(_bad_replies()))
def test_a_bad_reply_is_rejected_and_the_rest_aggregated(case: str) -> None:
    good = _random_state(4)
    strategy = _strategy()
    bad = _bad_replies()[case]
    arrays, _ = strategy.aggregate_train(3, [bad, _weights_reply(1, good)])
    result = _weights(arrays)
    torch.testing.assert_close(result["w"], good["w"])
    assert result["w"].dtype == torch.float32
    [rejected] = strategy.history[3]["rejected"]
    assert rejected["node"] == str(bad.metadata.src_node_id)
    assert rejected["reason"]


def test_two_replies_claiming_1e308_examples_cannot_zero_the_model() -> None:
    strategy = _strategy(bound=OFF)
    good = _random_state(2)
    replies = [_weights_reply(n, _random_state(n), 1.7e308) for n in (5, 6)]
    arrays, _ = strategy.aggregate_train(1, [*replies, _weights_reply(1, good)])
    torch.testing.assert_close(_weights(arrays)["w"], good["w"])


def test_the_running_mean_does_not_overflow_at_the_largest_allowed_counts() -> None:
    mean = RunningMean({"w": torch.zeros(2)})
    for value in (1.0, 3.0):
        mean.add({"w": torch.full((2,), value)}, 2.0**53)
    torch.testing.assert_close(mean.mean()["w"], torch.full((2,), 2.0))


def test_evaluate_metrics_with_extra_or_differing_keys_do_not_end_the_round() -> None:
    def eval_reply(node: int, **metrics: float) -> Message:
        record = MetricRecord({"num-examples": 10, "eval-loss": 0.2, **metrics})
        return node_reply(node, RecordDict({METRICS: record}), kind="evaluate")

    strategy = _strategy()
    no_loss = node_reply(4, RecordDict({METRICS: MetricRecord({"num-examples": 3})}), "evaluate")
    replies = [eval_reply(1), eval_reply(2, extra=5.0), eval_reply(3, other=1, more=2), no_loss]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert dict(metrics) == {"eval-loss": pytest.approx(0.2)}
    [rejected] = strategy.history[1]["rejected"]
    assert rejected["node"] == "4" and "eval-loss" in rejected["reason"]


def test_with_nothing_valid_the_global_model_stays() -> None:
    strategy = _strategy()
    arrays, metrics = strategy.aggregate_train(2, list(_bad_replies().values()))
    assert arrays is None and metrics is None
    assert len(strategy.history[2]["rejected"]) == len(_bad_replies())


def _update_reply(node: int, update: dict[str, torch.Tensor], n: float, **codec: int) -> Message:
    payload = encode_update(update, **codec)
    return node_reply(
        node, RecordDict({UPDATE: payload_record(payload), METRICS: train_metrics(n)})
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_adds_the_weighted_mean_of_decoded_updates(bits: int) -> None:
    codec = {"bits": bits, "block_size": 4}
    updates = [_random_state(s) for s in (5, 6)]
    strategy = _strategy(FedDMQuant, bound=OFF, **codec)
    arrays, _ = strategy.aggregate_train(
        1, [_update_reply(1, updates[0], 30, **codec), _update_reply(2, updates[1], 10, **codec)]
    )
    result = _weights(arrays)
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
    int_weights = encode_update({**update, "w": torch.zeros(3, 4, dtype=torch.int64)}, **codec)
    bad = {
        31: payload[:-3],
        32: bytes(version),
        33: wrong_shape,
        34: missing,
        35: payload + b"\x00",
        37: int_weights,
    }
    replies = [
        node_reply(node, RecordDict({UPDATE: payload_record(p), METRICS: train_metrics(5)}))
        for node, p in bad.items()
    ]
    replies.append(
        node_reply(36, RecordDict({ARRAYS: to_record(update), METRICS: train_metrics(5)}))
    )
    replies.append(_update_reply(1, update, 5, **codec))
    strategy = _strategy(FedDMQuant, **codec)
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = GLOBAL["w"] + decode_update(payload)["w"]
    torch.testing.assert_close(_weights(arrays)["w"], expected)
    rejected = {int(r["node"]) for r in strategy.history[1]["rejected"]}
    assert rejected == {31, 32, 33, 34, 35, 36, 37}


@pytest.mark.parametrize("uplink", ["fp32", "int8"])
def test_a_hostile_finite_reply_moves_the_model_no_more_than_an_honest_one(uplink: str) -> None:
    """One of four replies scales its update by 1e6 (and weights by 1e30) and claims a
    billion times the examples: the step stays within norm-bound x the median honest norm."""
    codec = {"bits": 8, "block_size": 4}
    honest = [_random_state(s, scale=0.01) for s in (1, 2, 3)]
    norms = sorted(math.sqrt(sum(float(v.float().pow(2).sum()) for k, v in u.items()
                                 if k != "steps")) for u in honest)  # fmt: skip
    for hostile_scale in (1e6, 1e30):
        hostile = {k: (v * hostile_scale if v.is_floating_point() else v) for k, v in
                   _random_state(1, 0.01).items()}  # fmt: skip
        if uplink == "fp32":
            weights = [{k: GLOBAL[k] + u[k] if k != "steps" else u[k] for k in u} for u in honest]
            replies = [_weights_reply(i, w, 10) for i, w in enumerate(weights)]
            replies.append(_weights_reply(9, hostile, 10e9))
            strategy = _strategy()
        else:
            replies = [_update_reply(i, u, 10, **codec) for i, u in enumerate(honest)]
            replies.append(_update_reply(9, hostile, 10e9, **codec))
            strategy = _strategy(FedDMQuant, **codec)
        arrays, _ = strategy.aggregate_train(1, replies)
        result = _weights(arrays)
        step = math.sqrt(sum(float((result[k] - GLOBAL[k]).pow(2).sum()) for k in ("w", "b")))
        assert step <= norms[1] * 1.05  # the median honest update, within quantization error
        assert "rejected" not in strategy.history[1] or hostile_scale == 1e30


def test_switching_the_bounds_off_lets_the_hostile_reply_dominate() -> None:
    """The bound is what protects: without it the same hostile reply moves the model 1e5 x."""
    honest = [_random_state(s, scale=0.01) for s in (1, 2, 3)]
    replies = [_weights_reply(i, u, 10) for i, u in enumerate(honest)]
    replies.append(_weights_reply(9, _random_state(1, 1e4), 10e9))
    arrays, _ = _strategy(bound=OFF).aggregate_train(1, replies)
    assert float(_weights(arrays)["w"].abs().max()) > 100


_VALID = st.tuples(st.integers(1, 10_000), st.integers(0, 2**31 - 1))
_INVALID = st.sampled_from(sorted(_bad_replies()))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(_VALID, _INVALID), max_size=7), st.booleans())
def test_any_mix_gives_the_weighted_mean_of_the_valid_or_no_change(mix, bounded) -> None:
    strategy = _strategy(bound=None if bounded else OFF)
    replies, states, weights = [], [], []
    for i, item in enumerate(mix):
        if isinstance(item, str):
            replies.append(_bad_replies()[item])
        else:
            n, seed = item
            states.append(_random_state(seed))
            weights.append(float(n))
            replies.append(_weights_reply(100 + i, states[-1], n))
    arrays, _ = strategy.aggregate_train(1, replies)
    if not states:
        assert arrays is None
        return
    result = _weights(arrays)
    assert all(bool(torch.isfinite(v).all()) for v in result.values())
    if not bounded:
        for k in ("w", "b"):
            expected = np.average(np.stack([s[k].numpy() for s in states]), axis=0, weights=weights)
            np.testing.assert_allclose(result[k].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert len(strategy.history[1].get("rejected", [])) == len(mix) - len(states)


def test_min_replies_and_missing_nodes_are_reported() -> None:
    strategy = _strategy(min_replies=2)
    strategy.book.sampled[4] = [1, 2, 3]
    arrays, _ = strategy.aggregate_train(4, [_weights_reply(1, _random_state(1))])
    assert arrays is None  # one accepted reply < min-replies=2
    assert strategy.history[4]["missing"] == ["2", "3"]


def test_superlink_stand_in_errors_count_the_node_as_missing() -> None:
    """A dead node's "reply" is an error the SuperLink (node 1) makes in its place: it must
    name the node the message went to, as missing, not as a bad reply from node 1."""
    strategy = _strategy()
    strategy.book.sampled[2] = [70, 80]
    sent = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in (70, 80)]
    for msg in sent:
        assign_message_id(msg, f"to-{msg.metadata.dst_node_id}")
    strategy.dispatch.sent = [msg.metadata for msg in sent]
    gone = Error(code=ErrorCode.NODE_UNAVAILABLE, reason="gone")
    stand_in = node_reply(SUPERLINK_NODE_ID, gone, reply_to_id="to-70")
    good = _random_state(3)
    arrays, _ = strategy.aggregate_train(2, [stand_in, _weights_reply(80, good)])
    torch.testing.assert_close(_weights(arrays)["w"], good["w"])
    assert strategy.history[2]["missing"] == ["70"]
    assert "rejected" not in strategy.history[2]


def _grid(nodes: list[int]) -> SimpleNamespace:
    return SimpleNamespace(get_node_ids=lambda: list(nodes))


def test_node_sampling_is_seeded_and_recorded() -> None:
    nodes = list(range(1000, 1020))

    def sampled(seed: int, server_round: int) -> list[int]:
        strategy = _strategy(fraction_train=0.25, seed=seed)
        config = ConfigRecord()
        messages = strategy.configure_train(server_round, ArrayRecord(GLOBAL), config, _grid(nodes))
        got = [m.metadata.dst_node_id for m in messages]
        assert strategy.history[server_round]["sampled-train"] == [str(n) for n in got]
        return got

    assert sampled(0, 1) == sampled(0, 1)
    assert len(sampled(0, 1)) == 5
    assert sampled(0, 1) != sampled(1, 1) or sampled(0, 2) != sampled(1, 2)
    assert sampled(0, 1) != sampled(0, 2) or sampled(0, 3) != sampled(0, 4)


def test_fraction_evaluate_zero_sends_evaluate_messages_after_the_last_round_only() -> None:
    """The default: train messages ask for the received model's loss, and the only evaluate
    messages follow the last round, to as many nodes as train (final-eval-loss); a fraction
    above 0 sends evaluate messages every round instead (eval-loss)."""
    grid, model = _grid([1, 2, 3]), ArrayRecord(GLOBAL)
    strategy = _strategy(fraction_evaluate=0.0)
    train = strategy.configure_train(1, model, ConfigRecord(), grid)
    assert len(train) == 3 and all(m.content["config"]["evaluate-received"] for m in train)
    assert strategy.configure_evaluate(1, model, ConfigRecord(), grid) == []
    assert len(strategy.configure_evaluate(1, model, ConfigRecord(), grid, final=True)) == 3
    metrics = MetricRecord({"num-examples": 4, "eval-loss": 0.3})
    reply = node_reply(1, RecordDict({METRICS: metrics}), kind="evaluate")
    strategy.aggregate_evaluate(1, [reply], final=True)
    assert strategy.history[1]["final-eval-loss"] == pytest.approx(0.3)
    assert "eval-loss" not in strategy.history[1]
    per_round = _strategy(fraction_evaluate=1.0)
    train = per_round.configure_train(1, model, ConfigRecord(), grid)
    assert not any(m.content["config"]["evaluate-received"] for m in train)
    assert len(per_round.configure_evaluate(1, model, ConfigRecord(), grid)) == 3
    per_round.aggregate_evaluate(1, [reply], final=True)
    assert per_round.history[1]["eval-loss"] == pytest.approx(0.3)


def test_after_every_round_and_before_the_first_evaluate_fn_then_end_round() -> None:
    """What the run keeps of a round is an explicit step of the loop, after Flower's
    ``evaluate_fn``, whose metrics land in the result under their round."""
    calls: list[tuple[str, int]] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        calls.append(("evaluate", server_round))
        return MetricRecord({"global-loss": float(server_round)})

    strategy = FedDMStrategy(fraction_evaluate=0.0, poll_interval=0.0)
    result = strategy.start(ReplyingGrid(2, "fp32"), ArrayRecord(GLOBAL), num_rounds=2,
                            evaluate_fn=evaluate,
                            end_round=lambda rnd: calls.append(("end", rnd)))  # fmt: skip
    assert calls == [(step, rnd) for rnd in (0, 1, 2) for step in ("evaluate", "end")]
    assert {r: m["global-loss"] for r, m in result.evaluate_metrics_serverapp.items()} == {
        0: 0.0, 1: 1.0, 2: 2.0
    }  # fmt: skip


def test_the_clients_phase_times_are_averaged_and_hostile_ones_ignored() -> None:
    """time-<phase> of the accepted replies, averaged per phase into the round's history; a
    reply's unbelievable times are left out, and never cost it its place in the mean."""
    timed = [
        train_metrics(10, **{"time-startup": 1.0, "time-train": 8.0}),
        train_metrics(10, **{"time-startup": 3.0, "time-train": float("nan"), "time-data": -1.0}),
        train_metrics(10, **{"time-train": 1e300}),
    ]
    replies = [
        node_reply(i, RecordDict({ARRAYS: to_record(_random_state(i)), METRICS: m}))
        for i, m in enumerate(timed)
    ]
    strategy = _strategy(bound=OFF)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and "rejected" not in strategy.history[1]
    times = {k: v for k, v in strategy.history[1].items() if k.startswith("train-time-")}
    assert times == {"train-time-startup": 2.0, "train-time-train": 8.0}


def test_presets_and_free_combinations_reach_the_nodes() -> None:
    """What a preset or a run-config combination sets is what its train messages tell the
    nodes, and the run-config picks Flower's optimizer and rule."""

    def told(strategy: FedDMStrategy) -> dict[str, object]:
        arrays = ArrayRecord(_random_state(0, scale=1.0))
        (msg, *_) = strategy.configure_train(1, arrays, ConfigRecord(), _grid([1, 2]))
        return dict(msg.content["config"])

    assert told(FedDMVanilla())["proximal-mu"] == 0.0 and told(FedDMVanilla())["uplink"] == "fp32"
    assert told(FedDMProx())["proximal-mu"] == 0.01
    quant = told(FedDMQuant(bits=4, block_size=64))
    assert quant["uplink"] == "int4" and quant["quant-block-size"] == 64
    cfg = RunConfig.from_mapping(
        {"proximal-mu": 0.02, "uplink": "sparse", "sparse-fraction": 0.1,
         "server-optimizer": "fedadam", "aggregation": "trimmed-mean", "trim-fraction": 0.2}
    )  # fmt: skip
    strategy = build_strategy(cfg)
    config = told(strategy)
    assert config["proximal-mu"] == 0.02 and config["uplink"] == "sparse"
    assert config["sparse-fraction"] == 0.1 and config["sparse-bits"] == cfg.sparse_bits
    assert isinstance(strategy.optimizer, FedAdam)
    assert isinstance(strategy.aggregator, FedTrimmedAvg) and strategy.aggregator.beta == 0.2


def _round(strategy: FedDMStrategy, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
    """One training round of 3 nodes whose update is a fixed function of the round."""
    messages = strategy.configure_train(server_round, arrays, ConfigRecord(), _grid([1, 2, 3]))
    current = arrays.to_torch_state_dict()
    replies = []
    for m in messages:
        node = m.metadata.dst_node_id
        step = _random_state(100 * server_round + node, scale=0.01)
        local = {k: current[k] + step[k] if k != "steps" else current[k] for k in current}
        replies.append(_weights_reply(node, local, 10 * node))
    new, _ = strategy.aggregate_train(server_round, replies)
    return new


def test_fedadam_state_survives_a_restart() -> None:
    """Stopped after round 2 and restored from state(), FedAdam ends where an uninterrupted
    run ends: same round numbers, same moments."""

    def fresh() -> FedDMStrategy:
        return build_strategy(RunConfig.from_mapping({"server-optimizer": "fedadam"}))

    arrays = ArrayRecord(GLOBAL)
    straight = fresh()
    for rnd in (1, 2, 3, 4):
        arrays = _round(straight, rnd, arrays)

    first = fresh()
    stopped = ArrayRecord(GLOBAL)
    for rnd in (1, 2):
        stopped = _round(first, rnd, stopped)
    after_two = ArrayRecord(_weights(stopped))
    state, moments = strategy_state(first, 2), optimizer_arrays(first)
    assert {k.split("/")[0] for k in moments} == {"m_t", "v_t"}
    resumed = fresh()
    restore(resumed, state, moments)
    assert resumed.first_round == 3
    for rnd in (3, 4):
        stopped = _round(resumed, rnd, stopped)
    for k, v in _weights(arrays).items():
        torch.testing.assert_close(_weights(stopped)[k], v, rtol=0, atol=0)
    # Without the moments the resumed run would differ: the restore is what makes it equal.
    blank = fresh()
    restore(blank, state, {})
    for rnd in (3, 4):
        after_two = _round(blank, rnd, after_two)
    assert not torch.equal(_weights(after_two)["w"], _weights(arrays)["w"])


def _contribution(norm: float, weight: float) -> Contribution:
    return Contribution(weight, {"w": torch.tensor([norm, 0.0])}, norm, {})


@pytest.mark.parametrize("spill", [False, True])
def test_a_round_without_a_reference_holds_its_replies_and_bounds_them_by_all(
    tmp_path, spill: bool
) -> None:
    """No reply is let through before the round ends; then the medians of all set the limits,
    and next round's reference is those medians."""
    stream = BoundedStream(InfluenceBound(1.5, 2.0), None, tmp_path if spill else None)
    pushed = [(100.0, 1e9), (100.0, 1e9), (1.0, 10), (4.0, 30), (2.0, 20)]  # two fast liars
    assert all(stream.push(_contribution(n, w)) == [] for n, w in pushed)
    assert len(list(tmp_path.iterdir())) == (5 if spill else 0)
    ready = list(stream.flush())  # medians: norm 4, weight 30 -> limits 6 and 60
    assert [(c.norm, c.weight) for c in ready] == [(6, 60), (6, 60), (1, 10), (4, 30), (2, 20)]
    torch.testing.assert_close(ready[0].update["w"], torch.tensor([6.0, 0.0]))
    assert not list(tmp_path.iterdir())
    assert stream.reference() == Reference(weight=30, norm=4)


def test_with_a_reference_every_reply_is_bounded_as_it_arrives() -> None:
    stream = BoundedStream(InfluenceBound(1.0, 2.0), Reference(weight=10, norm=2), None)
    [first] = stream.push(_contribution(100.0, 1e9))  # answers first: bounded at once
    assert (first.norm, first.weight) == (2.0, 20.0)
    assert stream.push(_contribution(1.0, 5)) != [] and list(stream.flush()) == []
    assert stream.reference() == Reference(weight=(1e9 + 5) / 2, norm=50.5)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.floats(1e-3, 1e6), st.floats(1, 1e9)), min_size=1, max_size=9),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_any_arrival_order_gives_the_same_bounds(replies, rng, first_round) -> None:
    """The bounded (norm, weight) of every reply and the next reference do not depend on the
    order in which the same replies arrive."""

    def bounded(order: list[tuple[float, float]]) -> tuple[list, Reference | None]:
        reference = None if first_round else Reference(weight=1e4, norm=10.0)
        stream = BoundedStream(InfluenceBound(), reference, None)
        out = [c for n, w in order for c in stream.push(_contribution(n, w))]
        out += list(stream.flush())
        return sorted((c.norm, c.weight) for c in out), stream.reference()

    shuffled = list(replies)
    rng.shuffle(shuffled)
    assert bounded(replies) == bounded(shuffled)


def test_fast_colluders_cannot_set_the_next_rounds_bounds() -> None:
    """Two liars of five answer first in rounds 1 and 2: round 1's limits come from all five
    replies, round 2's from round 1's medians; the liars never dominate."""
    strategy = _strategy()
    for rnd in (1, 2):
        start = {k: v.clone() for k, v in strategy.global_state.items()}
        steps = [_random_state(s, scale=0.01) for s in (rnd, rnd + 2, rnd + 4)]
        honest = [{k: v + u[k] if v.is_floating_point() else v for k, v in start.items()}
                  for u in steps]  # fmt: skip
        liars = [_weights_reply(90 + i, _random_state(9, scale=100), 1e9) for i in range(2)]
        good = [_weights_reply(i, w, 10) for i, w in enumerate(honest)]
        arrays, _ = strategy.aggregate_train(rnd, liars + good)
        step = math.sqrt(sum(float((_weights(arrays)[k] - start[k]).pow(2).sum())
                             for k in ("w", "b")))  # fmt: skip
        assert strategy.reference.weight == 10 and strategy.reference.norm < 0.1
        assert step < 0.1, step  # an honest update's norm is about 0.04, a liar's about 400
        strategy.global_state = _weights(arrays)


@pytest.mark.parametrize("optimizer", ["fedavgm", "fedadam"])
def test_a_refused_global_model_leaves_model_and_optimizer_state_as_they_were(
    optimizer: str,
) -> None:
    """A refused round leaves no trace in the optimizer's momentum/moments or its current
    weights: the next round steps exactly as if it had never happened."""
    cfg = RunConfig.from_mapping({"server-optimizer": optimizer})
    good = {k: GLOBAL[k] + 0.1 if k != "steps" else GLOBAL[k] for k in GLOBAL}
    bad = {k: GLOBAL[k] + 5.0 if k != "steps" else GLOBAL[k] for k in GLOBAL}

    def run(attacked: bool) -> dict[str, torch.Tensor]:
        strategy = build_strategy(cfg)
        arrays = ArrayRecord({k: v.clone() for k, v in GLOBAL.items()})
        plan = [good, bad, good] if attacked else [good, good]
        for rnd, target in enumerate(plan, start=1):
            refuse = target is bad
            calls: list[int] = []  # the current model, the new global model

            def loss(state: dict, r: bool = refuse, calls: list[int] = calls) -> float:
                calls.append(1)
                return math.inf if r and len(calls) == 2 else 0.0

            strategy.loss_check = LossCheck(loss, 1.5)
            strategy.configure_train(rnd, arrays, ConfigRecord(), _grid([1, 2]))
            opt = strategy.optimizer
            before = {a: getattr(opt, a) for a in STEP_STATE if hasattr(opt, a)}
            new, _ = strategy.aggregate_train(rnd, [_weights_reply(1, target, 10)])
            if refuse:
                assert new is None and "not finite" in strategy.history[rnd]["aggregate-rejected"]
                assert all(getattr(opt, a) is value for a, value in before.items())
            else:
                arrays = new
        return _weights(arrays)

    attacked, clean = run(attacked=True), run(attacked=False)
    if optimizer == "fedavgm":  # FedAdam's bias correction counts rounds, not steps
        for k in ("w", "b"):
            torch.testing.assert_close(attacked[k], clean[k], rtol=0, atol=0)


def test_the_last_check_refuses_a_loss_above_max_loss_ratio_x_the_current() -> None:
    check = LossCheck(lambda state: float(state["w"].mean()), 1.5)
    current = {"w": torch.full((2,), 1.0)}
    assert "1.5x" in check.refusal({"w": torch.full((2,), 1.6)}, current)
    assert check.current == 1.0  # refused: still the current model's
    assert check.refusal({"w": torch.full((2,), 1.25)}, current) is None and check.current == 1.25


def test_a_reply_whose_model_has_a_non_finite_loss_is_rejected_and_zero_turns_it_off() -> None:
    strategy = _strategy()
    strategy.loss_check = LossCheck(lambda state: math.nan, 1.5)
    strategy.loss_check.current = 1.0
    arrays, _ = strategy.aggregate_train(1, [_weights_reply(1, _random_state(1))])
    [rejected] = strategy.history[1]["rejected"]
    assert arrays is None and rejected["reason"] == "its model's global-loss nan is not finite"
    with pytest.raises(Exception, match="max-loss-ratio.*>= 1, or 0 = off"):
        RunConfig.from_mapping({"max-loss-ratio": 0.5})
    assert build_strategy(RunConfig.from_mapping({"max-loss-ratio": 0.0})).loss_check is None
