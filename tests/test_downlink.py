"""The downlink: every node's copy equals the server's reference bit for bit, whatever it
missed, and a node that cannot rebuild it is resent the full model."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.serverapp.strategy import FedAdam

from feddm_flower.app.dispatch import Architecture
from feddm_flower.app.local_grid import LocalGrid, eval_metrics, train_metrics
from feddm_flower.app.records import (
    NO_BASE,
    OUT_OF_SYNC,
    downlink_content,
    encode_uplink,
    message_bytes,
    payloads_from,
    payloads_record,
    received_model,
    to_record,
    uplink_key,
)
from feddm_flower.app.strategy import FedDMStrategy
from feddm_flower.fed.changes import ChangeCodec, decode_change
from feddm_flower.fed.downlink import DOWNLINKS, Delivery, ModelChain, OutOfSync, digest
from feddm_flower.protocol import BASE, CHANGE, CONFIG, METRICS, SERVER_ROUND

pytestmark = pytest.mark.usefixtures("server_identity")


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": scale * torch.randn(64, 40, generator=g),
        "b": scale * torch.randn(9, generator=g),
        "steps": torch.tensor([seed]),
    }


START = _state(0)


def _moved(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    step = _state(seed, scale=0.01)
    return {k: v + step[k] if v.is_floating_point() else step[k] for k, v in state.items()}


def _content(chain: ModelChain, held: str | None, full: bool = False) -> RecordDict:
    """The message the strategy sends a node it believes holds ``held`` (``full``: resent)."""
    record = to_record(chain.ref, "fp16" if chain.downlink == "fp16" else "fp32")
    delivery = Delivery("full") if full else chain.plan(held)
    return downlink_content(delivery, chain.digest, ConfigRecord({"x": 1}), record)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("downlink", DOWNLINKS)
def test_nodes_rebuild_the_reference_bit_for_bit_over_rounds_skips_and_a_restart(
    downlink: str,
) -> None:
    """Eight rounds; node 3 takes part every third round only, node 2 restarts with an empty
    state in round 5 (the server still believes it holds the model). After every message the
    node's weights equal the server's reference bit for bit."""
    chain = ModelChain(downlink, block_size=16)
    chain.start(START, nodes_have_it=True)
    copies: dict[int, dict[str, torch.Tensor] | None] = dict.fromkeys(range(4))
    server_view: dict[int, str] = {}
    kinds: dict[tuple[int, int], str] = {}
    global_state = START
    for rnd in range(1, 9):
        global_state = _moved(global_state, rnd)
        assert chain.update(global_state) and not chain.update(global_state)
        if rnd == 5:
            copies[2] = None
        for node in [n for n in range(4) if n != 3 or rnd % 3 == 0]:
            kinds[rnd, node] = chain.plan(server_view.get(node)).kind
            held = copies[node] or START  # no copy: the node rebuilds the seeded start
            try:
                weights = received_model(_content(chain, server_view.get(node)), held)
            except OutOfSync:
                assert (rnd, node) == (5, 2)
                weights = received_model(_content(chain, None, full=True), held)  # resent
                kinds[rnd, node] = "full"
            assert _equal(weights, chain.ref) and digest(weights) == chain.digest
            copies[node], server_view[node] = weights, chain.digest
    fp = downlink in ("fp32", "fp16")
    assert kinds[1, 0] == ("full" if fp else "change")  # seeded start: a change of it
    assert kinds[6, 3] == ("full" if fp else "change")  # three versions behind: a chain
    assert kinds[5, 2] == "full"  # the restarted node (under a codec after its error)
    assert chain.plan(server_view[0]).kind == "current"


@pytest.mark.parametrize(("downlink", "qmax"), [("int8", 127), ("int4", 7)])
def test_server_error_feedback_keeps_the_reference_within_one_step(
    downlink: str, qmax: int
) -> None:
    """The same small move every round for 20 rounds: the reference stays within half a
    quantization step of the global model (rounding each move alone would drift)."""
    chain = ModelChain(downlink, block_size=16)
    chain.start(START, nodes_have_it=False)
    step = _state(99, scale=0.01)
    global_state = dict(START)
    for _ in range(20):
        global_state = {k: v + step[k] if v.is_floating_point() else v
                        for k, v in global_state.items()}  # fmt: skip
        chain.update(global_state)
    for k in ("w", "b"):
        error = (global_state[k] - chain.ref[k]).abs().max()
        assert error <= 0.5 * 1.02 * step[k].abs().max() / qmax + 1e-6


def test_sparse_downlink_carries_what_it_did_not_send() -> None:
    """The same move every round, 10% of each tensor sent: with the server's residual the
    reference keeps up (every value is sent once its residual is large enough), while
    sending each round's top 10% of the move alone would leave 90% of the values behind."""
    chain = ModelChain("sparse", block_size=16, fraction=0.1, sparse_bits=8)
    chain.start(START, nodes_have_it=False)
    step = _state(99, scale=0.01)
    alone = ModelChain("sparse", block_size=16, fraction=0.1, sparse_bits=8).codec
    no_feedback = dict(START)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in START.items()}
    global_state = dict(START)
    for _ in range(40):
        global_state = {k: v + step[k] if v.is_floating_point() else v
                        for k, v in global_state.items()}  # fmt: skip
        chain.update(global_state)
        sent = decode_change(alone.encode(step), expected)
        no_feedback = {k: v + sent[k] if v.is_floating_point() else v
                       for k, v in no_feedback.items()}  # fmt: skip
    for k in ("w", "b"):
        error = (global_state[k] - chain.ref[k]).abs().max()
        assert error <= 12 * step[k].abs().max()  # about 1 / fraction rounds of one value
        assert (global_state[k] - no_feedback[k]).abs().max() > 3 * error


