"""Model presets build real diffusers U-Nets of the documented sizes."""

from __future__ import annotations

import pytest
import torch

from feddm_flower.task.models import build_unet, count_parameters, training_memory, unet_config

# Parameter counts documented in docs/models.md (preset, pixels, channels) -> millions, +-5 %.
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


def test_latent_paper_preset_is_the_ldm8_churches_unet() -> None:
    unet = build_unet("paper", 32, 4, latent=True)
    assert count_parameters(unet) / 1e6 == pytest.approx(256.4, rel=0.01)  # the paper's 256 M
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        assert unet(x, torch.tensor([500])).sample.shape == x.shape
    with pytest.raises(ValueError, match="'paper' at \\[32\\] latent px"):
        unet_config("paper", 64, 4, latent=True)


def test_training_memory_is_optimizer_state_plus_activations_linear_in_batch() -> None:
    unet = build_unet("tiny", 28, 1)
    state = 16 * count_parameters(unet)
    one, two = training_memory(unet, 1), training_memory(unet, 2)
    assert one > state and two - one == one - state
