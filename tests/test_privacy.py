"""Differential privacy: client clip before the codec, server re-clip, Flower's Gaussian noise
of std noise x clip / n on the unweighted mean, Flower's RDP accountant, config checks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_RUN
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import FedAdam, FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st

from feddm_flower.app.compat import KEY_CLIPPING_NORM
from feddm_flower.app.local_grid import node_reply, train_metrics
from feddm_flower.app.privacy import DP_POPULATION
from feddm_flower.app.records import (
    clipped_update,
    encode_uplink,
    from_record,
    payload_record,
    to_record,
)
from feddm_flower.app.resume import restore, strategy_state
from feddm_flower.app.server_app import build_strategy
from feddm_flower.app.strategy import FedDMStrategy
from feddm_flower.config import ConfigError, RunConfig
from feddm_flower.fed import changes
from feddm_flower.fed.aggregation import update_norm
from feddm_flower.fed.changes import CODED, ChangeCodec
from feddm_flower.fed.codecs import encode_update
from feddm_flower.protocol import ARRAYS, METRICS, UPDATE

# What a ServerApp process has set before a strategy builds its messages.
pytestmark = pytest.mark.usefixtures("server_identity")


def _state(seed: int, shapes: list[tuple[int, ...]], scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {f"t{i}": scale * torch.randn(shape, generator=g) for i, shape in enumerate(shapes)}
    state["steps"] = torch.tensor([3])  # a non-float tensor: never clipped, never sent as update
    return state


def _pair(seed: int, shapes: list[tuple[int, ...]], scale: float) -> tuple[dict, dict]:
    """(received, local) weights: local = received + a random update of size ``scale``."""
    received, update = _state(seed, shapes, 1.0), _state(seed + 1, shapes, scale)
    local = {k: v + update[k] if v.is_floating_point() else v for k, v in received.items()}
    return received, local


_SHAPES = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 40)).map(tuple), min_size=1, max_size=3
)
_SCALES = st.sampled_from([1e-6, 1e-3, 0.1, 1.0, 10.0, 1e4])
_CLIPS = st.floats(1e-4, 1e3)


# ------------------------------------------------------------------------------ clipping


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), _SHAPES, _SCALES, _CLIPS)
def test_a_clipped_update_never_exceeds_the_clip_norm(seed, shapes, scale, clip) -> None:
    """fp32: the update scaled as one vector, never longer than the clip, never changed when
    it is already within it."""
    received, local = _pair(seed, shapes, scale)
    raw = {k: local[k] - received[k] for k in local}
    update = clipped_update(local, received, clip)
    assert update_norm(update) <= clip
    if update_norm(raw) <= clip:
        assert all(torch.equal(update[k], raw[k]) for k in raw)
    else:  # one scale for every float tensor: the direction is kept
        ratio = update_norm(update) / update_norm(raw)
        for k in ("t0",):
            torch.testing.assert_close(update[k], raw[k] * ratio, rtol=1e-5, atol=1e-12)
    assert torch.equal(update["steps"], torch.tensor([0]))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), _SHAPES, _SCALES, _CLIPS, st.sampled_from(CODED))
def test_the_codec_quantizes_the_clipped_update(seed, shapes, scale, clip, uplink) -> None:
    """int8/int4/sparse: what goes into the codec is the clipped update, never longer than
    the clip (coding it then drops values and adds at most half a step to each value sent;
    the server clips again): clipping comes before sparsification."""
    received, local = _pair(seed, shapes, scale)
    seen = []

    def spy(encode):
        def spied(update, **kwargs):
            seen.append({k: v.clone() for k, v in update.items()})
            return encode(update, **kwargs)

        return spied

    dense, sparse = changes.encode_update, changes.encode_sparse
    changes.encode_update, changes.encode_sparse = spy(dense), spy(sparse)
    try:
        encode_uplink(local, received, uplink, codec=ChangeCodec(uplink, 16), clip_norm=clip)
    finally:
        changes.encode_update, changes.encode_sparse = dense, sparse
    [update] = seen
    assert update_norm(update) <= clip
    expected = clipped_update(local, received, clip)
    assert all(torch.equal(update[k], expected[k]) for k in expected)


def test_fp_uplinks_send_received_plus_the_clipped_update() -> None:
    received = _state(0, [(30, 30)], 1.0)
    local = {"t0": received["t0"] + 5.0, "steps": received["steps"]}
    record, _ = encode_uplink(local, received, "fp32", clip_norm=0.5)
    sent = from_record(record)
    assert update_norm({"t0": sent["t0"] - received["t0"]}) <= 0.5 * (1 + 1e-5)
    assert torch.equal(sent["steps"], local["steps"])
    # Without a clip nothing changes.
    record, _ = encode_uplink(local, received, "fp32")
    assert torch.equal(from_record(record)["t0"], local["t0"])


# ------------------------------------------------------------------------ server side

GLOBAL = {"w": torch.zeros(400, 500), "b": torch.zeros(10), "steps": torch.tensor([7])}


def _weights_reply(node: int, update: dict[str, torch.Tensor], n: float = 10) -> Message:
    weights = {k: GLOBAL[k] + update[k] if k in update else GLOBAL[k] for k in GLOBAL}
    return node_reply(node, RecordDict({ARRAYS: to_record(weights), METRICS: train_metrics(n)}))


def _update_reply(node: int, update: dict[str, torch.Tensor], n: float = 10) -> Message:
    payload = encode_update({**update, "steps": torch.tensor([0])}, bits=8, block_size=64)
    return node_reply(
        node, RecordDict({UPDATE: payload_record(payload), METRICS: train_metrics(n)})
    )


def _direction(seed: int, norm: float) -> dict[str, torch.Tensor]:
    update = _state(seed, [GLOBAL["w"].shape, GLOBAL["b"].shape], 1.0)
    update = {"w": update["t0"], "b": update["t1"]}
    scale = norm / update_norm(update)
    return {k: v * scale for k, v in update.items()}


def _grid(nodes: list[int]) -> SimpleNamespace:
    return SimpleNamespace(get_node_ids=lambda: list(nodes))


def _round(strategy: FedDMStrategy, server_round: int, replies: list[Message]) -> dict:
    config = ConfigRecord()
    nodes = [r.metadata.src_node_id for r in replies]
    strategy.configure_train(server_round, ArrayRecord(GLOBAL), config, _grid(nodes))
    assert config[KEY_CLIPPING_NORM] == strategy.privacy.clipping_norm  # what clients clip to
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    assert metrics is not None
    return arrays.to_torch_state_dict()


@pytest.mark.parametrize("n", [1, 4])
def test_the_server_adds_noise_of_std_noise_times_clip_over_n(n: int) -> None:
    """All n replies equal: the new global minus the mean has per-value std z*C/n."""
    clip, z = 2.0, 0.5
    strategy = FedDMStrategy(dp_clip_norm=clip, dp_noise_multiplier=z, min_nodes=1)
    update = _direction(1, norm=0.5 * clip)  # within the clip: not scaled
    np.random.seed(0)  # Flower's wrapper draws from numpy's global generator
    result = _round(strategy, 1, [_weights_reply(i, update, n=10 * i + 1) for i in range(n)])
    noise = (result["w"] - GLOBAL["w"] - update["w"]).double()
    assert abs(float(noise.std()) / (z * clip / n) - 1) < 0.02  # 200,000 values
    assert abs(float(noise.mean())) < 0.01 * z * clip / n
    assert torch.equal(result["steps"], GLOBAL["steps"])  # non-float tensors get no noise
    assert strategy.history[1]["dp-noise-std"] == pytest.approx(z * clip / n)


def test_the_dp_mean_is_unweighted_and_clipped_on_the_server() -> None:
    """num-examples is ignored, and a client that did not clip (norm 100 x the clip, int8)
    counts with the clip's norm: the sensitivity holds whatever a client sends."""
    clip = 1.0
    strategy = FedDMStrategy(dp_clip_norm=clip, dp_noise_multiplier=1e-12, uplink="int8")
    small, huge = _direction(2, 0.5), _direction(3, 100.0)
    result = _round(strategy, 1, [_update_reply(1, small, n=1), _update_reply(2, huge, n=1e6)])
    step = {k: result[k] - GLOBAL[k] for k in ("w", "b")}
    expected = {k: (small[k] + huge[k] / 100 * clip) / 2 for k in step}  # unweighted
    for k in step:
        torch.testing.assert_close(step[k], expected[k], rtol=0, atol=2e-3)
    assert "rejected" not in strategy.history[1]


