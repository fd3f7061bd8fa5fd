"""Model presets build real diffusers U-Nets of the documented sizes."""

from __future__ import annotations

import pytest
import torch

from feddm_flower.models import build_unet, count_parameters, unet_config

# Parameter counts documented in the README (preset, pixels, channels) -> millions, +-5 %.
DOCUMENTED_MILLIONS = {
    ("tiny", 28, 1): 0.267,
    ("paper", 28, 1): 25.8,
    ("paper", 32, 3): 35.7,
    ("paper", 64, 3): 78.7,
}


@pytest.mark.parametrize(("preset", "size", "channels"), sorted(DOCUMENTED_MILLIONS))
def test_preset_shapes_and_sizes(preset: str, size: int, channels: int) -> None:
    unet = build_unet(preset, size, channels)
    millions = count_parameters(unet) / 1e6
    assert millions == pytest.approx(DOCUMENTED_MILLIONS[preset, size, channels], rel=0.05)
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        out = unet(x, torch.tensor([0, 999])).sample
    assert out.shape == x.shape


def test_same_seed_same_weights_different_seed_different() -> None:
    a, b, c = (build_unet("tiny", 28, 1, seed=s) for s in (3, 3, 4))
    wa, wb, wc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_unknown_preset_or_size_is_refused() -> None:
    with pytest.raises(ValueError, match="'paper' at"):
        unet_config("paper", 48, 3)
    with pytest.raises(ValueError, match="no model preset 'large'"):
        unet_config("large", 28, 1)
