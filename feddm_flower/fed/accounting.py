"""Communication accounting: bytes each node was sent and sent back, per round and cumulative."""

from __future__ import annotations

from collections import defaultdict

DIRECTIONS = ("down", "up")


class CommLedger:
    """Per-round, per-node byte counts in both directions, beside an fp32-FedAvg baseline.

    ``down`` is server -> node (train and evaluate instructions), ``up`` is node -> server
    (replies). For every message the caller passes the bytes it carried and the bytes the same
    message would have carried under fp32 FedAvg (full fp32 weights); the ledger only adds.
    """

    def __init__(self) -> None:
        # (round, direction) -> node -> [actual bytes, fp32 FedAvg bytes]
        self._bytes: dict[tuple[int, str], dict[int, list[int]]] = defaultdict(
            lambda: defaultdict(lambda: [0, 0])
        )

    def add(
        self,
        server_round: int,
        direction: str,
        node_id: int,
        nbytes: int,
        fp32_bytes: int | None = None,
    ) -> None:
        """Count ``nbytes`` (fp32 FedAvg: ``fp32_bytes``, default the same) for ``node_id``."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'down' or 'up', not {direction!r}")
        entry = self._bytes[server_round, direction][node_id]
        entry[0] += nbytes
        entry[1] += nbytes if fp32_bytes is None else fp32_bytes

    def to_dict(self) -> dict[str, dict[str, dict[str, list[int]]]]:
        """JSON-ready copy: round -> direction -> node -> [actual, fp32] bytes."""
        out: dict[str, dict[str, dict[str, list[int]]]] = {}
        for (rnd, d), nodes in self._bytes.items():
            out.setdefault(str(rnd), {})[d] = {str(n): list(b) for n, b in nodes.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, dict[str, list[int]]]]) -> CommLedger:
        """Inverse of :meth:`to_dict`."""
        ledger = cls()
        for rnd, directions in data.items():
            for d, nodes in directions.items():
                for node, (actual, fp32) in nodes.items():
                    ledger.add(int(rnd), d, int(node), actual, fp32)
        return ledger

    def per_node(self, server_round: int, direction: str) -> dict[int, int]:
        """Bytes per node id in one round and direction."""
        return {n: b[0] for n, b in self._bytes.get((server_round, direction), {}).items()}

    def total(self, server_round: int, direction: str, fp32: bool = False) -> int:
        """All bytes of one round in one direction (``fp32``: the FedAvg baseline instead)."""
        nodes = self._bytes.get((server_round, direction), {})
        return sum(b[int(fp32)] for b in nodes.values())

    def cumulative(self, up_to_round: int, direction: str, fp32: bool = False) -> int:
        """All bytes in ``direction`` from round 1 through ``up_to_round``."""
        rounds = {r for r, d in self._bytes if d == direction and r <= up_to_round}
        return sum(self.total(r, direction, fp32) for r in rounds)

    def round_summary(self, server_round: int) -> dict[str, object]:
        """The metrics.jsonl fields for one round.

        ``compression-*`` is fp32-FedAvg bytes / actual bytes over all rounds so far
        (4.0 = four times fewer bytes than fp32 FedAvg).
        """
        out: dict[str, object] = {}
        for d in DIRECTIONS:
            actual = self.cumulative(server_round, d)
            out[f"bytes-{d}"] = self.total(server_round, d)
            out[f"bytes-{d}-cumulative"] = actual
            out[f"bytes-{d}-per-node"] = {
                str(k): v for k, v in sorted(self.per_node(server_round, d).items())
            }
            baseline = self.cumulative(server_round, d, fp32=True)
            out[f"compression-{d}"] = round(baseline / actual, 4) if actual else None
        return out
