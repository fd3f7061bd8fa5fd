"""Hostile nodes, as Flower records: the attacks of :mod:`feddm_flower.fed.attacks` wrapped
around an honest node's task (the test app's nodes), and a federation of real nodes in this
process with colluders among them (the attack table's)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict

from feddm_flower.app.local_grid import LocalGrid, run_rounds
from feddm_flower.app.node_tasks import held_model, receive, run_task, uplink_codec
from feddm_flower.app.records import encode_uplink, from_record, payload_from, to_record, uplink_key
from feddm_flower.app.server_app import (
    architecture,
    build_strategy,
    fresh_model,
    last_check,
)
from feddm_flower.app.strategy import FedDMStrategy
from feddm_flower.config import RunConfig
from feddm_flower.evaluation.quality import global_loss, load_eval_inputs, probe_inputs
from feddm_flower.fed.aggregation import State
from feddm_flower.fed.attacks import answers, claimed_examples, hostile_weights, skips_training
from feddm_flower.fed.changes import CODED, decode_change
from feddm_flower.fed.codecs import schema_of
from feddm_flower.fed.timings import Stopwatch
from feddm_flower.protocol import (
    CONFIG,
    EVAL_EXAMPLES,
    EVAL_LOSS,
    EVALUATE_RECEIVED,
    METRICS,
    MODEL_DIGEST,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    SERVER_ROUND,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    TRAIN_STEPS,
    UPLINK,
)
from feddm_flower.task.finetune import load_trainable, trainable_state

FIRST_REPLY_KEY = "attack-first-reply"  # a stale replayer's round-1 weights, in context.state


def hostile_reply(attack: str, content: RecordDict, context: Context, honest: RecordDict | None):
    """The reply records of a hostile node for the train message ``content``: built from the
    honest reply ``honest`` (None for attacks that skip training; the node copy is then
    updated by :func:`~feddm_flower.app.node_tasks.receive`)."""
    config = content[CONFIG]
    uplink, server_round = str(config[UPLINK]), int(config[SERVER_ROUND])
    key = uplink_key(uplink)
    if honest is None:
        received, trained, examples = receive(content, context), None, 1.0
        metrics = {TRAIN_LOSS: 0.0, TRAIN_STEPS: 0, TRAIN_SECONDS: 0.0}
        if bool(config.get(EVALUATE_RECEIVED, False)):  # it claims a loss it never measured
            metrics.update({EVAL_LOSS: 0.0, EVAL_EXAMPLES: 1})
    else:
        received = held_model(context)
        if uplink in CODED:
            expected = schema_of(received)
            update = decode_change(payload_from(honest[key]), expected)
            trained = {k: v + update[k] if k in update else v for k, v in received.items()}
        else:
            trained = {k: v.float() if v.is_floating_point() else v
                       for k, v in from_record(honest[key]).items()}  # fmt: skip
        metrics = dict(honest[METRICS])
        examples = float(metrics[NUM_EXAMPLES])
    first = context.state.get(FIRST_REPLY_KEY)
    first = from_record(first) if isinstance(first, ArrayRecord) else None
    weights = hostile_weights(attack, received, trained, server_round, first)
    if attack == "stale-replay" and first is None:
        context.state[FIRST_REPLY_KEY] = to_record(weights)
    codec = uplink_codec(uplink, config) if uplink in CODED else None
    record, _ = encode_uplink(weights, received, uplink, codec=codec)
    metrics[NUM_EXAMPLES] = claimed_examples(attack, examples)
    return RecordDict({key: record, METRICS: MetricRecord(metrics)})


class AttackGrid(LocalGrid):
    """``num_nodes`` real nodes in this process (:func:`run_task` on their partitions); the
    first ``colluders`` run ``attack`` on training messages (all evaluate honestly). Replies
    come in the attack's order: fast attackers first, then the honest nodes, slow attackers
    last. Honest replies are cached in ``cache`` by (node, model digest, round, run-config):
    a cell that sends a node the same model as an earlier cell (every cell's round 1) gets the
    same reply without training again."""

    ordered = True
    _RANKS = {"first": 0, "in-turn": 1, "last": 2}

    def __init__(
        self, run_config: dict[str, Any], num_nodes: int, attack: str, colluders: int,
        cache: dict[tuple, RecordDict],
    ) -> None:  # fmt: skip
        super().__init__(range(10, 10 + num_nodes))
        self.contexts = {
            node: Context(
                1,
                node,
                {PARTITION_ID: i, NUM_PARTITIONS: num_nodes},
                RecordDict(),
                dict(run_config),
            )  # fmt: skip
            for i, node in enumerate(self.node_ids)
        }
        self.hostile = set(self.node_ids[:colluders]) if attack != "none" else set()
        self.attack, self.cache = attack, cache

    def rank(self, msg: Message) -> int:
        hostile = msg.metadata.dst_node_id in self.hostile
        return self._RANKS[answers(self.attack) if hostile else "in-turn"]

    def answer(self, msg: Message) -> RecordDict:
        node = msg.metadata.dst_node_id
        context = self.contexts[node]
        if msg.metadata.message_type != MessageType.TRAIN:  # evaluation: answered honestly
            return _task("evaluate", msg, context)
        honest = None
        if node not in self.hostile or not skips_training(self.attack):
            honest = self._honest(msg, context)
        if node not in self.hostile:
            return honest
        return hostile_reply(self.attack, msg.content, context, honest)

    def _honest(self, msg: Message, context: Context) -> RecordDict:
        config = msg.content[CONFIG]
        key = (context.node_id, str(config[MODEL_DIGEST]), int(config[SERVER_ROUND]),
               json.dumps(context.run_config, sort_keys=True))  # fmt: skip
        if key in self.cache:
            receive(msg.content, context)  # the node still keeps the model as its copy
            return self.cache[key]
        self.cache[key] = _task("train", msg, context)
        return self.cache[key]


def _task(kind: str, msg: Message, context: Context) -> RecordDict:
    """What the node's task ``kind`` sends back for ``msg`` (the nodes here stay in sync)."""
    status, content = run_task(kind, msg.content, context, Stopwatch(time.time()))
    assert status == "ok", content
    return content


@dataclass
class LocalRun:
    """A federation run in this process: its initial and final global weights, the final
    weights' server ``global-loss``, and the strategy (its history and ledger)."""

    initial: State
    final: State
    loss: float
    strategy: FedDMStrategy


def run_in_process(
    run_config: dict[str, Any], nodes: int, attack: str = "none", colluders: int = 0,
    cache: dict[tuple, RecordDict] | None = None,
) -> LocalRun:  # fmt: skip
    """``run_config`` (FashionMNIST) on ``nodes`` real nodes behind an :class:`AttackGrid`,
    with the server's real strategy, seeded start and last check."""
    cfg = RunConfig.from_mapping(run_config)
    unet = fresh_model(cfg, 1, 28, latent=False)
    initial = {k: v.clone() for k, v in trainable_state(unet).items()}
    inputs = load_eval_inputs(cfg, None)

    def loss_of(state: State, probe: bool = False) -> float:
        load_trainable(unet, state)
        return global_loss(unet, probe_inputs(inputs) if probe else inputs, cfg.seed)

    strategy = build_strategy(cfg, seeded_start=True, architecture=architecture(cfg, unet))
    strategy.dispatch.poll_interval = 0.0
    strategy.loss_check = last_check(cfg, loss_of, lambda state: loss_of(state, probe=True))
    grid = AttackGrid(run_config, nodes, attack, colluders, {} if cache is None else cache)
    final = run_rounds(strategy, grid, initial, cfg.num_server_rounds)
    return LocalRun(initial, final, loss_of(final), strategy)
