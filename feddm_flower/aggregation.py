"""Server-side math on client results: reply checks and the fp32 weighted mean."""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


class InvalidReply(ValueError):
    """A client reply that must not reach the global model; the message says why."""


def check_like(tensors: State, reference: State) -> None:
    """Raise :class:`InvalidReply` unless ``tensors`` has exactly ``reference``'s names and
    shapes and only finite values."""
    missing = sorted(reference.keys() - tensors.keys())
    extra = sorted(tensors.keys() - reference.keys())
    if missing or extra:
        raise InvalidReply(f"tensor names differ: missing {missing[:3]}, extra {extra[:3]}")
    for name, ref in reference.items():
        t = tensors[name]
        if t.shape != ref.shape:
            raise InvalidReply(f"{name}: shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidReply(f"{name}: non-finite values")


def weighted_mean(states: list[State], weights: list[float]) -> State:
    """Per-name mean of ``states`` weighted by ``weights``, accumulated in fp32.

    Non-float tensors (counters) are taken from the first state.
    """
    if not states or len(states) != len(weights):
        raise ValueError("need one positive weight per state, and at least one state")
    total = float(sum(weights))
    out: State = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float32)
        for state, w in zip(states, weights, strict=True):
            acc.add_(state[name].float(), alpha=w / total)
        out[name] = acc
    return out
