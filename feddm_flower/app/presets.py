"""The paper's strategies as named presets of :class:`FedDMStrategy`: a choice of client
objective and uplink, nothing else (every other part stays free to combine)."""

from __future__ import annotations

from feddm_flower.app.strategy import FedDMStrategy
from feddm_flower.config import QUANT_BLOCK_SIZE


class FedDMVanilla(FedDMStrategy):
    """FedDM-vanilla: FedAvg of fp32 weights."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**{"proximal_mu": 0.0, "uplink": "fp32", **kwargs})


class FedDMProx(FedDMStrategy):
    """FedDM-prox: clients add (mu/2)·‖w − w_global‖² against a detached copy of the
    received weights."""

    def __init__(self, *, proximal_mu: float = 0.01, **kwargs: object) -> None:
        super().__init__(proximal_mu=proximal_mu, **{"uplink": "fp32", **kwargs})


class FedDMQuant(FedDMStrategy):
    """FedDM-quant: clients send int8 or int4 block-quantized updates."""

    def __init__(
        self, *, bits: int = 8, block_size: int = QUANT_BLOCK_SIZE, **kwargs: object
    ) -> None:
        codec = {"quant-block-size": block_size, "quant-stochastic": False,
                 "error-feedback": False, **kwargs.pop("codec", {})}  # fmt: skip
        super().__init__(uplink=f"int{bits}", codec=codec, **kwargs)
