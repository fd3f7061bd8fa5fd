"""Getting the model to the nodes and their replies back: seeded sampling, one message per
node with what it lacks of the current model, replies streamed one at a time, the full model
resent to a node that is out of sync."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, Metadata, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from feddm_flower.app.compat import SUPERLINK_NODE_ID
from feddm_flower.app.records import (
    NO_BASE,
    OUT_OF_SYNC,
    downlink_content,
    fedavg_record_bytes,
    to_record,
)
from feddm_flower.app.round_book import RoundBook
from feddm_flower.fed.aggregation import State
from feddm_flower.fed.downlink import Delivery, ModelChain
from feddm_flower.protocol import (
    BASE,
    BASE_DIGEST,
    BYTES_BASE_DOWN,
    FROZEN_DIGEST,
    SERVER_ROUND,
    UNET_CONFIG,
)


def sample_nodes(grid: Grid, key: str, fraction: float, min_nodes: int) -> list[int]:
    """A ``fraction`` of the sorted node ids (at least ``min_nodes``; none for fraction 0),
    drawn with ``random.Random(key)``; waits until ``min_nodes`` are connected."""
    if fraction == 0:
        return []
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        log(INFO, "Waiting for nodes: %d connected, %d needed", len(nodes), min_nodes)
        time.sleep(1)
    size = min(len(nodes), max(int(len(nodes) * fraction), min_nodes))
    return sorted(random.Random(key).sample(nodes, size))


@dataclass
class Architecture:
    """What a node needs to build the model besides the federated weights: the U-Net's
    config and weights (``init-from``; none: the run's seeded preset) and their digest, and
    the digest of the frozen LoRA factors the node rebuilds from the seed."""

    unet_config: str = ""
    base: State | None = None
    base_digest: str = ""
    frozen_digest: str = ""

    def fields(self) -> dict[str, str]:
        """The config keys every message carries (none for a seeded preset, all weights)."""
        named = {UNET_CONFIG: self.unet_config, BASE_DIGEST: self.base_digest,
                 FROZEN_DIGEST: self.frozen_digest}  # fmt: skip
        return {k: v for k, v in named.items() if v}


class Dispatch:
    """Messages out and replies in for one strategy.

    ``held`` is what each node holds, as last confirmed (a digest of ``chain``'s); ``sent``
    the metadata of this phase's messages (no weights), to name the node behind an error the
    SuperLink writes in its place.
    """

    def __init__(
        self,
        chain: ModelChain,
        book: RoundBook,
        *,
        seeded_start: bool = False,
        architecture: Architecture | None = None,
        poll_interval: float = 0.5,
    ) -> None:
        self.chain, self.book = chain, book
        self.seeded_start, self.poll_interval = seeded_start, poll_interval
        self.architecture = architecture or Architecture()
        self._base: ArrayRecord | None = None
        self.base_sent: set[int] = set()  # nodes sent the base this run: never twice
        self.held: dict[int, str] = {}
        self.sent: list[Metadata] = []
        self.phase: tuple[int, ConfigRecord, str] = (0, ConfigRecord(), MessageType.TRAIN)
        self.fp32_model = 0  # bytes of the global model as an fp32 ArrayRecord (FedAvg's)

    def messages(
        self, server_round: int, nodes: list[int], config: ConfigRecord, kind: str, model: State
    ) -> list[Message]:
        """One message per node with what it lacks of ``model`` (one content per distinct
        delivery: nodes that hold the same model share it)."""
        config[SERVER_ROUND] = server_round
        config.update(self.architecture.fields())
        self.fp32_model = fedavg_record_bytes(model)
        if not self.chain.ref:
            self.chain.start(model, nodes_have_it=self.seeded_start)
        elif self.chain.update(model):
            log(INFO, "Round %d: model version %d (%s downlink)", server_round,
                self.chain.version, self.chain.downlink)  # fmt: skip
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
        if nodes:
            self.book.deliveries(server_round, _phase_name(kind), kinds)
        self.book.count_down(server_round, messages, self.fp32_model)
        self.sent = [m.metadata for m in messages]
        return messages

    def replies(self, grid: Grid, messages: list[Message], timeout: float) -> Iterator[Message]:
        """Push ``messages``, then yield each reply as soon as it is pulled, one at a time,
        until all have answered or ``timeout`` seconds have passed.

        A node's confirmation (any reply that is not an error) records the model it now holds.
        A node that answers :data:`OUT_OF_SYNC` is resent the full model, once per phase, and
        one that answers :data:`NO_BASE` the base model with it, once per run: a node that
        asks for the base again keeps its error (a rejected reply), so it cannot make the
        server send the base every round.
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
                    node = self.node_of(reply)
                    if not reply.has_error():
                        self.held[node] = self.chain.digest
                        yield reply
                        continue
                    self.held.pop(node, None)
                    code = reply.error.code
                    base = code == NO_BASE
                    again = node in resent or (base and node in self.base_sent)
                    if code in (OUT_OF_SYNC, NO_BASE) and not again:
                        resent.add(node)
                        pending.update(self._resend(grid, node, reply.error.reason, base))
                        continue
                    yield reply
            if pending and not pulled:
                time.sleep(self.poll_interval)
        for metadata in self.sent:  # unanswered: what the node holds is unknown
            if metadata.message_id in pending:
                self.held.pop(metadata.dst_node_id, None)

    def node_of(self, msg: Message) -> int:
        """The node a reply answers for: its sender, or for an error that the SuperLink sent
        in a node's place, the node the answered message went to."""
        if msg.metadata.src_node_id != SUPERLINK_NODE_ID:
            return msg.metadata.src_node_id
        sent_to = {m.message_id: m.dst_node_id for m in self.sent}
        return sent_to.get(msg.metadata.reply_to_message_id, SUPERLINK_NODE_ID)

    def stand_in(self, server_round: int, phase: str, msg: Message) -> bool:
        """Whether ``msg`` is the SuperLink's error for an unavailable node (logged)."""
        if not (msg.has_error() and msg.metadata.src_node_id == SUPERLINK_NODE_ID):
            return False
        log(WARNING, "Round %d: no %s reply from node %d (%s)",
            server_round, phase, self.node_of(msg), msg.error.reason)  # fmt: skip
        return True

    def own_replies(
        self, server_round: int, phase: str, replies: Iterable[Message], replied: set[int]
    ) -> Iterator[Message]:
        """The replies that are a node's own (not the SuperLink's stand-in), counted up;
        their nodes added to ``replied``."""
        for msg in replies:
            if self.stand_in(server_round, phase, msg):
                continue
            replied.add(self.node_of(msg))
            self.book.count_up(server_round, msg, self.fp32_model)
            yield msg

    def _full(self) -> ArrayRecord:
        """The reference as a full-model record (fp16 under an fp16 downlink, else fp32)."""
        return to_record(self.chain.ref, "fp16" if self.chain.downlink == "fp16" else "fp32")

    def _resend(self, grid: Grid, node: int, reason: str | None, base: bool) -> set[str]:
        """Push the full model (and the ``base`` model) to ``node`` again, in the phase's
        message; its message ids. The base's bytes are counted apart as well."""
        server_round, config, kind = self.phase
        self.book.out_of_sync(server_round, node, reason)
        if base and self.architecture.base_digest == self.chain.digest:  # the base is the model
            content = downlink_content(Delivery("current", self.chain.digest), self.chain.digest,
                                       config)  # fmt: skip
        else:
            content = downlink_content(Delivery("full"), self.chain.digest, config, self._full())
        if base and self.architecture.base is not None:
            self.base_sent.add(node)
            self._base = self._base or to_record(self.architecture.base)
            content[BASE] = self._base
            history = self.book.history[server_round]
            history[BYTES_BASE_DOWN] = history.get(BYTES_BASE_DOWN, 0) + self._base.count_bytes()
        msg = Message(content, dst_node_id=node, message_type=kind)
        self.book.deliveries(server_round, _phase_name(kind), {"current": [], "change": [],
                                                              "full": [node]})  # fmt: skip
        self.book.count_down(server_round, [msg], self.fp32_model)
        self.sent.append(msg.metadata)
        return {i for i in grid.push_messages([msg]) if i}


def _phase_name(kind: str) -> str:
    return "train" if kind == MessageType.TRAIN else "evaluate"