def test_epsilon_grows_with_rounds_as_flowers_accountant_composes() -> None:
    delta = 1e-6
    cfg = {"dp-clip-norm": 1.0, "dp-noise-multiplier": 1.1, "dp-delta": delta}
    strategy = build_strategy(RunConfig.from_mapping(cfg))
    reference = RdpAccountant(
        PrivacyConfig(delta, DP_POPULATION, NeighboringRelation.ADD_OR_REMOVE_ONE,
                      SamplingMethod.NO_AMPLIFICATION)
    )  # fmt: skip
    epsilons = []
    for rnd in (1, 2, 3):
        _round(strategy, rnd, [_weights_reply(i, _direction(10 * rnd + i, 3.0)) for i in (1, 2)])
        reference.compose(GaussianPrivacyEvent(1.1, 2, DP_POPULATION))
        epsilons.append(strategy.history[rnd]["dp-epsilon"])
        assert strategy.history[rnd]["dp-delta"] == delta
        assert epsilons[-1] == pytest.approx(reference.get_epsilon(delta))
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
    # The spent budget survives a restart with the rest of the strategy state.
    resumed = build_strategy(RunConfig.from_mapping(cfg))
    restore(resumed, json.loads(json.dumps(strategy_state(strategy, 3))), {})
    assert resumed.privacy.privacy_spent().epsilon == pytest.approx(epsilons[-1])


