"""Hostile clients as plain functions on weights: what the robustness tests and the attack
table (:mod:`feddm_flower.tools.attack_table`) send in place of an honest reply.

Each attack turns what a node received (and, for those that train, what honest training gave)
into the weights it replies with, the ``num-examples`` it claims and when it answers. Written
here because the attacks are defined by the threat model of this project (docs/robustness.md),
not by a library.
"""

from __future__ import annotations

import math

import torch

State = dict[str, torch.Tensor]

# What each attack does; the keys are the names the tests and the table use.
ATTACKS = {
    "fast-colluders": "skip training; received + one shared random step (std 10 per value), "
    "1e9 examples; answer first",
    "slow-colluders": "the same reply, answered after every honest node",
    "scaled": "honest update x 1e6, 1e9 examples",
    "count-lie": "honest update, 1e9 examples",
    "sign-flip": "honest update x -10",
    "non-finite": "honest weights with NaN and Inf values",
    "stale-replay": "from round 2 on, the node's round-1 weights again",
}
LIED_EXAMPLES = 1e9
COLLUDER_STD = 10.0
UPDATE_SCALE = 1e6
FLIP_SCALE = -10.0


def skips_training(attack: str) -> bool:
    """Whether the attack replies without training (so it can answer at once)."""
    return attack in ("fast-colluders", "slow-colluders")


def answers(attack: str) -> str:
    """When the attacker's reply arrives: 'first', 'last', or 'in-turn' (as honest ones do)."""
    return {"fast-colluders": "first", "slow-colluders": "last"}.get(attack, "in-turn")


def claimed_examples(attack: str, examples: float) -> float:
    """The ``num-examples`` the attacker claims, for ``examples`` real ones."""
    return LIED_EXAMPLES if attack in ("fast-colluders", "slow-colluders", "scaled",
                                       "count-lie") else examples  # fmt: skip


def colluders_step(like: State, server_round: int, seed: int = 0) -> State:
    """One random step per round, the same for every colluder: they agree on it in advance."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + server_round)
    return {k: torch.randn(v.shape, generator=gen) * COLLUDER_STD
            for k, v in like.items() if v.is_floating_point()}  # fmt: skip


def hostile_weights(
    attack: str,
    received: State,
    trained: State | None,
    server_round: int,
    first_reply: State | None = None,
) -> State:
    """The weights the attacker sends: from ``received`` (the global model it was sent),
    ``trained`` (honest local training from it; None for attacks that skip training) and
    ``first_reply`` (the weights it sent in round 1, for stale replays)."""
    if skips_training(attack):
        step = colluders_step(received, server_round)
        return {k: v + step[k] if k in step else v for k, v in received.items()}
    assert trained is not None, f"{attack} needs honest training first"
    if attack in ("scaled", "sign-flip"):
        scale = UPDATE_SCALE if attack == "scaled" else FLIP_SCALE
        return {k: received[k] + scale * (v - received[k]) if v.is_floating_point() else v
                for k, v in trained.items()}  # fmt: skip
    if attack == "non-finite":
        broken = {k: v.clone() for k, v in trained.items()}
        floats = [k for k, v in broken.items() if v.is_floating_point()]
        broken[floats[0]].view(-1)[0] = math.nan
        broken[floats[-1]].view(-1)[-1] = math.inf
        return broken
    if attack == "stale-replay" and first_reply is not None and server_round > 1:
        return first_reply
    return trained  # count-lie, and a stale replay's honest first round
