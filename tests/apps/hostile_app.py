"""Test-only FedDM ClientApp: the node with partition-id 0 is hostile, the others honest.

Its mod lets the real ``client_app.train`` run, then scales the update 1e6 times (weights:
received + 1e6 x (local - received); codec uplinks: the decoded update x 1e6, re-encoded) and
claims 1e9 times its examples: finite, well-formed and hostile.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from feddm_flower import client_app, node_tasks
from feddm_flower.codecs import decode_update
from feddm_flower.records import CODEC_BITS, encode_uplink, from_record, payload_from, uplink_key

UPDATE_SCALE = 1e6
EXAMPLES_SCALE = 1e9


def hostile(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    if context.node_config["partition-id"] != 0 or msg.metadata.message_type != "train":
        return reply
    config = msg.content["config"]
    uplink = str(config["uplink"])
    key = uplink_key(uplink)
    # What the node trained from: its copy of the global model, as the real train() kept it.
    received = from_record(context.state[node_tasks.MODEL_KEY])
    if uplink in CODEC_BITS:
        update = decode_update(payload_from(reply.content[key]))
    else:
        local = from_record(reply.content[key])
        update = {k: v.float() - received[k] for k, v in local.items()}
    scaled = {k: received[k] + UPDATE_SCALE * update[k] for k in received}
    block_size = int(config.get("quant-block-size", 256))
    record, _ = encode_uplink(scaled, received, uplink, block_size=block_size)
    metrics = MetricRecord(dict(reply.content["metrics"]))
    metrics["num-examples"] = metrics["num-examples"] * EXAMPLES_SCALE
    return Message(RecordDict({key: record, "metrics": metrics}), reply_to=msg)


app = ClientApp(mods=[hostile])
app.train()(client_app.train)
app.evaluate()(client_app.evaluate)