def test_a_chain_longer_than_the_model_is_replaced_by_the_full_model() -> None:
    chain = ModelChain("int8", block_size=16)
    chain.start(START, nodes_have_it=False)
    old, global_state = chain.digest, START
    for rnd in range(1, 6):
        global_state = _moved(global_state, rnd)
        chain.update(global_state)
        delivery = chain.plan(old)
        # Each int8 change is about a quarter of the fp32 model: four make it dearer.
        assert delivery.kind == ("change" if rnd < 4 else "full"), rnd
    assert chain.plan(None).kind == "full"  # no seeded start: a node with no copy


def test_a_node_out_of_sync_is_refused_not_silently_drifting() -> None:
    chain = ModelChain("int8", block_size=16)
    chain.start(START, nodes_have_it=True)
    chain.update(_moved(START, 1))
    content = _content(chain, None)
    wrong = _moved(START, 7)
    with pytest.raises(OutOfSync, match="holds model"):
        received_model(content, wrong)
    [payload] = payloads_from(content[CHANGE])
    flipped = bytearray(payload)
    flipped[-1] ^= 0x40  # one level of the change
    content[CHANGE] = payloads_record((bytes(flipped),))
    with pytest.raises(OutOfSync, match="rebuilt model"):
        received_model(content, START)
    content[CHANGE] = payloads_record((b"FDMQ",))
    with pytest.raises(OutOfSync, match="does not decode"):
        received_model(content, START)


# --------------------------------------------------- the strategy's real loop, fake nodes


