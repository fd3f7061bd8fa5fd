"""Test-only FedDM ClientApp: the nodes with partition-id < HOSTILE run ATTACK, the others
are honest. Both come from ``attack_config.py`` beside this file, which the test writes.

The mod lets the real ``client_app.train`` run (unless the attack skips training), then
replaces the reply with the hostile one of :func:`feddm_flower.app.hostile.hostile_reply`:
finite or not, well-formed and hostile, as :mod:`feddm_flower.fed.attacks` describes.
"""

from __future__ import annotations

import time

from attack_config import ATTACK, HOSTILE
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from feddm_flower.app import client_app
from feddm_flower.app.hostile import hostile_reply
from feddm_flower.fed.attacks import answers, skips_training

SLOW_SECONDS = 3.0  # a slow attacker answers after the honest nodes of a tiny test run


def hostile(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type != "train" or context.node_config["partition-id"] >= HOSTILE:
        return call_next(msg, context)
    honest = None
    if not skips_training(ATTACK):
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        honest = reply.content
    elif answers(ATTACK) == "last":
        time.sleep(SLOW_SECONDS)
    return Message(hostile_reply(ATTACK, msg.content, context, honest), reply_to=msg)


app = ClientApp(mods=[hostile])
app.train()(client_app.train)
app.evaluate()(client_app.evaluate)
