"""FedDM strategy: one Flower strategy that wraps Flower's own, as its DP strategies do.

``FedDMStrategy`` owns what is FedDM's: the downlink and uplink codecs, the reply guard,
bounded influence, streaming aggregation, traffic accounting, seeded node sampling and the
state a resumed run needs. What Flower already has it delegates: the server optimizer is a
Flower ``FedAvg``/``FedAvgM``/``FedAdam``/``FedYogi``/``FedAdagrad`` and a robust aggregation a
Flower ``FedMedian``/``FedTrimmedAvg``/``Krum``; they receive decoded fp32 weights in the
record layout they expect. ``FedDMVanilla``, ``FedDMProx`` and ``FedDMQuant`` are presets.
Differential privacy is Flower's ``DifferentialPrivacyClientSideFixedClipping`` with Flower's
RDP accountant.

One training round::

    configure_train   seeded sample; per node what it lacks of the current model (nothing,
                      the changes since its copy, or the full model; downlink.py) + config
                      (proximal-mu, uplink, DP: the wrapper's clipping_norm)
    _replies          push, then pull one reply at a time as it arrives (no round-sized list);
                      a node out of sync is resent the full model
    aggregate_train   guard each reply -> fp32 update -> bounded influence against the
                      previous round's medians (DP: the clip) -> mean: folded into a running
                      sum and dropped | first round: held on disk | robust rule: held
                      -> aggregation rule (DP: Flower's wrapper noises the sum, / n)
                      -> server optimizer -> last check (finite, global-loss) -> new global
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    Krum,
    Result,
    Strategy,
)

from feddm_flower.app.compat import (
    OPTIMIZER_STATE,
    STEP_STATE,
    SUPERLINK_NODE_ID,
    remember_model,
    set_krum_byzantine,
)
from feddm_flower.app.records import (
    OUT_OF_SYNC,
    array_bytes,
    decode_uplink,
    downlink_content,
    fedavg_record_bytes,
    message_bytes,
    to_record,
    uplink_key,
)
from feddm_flower.config import QUANT_BLOCK_SIZE, SPARSE_BITS, SPARSE_FRACTION
from feddm_flower.fed.accounting import CommLedger
from feddm_flower.fed.aggregation import (
    BoundedStream,
    Contribution,
    InfluenceBound,
    InvalidReply,
    LossCheck,
    Reference,
    RunningMean,
    Spread,
    State,
    check_examples,
    clip_update,
    update_norm,
)
from feddm_flower.fed.changes import CODED
from feddm_flower.fed.downlink import Delivery, ModelChain
from feddm_flower.fed.timings import PhaseMeans, phase_times

TRAIN_METRICS = ("train-loss", "train-steps", "train-seconds")
EVAL_METRICS = ("eval-loss",)
WEIGHT_KEY = "num-examples"
# The population Flower's accountant is told. 'no-amplification' accounting does not use it
# (epsilon depends on the noise multiplier and the number of releases only); it must merely
# be at least any round's number of clients.
DP_POPULATION = 2**31 - 1


class FedDMStrategy(Strategy):
    """Federated diffusion training over any Flower server optimizer and aggregation rule.

    Every training reply is checked on its own (:meth:`contribution`): exactly the records
    ``<uplink record>`` and ``metrics``; one MetricRecord whose ``num-examples`` is a finite
    number in (0, 2**53] and whose aggregated keys are finite numbers (other keys ignored);
    tensors with the global model's names and shapes, the uplink's dtypes, finite values. A
    reply that fails is logged with its node and reason, listed under ``rejected`` in the
    round's history, and left out. Accepted updates are bounded (``bound``), combined, passed
    through the optimizer, and the result is accepted only if it is finite and passes
    ``loss_check``; a refused result leaves the model and the optimizer's state as they were.

    Parameters
    ----------
    optimizer : FedAvg, optional
        Flower server optimizer (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad). It sees one
        reply per round, the aggregate; its own node sampling is switched off. Default FedAvg.
    aggregator : Strategy, optional
        Flower rule that needs every reply at once (FedMedian, FedTrimmedAvg, Krum); None
        streams a weighted mean instead, holding no reply longer than it takes to add it.
    proximal_mu : float
        Sent to clients, who add (mu/2)·‖w − w_global‖² to their loss; 0 turns it off.
    uplink : str
        "fp32"/"fp16" weights, "int8"/"int4" block-quantized updates, or "sparse" updates (the
        largest share of each tensor, block-quantized; sparse.py).
    downlink : str
        What a node that is behind receives: the full model in "fp32" or "fp16", or under
        "int8"/"int4"/"sparse" the coded changes since the model it holds (error feedback on
        the server; :class:`~feddm_flower.fed.downlink.ModelChain`). Nodes keep their copy, and a
        node that holds the current model is sent none (the train message after an evaluate
        message). Nodes train from that copy, the *reference*; their updates are taken against
        it and applied to the exact global model.
    codec : dict, optional
        ``quant-block-size``, ``sparse-fraction`` and ``sparse-bits`` (both directions);
        ``quant-stochastic`` and ``error-feedback`` (the clients' residual) for coded uplinks.
    lossless : bool
        zstd after quantization, in both directions, kept only where it makes a payload smaller.
    seeded_start : bool
        Nodes rebuild the initial weights themselves (a fresh run's seeded initialisation), so
        they are sent only its digest; a node whose rebuild differs is resent the full model.
    bound : InfluenceBound
        Caps on each reply's weight and update norm, relative to a reference that arrival
        order cannot set: the medians over all accepted replies of the previous round; in a
        run's first round (and under a rule that holds every reply) those of the round itself,
        whose replies are held until it ends (on disk for the streamed mean). Under
        differential privacy the fixed clip replaces it (and every weight is 1).
    loss_check : LossCheck, optional
        The last check of each reply's own model and of every new global model
        (``global-loss`` on the server's data, ``max-loss-ratio``); None: only finiteness is
        checked. Under DP only the new global model is checked. The server app sets it.
    dp_clip_norm, dp_noise_multiplier : float
        Differential privacy, both > 0 or both 0 (off); needs the streamed mean. Clients clip
        their update to L2 norm ``dp_clip_norm`` before encoding it and the server clips every
        decoded update again; the unweighted sum of the n accepted updates (sensitivity
        ``dp_clip_norm``) gets Gaussian noise of std ``dp_noise_multiplier * dp_clip_norm``
        from Flower's ``DifferentialPrivacyClientSideFixedClipping`` (:attr:`privacy`), then
        is divided by n: std ``dp_noise_multiplier * dp_clip_norm / n`` on the mean update,
        before the server optimizer (post-processing, so any optimizer keeps the guarantee).
    dp_delta : float
        The delta at which Flower's RDP accountant reports the epsilon spent so far.
    fraction_train, fraction_evaluate, min_nodes, min_replies, seed
        Nodes are drawn from the sorted node ids with ``random.Random(f"{seed}/{round}/...")``;
        at least ``min_nodes`` are sampled; fewer than ``min_replies`` accepted training
        replies leave the global model unchanged.
    """

    def __init__(
        self,
        *,
        optimizer: FedAvg | None = None,
        aggregator: Strategy | None = None,
        proximal_mu: float = 0.0,
        uplink: str = "fp32",
        downlink: str = "fp32",
        codec: dict[str, int | bool] | None = None,
        lossless: bool = False,
        seeded_start: bool = False,
        bound: InfluenceBound | None = None,
        loss_check: LossCheck | None = None,
        dp_clip_norm: float = 0.0,
        dp_noise_multiplier: float = 0.0,
        dp_delta: float = 1e-5,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_nodes: int = 2,
        min_replies: int = 1,
        seed: int = 0,
        poll_interval: float = 0.5,
    ) -> None:
        self.optimizer = optimizer or FedAvg()
        # This strategy samples the nodes (seeded); the optimizer only keeps its own state.
        self.optimizer.fraction_train = self.optimizer.fraction_evaluate = 0.0
        self.aggregator = aggregator
        self.proximal_mu, self.uplink, self.downlink = proximal_mu, uplink, downlink
        self.codec = dict(codec or {})
        self.lossless, self.seeded_start = lossless, seeded_start
        self.chain = ModelChain(
            downlink,
            block_size=int(self.codec.get("quant-block-size", QUANT_BLOCK_SIZE)),
            lossless=lossless,
            fraction=float(self.codec.get("sparse-fraction", SPARSE_FRACTION)),
            sparse_bits=int(self.codec.get("sparse-bits", SPARSE_BITS)),
        )
        self.held: dict[int, str] = {}  # node -> digest of the model it holds, as last confirmed
        self.bound = bound or InfluenceBound()
        self.reference: Reference | None = None  # medians of the last round with replies
        self.loss_check = loss_check
        self.privacy = self._privacy(dp_clip_norm, dp_noise_multiplier, dp_delta)
        if self.privacy is not None:  # the fixed clip is the norm bound; every weight is 1
            self.bound = InfluenceBound(norm_bound=0.0, weight_bound=0.0)
        self.fraction_train, self.fraction_evaluate = fraction_train, fraction_evaluate
        self.min_nodes, self.min_replies, self.seed = min_nodes, min_replies, seed
        self.poll_interval = poll_interval
        self.first_round = 1
        self.sampled: dict[int, list[int]] = {}  # round -> nodes sent training work
        self.sent: list[Metadata] = []  # this phase's messages (ids, destinations), no weights
        self.phase: tuple[int, ConfigRecord, str] = (0, ConfigRecord(), MessageType.TRAIN)
        self.ledger = CommLedger()
        self.history: dict[int, dict[str, object]] = defaultdict(dict)
        self.global_state: State = {}

    def _privacy(
        self, clip: float, noise: float, delta: float
    ) -> DifferentialPrivacyClientSideFixedClipping | None:
        """Flower's client-side fixed-clipping DP wrapper with Flower's RDP accountant, or None.

        It wraps a FedAvg release stage, not the optimizer: Flower accounts only for a wrapped
        strategy that aggregates exactly as FedAvg does (FedAvgM/FedAdam/... do not), and the
        optimizer then steps on the noised mean, which costs no privacy. The wrapper sees one
        reply per round, the server's sum of the n clipped updates, whose sensitivity is the
        clip: so its ``num_sampled_clients`` is 1 and its noise std noise x clip; the strategy
        divides by n. Its accounting counts the messages the wrapped strategy sends, and
        FedDM sends them itself, so :meth:`_release` composes each round's Gaussian event on
        the wrapper's accountant (public API) once the noise is drawn.
        """
        if clip == 0 and noise == 0:
            return None
        if not (clip > 0 and noise > 0):
            raise ValueError(f"DP needs dp_clip_norm={clip} and dp_noise_multiplier={noise} > 0")
        if self.aggregator is not None:
            raise ValueError("DP needs the streamed mean: its sensitivity is clip / n")
        release = FedAvg()
        release.fraction_train = release.fraction_evaluate = 0.0  # never samples nodes
        config = PrivacyConfig(
            target_delta=delta,
            population_size=DP_POPULATION,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
        return DifferentialPrivacyClientSideFixedClipping(
            release, noise, clip, num_sampled_clients=1, accountant=RdpAccountant(config)
        )

    def summary(self) -> None:
        """Log the combination this strategy runs."""
        log(INFO, "\t├──> FedDM: uplink %s, downlink %s, proximal-mu %g",
            self.uplink, self.downlink, self.proximal_mu)  # fmt: skip
        rule = type(self.aggregator).__name__ if self.aggregator else "weighted mean (streamed)"
        if self.privacy is not None:
            rule = "unweighted mean (streamed) + Gaussian noise"
        log(INFO, "\t├──> optimizer %s, aggregation %s", type(self.optimizer).__name__, rule)
        if self.privacy is not None:
            log(INFO, "\t├──> DP: updates clipped to L2 norm %g (clients, then server), noise "
                "multiplier %g, epsilon at delta %g (Flower's RDP accountant)",
                self.privacy.clipping_norm, self.privacy.noise_multiplier,
                self.privacy.accountant.config.target_delta)  # fmt: skip
        else:
            log(INFO, "\t├──> bounds: update norm %gx, num-examples %gx the previous round's "
                "median (0 = off)", self.bound.norm_bound, self.bound.weight_bound)  # fmt: skip
        check = self.loss_check
        limit = (
            f"; its and each reply's global-loss <= {check.max_ratio:g}x the current"
            if check
            else ""
        )
        log(INFO, "\t└──> last check: new global model finite%s", limit)

    # ----------------------------------------------------------------------------- rounds

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop, from round ``self.first_round`` (after :meth:`restore`) to
        ``num_rounds``, with replies folded in as they arrive instead of gathered first."""
        log(INFO, "Starting %s, rounds %d to %d:", type(self).__name__, self.first_round,
            num_rounds)  # fmt: skip
        self.summary()
        result, arrays = Result(), initial_arrays
        if evaluate_fn and self.first_round == 1:
            evaluate_fn(0, arrays)
        for rnd in range(self.first_round, num_rounds + 1):
            log(INFO, "[ROUND %d/%d]", rnd, num_rounds)
            begun = time.monotonic()
            config = ConfigRecord(dict(train_config or {}))
            messages = self.configure_train(rnd, arrays, config, grid)
            new_arrays, metrics = self.aggregate_train(rnd, self._replies(grid, messages, timeout))
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if metrics is not None:
                result.train_metrics_clientapp[rnd] = metrics
            trained = time.monotonic()
            config = ConfigRecord(dict(evaluate_config or {}))
            messages = self.configure_evaluate(rnd, arrays, config, grid)
            if messages:
                metrics = self.aggregate_evaluate(rnd, self._replies(grid, messages, timeout))
                if metrics is not None:
                    result.evaluate_metrics_clientapp[rnd] = metrics
            # The server's view of the round: send, wait for and fold each phase's replies.
            self.history[rnd]["server-time-train"] = round(trained - begun, 3)
            self.history[rnd]["server-time-evaluate"] = round(time.monotonic() - trained, 3)
            if evaluate_fn and (metrics := evaluate_fn(rnd, arrays)) is not None:
                result.evaluate_metrics_serverapp[rnd] = metrics
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """The global weights (downlink dtype) and this combination's client config, to a
        seeded sample of nodes; counted as downlink."""
        self.global_state = arrays.to_torch_state_dict()
        remember_model(self.optimizer, server_round, arrays, config, grid)
        if self.privacy is not None:  # puts clipping_norm in the config, opens the round
            self.privacy.configure_train(server_round, arrays, config, grid)
        config["proximal-mu"] = self.proximal_mu
        config["uplink"] = self.uplink
        if self.uplink in CODED:
            config.update({**self.codec, "lossless": self.lossless})
        nodes = self._sample(grid, server_round, "train", self.fraction_train)
        self.sampled[server_round] = nodes
        self.history[server_round]["sampled-train"] = [str(n) for n in nodes]
        return self._messages(server_round, nodes, config, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """The global weights to a seeded sample of nodes for evaluation."""
        self.global_state = arrays.to_torch_state_dict()
        nodes = self._sample(grid, server_round, "evaluate", self.fraction_evaluate)
        return self._messages(server_round, nodes, config, MessageType.EVALUATE) if nodes else []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Guard, bound and combine the replies, then take the optimizer's step (under DP
        after :meth:`configure_train` of the same round, which opens it for the wrapper)."""
        mean = RunningMean(self.global_state) if self.aggregator is None else None
        # A rule that holds every reply bounds them by the round's own medians; the streamed
        # mean by the previous round's, or (first round) holds the replies on disk.
        reference = self.reference if mean is not None else None
        spill = tempfile.TemporaryDirectory(prefix="feddm-held-") if mean is not None else None
        stream = BoundedStream(self.bound, reference, spill and Path(spill.name))
        held: list[Contribution] = []
        records: list[RecordDict] = []

        def fold(ready: list[Contribution]) -> None:
            for c in ready:
                metrics = MetricRecord({**c.metrics, WEIGHT_KEY: c.weight})
                records.append(RecordDict({"metrics": metrics}))
                if mean is not None:
                    mean.add(c.update, c.weight)  # and the update is dropped
                else:
                    held.append(c)

        replied: set[int] = set()
        drift, times = Spread(), PhaseMeans()
        for msg in replies:
            node = self._node(msg)
            if self._stand_in(server_round, "training", msg):
                continue
            replied.add(node)
            self._count_up(server_round, msg)
            try:
                contribution = self.contribution(msg)
                self._check_model(contribution)
            except InvalidReply as exc:
                self._reject(server_round, "train", node, str(exc))
                continue
            drift.add(contribution.norm)
            times.add(phase_times(msg.content["metrics"]))
            fold(stream.push(contribution))
        fold(stream.flush())
        if spill is not None:
            spill.cleanup()
        self.reference = stream.reference() or self.reference
        # Client drift: ‖w_local − w_received‖ of the accepted replies, as decoded (before
        # the bounds; under DP clipped), across clients.
        self.history[server_round].update(drift.summary("drift"))
        self.history[server_round].update(times.summary("train-time-"))
        self._note_missing(server_round, replied)
        log(INFO, "Round %d: %d training replies accepted", server_round, len(records))
        if len(records) < self.min_replies:
            log(WARNING, "Round %d: %d valid training replies, fewer than min-replies=%d; "
                "global model unchanged", server_round, len(records), self.min_replies)  # fmt: skip
            self._note_privacy(server_round)
            return None, None
        if self.privacy is not None:
            candidate = self._release(server_round, mean)
            self._note_privacy(server_round)
        else:
            candidate = self._combine(server_round, mean, held)
        new_state = self._step(server_round, candidate) if candidate is not None else None
        if new_state is None:
            return None, None
        metrics = self.optimizer.train_metrics_aggr_fn(records, WEIGHT_KEY)
        self._remember(server_round, "train", metrics)
        return ArrayRecord(new_state), metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted mean of the evaluation metrics of the replies that pass the guard."""
        records, times = [], PhaseMeans()
        for msg in replies:
            node = self._node(msg)
            if self._stand_in(server_round, "evaluate", msg):
                continue
            self._count_up(server_round, msg)
            try:
                self._check_records(msg, {"metrics"})
                weight, metrics = self._metrics(msg.content, EVAL_METRICS)
            except InvalidReply as exc:
                self._reject(server_round, "evaluate", node, str(exc))
                continue
            records.append(RecordDict({"metrics": MetricRecord({**metrics, WEIGHT_KEY: weight})}))
            times.add(phase_times(msg.content["metrics"]))
        self.history[server_round].update(times.summary("evaluate-time-"))
        if not records:
            return None
        metrics = self.optimizer.evaluate_metrics_aggr_fn(records, WEIGHT_KEY)
        self._remember(server_round, "eval", metrics)
        return metrics

    # ---------------------------------------------------------------------------- the guard

    def contribution(self, msg: Message) -> Contribution:
        """A training reply as its fp32 update, weight, norm and aggregated metrics;
        :class:`InvalidReply` with the reason if any part of it is unusable.

        Under DP the update is clipped to the clip norm here too, whatever the client did
        (the quantization of a clipped update, half a step per value, or a client that does not
        clip cannot exceed the sensitivity), and the weight is 1: the mean is unweighted.
        """
        key = uplink_key(self.uplink)
        self._check_records(msg, {key, "metrics"})
        weight, metrics = self._metrics(msg.content, TRAIN_METRICS)
        # Nodes trained from the reference (before any message: the global model itself).
        update = decode_uplink(msg.content[key], self.uplink, self.chain.ref or self.global_state)
        if self.privacy is not None:
            clip_update(update, self.privacy.clipping_norm)
            weight = 1.0
        return Contribution(weight, update, update_norm(update), metrics)

    def _check_model(self, c: Contribution) -> None:
        """:class:`InvalidReply` if the reply's own model fails the loss check (not under DP:
        a decision on one client's update alone is not noised)."""
        if self.loss_check is None or self.privacy is not None:
            return
        _, reason = self.loss_check.judge(self._weights(c.update), self.global_state)
        if reason is not None:
            raise InvalidReply(f"its model's {reason}")

    @staticmethod
    def _check_records(msg: Message, expected: set[str]) -> None:
        if msg.has_error():
            raise InvalidReply(f"client error: {msg.error.reason}")
        names = set(msg.content.keys())
        if names != expected:
            raise InvalidReply(f"records {sorted(names)}, expected {sorted(expected)}")
        # Not content.metric_records: its view keeps the reply alive in a reference cycle.
        metric_records = [k for k, v in msg.content.items() if isinstance(v, MetricRecord)]
        if metric_records != ["metrics"]:
            raise InvalidReply("expected exactly one MetricRecord, named 'metrics'")

    @staticmethod
    def _metrics(content: RecordDict, keys: tuple[str, ...]) -> tuple[float, dict[str, float]]:
        record = content.get("metrics")
        if not isinstance(record, MetricRecord):
            raise InvalidReply("no MetricRecord 'metrics'")
        weight = check_examples(record.get(WEIGHT_KEY))
        metrics = {}
        for key in keys:
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidReply(f"metric {key}={value!r} is missing or not a number")
            if not np.isfinite(value):
                raise InvalidReply(f"metric {key}={value!r} is not finite")
            metrics[key] = float(value)
        return weight, metrics

    # -------------------------------------------------------------- combine and optimize

    def _combine(
        self, server_round: int, mean: RunningMean | None, held: list[Contribution]
    ) -> State:
        """The aggregate weights: global + weighted mean update, or the Flower rule's pick."""
        if mean is not None:
            return self._weights(mean.mean())
        if isinstance(self.aggregator, Krum):  # Krum needs n > 2f + 2
            set_krum_byzantine(self.aggregator, max(0, (len(held) - 3) // 2))
        replies = [_as_reply(self._weights(c.update), c.weight) for c in held]
        held.clear()
        arrays, _ = self.aggregator.aggregate_train(server_round, replies)
        return arrays.to_torch_state_dict()

    def _release(self, server_round: int, mean: RunningMean) -> State | None:
        """The aggregate weights under DP: global + (sum of the n clipped updates + Flower's
        Gaussian noise of std noise x clip) / n, i.e. std noise x clip / n on the mean."""
        n, privacy = mean.count, self.privacy
        arrays, _ = privacy.aggregate_train(server_round, [_as_reply(mean.sums, 1.0)])
        if arrays is None:  # the wrapper refused (it logged why)
            self.history[server_round]["aggregate-rejected"] = "DP wrapper returned no arrays"
            return None
        # The noise is drawn: the release counts, whatever happens to the result.
        event = GaussianPrivacyEvent(privacy.noise_multiplier, n, DP_POPULATION)
        privacy.accountant.compose(event)
        std = privacy.noise_multiplier * privacy.clipping_norm / n
        self.history[server_round]["dp-noise-std"] = std
        spent = privacy.privacy_spent()
        log(INFO, "Round %d: DP noise std %.4g on the mean of %d clipped updates; epsilon %.4g "
            "at delta %g after %d releases", server_round, std, n, spent.epsilon, spent.delta,
            spent.num_releases)  # fmt: skip
        return self._weights({k: v / n for k, v in arrays.to_torch_state_dict().items()})

    def _note_privacy(self, server_round: int) -> None:
        """The privacy spent up to this round, in its metrics line (under DP)."""
        if self.privacy is None:
            return
        spent = self.privacy.privacy_spent()
        self.history[server_round]["dp-epsilon"] = spent.epsilon
        self.history[server_round]["dp-delta"] = spent.delta

    def _weights(self, update: State) -> State:
        """Global weights plus ``update`` (float tensors); other tensors stay the global's."""
        return {k: (g + update[k] if g.is_floating_point() else g)
                for k, g in self.global_state.items()}  # fmt: skip

    def _step(self, server_round: int, candidate: State) -> State | None:
        """The optimizer's new global weights from the aggregate if they pass the last check;
        else None, with the optimizer's state put back as it was before the step."""
        before = {a: getattr(self.optimizer, a) for a in STEP_STATE if hasattr(self.optimizer, a)}
        arrays, _ = self.optimizer.aggregate_train(server_round, [_as_reply(candidate, 1.0)])
        new = {name: value.to(self.global_state[name].dtype)
               for name, value in arrays.to_torch_state_dict().items()}  # fmt: skip
        reason = self._refusal(new)
        if reason is None:
            return new
        log(WARNING, "Round %d: new global model refused: %s; keeping the current one",
            server_round, reason)  # fmt: skip
        self.history[server_round]["aggregate-rejected"] = reason
        for attr, value in before.items():
            setattr(self.optimizer, attr, value)
        return None

    def _refusal(self, new: State) -> str | None:
        """Why the candidate global model ``new`` must not replace the current one, if so."""
        for name, g in self.global_state.items():
            value = new.get(name)
            if value is None or value.shape != g.shape:
                return f"{name}: misshapen or missing"
            if g.is_floating_point() and not value.isfinite().all():
                return f"{name}: not finite"
        if self.loss_check is not None:
            return self.loss_check.refusal(new, self.global_state)
        return None

    # ------------------------------------------------------------------ state for resume

    def state(self, completed_round: int) -> dict[str, object]:
        """What a resumed run needs besides the weights and :meth:`optimizer_state`."""
        state = {
            "round": completed_round,
            "ledger": self.ledger.to_dict(),
            "history": {str(k): v for k, v in self.history.items()},
        }
        if self.reference is not None:
            state["reference"] = dataclasses.asdict(self.reference)
        if self.privacy is not None:
            state["privacy"] = self.privacy.accountant.state_dict()
        return state

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The server optimizer's moments/momentum as flat named arrays (may be empty)."""
        out = {}
        for attr in OPTIMIZER_STATE:
            value = getattr(self.optimizer, attr, None)
            items = value.items() if isinstance(value, dict) else enumerate(value or [])
            out.update({f"{attr}/{k}": np.asarray(v) for k, v in items})
        return out

    def restore(self, state: dict[str, object], arrays: dict[str, np.ndarray]) -> None:
        """Continue after ``state["round"]`` (the inverse of :meth:`state` and
        :meth:`optimizer_state`)."""
        self.first_round = int(state["round"]) + 1
        self.ledger = CommLedger.from_dict(state["ledger"])
        self.history.update({int(k): v for k, v in state["history"].items()})
        if "reference" in state:
            self.reference = Reference(**state["reference"])
        if self.privacy is not None and "privacy" in state:
            self.privacy.accountant.load_state_dict(state["privacy"])
        for attr in OPTIMIZER_STATE:
            named = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(attr + "/")}
            if named and attr == "momentum_vector":
                setattr(self.optimizer, attr, [named[str(i)] for i in range(len(named))])
            elif named:
                setattr(self.optimizer, attr, named)

    # -------------------------------------------------------------------------- plumbing

    def _sample(self, grid: Grid, server_round: int, phase: str, fraction: float) -> list[int]:
        if fraction == 0:  # fraction-evaluate=0: the phase is off
            return []
        while len(nodes := sorted(grid.get_node_ids())) < self.min_nodes:
            log(INFO, "Waiting for nodes: %d connected, %d needed", len(nodes), self.min_nodes)
            time.sleep(1)
        size = min(len(nodes), max(int(len(nodes) * fraction), self.min_nodes))
        rng = random.Random(f"{self.seed}/{server_round}/{phase}")
        return sorted(rng.sample(nodes, size))

    def _messages(
        self, server_round: int, nodes: list[int], config: ConfigRecord, kind: str
    ) -> list[Message]:
        """One message per node with what it lacks of the current model (one content per
        distinct delivery: nodes that hold the same model share it)."""
        config["server-round"] = server_round
        if not self.chain.ref:
            self.chain.start(self.global_state, nodes_have_it=self.seeded_start)
        elif self.chain.update(self.global_state):
            log(INFO, "Round %d: model version %d (%s downlink)", server_round,
                self.chain.version, self.downlink)  # fmt: skip
        self.phase = (server_round, config, kind)
        contents: dict[str, RecordDict] = {}
        messages, kinds = [], defaultdict(list)
        for node in nodes:
            delivery = self.chain.plan(self.held.get(node))
            kinds[delivery.kind].append(node)
            key = f"{delivery.kind}/{delivery.base}"
            if key not in contents:
                full = self._full() if delivery.kind == "full" else None
                contents[key] = downlink_content(delivery, self.chain.digest, config, full)
            messages.append(Message(contents[key], dst_node_id=node, message_type=kind))
        self._note_deliveries(server_round, kind, kinds)
        self._count_down(server_round, messages)
        self.sent = [m.metadata for m in messages]
        return messages

    def _full(self) -> ArrayRecord:
        """The reference as a full-model record (fp16 under an fp16 downlink, else fp32)."""
        return to_record(self.chain.ref, "fp16" if self.downlink == "fp16" else "fp32")

    def _note_deliveries(self, server_round: int, kind: str, kinds: dict[str, list[int]]) -> None:
        phase = "train" if kind == MessageType.TRAIN else "evaluate"
        log(INFO, "Round %d %s: model current on %d nodes, changes to %d, full model to %s",
            server_round, phase, len(kinds["current"]), len(kinds["change"]),
            kinds["full"] or "none")  # fmt: skip
        if kinds["full"]:
            self.history[server_round].setdefault("downlink-full", []).extend(
                {"node": str(n), "phase": phase} for n in kinds["full"]
            )

    def _replies(self, grid: Grid, messages: list[Message], timeout: float) -> Iterator[Message]:
        """Push ``messages``, then yield each reply as soon as it is pulled, one at a time,
        until all have answered or ``timeout`` seconds have passed.

        A node's confirmation (any reply that is not an error) records the model it now holds.
        A node that answers :data:`OUT_OF_SYNC` is resent the full model, once per phase.
        """
        pending = {i for i in grid.push_messages(messages) if i}
        del messages
        resent: set[int] = set()
        end = time.monotonic() + timeout
        while pending and time.monotonic() < end:
            pulled = False
            for message_id in sorted(pending):
                for reply in grid.pull_messages([message_id]):
                    pending.discard(reply.metadata.reply_to_message_id)
                    pulled = True
                    node = self._node(reply)
                    if not reply.has_error():
                        self.held[node] = self.chain.digest
                        yield reply
                        continue
                    self.held.pop(node, None)
                    if reply.error.code == OUT_OF_SYNC and node not in resent:
                        resent.add(node)
                        pending.update(self._resend(grid, node, reply.error.reason))
                        continue
                    yield reply
            if pending and not pulled:
                time.sleep(self.poll_interval)
        for metadata in self.sent:  # unanswered: what the node holds is unknown
            if metadata.message_id in pending:
                self.held.pop(metadata.dst_node_id, None)

    def _resend(self, grid: Grid, node: int, reason: str | None) -> set[str]:
        """Push the full model to ``node`` again, in the phase's message; its message ids."""
        server_round, config, kind = self.phase
        log(WARNING, "Round %d: node %d is out of sync (%s); resending the full model",
            server_round, node, reason)  # fmt: skip
        self.history[server_round].setdefault("out-of-sync", []).append(
            {"node": str(node), "reason": str(reason)}
        )
        content = downlink_content(Delivery("full"), self.chain.digest, config, self._full())
        msg = Message(content, dst_node_id=node, message_type=kind)
        self._note_deliveries(server_round, kind, {"current": [], "change": [], "full": [node]})
        self._count_down(server_round, [msg])
        self.sent.append(msg.metadata)
        return {i for i in grid.push_messages([msg]) if i}

    def _node(self, msg: Message) -> int:
        """The node a reply answers for: its sender, or for an error that the SuperLink sent
        in a node's place, the node the answered message went to."""
        if msg.metadata.src_node_id != SUPERLINK_NODE_ID:
            return msg.metadata.src_node_id
        sent_to = {m.message_id: m.dst_node_id for m in self.sent}
        return sent_to.get(msg.metadata.reply_to_message_id, SUPERLINK_NODE_ID)

    def _stand_in(self, server_round: int, phase: str, msg: Message) -> bool:
        """Whether ``msg`` is the SuperLink's error for an unavailable node (logged)."""
        if not (msg.has_error() and msg.metadata.src_node_id == SUPERLINK_NODE_ID):
            return False
        log(WARNING, "Round %d: no %s reply from node %d (%s)",
            server_round, phase, self._node(msg), msg.error.reason)  # fmt: skip
        return True

    def _note_missing(self, server_round: int, replied: set[int]) -> None:
        missing = [n for n in self.sampled.get(server_round, []) if n not in replied]
        if missing:
            log(WARNING, "Round %d: no training reply from nodes %s", server_round, missing)
            self.history[server_round]["missing"] = [str(n) for n in missing]

    def _reject(self, server_round: int, phase: str, node: int, reason: str) -> None:
        log(WARNING, "Round %d: rejected %s reply from node %d: %s",
            server_round, phase, node, reason)  # fmt: skip
        self.history[server_round].setdefault("rejected", []).append(
            {"node": str(node), "phase": phase, "reason": reason}
        )

    def _fp32_model_bytes(self) -> int:
        """Bytes of the global model as an fp32 ArrayRecord: what FedAvg would carry."""
        return fedavg_record_bytes(self.global_state)

    def _count_down(self, server_round: int, messages: list[Message]) -> None:
        fp32_model = self._fp32_model_bytes()
        for msg in messages:
            actual = message_bytes(msg.content)
            fp32 = actual - array_bytes(msg.content) + fp32_model
            self.ledger.add(server_round, "down", msg.metadata.dst_node_id, actual, fp32)

    def _count_up(self, server_round: int, msg: Message) -> None:
        if msg.has_error():
            return
        actual = message_bytes(msg.content)
        model_bytes = array_bytes(msg.content)
        fp32 = actual - model_bytes + self._fp32_model_bytes() if model_bytes else actual
        self.ledger.add(server_round, "up", msg.metadata.src_node_id, actual, fp32)

    def _remember(self, server_round: int, phase: str, metrics: MetricRecord | None) -> None:
        for key, value in (metrics or {}).items():
            name = key if key.startswith(f"{phase}-") else f"{phase}-{key}"
            self.history[server_round][name] = value


def _as_reply(state: State, weight: float) -> Message:
    """``state`` as the kind of training reply Flower's strategies aggregate (from no node:
    the server itself stands behind the aggregate it hands to Flower's rules)."""
    content = RecordDict(
        {"arrays": ArrayRecord(state), "metrics": MetricRecord({WEIGHT_KEY: weight})}
    )
    metadata = Metadata(
        run_id=0,
        message_id="",
        src_node_id=0,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=0.0,
        message_type=MessageType.TRAIN,
    )
    return Message(metadata=metadata, content=content)


class FedDMVanilla(FedDMStrategy):
    """FedDM-vanilla: FedAvg of fp32 weights (preset of :class:`FedDMStrategy`)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**{"proximal_mu": 0.0, "uplink": "fp32", **kwargs})


class FedDMProx(FedDMStrategy):
    """FedDM-prox: clients add (mu/2)·‖w − w_global‖² against a detached copy of the
    received weights (preset of :class:`FedDMStrategy`)."""

    def __init__(self, *, proximal_mu: float = 0.01, **kwargs: object) -> None:
        super().__init__(proximal_mu=proximal_mu, **{"uplink": "fp32", **kwargs})


class FedDMQuant(FedDMStrategy):
    """FedDM-quant: clients send int8 or int4 block-quantized updates (preset of
    :class:`FedDMStrategy`)."""

    def __init__(
        self, *, bits: int = 8, block_size: int = QUANT_BLOCK_SIZE, **kwargs: object
    ) -> None:
        codec = {"quant-block-size": block_size, "quant-stochastic": False,
                 "error-feedback": False, **kwargs.pop("codec", {})}  # fmt: skip
        super().__init__(uplink=f"int{bits}", codec=codec, **kwargs)
