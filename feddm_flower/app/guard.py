"""The reply guard's record checks: what a reply must hold before its numbers are used.

Written here, not taken from Flower: Flower's strategies validate a reply by raising on the
first bad one, which would end the round; the guard rejects one reply and the round goes on.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from feddm_flower.app.records import decode_uplink, uplink_key
from feddm_flower.fed.aggregation import (
    Contribution,
    InvalidReply,
    State,
    check_examples,
    clip_update,
    update_norm,
)
from feddm_flower.protocol import (
    ARRAYS,
    EVAL_EXAMPLES,
    EVAL_METRICS,
    METRICS,
    NUM_EXAMPLES,
    TRAIN_METRICS,
)


def check_records(msg: Message, expected: set[str]) -> None:
    """:class:`InvalidReply` unless ``msg`` is no error and holds exactly the records
    ``expected``, of which exactly one MetricRecord, named 'metrics'."""
    if msg.has_error():
        raise InvalidReply(f"client error: {msg.error.reason}")
    names = set(msg.content.keys())
    if names != expected:
        raise InvalidReply(f"records {sorted(names)}, expected {sorted(expected)}")
    # Not content.metric_records: its view keeps the reply alive in a reference cycle.
    metric_records = [k for k, v in msg.content.items() if isinstance(v, MetricRecord)]
    if metric_records != [METRICS]:
        raise InvalidReply("expected exactly one MetricRecord, named 'metrics'")


def read_metrics(content: RecordDict, keys: tuple[str, ...]) -> tuple[float, dict[str, float]]:
    """The reply's weight (``num-examples``, checked) and its finite numbers ``keys``."""
    record = content.get(METRICS)
    if not isinstance(record, MetricRecord):
        raise InvalidReply("no MetricRecord 'metrics'")
    weight = check_examples(record.get(NUM_EXAMPLES))
    metrics = {}
    for key in keys:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidReply(f"metric {key}={value!r} is missing or not a number")
        if not np.isfinite(value):
            raise InvalidReply(f"metric {key}={value!r} is not finite")
        metrics[key] = float(value)
    return weight, metrics


def contribution(
    msg: Message,
    uplink: str,
    reference: State,
    clip_norm: float | None = None,
    evaluated: bool = False,
) -> Contribution:
    """A training reply as its fp32 update against ``reference`` (the model the node trained
    from), weight, norm and metrics; :class:`InvalidReply` with the reason if any part of it
    is unusable. With ``clip_norm`` (DP) the update is clipped here, whatever the client did,
    and the weight is 1. ``evaluated``: the node was asked for the received model's
    ``eval-loss`` and its ``eval-examples`` (checked as a weight), which join the metrics."""
    key = uplink_key(uplink)
    check_records(msg, {key, METRICS})
    weight, metrics = read_metrics(msg.content, TRAIN_METRICS + (EVAL_METRICS if evaluated else ()))
    if evaluated:
        examples = msg.content[METRICS].get(EVAL_EXAMPLES)
        metrics[EVAL_EXAMPLES] = check_examples(examples, EVAL_EXAMPLES)
    update = decode_uplink(msg.content[key], uplink, reference)
    if clip_norm is not None:
        clip_update(update, clip_norm)
        weight = 1.0
    return Contribution(weight, update, update_norm(update), metrics)


def evaluation(msg: Message) -> RecordDict:
    """An evaluation reply's checked metrics, weighted by its ``num-examples``;
    :class:`InvalidReply` with the reason if they are unusable."""
    check_records(msg, {METRICS})
    weight, metrics = read_metrics(msg.content, EVAL_METRICS)
    return metrics_reply(metrics, weight)


def metrics_reply(metrics: dict[str, float], weight: float) -> RecordDict:
    """Checked ``metrics`` with their weight, as Flower's metric aggregation takes them."""
    return RecordDict({METRICS: MetricRecord({**metrics, NUM_EXAMPLES: weight})})


def metric_replies(
    accepted: list[tuple[dict[str, float], float]],
) -> tuple[list[RecordDict], list[RecordDict]]:
    """The accepted training replies' checked (metrics, weight) as Flower's metric
    aggregation takes them: their training metrics, and the evaluations of the received
    model that came with them, weighted by ``eval-examples``."""
    train, evaluations = [], []
    for metrics, weight in accepted:
        train.append(metrics_reply({k: metrics[k] for k in TRAIN_METRICS}, weight))
        if EVAL_EXAMPLES in metrics:
            evaluation = {k: metrics[k] for k in EVAL_METRICS}
            evaluations.append(metrics_reply(evaluation, metrics[EVAL_EXAMPLES]))
    return train, evaluations


def as_reply(state: State, weight: float) -> Message:
    """``state`` as the kind of training reply Flower's strategies aggregate (from no node:
    the server itself stands behind the aggregate it hands to Flower's rules)."""
    content = RecordDict(
        {ARRAYS: ArrayRecord(state), METRICS: MetricRecord({NUM_EXAMPLES: weight})}
    )
    metadata = Metadata(
        run_id=0,
        message_id="",
        src_node_id=0,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=0.0,
        message_type=MessageType.TRAIN,
    )
    return Message(metadata=metadata, content=content)
