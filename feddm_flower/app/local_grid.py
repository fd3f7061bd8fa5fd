"""Nodes in this process behind Flower's Grid interface: the strategy's real round loop with
no SuperLink, for the tests, the benchmarks and the attack table (one grid, one set of reply
builders for all of them)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from feddm_flower.app.compat import (
    SUPERLINK_NODE_ID,
    Run,
    act_as_server_app,
    assign_message_id,
    empty_run,
)
from feddm_flower.app.records import encode_uplink, received_model, uplink_key
from feddm_flower.config import QUANT_BLOCK_SIZE
from feddm_flower.fed.aggregation import State
from feddm_flower.fed.changes import CODED, ChangeCodec
from feddm_flower.protocol import (
    CONFIG,
    EVAL_EXAMPLES,
    EVAL_LOSS,
    METRICS,
    MODEL_DIGEST,
    NUM_EXAMPLES,
    SERVER_ROUND,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    TRAIN_STEPS,
)


class LocalGrid(Grid):
    """Nodes ``node_ids`` whose replies :meth:`answer` builds when the strategy pulls them.

    Subclasses say what a node sends back (:meth:`answer`: content or an Error). Every reply
    is available at once unless ``ordered``: then replies are released one at a time, lowest
    :meth:`rank` first (ties in push order), each only once every reply before it was pulled.
    """

    ordered = False

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = sorted(node_ids)
        self.pending: dict[str, Message] = {}
        self.turns: list[tuple[int, int, str]] = []  # (rank, push order, message id)
        self.pushed = 0
        self._run = empty_run()

    def answer(self, msg: Message) -> RecordDict | Error:
        """What the node ``msg`` went to sends back."""
        raise NotImplementedError

    def rank(self, msg: Message) -> int:
        """Where the reply to ``msg`` comes in the order of an ``ordered`` grid."""
        return 0

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            self.pushed += 1
            message_id = f"m{self.pushed}"
            assign_message_id(msg, message_id)
            self.pending[message_id] = msg
            self.turns.append((self.rank(msg), self.pushed, message_id))
            ids.append(message_id)
        self.turns.sort()
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = [i for i in message_ids if i in self.pending]
        if self.ordered:  # only the reply whose turn it is
            wanted = [self.turns[0][2]] if self.turns and self.turns[0][2] in wanted else []
        self.turns = [turn for turn in self.turns if turn[2] not in wanted]
        return [reply_to(msg, self.answer(msg)) for msg in map(self.pending.pop, wanted)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:  # fmt: skip
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run


def reply_to(msg: Message, answer: RecordDict | Error) -> Message:
    """The reply of the node ``msg`` went to, carrying ``answer`` (content or an Error)."""
    return node_reply(
        msg.metadata.dst_node_id, answer, msg.metadata.message_type, msg.metadata.message_id
    )


def node_reply(
    node: int, answer: RecordDict | Error, kind: str = "train", reply_to_id: str = "i"
) -> Message:
    """A reply from ``node`` to the message ``reply_to_id``, as the SuperLink delivers it."""
    metadata = Metadata(
        run_id=1,
        message_id=f"r-{reply_to_id}-{node}",
        src_node_id=node,
        dst_node_id=SUPERLINK_NODE_ID,
        reply_to_message_id=reply_to_id,
        group_id="",
        created_at=time.time(),
        ttl=60.0,
        message_type=kind,
    )
    if isinstance(answer, Error):
        return Message(metadata=metadata, error=answer)
    return Message(metadata=metadata, content=answer)


def train_metrics(num_examples: float, loss: float = 0.1, **extra: float) -> MetricRecord:
    """A training reply's metrics, as a node's task writes them under the default run-config
    (with the received model's evaluation; ``extra``: more, or replacements)."""
    metrics = {NUM_EXAMPLES: num_examples, TRAIN_LOSS: loss, TRAIN_STEPS: 1, TRAIN_SECONDS: 1.0}
    evaluation = {EVAL_LOSS: loss, EVAL_EXAMPLES: num_examples}
    return MetricRecord({**metrics, **evaluation, **extra})


def eval_metrics(num_examples: float, loss: float = 0.1) -> MetricRecord:
    """An evaluation reply's metrics."""
    return MetricRecord({NUM_EXAMPLES: num_examples, EVAL_LOSS: loss})


def run_rounds(strategy: Strategy, grid: Grid, initial: State, num_rounds: int) -> State:
    """The global weights after ``num_rounds`` of ``strategy``'s real round loop on ``grid``
    (``initial`` if no round changed them), as a ServerApp process runs it."""
    act_as_server_app()
    result = strategy.start(grid, ArrayRecord(initial), num_rounds)
    return result.arrays.to_torch_state_dict() if len(result.arrays) else initial


class ReplyingGrid(LocalGrid):
    """``num_nodes`` nodes that answer every message at once, as a node's task would, without
    training (the server's benchmarks).

    It keeps one copy of the model, rebuilt from the messages as a node rebuilds its own
    (records.received_model), and builds each reply when it is pulled, so that no more
    replies exist at once than the strategy itself holds. A training reply carries what a
    node sends under ``uplink``: the received weights + seeded noise of standard deviation
    ``noise`` (fp32/fp16), or that update coded; an evaluation reply carries metrics only.
    """

    def __init__(
        self, num_nodes: int, uplink: str, *, block_size: int = QUANT_BLOCK_SIZE,
        noise: float = 1e-3,
    ) -> None:  # fmt: skip
        super().__init__(1000 + i for i in range(num_nodes))  # SUPERLINK_NODE_ID is 1
        self.uplink, self.block_size, self.noise = uplink, block_size, noise
        self.received: State = {}
        self.digest = ""
        self.served: Counter[str] = Counter()  # replies built, by message type

    def answer(self, msg: Message) -> RecordDict:
        config = msg.content[CONFIG]
        if str(config.get(MODEL_DIGEST, "")) != self.digest:  # every node holds one model
            self.hold(received_model(msg.content, self.received))
            self.digest = str(config.get(MODEL_DIGEST, ""))
        kind = msg.metadata.message_type
        self.served[kind] += 1
        if kind != MessageType.TRAIN:
            return RecordDict({METRICS: eval_metrics(100)})
        node, server_round = msg.metadata.dst_node_id, int(config[SERVER_ROUND])
        return self.train_content(seed=server_round * 100_003 + node)

    def hold(self, weights: State) -> None:
        """Answer from ``weights`` (the previous copy is dropped first)."""
        self.received = {}
        self.received = weights

    def train_content(self, seed: int) -> RecordDict:
        """What a node's training task would send back."""
        gen = torch.Generator().manual_seed(seed)
        local = {}
        for name, value in self.received.items():  # tensor by tensor: one noise at a time
            if value.is_floating_point():
                local[name] = torch.randn(value.shape, generator=gen).mul_(self.noise).add_(value)
            else:
                local[name] = value.clone()
        codec = ChangeCodec(self.uplink, self.block_size) if self.uplink in CODED else None
        record, _ = encode_uplink(local, self.received, self.uplink, codec=codec, seed=seed)
        del local
        return RecordDict({uplink_key(self.uplink): record, METRICS: train_metrics(100)})
