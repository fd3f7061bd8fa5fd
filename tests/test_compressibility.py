"""The compressors `bench compressibility` compares the codecs against."""

from __future__ import annotations

import torch

from feddm_flower.tools.compressibility import low_rank, sign_blocks


def test_sign_and_low_rank_compressors() -> None:
    x = torch.tensor([1.0, -3.0, 2.0, 0.0, 5.0])
    assert torch.equal(sign_blocks(x, block=2), torch.tensor([2.0, -2.0, 1.0, 0.0, 5.0]))
    m = torch.outer(torch.arange(1.0, 5.0), torch.arange(1.0, 4.0)).reshape(4, 3, 1, 1)
    approx, sent = low_rank(m + 0.0, 1)
    torch.testing.assert_close(approx, m)  # a rank-1 matrix survives rank 1
    assert sent == 4 + 3
    bias = torch.randn(7)
    assert low_rank(bias, 1) == (bias, 7)
