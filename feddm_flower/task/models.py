"""Model presets: plain config dicts for diffusers' ``UNet2DModel`` and the DDPM scheduler."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from feddm_flower.config import COMPILE_MODES, PRESETS

# Datasets of at least LATENT_FROM_PX pixels train in the latent space of autoencoder='auto'
# (task/latents.py: Stable Diffusion's KL-f8 VAE), whose latents have AUTO_VAE_LATENT's
# channels and downsampling factor.
LATENT_FROM_PX = 256
AUTO_VAE_LATENT = (4, 8)

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
# Latent space (f=8 VAE, 4 x 32 x 32 latents of 256 px images): the LDM paper's LSUN-Churches
# U-Net (Rombach et al. 2022, Tab. 18, LDM-8: ch 192, multipliers 1,2,2,4,4, attention at
# 32/16/8/4 px, 24 channels per head): 256 M parameters, as published.
_PAPER_LATENT = {
    32: {
        "block_out_channels": (192, 384, 384, 768, 768),
        "down_block_types": ("AttnDownBlock2D",) * 4 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("AttnUpBlock2D",) * 4,
        "attention_head_dim": 24,
    },
}
# Each preset's training defaults (learning rate, warm-up, gradient clip) are run-config data:
# config.TRAINING_DEFAULTS, beside the keys they fill (checking a run-config needs no torch).
NUM_TRAIN_TIMESTEPS = 1000


def unet_config(
    preset: str, image_size: int, channels: int, latent: bool = False
) -> dict[str, Any]:
    """Return the ``UNet2DModel`` config for ``preset`` at ``image_size`` px (or latent px)."""
    paper = _PAPER_LATENT if latent else _PAPER
    if preset == "tiny":
        blocks: dict[str, Any] = _TINY
    elif preset == "paper" and image_size in paper:
        blocks = {**paper[image_size], "layers_per_block": 2}
        if not latent:
            blocks["dropout"] = 0.1
    else:
        space = "latent " if latent else ""
        raise ValueError(
            f"no model preset {preset!r} for {image_size} {space}px; "
            f"allowed: 'tiny' at any size, 'paper' at {sorted(paper)} {space}px"
        )
    return {"sample_size": image_size, "in_channels": channels, "out_channels": channels, **blocks}


def build_unet(
    preset: str, image_size: int, channels: int, seed: int = 0, latent: bool = False
) -> UNet2DModel:
    """Build a freshly initialised U-Net; the same ``seed`` gives the same weights."""
    config = unet_config(preset, image_size, channels, latent)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**config)


def build_scheduler() -> DDPMScheduler:
    """The training noise schedule: DDPM, T=1000, linear betas (Ho et al. 2020)."""
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear")


def sampling_scheduler(train_scheduler: DDPMScheduler) -> DDIMScheduler:
    """A DDIM sampler over the same noise schedule, for fast evaluation sampling."""
    return DDIMScheduler.from_config(train_scheduler.config)


def resolve_device(name: str) -> torch.device:
    """Run-config ``device``: 'auto' is CUDA when visible (Ray hides GPUs from ClientApps that
    were given none), else CPU; 'cuda' without a visible GPU is an error, not a silent CPU run."""
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise RuntimeError(
            "run-config device='cuda' but no CUDA device is visible here; in simulation give "
            "each ClientApp a GPU share (client-resources-num-gpus > 0, README)"
        )
    return torch.device("cuda" if name == "cuda" or (name == "auto" and cuda) else "cpu")


def compile_unet(unet: UNet2DModel, mode: str) -> torch.nn.Module:
    """``torch.compile(unet, mode=mode)``, or ``unet`` itself for mode 'no' (COMPILE_MODES).

    The compiled module shares ``unet``'s parameters; its ``state_dict`` keys gain an
    ``_orig_mod.`` prefix, so save and load ``unet``. Inductor keeps its kernels in
    TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_$USER), which a node's processes share.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: allowed are {', '.join(COMPILE_MODES)}")
    return unet if mode == "no" else torch.compile(unet, mode=mode)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (trainable or frozen)."""
    return sum(p.numel() for p in model.parameters())


def training_memory(unet: UNet2DModel, batch_size: int) -> int:
    """Estimated bytes to train ``unet`` in fp32 with AdamW at ``batch_size``.

    16 B per parameter (weights, gradients, two AdamW moments) plus the activations autograd
    keeps for the backward pass, measured at batch 1 and scaled. Allocator slack and kernel
    workspaces come on top, so a real peak is somewhat higher.
    """
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:  # weights are counted once, above
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    size, channels = unet.config.sample_size, unet.config.in_channels
    x = torch.randn(1, channels, size, size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, torch.tensor([500])).sample.square().mean()
    return 16 * count_parameters(unet) + batch_size * sum(saved.values())


def presets_table(batch_size: int = 64) -> str:
    """The documented presets table (docs/models.md): every dataset x preset, as Markdown."""
    from feddm_flower.data.loading import IMAGE_SHAPES  # only here: the models need no data

    rows = [
        "| dataset | images | U-Net space (C x H x W) | preset | parameters "
        f"| fp32 training memory, batch {batch_size} |",
        "|---|---|---|---|---|---|",
    ]
    for dataset, (channels, size) in IMAGE_SHAPES.items():
        latent = size >= LATENT_FROM_PX
        if latent:  # autoencoder='auto': the KL-f8 VAE
            space, (c, s) = "latent", (AUTO_VAE_LATENT[0], size // AUTO_VAE_LATENT[1])
        else:
            space, (c, s) = "pixel", (channels, size)
        for preset in PRESETS:
            try:
                unet = build_unet(preset, s, c, latent=latent)
            except ValueError:
                continue
            gib = training_memory(unet, batch_size) / 2**30
            rows.append(
                f"| {dataset} | {channels} x {size}² | {space} {c} x {s} x {s} | `{preset}` "
                f"| {count_parameters(unet) / 1e6:.2f} M | {gib:.1f} GiB |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(presets_table())
