"""FedDM strategies: Flower Message-API strategies over diffusion U-Net weights.

``FedDMVanilla`` is FedAvg; ``FedDMProx`` also sends ``proximal-mu`` for the clients' proximal
term; ``FedDMQuant`` receives quantized weight *updates*. All three check every reply on its
own (a bad one is logged and dropped, the rest are aggregated) and account their traffic.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from .accounting import CommLedger
from .aggregation import InvalidReply, State, check_like, weighted_mean
from .codecs import CodecError, decode_update
from .records import array_bytes, message_bytes, payload_from, to_record


class FedDMVanilla(FedAvg):
    """FedAvg over U-Net weights (FedDM-vanilla), with reply checks and traffic accounting.

    Each training reply must carry an ArrayRecord ``arrays`` with exactly the global model's
    tensor names and shapes, all finite, and a MetricRecord ``metrics`` with a positive
    ``num-examples``. Replies that do not are logged with the node id and the reason and left
    out; with none left, the global model stays as it was. The accepted weights are averaged in
    fp32, weighted by ``num-examples``.

    Every message is counted in ``self.ledger`` (actual bytes and fp32-FedAvg bytes); the
    aggregated client metrics of each round are kept in ``self.history[round]``. A resumed run
    sets ``round_offset`` to the rounds already done, so that Flower's round 1 is round k+1
    everywhere (messages, ledger, history).

    Parameters
    ----------
    downlink_dtype : str (default: "fp32")
        Dtype of the float weights sent to clients: "fp32" or "fp16".
    min_replies : int (default: 1)
        Fewest accepted training replies that update the global model; with fewer, the round
        leaves it unchanged. Nodes that were sent work but never replied (dead, timed out, or
        reported unavailable by the SuperLink) are logged and listed under ``missing`` in the
        round's history.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(
        self, *, downlink_dtype: str = "fp32", min_replies: int = 1, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)
        self.downlink_dtype = downlink_dtype
        self.min_replies = min_replies
        self.sampled: dict[int, list[int]] = {}  # round -> nodes sent training work
        # Metadata of this phase's messages (not their weights); the grid sets their ids.
        self.sent: list[Metadata] = []
        self.round_offset = 0
        self.ledger = CommLedger()
        self.history: dict[int, dict[str, object]] = defaultdict(dict)
        self.global_state: State = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages with this strategy's config, counted as downlink."""
        server_round += self.round_offset
        self.global_state = arrays.to_torch_state_dict()
        self.train_config(config)
        messages = list(super().configure_train(server_round, self._downlink(), config, grid))
        self.sampled[server_round] = [m.metadata.dst_node_id for m in messages]
        self._count_down(server_round, messages)
        self.sent = [m.metadata for m in messages]
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluate messages, counted as downlink."""
        server_round += self.round_offset
        self.global_state = arrays.to_torch_state_dict()
        messages = list(super().configure_evaluate(server_round, self._downlink(), config, grid))
        self._count_down(server_round, messages)
        self.sent = [m.metadata for m in messages]
        return messages

    def state(self, completed_round: int) -> dict[str, object]:
        """What a resumed run needs besides the weights: rounds done, ledger, history."""
        return {
            "round": completed_round,
            "ledger": self.ledger.to_dict(),
            "history": {str(k): v for k, v in self.history.items()},
        }

    def restore(self, state: dict[str, object]) -> None:
        """Continue after ``state["round"]`` (the inverse of :meth:`state`)."""
        self.round_offset = int(state["round"])
        self.ledger = CommLedger.from_dict(state["ledger"])
        self.history.update({int(k): v for k, v in state["history"].items()})

    def train_config(self, config: ConfigRecord) -> None:
        """Add what clients need to know about this strategy to the train config."""

    def decode(self, content: RecordDict) -> State:
        """The reply's model contribution as fp32 tensors; :class:`InvalidReply` if unusable."""
        record = content.get("arrays")
        if not isinstance(record, ArrayRecord):
            raise InvalidReply("no ArrayRecord 'arrays'")
        try:
            state = record.to_torch_state_dict()
        except Exception as exc:  # any undecodable Array is the client's fault
            raise InvalidReply(f"arrays do not decode: {exc}") from exc
        check_like(state, self.global_state)
        return state

    def apply(self, mean: State) -> State:
        """The new global weights from the weighted mean of accepted contributions."""
        return mean

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, then average the accepted ones (fp32, by ``num-examples``)."""
        server_round += self.round_offset
        replies = self._answered(server_round, "training", replies)
        self._count_up(server_round, replies)
        accepted: list[tuple[Message, float, State]] = []
        for msg in replies:
            try:
                weight = self._weight(msg)
                accepted.append((msg, weight, self.decode(msg.content)))
            except InvalidReply as exc:
                self._reject(server_round, "train", msg, str(exc))
        self._note_missing(server_round, replies)
        log(INFO, "aggregate_train: %d of %d replies accepted", len(accepted), len(replies))
        if len(accepted) < self.min_replies:
            log(
                WARNING,
                "Round %d: %d valid training replies, fewer than min-replies=%d; "
                "global model unchanged",
                server_round,
                len(accepted),
                self.min_replies,
            )
            return None, None
        mean = weighted_mean([s for _, _, s in accepted], [w for _, w, _ in accepted])
        arrays = ArrayRecord(self.apply(mean))
        metrics = self.train_metrics_aggr_fn(
            [m.content for m, _, _ in accepted], self.weighted_by_key
        )
        self._remember(server_round, "train", metrics)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average the metrics of the replies that carry a valid ``num-examples``."""
        server_round += self.round_offset
        replies = self._answered(server_round, "evaluate", replies)
        self._count_up(server_round, replies)
        valid = []
        for msg in replies:
            try:
                self._weight(msg)
                valid.append(msg)
            except InvalidReply as exc:
                self._reject(server_round, "evaluate", msg, str(exc))
        metrics = super().aggregate_evaluate(server_round, valid) if valid else None
        self._remember(server_round, "eval", metrics)
        return metrics

    def _downlink(self) -> ArrayRecord:
        return to_record(self.global_state, self.downlink_dtype)

    def _weight(self, msg: Message) -> float:
        if msg.has_error():
            raise InvalidReply(f"client error: {msg.error.reason}")
        metrics = msg.content.get("metrics")
        if not isinstance(metrics, MetricRecord):
            raise InvalidReply("no MetricRecord 'metrics'")
        weight = metrics.get(self.weighted_by_key)
        if not isinstance(weight, int | float) or not 0 < weight < float("inf"):
            raise InvalidReply(f"{self.weighted_by_key}={weight!r} is not a positive number")
        return float(weight)

    def _node(self, msg: Message) -> int:
        """The node a reply answers for: its sender, or for an error that the SuperLink sent
        in a node's place, the node the answered message went to."""
        if msg.metadata.src_node_id != SUPERLINK_NODE_ID:
            return msg.metadata.src_node_id
        sent_to = {m.message_id: m.dst_node_id for m in self.sent}
        return sent_to.get(msg.metadata.reply_to_message_id, SUPERLINK_NODE_ID)

    def _answered(self, server_round: int, phase: str, replies: Iterable[Message]) -> list[Message]:
        """The replies that came from nodes; the SuperLink's stand-ins for nodes that were
        unavailable or let the message expire are logged, and the node counts as missing."""
        answered = []
        for msg in replies:
            if msg.has_error() and msg.metadata.src_node_id == SUPERLINK_NODE_ID:
                log(
                    WARNING,
                    "Round %d: no %s reply from node %d (%s)",
                    server_round,
                    phase,
                    self._node(msg),
                    msg.error.reason,
                )
            else:
                answered.append(msg)
        return answered

    def _note_missing(self, server_round: int, replies: list[Message]) -> None:
        replied = {m.metadata.src_node_id for m in replies}
        missing = [n for n in self.sampled.get(server_round, []) if n not in replied]
        if missing:
            log(WARNING, "Round %d: no training reply from nodes %s", server_round, missing)
            self.history[server_round]["missing"] = [str(n) for n in missing]

    def _reject(self, server_round: int, phase: str, msg: Message, reason: str) -> None:
        node = self._node(msg)
        log(
            WARNING,
            "Round %d: rejected %s reply from node %d: %s",
            server_round,
            phase,
            node,
            reason,
        )
        self.history[server_round].setdefault("rejected", []).append(
            {"node": str(node), "phase": phase, "reason": reason}
        )

    def _fp32_model_bytes(self) -> int:
        """Bytes of the global model as an fp32 ArrayRecord: what FedAvg would carry."""
        return to_record(self.global_state, "fp32").count_bytes()

    def _count_down(self, server_round: int, messages: list[Message]) -> None:
        fp32_model = self._fp32_model_bytes()
        for msg in messages:
            actual = message_bytes(msg.content)
            fp32 = actual - array_bytes(msg.content) + fp32_model
            self.ledger.add(server_round, "down", msg.metadata.dst_node_id, actual, fp32)

    def _count_up(self, server_round: int, replies: list[Message]) -> None:
        fp32_model = self._fp32_model_bytes()
        for msg in replies:
            if msg.has_error():
                continue
            actual = message_bytes(msg.content)
            model_bytes = array_bytes(msg.content)
            fp32 = actual - model_bytes + fp32_model if model_bytes else actual
            self.ledger.add(server_round, "up", msg.metadata.src_node_id, actual, fp32)

    def _remember(self, server_round: int, phase: str, metrics: MetricRecord | None) -> None:
        for key, value in (metrics or {}).items():
            name = key if key.startswith(f"{phase}-") else f"{phase}-{key}"
            self.history[server_round][name] = value


