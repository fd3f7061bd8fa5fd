"""End to end: latent diffusion on an LSUN church LMDB with a small random AutoencoderKL.

Real `flwr run`s (vanilla, then quant) check that only U-Net weights travel, that clients
encode their latents once, and that samples decode to 256 px images a diffusers pipeline makes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from conftest import TINY_RUN, tiny_vae
from diffusers import UNet2DModel
from formats import write_lsun
from PIL import Image
from safetensors.torch import load_file

from feddm_flower.task.latent_pipeline import LatentDDPMPipeline
from feddm_flower.task.models import build_unet

LDM_RUN = {**TINY_RUN, "num-server-rounds": 1, "batch-size": 4, "eval-max-examples": 4}


def _lsun_images(n: int = 12) -> list[Image.Image]:
    """``n`` noise images as LSUN ships them: short side 256, the other one longer."""
    rng = np.random.default_rng(0)
    shapes = [(256, 320 + 8 * i) if i % 2 else (300 + 8 * i, 256) for i in range(n)]
    return [Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)) for hw in shapes]


def test_ldm_round_sends_only_the_unet_and_decodes_256_px(flwr_run, tmp_path: Path) -> None:
    write_lsun(tmp_path / "data", _lsun_images())
    vae_dir, cache = tmp_path / "vae", tmp_path / "latents"
    tiny_vae().save_pretrained(vae_dir)
    ldm = {
        **LDM_RUN,
        "dataset": "lsun-church",
        "data-root": str(tmp_path / "data"),
        "autoencoder": str(vae_dir),
        "latent-cache-dir": str(cache),
    }
    out = tmp_path / "vanilla"
    proc = flwr_run({**ldm, "output-dir": str(out)})
    assert proc.returncode == 0, proc.stdout + proc.stderr

    unet = build_unet("tiny", 32, 4, latent=True)
    unet_bytes = 4 * sum(p.numel() for p in unet.state_dict().values())
    [row] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # Down, one U-Net per node (the evaluate message's new model; the nodes build the seeded
    # start themselves), and 2 train replies up: the U-Net and nothing else (the VAE's 99 kB
    # would push either past the 5 % left for tensor names).
    assert 2 * unet_bytes <= row["bytes-down"] < 2 * unet_bytes * 1.05
    assert 2 * unet_bytes <= row["bytes-up"] < 2 * unet_bytes * 1.05
    assert row["train-loss"] > 0 and row["eval-loss"] > 0 and row["global-loss"] > 0

    weights = load_file(out / "checkpoint" / "diffusion_pytorch_model.safetensors")
    assert weights.keys() == unet.state_dict().keys()
    assert not any(k.startswith(("encoder.", "decoder.", "quant_conv")) for k in weights)
    assert UNet2DModel.from_pretrained(out / "checkpoint").config.in_channels == 4
    assert len(list(cache.glob("*.pt"))) == 5  # 2 clients x (train, held-out) + the server's

    # Each round's grid holds 4 decoded 256 px samples, 2 x 2 with 1 px padding.
    assert Image.open(out / "samples" / "round_001.png").size == (2 * 257 + 1, 2 * 257 + 1)
    pipe = LatentDDPMPipeline.from_pretrained(out / "pipeline")
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (
        1,
        256,
        256,
        3,
    )
    for k, v in tiny_vae().state_dict().items():  # the frozen VAE, untouched
        assert torch.equal(pipe.vae.state_dict()[k], v), k

    # FedDM-quant on the same partitions: latents come from the cache, the payload is int8.
    out = tmp_path / "quant"
    proc = flwr_run({**ldm, "strategy": "quant", "output-dir": str(out)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "latents from cache" in proc.stdout + proc.stderr
    assert len(list(cache.glob("*.pt"))) == 5
    [row] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 3.8 < row["compression-up"] < 4.3 and "rejected" not in row
    assert LatentDDPMPipeline.from_pretrained(out / "pipeline").unet.config.sample_size == 32
