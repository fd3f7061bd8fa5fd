"""Latent space for 256 px data: a frozen ``AutoencoderKL``, its latents, and their disk cache.

The VAE never trains and never travels: clients encode their partition once (cached on disk),
the U-Net trains on the scaled latents, and the server decodes samples with the same VAE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from feddm_flower.task.diffusion import to_model_range
from feddm_flower.task.models import LATENT_FROM_PX

log = logging.getLogger(__name__)

# What autoencoder='auto' loads for datasets of at least LATENT_FROM_PX pixels: Stable
# Diffusion's KL-f8 VAE with the MSE-fine-tuned decoder (downloaded by diffusers: needs internet).
AUTO_VAE = "stabilityai/sd-vae-ft-mse"
DEFAULT_LATENT_CACHE = Path.home() / ".cache" / "feddm-flower" / "latents"


def vae_source(autoencoder: str, image_size: int) -> str | None:
    """The VAE that run-config ``autoencoder`` names for ``image_size`` px data; None = pixels."""
    if autoencoder == "none":
        return None
    if autoencoder == "auto":
        return AUTO_VAE if image_size >= LATENT_FROM_PX else None
    return autoencoder


@lru_cache(maxsize=2)
def load_vae(source: str) -> AutoencoderKL:
    """A frozen ``AutoencoderKL`` (eval mode, no gradients) from a local directory or hub id."""
    path = Path(source).expanduser()
    try:
        vae = AutoencoderKL.from_pretrained(path if path.is_dir() else source)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"run-config autoencoder={source!r}: no AutoencoderKL directory there and the hub "
            f"download failed ({exc}). Without internet, save a VAE with `save_pretrained(DIR)` "
            "on a machine that has it and pass autoencoder='DIR'."
        ) from exc
    return vae.eval().requires_grad_(False)


def model_space(
    autoencoder: str, image_shape: tuple[int, int]
) -> tuple[AutoencoderKL | None, int, int]:
    """(VAE or None, channels, pixels) the U-Net works in, for images of (channels, pixels)."""
    channels, size = image_shape
    source = vae_source(autoencoder, size)
    if source is None:
        return None, channels, size
    vae = load_vae(source)
    if vae.config.in_channels != channels:
        raise ValueError(
            f"autoencoder={autoencoder!r} takes {vae.config.in_channels}-channel images, "
            f"the dataset has {channels}; use autoencoder='none' for pixel space"
        )
    return vae, *latent_shape(vae, size)


def latent_shape(vae: AutoencoderKL, image_size: int) -> tuple[int, int]:
    """(channels, pixels) of the latents of ``image_size`` px images: each VAE level but the
    last halves the resolution (f=8 for four levels)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(f"{image_size} px images do not divide by the VAE's factor {factor}")
    return vae.config.latent_channels, image_size // factor


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """SHA-256 of the VAE's config and weights: the identity its latents are cached under."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in vae.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@torch.no_grad()
def encode(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    label: str = "latents",
) -> torch.Tensor:
    """Scaled latents (float32, on CPU) of images (uint8 in [0, 255] or float in [-1, 1]).

    Each image gets its posterior mean: latents are computed once and reused every round, so
    one fixed random draw would only add noise.
    """
    vae = vae.to(device)
    chunks, done, start = [], 0, time.perf_counter()
    batches = images.split(batch_size)
    for i, batch in enumerate(batches, start=1):
        mean = vae.encode(to_model_range(batch.to(device)).float()).latent_dist.mean
        chunks.append((mean * vae.config.scaling_factor).float().cpu())
        done += len(batch)
        if i == len(batches) or i % max(len(batches) // 10, 1) == 0:
            rate = done / (time.perf_counter() - start)
            log.info("%s: encoded %d/%d images, %.1f img/s", label, done, len(images), rate)
    return torch.cat(chunks)


def cached_encode(
    vae: AutoencoderKL,
    images: torch.Tensor,
    cache_dir: Path,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    label: str = "latents",
) -> torch.Tensor:
    """:func:`encode`, computed once: keyed by the VAE's fingerprint and the images' bytes, so a
    new VAE, partition or data file never reuses stale latents."""
    digest = hashlib.sha256(vae_fingerprint(vae).encode())
    digest.update(str((images.dtype, tuple(images.shape))).encode())
    digest.update(images.contiguous().reshape(-1).view(torch.uint8).numpy())
    path = cache_dir / f"{digest.hexdigest()[:32]}.pt"
    if path.exists():
        log.info("%s: %d latents from cache %s", label, len(images), path)
        return torch.load(path, weights_only=True)
    latents = encode(vae, images, batch_size=batch_size, device=device, label=label)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name, then renamed: a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        torch.save(latents, f)
    os.replace(tmp, path)
    log.info("%s: cached %d latents in %s", label, len(latents), path)
    return latents
