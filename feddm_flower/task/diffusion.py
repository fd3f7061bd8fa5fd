"""The diffusion task itself: local training, held-out denoising loss, sampling.

Plain PyTorch + diffusers, nothing Flower-specific: the ClientApp, the ServerApp and the
benchmarks all call these functions.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, UNet2DModel

from feddm_flower.config import CLIENT_OPTIMIZERS
from feddm_flower.task.latent_pipeline import LatentDDPMPipeline
from feddm_flower.task.models import sampling_scheduler

log = logging.getLogger(__name__)
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Training images up to this size move to the GPU once per train_local call.
RESIDENT_BYTES = 2 * 2**30


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train_local` did."""

    mean_loss: float  # mean diffusion (MSE) loss over all steps, prox term excluded
    steps: int
    examples: int  # images seen, counting repeats
    seconds: float


def diffusion_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    generator: torch.Generator,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE at random (or given) timesteps (Ho et al. 2020, Alg. 1)."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    if timesteps is None:
        t = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, t, (len(x0),), generator=generator, device=x0.device)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    # fp32 loss even under autocast: a half-precision MSE loses the small late-training values.
    return F.mse_loss(unet(noisy, timesteps).sample.float(), noise)


def autocast(device: torch.device, mixed_precision: str) -> torch.autocast:
    """Autocast to ``mixed_precision`` ('fp16' or 'bf16') on ``device``; off for 'no'."""
    dtype = AMP_DTYPES.get(mixed_precision, torch.bfloat16)
    return torch.autocast(device.type, dtype=dtype, enabled=mixed_precision in AMP_DTYPES)


def to_model_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images (0..255) as float32 in [-1, 1]; float tensors (e.g. latents) pass through.

    Datasets stay uint8 in memory (4x smaller); each minibatch is converted on its device.
    """
    if batch.dtype == torch.uint8:
        return batch.float().div(127.5).sub(1.0)
    return batch


def proximal_term(
    params: list[torch.Tensor], global_params: list[torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's (mu/2)·Σ‖w − w_global‖² (squared L2) over the trainable ``params``, against
    detached copies of the global weights."""
    sq = sum(((w - g) ** 2).sum() for w, g in zip(params, global_params, strict=True))
    return 0.5 * mu * sq


