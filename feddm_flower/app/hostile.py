"""A hostile node's reply, as Flower records: the attacks of :mod:`feddm_flower.fed.attacks`
wrapped around an honest node's task (the attack table's nodes and the test app's)."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict

from feddm_flower.app.node_tasks import held_model, receive, uplink_codec
from feddm_flower.app.records import encode_uplink, from_record, payload_from, to_record, uplink_key
from feddm_flower.fed.attacks import claimed_examples, hostile_weights
from feddm_flower.fed.changes import CODED, decode_change
from feddm_flower.fed.codecs import schema_of
from feddm_flower.protocol import (
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    SERVER_ROUND,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    TRAIN_STEPS,
    UPLINK,
)

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
