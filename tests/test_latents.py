"""Latent diffusion pieces on CPU: the frozen VAE, cached latents, decoding, the saved pipeline,
and the device / mixed-precision plumbing (the CUDA test runs only where a GPU is visible)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_vae
from diffusers import DiffusionPipeline

from feddm_flower.evaluation.artifacts import RunDirectory
from feddm_flower.task import latents
from feddm_flower.task.diffusion import autocast, sample, train_local
from feddm_flower.task.latent_pipeline import LatentDDPMPipeline
from feddm_flower.task.latents import cached_encode, encode, load_vae, model_space, vae_source
from feddm_flower.task.models import build_scheduler, build_unet, resolve_device


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(path)
    return path


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 256, 256), generator=g, dtype=torch.uint8)


def test_autoencoder_key_chooses_pixel_or_latent_space(vae_dir: Path) -> None:
    assert vae_source("auto", 28) is None and vae_source("auto", 64) is None
    assert vae_source("auto", 256) == latents.AUTO_VAE
    assert vae_source("none", 256) is None
    assert model_space("auto", (1, 28)) == (None, 1, 28)
    vae, channels, size = model_space(str(vae_dir), (3, 256))
    assert (channels, size) == (4, 32)  # f=8, 4 latent channels
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(ValueError, match="3-channel images, the dataset has 1"):
        model_space(str(vae_dir), (1, 256))


def test_missing_vae_names_the_key_and_the_offline_way(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="(?s)autoencoder=.*save_pretrained"):
        load_vae(str(tmp_path / "no-such-vae"))


def test_encode_gives_scaled_posterior_means_from_uint8_or_float(vae_dir: Path) -> None:
    vae, images = load_vae(str(vae_dir)), _images(3)
    z = encode(vae, images, batch_size=2)
    assert z.shape == (3, 4, 32, 32) and z.dtype == torch.float32
    with torch.no_grad():
        x = images.float() / 127.5 - 1
        expected = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(encode(vae, x, batch_size=3), z, rtol=1e-4, atol=1e-5)


def test_latents_are_computed_once_per_vae_and_images(
    vae_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae, images = load_vae(str(vae_dir)), _images(2)
    first = cached_encode(vae, images, tmp_path, batch_size=2)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def no_encoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("encoded again despite the cache")

    monkeypatch.setattr(latents, "encode", no_encoding)
    assert torch.equal(cached_encode(vae, images, tmp_path, batch_size=2), first)
    monkeypatch.undo()
    cached_encode(vae, _images(2, seed=1), tmp_path, batch_size=2)  # other images
    cached_encode(tiny_vae(seed=1), images, tmp_path, batch_size=2)  # other VAE weights
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_latent_samples_decode_to_256_px_images(vae_dir: Path) -> None:
    vae = load_vae(str(vae_dir))
    unet = build_unet("tiny", 32, 4, latent=True)
    images = sample(unet, build_scheduler(), 3, steps=2, seed=0, batch_size=2, vae=vae)
    assert images.shape == (3, 3, 256, 256)
    assert images.min() >= 0 and images.max() <= 1
    again = sample(unet, build_scheduler(), 3, steps=2, seed=0, batch_size=2, vae=vae)
    assert torch.equal(images, again)


def test_saved_latent_pipeline_loads_with_and_without_feddm(vae_dir: Path, tmp_path: Path) -> None:
    unet = build_unet("tiny", 32, 4, seed=3, latent=True)
    path = RunDirectory(tmp_path).save_pipeline(unet, build_scheduler(), load_vae(str(vae_dir)))
    assert (path / "pipeline.py").exists() and (path / "vae").is_dir()

    pipe = LatentDDPMPipeline.from_pretrained(path)
    for k, v in unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[k], v), k
    out = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert out.shape == (2, 256, 256, 3)

    # Plain diffusers, with the pipeline class read from the directory itself.
    plain = DiffusionPipeline.from_pretrained(
        path, custom_pipeline=str(path), trust_remote_code=True
    )
    assert type(plain).__name__ == "LatentDDPMPipeline"
    assert plain(batch_size=1, num_inference_steps=2).images[0].size == (256, 256)


def test_mixed_precision_trains_latents_on_cpu_and_keeps_fp32_weights() -> None:
    latents_ = torch.randn(8, 4, 32, 32)
    for mode in ("bf16", "fp16"):
        unet = build_unet("tiny", 32, 4, latent=True).to(memory_format=torch.channels_last)
        before = [p.detach().clone() for p in unet.parameters()]
        result = train_local(
            unet, build_scheduler(), latents_, batch_size=4, lr=1e-3, steps=2, mixed_precision=mode
        )
        assert result.steps == 2 and torch.isfinite(torch.tensor(result.mean_loss))
        assert all(p.dtype == torch.float32 for p in unet.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters(), strict=True))


def test_autocast_is_off_for_no_and_casts_for_bf16() -> None:
    cpu, x = torch.device("cpu"), torch.randn(2, 3)
    with autocast(cpu, "no"):
        assert (x @ x.T).dtype == torch.float32
    with autocast(cpu, "bf16"):
        assert (x @ x.T).dtype == torch.bfloat16


def test_device_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="client-resources-num-gpus"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["no", "fp16", "bf16"])
def test_cuda_training_and_latent_sampling(vae_dir: Path, mode: str) -> None:
    cuda = torch.device("cuda")
    unet = build_unet("tiny", 32, 4, latent=True).to(cuda, memory_format=torch.channels_last)
    latents_ = encode(load_vae(str(vae_dir)), _images(8), batch_size=4, device=cuda)
    result = train_local(
        unet, build_scheduler(), latents_, batch_size=4, lr=1e-3, steps=3, mixed_precision=mode
    )
    assert torch.isfinite(torch.tensor(result.mean_loss))
    images = sample(unet, build_scheduler(), 2, steps=2, seed=0, vae=load_vae(str(vae_dir)))
    assert images.shape == (2, 3, 256, 256) and images.device.type == "cpu"