def train_local(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    *,
    batch_size: int,
    lr: float,
    epochs: int = 1,
    steps: int = 0,
    weight_decay: float = 0.0,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    warmup_steps: int = 0,
    grad_clip: float = 0.0,
    proximal_mu: float = 0.0,
    mixed_precision: str = "no",
    seed: int = 0,
    label: str = "train",
    log_every: int = 50,
) -> TrainResult:
    """Train ``unet`` in place for ``steps`` steps, or ``epochs`` epochs if steps=0.

    ``optimizer`` is 'adamw' or 'sgd' (with ``momentum``), fresh on every call: in federated
    training, once per round. The learning rate ramps linearly from ``lr / warmup_steps`` to
    ``lr`` over the first ``warmup_steps`` steps (:func:`warmup_lr`); ``grad_clip`` > 0 clips
    the global gradient norm (of the unscaled fp16 gradients under a GradScaler). With
    ``proximal_mu`` > 0 the loss adds :func:`proximal_term` against the weights as they were
    on entry. ``mixed_precision`` 'fp16' or 'bf16' runs the forward pass under autocast
    (weights and optimiser stay fp32). Logs progress every ``log_every`` steps and at the end.

    The host waits for the device only there: losses stay on the device in between. On CUDA
    the optimiser is fused and images under RESIDENT_BYTES move to the GPU once per call.
    """
    if len(images) == 0:
        raise ValueError(f"{label}: no training images")
    if optimizer not in CLIENT_OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r}: allowed are {', '.join(CLIENT_OPTIMIZERS)}")
    device = next(unet.parameters()).device
    total = steps or epochs * math.ceil(len(images) / batch_size)
    batches = itertools.islice(_epochs(len(images), batch_size, seed), total)
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    params = [p for p in unet.parameters() if p.requires_grad]  # (a LoRA base is frozen)
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    # CUDA: one fused kernel per step instead of a loop over parameters; CPU: as it was.
    fused = {"fused": True} if device.type == "cuda" else {}
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **fused)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=mixed_precision == "fp16")
    if device.type == "cuda" and images.nbytes < RESIDENT_BYTES:
        images = images.to(device)  # once, instead of a host-to-device copy per step
    unet.train()
    # Per-step losses stay on the device (no host sync per step); read at the log points.
    losses = torch.zeros(total, dtype=torch.float64, device=device)
    examples, start = 0, time.perf_counter()
    for step, (epoch, idx) in enumerate(batches, start=1):
        x0 = to_model_range(images[idx.to(images.device, non_blocking=True)].to(device))
        with autocast(device, mixed_precision):
            loss = diffusion_loss(unet, scheduler, x0, noise)
        objective = loss + proximal_term(params, anchor, proximal_mu) if anchor else loss
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, lr, warmup_steps)
        opt.zero_grad(set_to_none=True)
        scaler.scale(objective).backward()
        if grad_clip > 0:
            scaler.unscale_(opt)  # clip the true gradients, not the loss-scaled ones
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(opt)
        scaler.update()
        losses[step - 1] = loss.detach()
        examples += len(x0)
        if step % log_every == 0 or step == total:
            recent = losses[max(step - log_every, 0) : step].mean().item()
            rate = examples / (time.perf_counter() - start)
            log.info(
                "%s: epoch %d, step %d/%d, loss %.4f, %.0f img/s",
                label,
                epoch,
                step,
                total,
                recent,
                rate,
            )
    return TrainResult(losses.mean().item(), total, examples, time.perf_counter() - start)


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of (1-based) ``step``: linear warm-up to ``lr`` over ``warmup_steps``."""
    return lr * min(1.0, step / warmup_steps) if warmup_steps > 0 else lr


def _epochs(n: int, batch_size: int, seed: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Endless (epoch, minibatch indices): a fresh seeded shuffle of ``range(n)`` per epoch."""
    generator = torch.Generator().manual_seed(seed)
    for epoch in itertools.count(1):
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            yield epoch, idx


@torch.no_grad()
def denoising_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Held-out epsilon-MSE on a fixed grid of timesteps and fixed noise.

    Image i is noised at timestep ``i * T / N`` (evenly over the schedule), so the value is
    deterministic for a given model and comparable across rounds.
    """
    if len(images) == 0:
        raise ValueError("no evaluation images")
    device = next(unet.parameters()).device
    steps = scheduler.config.num_train_timesteps
    grid = torch.linspace(0, steps - 1, len(images)).round().long()
    gen = torch.Generator(device=device).manual_seed(seed)
    unet.eval()
    total = 0.0
    for x0, t in zip(images.split(batch_size), grid.split(batch_size), strict=True):
        loss = diffusion_loss(unet, scheduler, to_model_range(x0.to(device)), gen, t.to(device))
        total += loss.item() * len(x0)
    return total / len(images)


def sample(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    num: int,
    *,
    steps: int,
    seed: int,
    batch_size: int = 256,
    vae: AutoencoderKL | None = None,
) -> torch.Tensor:
    """``num`` DDIM samples in [0, 1], shape (N, C, H, W), reproducible for a given seed.

    With a ``vae`` the U-Net samples latents, which the VAE decodes to images.
    """
    unet.eval()
    ddim = sampling_scheduler(scheduler)
    if vae is None:
        pipe = DDPMPipeline(unet=unet, scheduler=ddim)
    else:
        pipe = LatentDDPMPipeline(unet=unet, vae=vae, scheduler=ddim)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device=unet.device).manual_seed(seed)
    batches = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        out = pipe(batch_size=n, generator=gen, num_inference_steps=steps, output_type="np")
        batches.append(torch.from_numpy(out.images).permute(0, 3, 1, 2))
    return torch.cat(batches)
