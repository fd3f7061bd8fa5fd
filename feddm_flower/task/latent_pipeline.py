"""``LatentDDPMPipeline``: unconditional latent diffusion (Rombach et al. 2022) for diffusers.

A ``UNet2DModel`` denoises latents of a frozen ``AutoencoderKL``; the VAE decodes them to images.
diffusers 0.42 has no pipeline for this pair (``LDMPipeline`` expects a ``VQModel`` and ignores the
VAE's ``scaling_factor``), hence this one. It imports only torch and diffusers: the run copies this
file into the saved pipeline directory, so the result also loads without feddm-flower (README).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor


class LatentDDPMPipeline(DiffusionPipeline):
    """Sample latents with ``unet`` and ``scheduler``, decode with ``vae``.

    Latents are scaled by ``vae.config.scaling_factor`` during training, so they are divided by
    it before decoding.
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet: UNet2DModel, vae: AutoencoderKL, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """``batch_size`` images: PIL (default), or NHWC numpy in [0, 1] (``output_type='np'``)."""
        size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, size, size)
        latents = randn_tensor(
            shape, generator=generator, device=self.device, dtype=self.unet.dtype
        )
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            eps = self.unet(latents, t).sample
            latents = self.scheduler.step(eps, t, latents, generator=generator).prev_sample
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(latents).sample
        images = (images / 2 + 0.5).clamp(0, 1).float().cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
