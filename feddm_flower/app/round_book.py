"""What the server writes down about each round: the traffic ledger, the round's history (the
fields of its metrics.jsonl line) and which nodes were sampled."""

from __future__ import annotations

from collections import defaultdict
from logging import INFO, WARNING

from flwr.app import Message, MetricRecord
from flwr.common import log

from feddm_flower.app.records import array_bytes, message_bytes
from feddm_flower.fed.accounting import CommLedger


class RoundBook:
    """The ledger (bytes per round, direction and node, beside fp32 FedAvg's), the history
    (round -> field -> value) and the nodes sampled to train (round -> node ids)."""

    def __init__(self) -> None:
        self.ledger = CommLedger()
        self.history: dict[int, dict[str, object]] = defaultdict(dict)
        self.sampled: dict[int, list[int]] = {}

    def count_down(self, server_round: int, messages: list[Message], fp32_model: int) -> None:
        """Bytes of each message sent, and what it would weigh with the fp32 model in it."""
        for msg in messages:
            actual = message_bytes(msg.content)
            fp32 = actual - array_bytes(msg.content) + fp32_model
            self.ledger.add(server_round, "down", msg.metadata.dst_node_id, actual, fp32)

    def count_up(self, server_round: int, msg: Message, fp32_model: int) -> None:
        """Bytes of a reply (an error carries none)."""
        if msg.has_error():
            return
        actual = message_bytes(msg.content)
        model_bytes = array_bytes(msg.content)
        fp32 = actual - model_bytes + fp32_model if model_bytes else actual
        self.ledger.add(server_round, "up", msg.metadata.src_node_id, actual, fp32)

    def remember(self, server_round: int, phase: str, metrics: MetricRecord | None) -> None:
        """The round's aggregated client metrics, as ``<phase>-<key>``."""
        for key, value in (metrics or {}).items():
            name = key if key.startswith(f"{phase}-") else f"{phase}-{key}"
            self.history[server_round][name] = value

    def reject(self, server_round: int, phase: str, node: int, reason: str) -> None:
        log(WARNING, "Round %d: rejected %s reply from node %d: %s",
            server_round, phase, node, reason)  # fmt: skip
        self.history[server_round].setdefault("rejected", []).append(
            {"node": str(node), "phase": phase, "reason": reason}
        )

    def missing(self, server_round: int, replied: set[int]) -> None:
        """The sampled nodes that sent no training reply."""
        missing = [n for n in self.sampled.get(server_round, []) if n not in replied]
        if missing:
            log(WARNING, "Round %d: no training reply from nodes %s", server_round, missing)
            self.history[server_round]["missing"] = [str(n) for n in missing]

    def deliveries(self, server_round: int, phase: str, kinds: dict[str, list[int]]) -> None:
        """What each node was sent of the model: nothing, changes, or the full model."""
        log(INFO, "Round %d %s: model current on %d nodes, changes to %d, full model to %s",
            server_round, phase, len(kinds["current"]), len(kinds["change"]),
            kinds["full"] or "none")  # fmt: skip
        if kinds["full"]:
            self.history[server_round].setdefault("downlink-full", []).extend(
                {"node": str(n), "phase": phase} for n in kinds["full"]
            )

    def out_of_sync(self, server_round: int, node: int, reason: str | None) -> None:
        log(WARNING, "Round %d: node %d is out of sync (%s); resending the full model",
            server_round, node, reason)  # fmt: skip
        self.history[server_round].setdefault("out-of-sync", []).append(
            {"node": str(node), "reason": str(reason)}
        )
