"""The ClientApp's update encoding: error feedback carries the quantization residual exactly."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, RecordDict

from feddm_flower.client_app import RESIDUAL_KEY, _encoded_update
from feddm_flower.codecs import decode_update
from feddm_flower.records import payload_from


def _config(feedback: bool) -> ConfigRecord:
    return ConfigRecord(
        {
            "quant-bits": 4,
            "quant-block-size": 8,
            "quant-stochastic": False,
            "error-feedback": feedback,
        }
    )


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_error_feedback_residual_is_carried_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    received = {"w": torch.randn(5, 7, generator=g)}
    context = _context()
    true_total = torch.zeros(5, 7)
    sent_total = torch.zeros(5, 7)
    for _ in range(4):
        local = {"w": received["w"] + 0.01 * torch.randn(5, 7, generator=g)}
        record = _encoded_update(local, received, _config(True), context, seed=0)
        sent = decode_update(payload_from(record))["w"]
        true_total += local["w"] - received["w"]
        sent_total += sent
        residual = context.state[RESIDUAL_KEY].to_torch_state_dict()["w"]
        # Everything not yet sent is exactly the residual kept for the next round.
        torch.testing.assert_close(sent_total + residual, true_total, rtol=0, atol=1e-6)
    assert residual.abs().max() > 0


def test_without_error_feedback_no_state_is_kept() -> None:
    received = {"w": torch.zeros(3)}
    context = _context()
    _encoded_update({"w": torch.ones(3)}, received, _config(False), context, seed=0)
    assert RESIDUAL_KEY not in context.state
