"""FedDM strategies: Flower Message-API strategies that also account traffic and keep history."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .accounting import CommLedger


def message_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: tensor data, keys and values as Flower counts them."""
    return sum(record.count_bytes() for record in content.values())


class FedDMVanilla(FedAvg):
    """FedAvg over U-Net weights (FedDM-vanilla), with traffic accounting.

    Aggregation is Flower's FedAvg unchanged. On top, every message sent and every reply
    received is counted in ``self.ledger``, and the aggregated client metrics of each round
    are kept in ``self.history[round]`` (keys ``train-*`` and ``eval-*``).

    Parameters
    ----------
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.ledger = CommLedger()
        self.history: dict[int, dict[str, float]] = defaultdict(dict)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages, counted as downlink."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._count(server_round, "down", messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluate messages, counted as downlink."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._count(server_round, "down", messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count the replies as uplink, then aggregate them as FedAvg does."""
        replies = list(replies)
        self._count(server_round, "up", replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        self._remember(server_round, "train", metrics)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Count the replies as uplink, then average their metrics as FedAvg does."""
        replies = list(replies)
        self._count(server_round, "up", replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        self._remember(server_round, "eval", metrics)
        return metrics

    def _count(self, server_round: int, direction: str, messages: list[Message]) -> None:
        for msg in messages:
            if direction == "down":
                node = msg.metadata.dst_node_id
            else:
                node = msg.metadata.src_node_id
            if not msg.has_error():
                self.ledger.add(server_round, direction, node, message_bytes(msg.content))

    def _remember(self, server_round: int, phase: str, metrics: MetricRecord | None) -> None:
        for key, value in (metrics or {}).items():
            name = key if key.startswith(f"{phase}-") else f"{phase}-{key}"
            self.history[server_round][name] = value


STRATEGIES: dict[str, type[FedDMVanilla]] = {"vanilla": FedDMVanilla}