class FedDMProx(FedDMVanilla):
    """FedDM-prox: FedAvg whose clients add (mu/2)·‖w − w_global‖² to the diffusion loss.

    The server only sends ``proximal-mu``; the client computes the term against a detached copy
    of the weights it received (see ``diffusion.proximal_term``).

    Parameters
    ----------
    proximal_mu : float
        Weight of the proximal term; 0 makes the clients' objective that of FedDM-vanilla.
    **kwargs
        Passed to :class:`FedDMVanilla`.
    """

    def __init__(self, *, proximal_mu: float, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.proximal_mu = proximal_mu

    def train_config(self, config: ConfigRecord) -> None:
        config["proximal-mu"] = self.proximal_mu


class FedDMQuant(FedDMVanilla):
    """FedDM-quant: clients send their quantized update (local − received weights).

    The server decodes each payload (``codecs.decode_update``, checked against the global
    model's names and shapes), averages the updates in fp32 weighted by ``num-examples`` and adds
    the mean to the global weights.

    Parameters
    ----------
    bits : int
        8 or 4 (two values per byte).
    block_size : int
        Values per absmax scale.
    stochastic : bool
        Unbiased stochastic rounding on the clients (seeded per round and client).
    error_feedback : bool
        Clients add last round's quantization residual to their next update.
    **kwargs
        Passed to :class:`FedDMVanilla`.
    """

    def __init__(
        self,
        *,
        bits: int,
        block_size: int,
        stochastic: bool = False,
        error_feedback: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.bits, self.block_size = bits, block_size
        self.stochastic, self.error_feedback = stochastic, error_feedback

    def train_config(self, config: ConfigRecord) -> None:
        config["quant-bits"] = self.bits
        config["quant-block-size"] = self.block_size
        config["quant-stochastic"] = self.stochastic
        config["error-feedback"] = self.error_feedback

    def decode(self, content: RecordDict) -> State:
        try:
            payload = payload_from(content.get("update"))
            expected = {k: (tuple(v.shape), v.dtype) for k, v in self.global_state.items()}
            update = decode_update(payload, expected)
        except (ValueError, CodecError) as exc:
            raise InvalidReply(f"update: {exc}") from exc
        check_like(update, self.global_state)
        return update

    def apply(self, mean: State) -> State:
        return {
            k: (g + mean[k] if g.is_floating_point() else mean[k])
            for k, g in self.global_state.items()
        }
