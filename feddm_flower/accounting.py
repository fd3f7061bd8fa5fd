"""Communication accounting: bytes each node was sent and sent back, per round and cumulative."""

from __future__ import annotations

from collections import defaultdict


class CommLedger:
    """Per-round, per-node byte counts in both directions.

    ``down`` is server -> node (train and evaluate instructions), ``up`` is node -> server
    (replies). Callers pass the payload size of each message; the ledger only adds.
    """

    def __init__(self) -> None:
        self._bytes: dict[tuple[int, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, server_round: int, direction: str, node_id: int, nbytes: int) -> None:
        """Count ``nbytes`` carried in ``direction`` ('down' or 'up') for ``node_id``."""
        if direction not in ("down", "up"):
            raise ValueError(f"direction must be 'down' or 'up', not {direction!r}")
        self._bytes[server_round, direction][node_id] += nbytes

    def per_node(self, server_round: int, direction: str) -> dict[int, int]:
        """Bytes per node id in one round and direction."""
        return dict(self._bytes.get((server_round, direction), {}))

    def total(self, server_round: int, direction: str) -> int:
        """All bytes of one round in one direction."""
        return sum(self.per_node(server_round, direction).values())

    def cumulative(self, up_to_round: int, direction: str) -> int:
        """All bytes in ``direction`` from round 1 through ``up_to_round``."""
        return sum(
            sum(nodes.values())
            for (rnd, d), nodes in self._bytes.items()
            if d == direction and rnd <= up_to_round
        )

    def round_summary(self, server_round: int) -> dict[str, object]:
        """The metrics.jsonl fields for one round."""
        return {
            "bytes-down": self.total(server_round, "down"),
            "bytes-up": self.total(server_round, "up"),
            "bytes-down-cumulative": self.cumulative(server_round, "down"),
            "bytes-up-cumulative": self.cumulative(server_round, "up"),
            "bytes-down-per-node": _str_keys(self.per_node(server_round, "down")),
            "bytes-up-per-node": _str_keys(self.per_node(server_round, "up")),
        }


def _str_keys(d: dict[int, int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(d.items())}
