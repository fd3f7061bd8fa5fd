"""How the server (and the centralized baseline) judges a model: the global denoising loss on a
fixed, class-balanced test subset, FID/KID, and the EMA of the global weights.

Plain PyTorch, nothing Flower-specific, so that a federated run and the centralized baseline
are measured by the same code.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DModel

from feddm_flower.config import RunConfig, parse_classes
from feddm_flower.data.datasets import open_source, resolve_root
from feddm_flower.data.loading import class_rows, load_dataset
from feddm_flower.evaluation.fid import fid_kid, real_stats_name
from feddm_flower.protocol import (
    FID,
    FID_NUM_FAKE,
    KID,
)
from feddm_flower.task.diffusion import denoising_loss, sample
from feddm_flower.task.latents import DEFAULT_LATENT_CACHE, cached_encode
from feddm_flower.task.models import build_scheduler

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n // classes`` indices of each class (at least one, at most the rarest class's
    count), drawn with ``seed``, interleaved by class.

    Interleaving matters: :func:`~feddm_flower.task.diffusion.denoising_loss` noises the i-th image
    at the i-th step of an even timestep grid, so each class then spans the whole schedule.
    """
    classes = np.unique(labels)
    per_class = min(max(n // len(classes), 1), min(int((labels == c).sum()) for c in classes))
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.stack(picks, axis=1).reshape(-1)


def load_eval_images(
    dataset: str, data_root: str, n: int, seed: int, classes: tuple[int, ...] = ()
) -> torch.Tensor:
    """uint8 images of the test split to measure the global model on: a class-balanced subset
    of ``n`` of the ``classes`` (default: all; or the first ``n`` where the dataset has no
    classes, like FID's real images).

    Opens the split without decoding it, so CelebA and LSUN decode only the chosen images.
    """
    source = open_source(dataset, resolve_root(data_root), False)
    if source.labels is None:
        return source.read(np.arange(min(n, source.size)))
    rows = class_rows(source, classes)
    return source.read(rows[balanced_subset(source.labels[rows], n, seed)])


def load_eval_inputs(
    cfg: RunConfig, vae: AutoencoderKL | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The ``server-eval-examples`` test images of :func:`load_eval_images` as the U-Net sees
    them: uint8 images, or with a ``vae`` their latents (encoded once, cached like the
    clients')."""
    classes = parse_classes(cfg.classes)
    images = load_eval_images(
        cfg.dataset, cfg.data_root, cfg.server_eval_examples, cfg.seed, classes
    )
    if vae is None:
        return images
    cache = Path(cfg.latent_cache_dir or DEFAULT_LATENT_CACHE).expanduser()
    return cached_encode(
        vae, images, cache, batch_size=cfg.batch_size, device=device, label="eval latents"
    )


def global_loss(unet: UNet2DModel, inputs: torch.Tensor, seed: int) -> float:
    """The held-out denoising loss of ``unet`` on ``inputs`` at the clients' fixed timesteps
    and noise (:func:`~feddm_flower.task.diffusion.denoising_loss`): comparable across rounds, runs
    and the centralized baseline."""
    return denoising_loss(unet, build_scheduler(), inputs, seed=seed)


# The last check's probe of one reply's model: every 20th of the server's fixed images, so
# that it costs 1/20 of a global-loss evaluation (fed/aggregation.LossCheck.screen).
PROBE_STRIDE = 20


def probe_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """The probe's images (or latents): a fixed twentieth of ``inputs``, spread over them."""
    return inputs[::PROBE_STRIDE]


def fid_scores(
    unet: UNet2DModel, vae: AutoencoderKL | None, cfg: RunConfig
) -> dict[str, float | int]:
    """FID/KID of ``fid-samples`` DDIM samples (seed + 1) against as many real test images
    (the first ones, of ``classes``), with both counts."""
    n, start = cfg.fid_samples, time.perf_counter()
    classes = parse_classes(cfg.classes)
    real = load_dataset(cfg.dataset, cfg.data_root, train=False, limit=n, classes=classes).images
    fake = sample(
        unet,
        build_scheduler(),
        n,
        steps=cfg.sample_steps,
        seed=cfg.seed + 1,
        batch_size=cfg.batch_size,
        vae=vae,
    )
    subset = f"{cfg.dataset}-classes{cfg.classes}" if classes else cfg.dataset
    name = real_stats_name(subset, real.shape[-1], len(real))
    scores = fid_kid(fake, real.float() / 255, real_cache_name=name)
    log.info(
        "FID %.2f, KID %.4f (N=%d), %.0f s",
        scores[FID],
        scores[KID],
        n,
        time.perf_counter() - start,
    )
    return {
        FID: scores[FID],
        KID: scores[KID],
        "kid-std": scores["kid-std"],
        FID_NUM_FAKE: scores["num-fake"],
        "fid-num-real": scores["num-real"],
    }


def ema_decay(decay: float, count: int) -> float:
    """The decay for the ``count``-th update (1, 2, ...) that makes :func:`ema_update` the
    bias-corrected EMA of the updates alone: Σ (1−d)·d^(count−i)·w_i / (1 − d^count).

    A plain EMA started at the initial weights keeps d^count of that random init (0.53 after
    6 rounds at d=0.9); runs have tens of rounds, not DDPM's 800k steps, so it would dominate.
    """
    return decay * (1 - decay ** (count - 1)) / (1 - decay**count)


def ema_update(ema: State, new: State, decay: float) -> State:
    """``decay``·ema + (1 − decay)·new for float tensors; other tensors are taken from ``new``."""
    return {
        k: decay * v + (1 - decay) * new[k] if v.is_floating_point() else new[k].clone()
        for k, v in ema.items()
    }