class SyncGrid(LocalGrid):
    """Nodes that rebuild the model from each message exactly as client_app does
    (records.received_model over their own copy, none: the seeded start) and answer with
    received + a small seeded update, or an OUT_OF_SYNC error. ``corrupt`` flips a level in
    the change a node is sent (once per entry); ``restart`` empties a node's copy."""

    def __init__(self, nodes: Iterable[int], uplink: str = "fp32") -> None:
        super().__init__(nodes)
        self.uplink, self.scaled = uplink, set()  # nodes that scale their update a millionfold
        self.sizes: dict[tuple[int, str, int], int] = {}  # (round, direction, node) -> bytes
        self.copies: dict[int, dict[str, torch.Tensor] | None] = dict.fromkeys(self.node_ids)
        self.corrupt: set[tuple[int, int, str]] = set()  # (round, node, message type)
        self.errors: list[tuple[int, str]] = []
        self.chains: list[int] = []  # changes per message that carried changes

    def answer(self, msg: Message) -> RecordDict | Error:
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        content = msg.content
        rnd = int(content[CONFIG][SERVER_ROUND])
        down = (rnd, "down", node)
        self.sizes[down] = self.sizes.get(down, 0) + message_bytes(content)
        reply = self._answer_content(node, kind, content, rnd)
        if not isinstance(reply, Error):
            up = (rnd, "up", node)
            self.sizes[up] = self.sizes.get(up, 0) + message_bytes(reply)
        return reply

    def _answer_content(
        self, node: int, kind: str, content: RecordDict, rnd: int
    ) -> RecordDict | Error:
        if (rnd, node, kind) in self.corrupt and CHANGE in content:
            self.corrupt.discard((rnd, node, kind))
            payloads = payloads_from(content[CHANGE])
            payloads[-1] = payloads[-1][:-1] + bytes([payloads[-1][-1] ^ 0x40])
            content = RecordDict({**content, CHANGE: payloads_record(tuple(payloads))})
        if CHANGE in content:
            self.chains.append(len(content[CHANGE]))
        try:
            weights = received_model(content, self.copies[node] or START)
        except OutOfSync as exc:
            self.copies[node] = None
            self.errors.append((node, str(exc)))
            return Error(OUT_OF_SYNC, str(exc))
        self.copies[node] = weights
        if kind != "train":
            return RecordDict({METRICS: eval_metrics(10)})
        local = _moved(weights, 1000 * rnd + node)
        local["steps"] = weights["steps"]
        if node in self.scaled:
            local = {k: weights[k] + 1e6 * (v - weights[k]) if v.is_floating_point() else v
                     for k, v in local.items()}  # fmt: skip
        if self.uplink == "fp32":
            record = to_record(local)
        else:
            codec = ChangeCodec(self.uplink, 16, fraction=0.1, sparse_bits=4)
            record, _ = encode_uplink(local, weights, self.uplink, codec=codec)
        return RecordDict({uplink_key(self.uplink): record, METRICS: train_metrics(10)})


