"""Coded changes: the one place that turns an update into a payload and back, whichever
codec a direction uses (the dense block codec of codecs.py or the sparse one of sparse.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from feddm_flower.config import QUANT_BLOCK_SIZE, SPARSE_BITS, SPARSE_FRACTION
from feddm_flower.fed.codecs import CODEC_BITS, decode_update, encode_update
from feddm_flower.fed.sparse import decode_sparse, encode_sparse, is_sparse

# Uplinks and downlinks that send coded changes rather than weights.
CODED = (*CODEC_BITS, "sparse")
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ChangeCodec:
    """How a direction codes a change: ``kind`` int8/int4 (every value, block-quantized) or
    sparse (the ``fraction`` largest values of each tensor, quantized to ``sparse_bits``);
    ``block_size`` values per scale; ``lossless``: the values' zstd stage; ``stochastic``:
    unbiased rounding (int8/int4 only)."""

    kind: str
    block_size: int = QUANT_BLOCK_SIZE
    lossless: bool = False
    stochastic: bool = False
    fraction: float = SPARSE_FRACTION
    sparse_bits: int = SPARSE_BITS

    def __post_init__(self) -> None:
        if self.kind not in CODED:
            raise ValueError(f"codec {self.kind!r}: allowed is one of {CODED}")

    @classmethod
    def from_config(cls, kind: str, config: Mapping[str, object]) -> ChangeCodec:
        """The codec ``kind`` with the options a run-config or message config sets
        (``quant-block-size``, ``lossless``, ``quant-stochastic``, ``sparse-fraction``,
        ``sparse-bits``); a missing key keeps its default."""
        return cls(
            kind,
            block_size=int(config.get("quant-block-size", QUANT_BLOCK_SIZE)),
            lossless=bool(config.get("lossless", False)),
            stochastic=bool(config.get("quant-stochastic", False)),
            fraction=float(config.get("sparse-fraction", SPARSE_FRACTION)),
            sparse_bits=int(config.get("sparse-bits", SPARSE_BITS)),
        )

    def encode(self, update: Mapping[str, torch.Tensor], seed: int | None = None) -> bytes:
        """``update`` as one payload (``seed``: stochastic rounding's noise)."""
        options = {"block_size": self.block_size, "lossless": self.lossless}
        if self.kind == "sparse":
            return encode_sparse(update, fraction=self.fraction, bits=self.sparse_bits, **options)
        bits = CODEC_BITS[self.kind]
        return encode_update(update, bits=bits, stochastic=self.stochastic, seed=seed, **options)


def decode_change(
    payload: bytes, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
) -> State:
    """The update a payload of either codec holds (by its magic), checked against the
    ``expected`` names, shapes and dtypes; CodecError if it is malformed."""
    if is_sparse(payload):
        return decode_sparse(payload, expected)
    return decode_update(payload, expected)