def test_server_optimizers_step_on_the_noised_mean() -> None:
    """Flower accounts only for a FedAvg inside its wrapper: the wrapper noises a FedAvg
    release stage and FedAdam steps on its output (post-processing)."""
    cfg = {"dp-clip-norm": 1.0, "dp-noise-multiplier": 1.0, "server-optimizer": "fedadam"}
    strategy = build_strategy(RunConfig.from_mapping(cfg))
    assert isinstance(strategy.optimizer, FedAdam)
    assert type(strategy.privacy.strategy) is FedAvg and strategy.privacy.num_sampled_clients == 1
    result = _round(strategy, 1, [_weights_reply(i, _direction(i, 0.5)) for i in (1, 2)])
    assert all(bool(torch.isfinite(v).all()) for v in result.values())
    assert strategy.history[1]["dp-epsilon"] > 0


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"dp-clip-norm": 1.0}, ("dp-clip-norm=1.0", "dp-noise-multiplier=0.0")),
        ({"dp-noise-multiplier": 0.5}, ("dp-clip-norm=0.0", "dp-noise-multiplier=0.5")),
        ({"dp-clip-norm": -1.0}, ("dp-clip-norm=-1.0", ">= 0.0")),
        ({"dp-noise-multiplier": -0.1}, ("dp-noise-multiplier=-0.1", ">= 0.0")),
        ({"dp-delta": 1.0}, ("dp-delta=1.0", "strictly between 0 and 1")),
        ({"dp-delta": 0.0}, ("dp-delta=0.0", "strictly between 0 and 1")),
        (
            {"dp-clip-norm": 1.0, "dp-noise-multiplier": 1.0, "aggregation": "median"},
            ("dp-clip-norm=1.0", "aggregation='median'"),
        ),
        (
            {"dp-clip-norm": 1.0, "dp-noise-multiplier": 1.0, "aggregation": "krum"},
            ("dp-clip-norm=1.0", "aggregation='krum'"),
        ),
    ],
)
def test_invalid_dp_configs_name_the_keys(overrides: dict, names: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(overrides)
    for name in names:
        assert name in str(err.value)


def test_dp_is_off_by_default_and_named_when_on() -> None:
    assert build_strategy(RunConfig.from_mapping({})).privacy is None
    cfg = RunConfig.from_mapping({"uplink": "int8", "dp-clip-norm": 1, "dp-noise-multiplier": 1})
    assert cfg.label == "int8-dp" and cfg.dp_clip_norm == 1.0
    with pytest.raises(ValueError, match="streamed mean"):
        FedDMStrategy(dp_clip_norm=1.0, dp_noise_multiplier=1.0, aggregator=FedAvg())


# ------------------------------------------------------------------------- a real run


def test_a_real_run_with_dp_a_sparse_uplink_and_int8_down_spends_a_growing_epsilon(
    flwr_run, tmp_path: Path
) -> None:
    """Clients clip, then sparsify (keeping the rest as their residual); the server clips the
    decoded update again, adds the noise to the sum, and sends the noised model's change."""
    out = tmp_path / "dp"
    dp = {"uplink": "sparse", "downlink": "int8", "dp-clip-norm": 1.0, "dp-noise-multiplier": 0.5}
    # Noise of std 0.25 per value on the mean would raise the tiny model's loss beyond the last
    # check's 1.5x and keep the global model: this test follows the noised releases themselves.
    dp["max-loss-ratio"] = 0.0
    proc = flwr_run({**TINY_RUN, **dp, "output-dir": str(out)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert 0 < rows[0]["dp-epsilon"] < rows[1]["dp-epsilon"]
    for r in rows:
        assert r["strategy"] == "sparse-downint8-dp" and r["dp-delta"] == 1e-5
        assert r["dp-noise-std"] == pytest.approx(0.5 * 1.0 / 2)
        assert "rejected" not in r and "aggregate-rejected" not in r
        assert math.isfinite(r["train-loss"]) and 55 < r["compression-up"] < 75
        assert "downlink-full" not in r  # the start is seeded: never a full model
    # Down, cumulative: round 1's train messages name the seeded start (nothing to send);
    # round 2 sends one int8 change (~1/4 of fp32) per node in its train messages and one in
    # the final evaluate messages, where FedAvg would have sent three fp32 models.
    assert rows[0]["compression-down"] > 100 and 5.6 < rows[1]["compression-down"] < 6.5