def test_the_strategy_keeps_nodes_in_sync_and_resends_the_full_model_when_they_are_not() -> None:
    """Six rounds of the real FedDMStrategy loop (int8 down, FedAdam, 3 of 5 nodes sampled
    to train, 2 to evaluate) with fake nodes: a corrupted change in round 3 and a node
    restarted after round 3 each get one OUT_OF_SYNC error and then the full model; nodes
    that skipped rounds catch up by a chain of changes; every round aggregates every sampled
    node; every node holds exactly what the server believes, bit for bit."""
    grid = SyncGrid(range(10, 15))
    strategy = FedDMStrategy(
        optimizer=FedAdam(eta=0.01),
        uplink="fp32",
        downlink="int8",
        codec={"quant-block-size": 16},
        fraction_train=0.6,
        fraction_evaluate=0.4,
        min_nodes=2,
        seeded_start=True,
        poll_interval=0.0,
    )
    grid.corrupt.update((3, n, kind) for n in range(10, 15) for kind in ("train", "evaluate"))
    rounds_seen: list[int] = []

    def check(server_round: int, arrays: ArrayRecord) -> None:
        if server_round == 3:
            grid.copies[12] = None  # node 12 restarts with an empty state
        for node, copy in grid.copies.items():
            if copy is not None and strategy.dispatch.held.get(node) == strategy.chain.digest:
                assert _equal(copy, strategy.chain.ref), (server_round, node)
        rounds_seen.append(server_round)

    result = strategy.start(grid, ArrayRecord(START), num_rounds=6, evaluate_fn=check)
    assert rounds_seen == [0, 1, 2, 3, 4, 5, 6] and len(result.arrays) == 3
    history = strategy.history
    out_of_sync = [(r, e["node"]) for r in history for e in history[r].get("out-of-sync", [])]
    corrupted = [n for r, n in out_of_sync if r == 3]
    assert corrupted and len(corrupted) == len(grid.errors) - 1  # + node 12 once, later
    assert [n for r, n in out_of_sync if r > 3] == ["12"]
    full = {(r, e["node"]) for r in history for e in history[r].get("downlink-full", [])}
    assert set(out_of_sync) <= full  # each out-of-sync node got the full model
    assert all("rejected" not in history[r] and "missing" not in history[r] for r in history)
    assert max(grid.chains) >= 2  # a node that skipped rounds got a chain of changes
    for node, copy in grid.copies.items():  # every node answered its last message
        assert copy is not None and strategy.dispatch.held[node] == digest(copy)
    # The 2 nodes sampled to evaluate in round 6 hold its new model; the others an older one.
    assert sum(_equal(c, strategy.chain.ref) for c in grid.copies.values()) == 2
    # The global model is not the reference, only within a quantization step of it.
    final = result.arrays.to_torch_state_dict()
    assert not torch.equal(final["w"], strategy.chain.ref["w"])
    assert (final["w"] - strategy.chain.ref["w"]).abs().max() < 0.01


def test_an_evaluate_message_after_training_carries_only_the_change() -> None:
    grid = SyncGrid([11, 12])
    strategy = FedDMStrategy(downlink="int4", codec={"quant-block-size": 64},
                             seeded_start=True, fraction_evaluate=1.0,
                             poll_interval=0.0)  # fmt: skip
    strategy.start(grid, ArrayRecord(START), num_rounds=2)
    fp32 = to_record(START).count_bytes()
    ledger = strategy.book.ledger
    for rnd in (1, 2):
        per_node = ledger.per_node(rnd, "down")
        # train: nothing but the config; evaluate: one int4 change (~1/8 of the model).
        assert all(b < fp32 / 5 for b in per_node.values()), per_node
    assert not grid.errors and grid.chains == [1, 1, 1, 1]  # evaluate messages only


def test_sparse_both_ways_is_accounted_exactly_and_a_scaled_reply_is_bounded() -> None:
    """Sparse uplink and downlink over three rounds of the real strategy loop: the ledger
    holds, per round, direction and node, exactly the bytes of the messages and replies; the
    nodes stay in sync; a node that scales its sparse update a millionfold moves the model
    no further than an honest one (the norm bound applies to the decoded update)."""
    grid = SyncGrid([10, 11, 12, 13], uplink="sparse")
    grid.scaled.add(10)
    codec = {"quant-block-size": 16, "sparse-fraction": 0.1, "sparse-bits": 4}
    strategy = FedDMStrategy(uplink="sparse", downlink="sparse", codec=codec,
                             seeded_start=True, poll_interval=0.0)  # fmt: skip
    result = strategy.start(grid, ArrayRecord(START), num_rounds=3)
    for (rnd, direction, node), size in grid.sizes.items():
        assert strategy.book.ledger.per_node(rnd, direction)[node] == size, (rnd, direction, node)
    assert {k[:2] for k in grid.sizes} == {(r, d) for r in (1, 2, 3) for d in ("down", "up")}
    assert not grid.errors and max(grid.chains) == 1
    fp32 = to_record(START).count_bytes()
    # A round's train messages carry one change; the last round's final evaluation another.
    assert all(size < fp32 / 10 for (rnd, *_), size in grid.sizes.items() if rnd < 3)
    assert all(size < 2 * fp32 / 10 for size in grid.sizes.values())
    final = result.arrays.to_torch_state_dict()
    honest_move = 3 * 0.01 * max(v.abs().max() for k, v in _state(1).items() if k != "steps")
    assert (final["w"] - START["w"]).abs().max() <= 2 * honest_move


