"""Model presets: plain config dicts for diffusers' ``UNet2DModel`` and the DDPM scheduler."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

# One config dict per preset and resolution, diffusers-style: ``UNet2DModel(**config)``.
# ``tiny`` fits a 2-core CPU; ``paper`` follows the DDPM/DDIM papers' U-Nets (ch=128,
# two residual blocks per level, self-attention at 16 px or the nearest level).
_TINY = {
    "block_out_channels": (16, 32, 32),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
_PAPER = {
    28: {
        "block_out_channels": (128, 256, 256),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    },
    32: {
        "block_out_channels": (128, 256, 256, 256),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    },
    64: {
        "block_out_channels": (128, 256, 256, 256, 512),
        "down_block_types": (
            "DownBlock2D",
            "DownBlock2D",
            "AttnDownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    },
}
PRESETS = ("tiny", "paper")
NUM_TRAIN_TIMESTEPS = 1000


def unet_config(preset: str, image_size: int, channels: int) -> dict[str, Any]:
    """Return the ``UNet2DModel`` config for ``preset`` at ``image_size`` px."""
    if preset == "tiny":
        blocks: dict[str, Any] = _TINY
    elif preset == "paper" and image_size in _PAPER:
        blocks = {**_PAPER[image_size], "layers_per_block": 2, "dropout": 0.1}
    else:
        raise ValueError(
            f"no model preset {preset!r} for {image_size} px; "
            f"allowed: 'tiny' at any size, 'paper' at {sorted(_PAPER)} px"
        )
    return {"sample_size": image_size, "in_channels": channels, "out_channels": channels, **blocks}


def build_unet(preset: str, image_size: int, channels: int, seed: int = 0) -> UNet2DModel:
    """Build a freshly initialised U-Net; the same ``seed`` gives the same weights."""
    config = unet_config(preset, image_size, channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**config)


def build_scheduler() -> DDPMScheduler:
    """The training noise schedule: DDPM, T=1000, linear betas (Ho et al. 2020)."""
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear")


def sampling_scheduler(train_scheduler: DDPMScheduler) -> DDIMScheduler:
    """A DDIM sampler over the same noise schedule, for fast evaluation sampling."""
    return DDIMScheduler.from_config(train_scheduler.config)


def count_parameters(model: UNet2DModel) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters())
