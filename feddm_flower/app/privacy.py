"""Differential privacy through Flower: its client-side fixed-clipping wrapper and its RDP
accountant, composed once per round on the server's sum of clipped updates."""

from __future__ import annotations

from logging import INFO

from flwr.common import log
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    Strategy,
)

from feddm_flower.app.guard import as_reply
from feddm_flower.fed.aggregation import RunningMean, State

# The population Flower's accountant is told. 'no-amplification' accounting does not use it
# (epsilon depends on the noise multiplier and the number of releases only); it must merely
# be at least any round's number of clients.
DP_POPULATION = 2**31 - 1
Privacy = DifferentialPrivacyClientSideFixedClipping


def fixed_clipping(
    clip: float, noise: float, delta: float, aggregator: Strategy | None = None
) -> Privacy | None:
    """Flower's client-side fixed-clipping DP wrapper with Flower's RDP accountant; None when
    both ``clip`` and ``noise`` are 0. DP needs the streamed mean (no robust ``aggregator``).

    It wraps a FedAvg release stage, not the optimizer: Flower accounts only for a wrapped
    strategy that aggregates exactly as FedAvg does (FedAvgM/FedAdam/... do not), and the
    optimizer then steps on the noised mean, which costs no privacy. The wrapper sees one
    reply per round, the server's sum of the n clipped updates, whose sensitivity is the
    clip: so its ``num_sampled_clients`` is 1 and its noise std noise x clip; :func:`release`
    divides by n. Its accounting counts the messages the wrapped strategy sends, and FedDM
    sends them itself, so :func:`release` composes each round's Gaussian event on the
    wrapper's accountant (public API) once the noise is drawn.
    """
    if clip == 0 and noise == 0:
        return None
    if aggregator is not None:
        raise ValueError("DP needs the streamed mean: its sensitivity is clip / n")
    if not (clip > 0 and noise > 0):
        raise ValueError(f"DP needs dp_clip_norm={clip} and dp_noise_multiplier={noise} > 0")
    release_stage = FedAvg()
    release_stage.fraction_train = release_stage.fraction_evaluate = 0.0  # never samples
    config = PrivacyConfig(
        target_delta=delta,
        population_size=DP_POPULATION,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    return Privacy(
        release_stage, noise, clip, num_sampled_clients=1, accountant=RdpAccountant(config)
    )


def release(
    privacy: Privacy, server_round: int, mean: RunningMean, history: dict[str, object]
) -> State | None:
    """The mean update under DP: (sum of the n clipped updates + Flower's Gaussian noise of
    std noise x clip) / n, i.e. std noise x clip / n on the mean; None if the wrapper
    refused. The release is composed on the accountant once the noise is drawn."""
    n = mean.count
    arrays, _ = privacy.aggregate_train(server_round, [as_reply(mean.sums, 1.0)])
    if arrays is None:  # the wrapper refused (it logged why)
        history["aggregate-rejected"] = "DP wrapper returned no arrays"
        return None
    privacy.accountant.compose(GaussianPrivacyEvent(privacy.noise_multiplier, n, DP_POPULATION))
    std = privacy.noise_multiplier * privacy.clipping_norm / n
    history["dp-noise-std"] = std
    spent = privacy.privacy_spent()
    log(INFO, "Round %d: DP noise std %.4g on the mean of %d clipped updates; epsilon %.4g "
        "at delta %g after %d releases", server_round, std, n, spent.epsilon, spent.delta,
        spent.num_releases)  # fmt: skip
    return {k: v / n for k, v in arrays.to_torch_state_dict().items()}


def note_spent(privacy: Privacy | None, history: dict[str, object]) -> None:
    """The privacy spent so far, in the round's metrics line (under DP)."""
    if privacy is not None:
        spent = privacy.privacy_spent()
        history["dp-epsilon"], history["dp-delta"] = spent.epsilon, spent.delta