class AlwaysOutOfSync(SyncGrid):
    """Node 11 answers every message with OUT_OF_SYNC, full model or not (a hostile node)."""

    def answer(self, msg: Message) -> RecordDict | Error:
        if msg.metadata.dst_node_id == 11:
            self.errors.append((11, "always"))
            return Error(OUT_OF_SYNC, "model out of sync: always")
        return super().answer(msg)


def test_a_node_that_always_claims_out_of_sync_gets_one_resend_per_phase() -> None:
    """It cannot make the server resend without end: one full model per phase, then its
    error is an ordinary rejected reply and the round goes on with the others."""
    grid = AlwaysOutOfSync([11, 12, 13])
    strategy = FedDMStrategy(downlink="int8", codec={"quant-block-size": 16},
                             seeded_start=True, fraction_evaluate=1.0,
                             poll_interval=0.0)  # fmt: skip
    result = strategy.start(grid, ArrayRecord(START), num_rounds=2)
    assert len(result.arrays) == 3 and len(grid.errors) == 2 * 2 * 2  # 2 rounds x 2 phases x 2
    for rnd in (1, 2):
        history = strategy.history[rnd]
        assert [e["node"] for e in history["out-of-sync"]] == ["11", "11"]
        assert [(r["node"], r["phase"]) for r in history["rejected"]] == [
            ("11", "train"),
            ("11", "evaluate"),
        ]
    assert len(result.train_metrics_clientapp) == 2  # nodes 12 and 13 carried both rounds
    assert 11 not in strategy.dispatch.held
    assert strategy.dispatch.held[12] == strategy.dispatch.held[13] == strategy.chain.digest


class AlwaysNoBase(SyncGrid):
    """Node 11 answers every message with NO_BASE, base attached or not (a hostile node)."""

    def __init__(self, nodes: Iterable[int]) -> None:
        super().__init__(nodes)
        self.bases_sent = 0

    def answer(self, msg: Message) -> RecordDict | Error:
        self.bases_sent += BASE in msg.content
        if msg.metadata.dst_node_id == 11:
            self.errors.append((11, "no base"))
            return Error(NO_BASE, "the node holds no base model: always")
        return super().answer(msg)


def test_a_node_that_always_claims_no_base_gets_the_base_once_per_run() -> None:
    """The base (143 MB on the paper U-Net) goes to a node once in a run, however often it
    asks: later claims are ordinary rejected replies, so it cannot make the server resend it
    every round; the bytes-base-down metric counts the one copy."""
    grid = AlwaysNoBase([11, 12, 13])
    base = _state(5)
    architecture = Architecture(base=base, base_digest=digest(base))
    strategy = FedDMStrategy(downlink="int8", codec={"quant-block-size": 16},
                             seeded_start=True, poll_interval=0.0,
                             architecture=architecture)  # fmt: skip
    result = strategy.start(grid, ArrayRecord(START), num_rounds=3)
    assert len(result.arrays) == 3 and grid.bases_sent == 1
    assert len(grid.errors) == 3 + 1 + 1  # every train message, the final evaluation, a resend
    history = strategy.history
    assert [e["node"] for r in history for e in history[r].get("out-of-sync", [])] == ["11"]
    assert sum(history[r].get("bytes-base-down", 0) for r in history) == (
        to_record(base).count_bytes()
    )
    for rnd in (1, 2, 3):
        phases = ["train", "evaluate"] if rnd == 3 else ["train"]
        assert [(r["node"], r["phase"]) for r in history[rnd]["rejected"]] == [
            ("11", phase) for phase in phases
        ]
    assert len(result.train_metrics_clientapp) == 3  # nodes 12 and 13 carried every round
