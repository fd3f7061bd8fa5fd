"""FedDM strategy: one Flower strategy that wraps Flower's own, as its DP strategies do.

``FedDMStrategy`` keeps the round loop and FedDM's decisions. Its parts: delivery and replies
(``dispatch``), the reply guard (``guard``), ledger and history (``round_book``), the server's
step (``server_step``), DP through Flower's wrapper (``privacy``), resume state (``resume``);
what the run keeps of a round is the explicit ``end_round`` step (``report``). The server
optimizer is Flower's (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad), as is a robust rule
(FedMedian, FedTrimmedAvg, Krum), given decoded fp32 weights. One training round::

    configure_train   seeded sample; per node what it lacks of the current model (nothing,
                      the changes since its copy, or the full model) + config (by default
                      with evaluate-received: the node first measures the model it got)
    Dispatch.replies  push, then pull one reply at a time as it arrives; a node out of sync
                      is resent the full model
    aggregate_train   guard each reply -> fp32 update -> bounded influence (DP: the clip) ->
                      running mean, reply dropped | held (first round on disk; robust rule)
                      -> rule (DP: Flower's noise) -> server optimizer -> last check
                      (one evaluation; if refused, group tests find the replies that fail
                      alone, and the round is combined again without them)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy

from feddm_flower.app import guard
from feddm_flower.app import privacy as dp
from feddm_flower.app.compat import remember_model
from feddm_flower.app.dispatch import Architecture, Dispatch, sample_nodes
from feddm_flower.app.round_book import RoundBook
from feddm_flower.app.server_step import describe, server_step
from feddm_flower.fed.aggregation import (
    InfluenceBound,
    Intake,
    InvalidReply,
    LossCheck,
    Reference,
    State,
)
from feddm_flower.fed.changes import CODED
from feddm_flower.fed.downlink import ModelChain
from feddm_flower.fed.timings import PhaseMeans, phase_times
from feddm_flower.protocol import EVALUATE_RECEIVED, METRICS, NUM_EXAMPLES, PROXIMAL_MU, UPLINK


class FedDMStrategy(Strategy):
    """Federated diffusion training over any Flower server optimizer and aggregation rule.

    Every reply is checked on its own (``guard.contribution``); one that fails is logged with
    its node and reason, listed under ``rejected`` in the round's history, and left out.
    Accepted updates are bounded, combined and passed through the optimizer; the result is
    taken only if it is finite and passes ``loss_check``. If it does not, the replies whose
    own models fail are found by group testing, rejected, and the rest combined again; if
    that fails too, model and optimizer state stay.

    Parameters
    ----------
    optimizer : FedAvg, optional
        Flower server optimizer; it sees one reply per round, the aggregate. Default FedAvg.
    aggregator : Strategy, optional
        Flower rule that needs every reply at once (FedMedian, FedTrimmedAvg, Krum); None
        streams a weighted mean instead.
    proximal_mu : float
        Sent to clients, who add (mu/2)·‖w − w_global‖² to their loss; 0 turns it off.
    uplink, downlink, codec, lossless
        What nodes send ("fp32"/"fp16" weights, "int8"/"int4"/"sparse" updates) and receive
        ("fp32"/"fp16" model, or coded changes since their copy); the codecs' run-config keys
        (``quant-*``, ``sparse-*``, ``error-feedback``); zstd on top where it helps.
    seeded_start, architecture
        Nodes rebuild the initial weights themselves and are sent only their digest; what
        they build on (``dispatch.Architecture``: a loaded U-Net's config, a LoRA base).
    bound, loss_check
        Caps on each reply's weight and update norm against the medians of the previous
        round's accepted replies; the last check of each new global model.
    dp_clip_norm, dp_noise_multiplier, dp_delta : float
        Differential privacy (both > 0, streamed mean only): clients and server clip updates;
        Flower's wrapper noises their sum (``privacy.py``); epsilon reported at ``dp_delta``.
    fraction_train, fraction_evaluate, min_nodes, min_replies, seed, poll_interval
        Seeded sampling of at least ``min_nodes``; fewer than ``min_replies`` accepted
        training replies leave the model unchanged. ``fraction_evaluate`` > 0 sends an
        evaluate message to that fraction every round; 0 (one message per node and round)
        has each train message measure the model it received (``eval-loss`` of the previous
        round's model) and sends one evaluate message after the last round
        (``final-eval-loss``).
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
        architecture: Architecture | None = None,
        bound: InfluenceBound | None = None,
        loss_check: LossCheck | None = None,
        dp_clip_norm: float = 0.0,
        dp_noise_multiplier: float = 0.0,
        dp_delta: float = 1e-5,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
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
        self.codec, self.lossless = dict(codec or {}), lossless
        self.chain = ModelChain.from_config(downlink, {**self.codec, "lossless": lossless})
        self.book = RoundBook()
        self.dispatch = Dispatch(
            self.chain,
            self.book,
            seeded_start=seeded_start,
            architecture=architecture,
            poll_interval=poll_interval,
        )
        self.bound = bound or InfluenceBound()
        self.reference: Reference | None = None  # medians of the last round with replies
        self.loss_check = loss_check
        self.privacy = dp.fixed_clipping(dp_clip_norm, dp_noise_multiplier, dp_delta, aggregator)
        if self.privacy is not None:  # the fixed clip is the norm bound; every weight is 1
            self.bound = InfluenceBound(norm_bound=0.0, weight_bound=0.0)
        self.fraction_train, self.fraction_evaluate = fraction_train, fraction_evaluate
        self.min_nodes, self.min_replies, self.seed = min_nodes, min_replies, seed
        self.first_round = 1
        self.global_state: State = {}

    @property
    def history(self) -> dict[int, dict[str, object]]:
        """Per round, the fields of its metrics line that the strategy knows."""
        return self.book.history

    def summary(self) -> None:
        """Log the combination this strategy runs."""
        describe(self)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        end_round: Callable[[int], None] | None = None,
    ) -> Result:
        """Flower's round loop, from round ``self.first_round`` (after a resume) to
        ``num_rounds``, with replies folded in as they arrive instead of gathered first.
        After each round (and before the first): ``evaluate_fn``, then ``end_round``."""
        log(INFO, "Starting %s, rounds %d to %d:", type(self).__name__, self.first_round,
            num_rounds)  # fmt: skip
        self.summary()
        result, arrays = Result(), initial_arrays
        if self.first_round == 1:
            _close_round(0, arrays, result, evaluate_fn, end_round)
        for rnd in range(self.first_round, num_rounds + 1):
            log(INFO, "[ROUND %d/%d]", rnd, num_rounds)
            begun = time.monotonic()
            messages = self.configure_train(rnd, arrays, ConfigRecord(train_config or {}), grid)
            new, metrics = self.aggregate_train(rnd, self.dispatch.replies(grid, messages, timeout))
            if new is not None:
                result.arrays = arrays = new
            if metrics is not None:
                result.train_metrics_clientapp[rnd] = metrics
            trained = time.monotonic()
            config = ConfigRecord(evaluate_config or {})
            final = rnd == num_rounds
            if messages := self.configure_evaluate(rnd, arrays, config, grid, final):
                replies = self.dispatch.replies(grid, messages, timeout)
                if (metrics := self.aggregate_evaluate(rnd, replies, final)) is not None:
                    result.evaluate_metrics_clientapp[rnd] = metrics
            # The server's view of the round: send, wait for and fold each phase's replies.
            self.history[rnd]["server-time-train"] = round(trained - begun, 3)
            self.history[rnd]["server-time-evaluate"] = round(time.monotonic() - trained, 3)
            _close_round(rnd, arrays, result, evaluate_fn, end_round)
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """The model (what each node lacks of it) and this combination's client config, to
        a seeded sample of nodes."""
        self.global_state = arrays.to_torch_state_dict()
        remember_model(self.optimizer, server_round, arrays, config, grid)
        if self.privacy is not None:  # puts clipping_norm in the config, opens the round
            self.privacy.configure_train(server_round, arrays, config, grid)
        config[PROXIMAL_MU], config[UPLINK] = self.proximal_mu, self.uplink
        config[EVALUATE_RECEIVED] = self.evaluates_received
        if self.uplink in CODED:
            config.update({**self.codec, "lossless": self.lossless})
        nodes = sample_nodes(grid, f"{self.seed}/{server_round}/train", self.fraction_train,
                             self.min_nodes)  # fmt: skip
        self.book.sampled[server_round] = nodes
        self.history[server_round]["sampled-train"] = [str(n) for n in nodes]
        return self.dispatch.messages(
            server_round, nodes, config, MessageType.TRAIN, self.global_state
        )

    @property
    def evaluates_received(self) -> bool:
        """Whether train messages measure the model they carry (no evaluate messages but
        the last round's)."""
        return self.fraction_evaluate == 0

    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        final: bool = False,
    ) -> list[Message]:
        """The model to a seeded sample of nodes for evaluation: ``fraction_evaluate`` of
        them, or with fraction 0 none before the ``final`` round and then, once, as many as
        train."""
        fraction = self.fraction_evaluate
        if self.evaluates_received:
            fraction = self.fraction_train if final else 0.0
        self.global_state = arrays.to_torch_state_dict()
        nodes = sample_nodes(grid, f"{self.seed}/{server_round}/evaluate", fraction,
                             self.min_nodes)  # fmt: skip
        kind = MessageType.EVALUATE
        return self.dispatch.messages(server_round, nodes, config, kind, self.global_state)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Guard, bound and combine the replies, then take the optimizer's step."""
        # Not under DP (a decision on one update would not be noised): each reply's model is
        # probed, and the replies are kept (on disk) for a search if the last check refuses.
        keep = self.loss_check is not None and self.privacy is None
        probes = self.loss_check.probes if self.loss_check is not None else 0
        streamed = self.aggregator is None
        intake = Intake(self.bound, self.reference, self.global_state, streamed, keep)
        replied: set[int] = set()
        times = PhaseMeans()
        clip = self.privacy.clipping_norm if self.privacy is not None else None
        reference = self.chain.ref or self.global_state  # the model the nodes trained from
        for msg in self.dispatch.own_replies(server_round, "training", replies, replied):
            node = self.dispatch.node_of(msg)
            try:
                contribution = guard.contribution(
                    msg, self.uplink, reference, clip, self.evaluates_received
                )
                if keep and (why := self.loss_check.screen(self.global_state, contribution.update)):
                    raise InvalidReply(f"its model's {why}")
            except InvalidReply as exc:
                self.book.reject(server_round, "train", node, str(exc))
                continue
            contribution.node = node
            times.add(phase_times(msg.content[METRICS]))
            intake.add(contribution)
        closing = time.monotonic()  # every reply is in: what the server adds from here
        self.reference = intake.close() or self.reference
        history = self.history[server_round]
        # Client drift: ‖w_local − w_received‖ across clients (under DP clipped).
        history.update({**intake.drift.summary("drift"), **times.summary("train-time-")})
        self.book.missing(server_round, replied)
        log(INFO, "Round %d: %d training replies accepted", server_round, len(intake.accepted))
        try:
            new_state = server_step(server_round, intake, self.global_state, self, history)
        finally:
            intake.release()
        history["server-time-train-close"] = round(time.monotonic() - closing, 3)
        history["replies-accepted"] = len(intake.accepted)
        if self.loss_check is not None and self.loss_check.probe is not None:
            history["server-probes"] = self.loss_check.probes - probes
        records, evaluations = guard.metric_replies(intake.accepted)
        if evaluations:  # the model the nodes received: the previous round's
            evaluated = self.optimizer.evaluate_metrics_aggr_fn(evaluations, NUM_EXAMPLES)
            self.book.remember(server_round, "eval", evaluated)
        if new_state is None:
            return None, None
        metrics = self.optimizer.train_metrics_aggr_fn(records, NUM_EXAMPLES)
        self.book.remember(server_round, "train", metrics)
        return ArrayRecord(new_state), metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message], final: bool = False
    ) -> MetricRecord | None:
        """Weighted mean of the evaluation metrics of the replies that pass the guard (the
        ``final`` evaluation after one message per round: as ``final-eval-loss``)."""
        records, times = [], PhaseMeans()
        for msg in self.dispatch.own_replies(server_round, "evaluate", replies, set()):
            try:
                records.append(guard.evaluation(msg))
            except InvalidReply as exc:
                self.book.reject(server_round, "evaluate", self.dispatch.node_of(msg), str(exc))
                continue
            times.add(phase_times(msg.content[METRICS]))
        self.history[server_round].update(times.summary("evaluate-time-"))
        if not records:
            return None
        metrics = self.optimizer.evaluate_metrics_aggr_fn(records, NUM_EXAMPLES)
        phase = "final" if final and self.evaluates_received else "eval"
        self.book.remember(server_round, phase, metrics)
        return metrics


def _close_round(
    server_round: int,
    arrays: ArrayRecord,
    result: Result,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
    end_round: Callable[[int], None] | None,
) -> None:
    if evaluate_fn and (metrics := evaluate_fn(server_round, arrays)) is not None:
        result.evaluate_metrics_serverapp[server_round] = metrics
    if end_round:
        end_round(server_round)
