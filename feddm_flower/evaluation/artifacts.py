"""A run's output directory: config, metrics.jsonl, sample grids, checkpoint, final pipeline."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, UNet2DModel
from torchvision.utils import save_image

from feddm_flower.task import latent_pipeline
from feddm_flower.task.finetune import is_lora, merged, save_adapter
from feddm_flower.task.latent_pipeline import LatentDDPMPipeline

DEFAULT_RUNS_ROOT = Path.home() / "feddm-flower" / "runs"
STATE_FILE = "feddm_state.json"
OPTIMIZER_FILE = "server_optimizer.npz"  # the server optimizer's moments / momentum
EMA_FILE = "ema.pt"  # the server's EMA of the global weights (server-ema)
ADAPTER_DIR = "adapter"  # trainable='lora': the adapter alone, peft's format


class RunDirectory:
    """Everything one run writes, in one directory::

    run_config.json       the validated run configuration
    metrics.jsonl         one JSON object per finished round
    samples/round_NNN.png sample grid of the global model after round NNN (000 = init)
    events.out.tfevents.* TensorBoard: the rounds' scalars and grids, the config
                          (``tensorboard``)
    checkpoint/           latest global U-Net (diffusers ``save_pretrained``), strategy state,
                          server optimizer arrays, EMA weights (``server-ema``)
    pipeline/             final ``DDPMPipeline``, or ``LatentDDPMPipeline`` with its VAE and
                          source file (``pipeline.py``) for latent diffusion; under LoRA
                          the U-Net merged (no peft needed to load it)
    adapter/              trainable='lora': the final adapter alone (peft's format)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "samples").mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, output_dir: str, strategy: str) -> RunDirectory:
        """``output_dir`` if given (relative to the working directory), else a fresh default."""
        if output_dir:
            return cls(Path(output_dir).expanduser().resolve())
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return cls(DEFAULT_RUNS_ROOT / f"{stamp}-{strategy}")

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, config: dict[str, object]) -> None:
        (self.path / "run_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def append_metrics(self, record: dict[str, object]) -> None:
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_summary(self) -> dict[str, object]:
        """Write ``summary.json``: the run's last metrics line (cumulative bytes, losses)."""
        lines = self.metrics_file.read_text().splitlines() if self.metrics_file.exists() else []
        last = json.loads(lines[-1]) if lines else {}
        summary = {k: v for k, v in last.items() if not k.endswith("per-node")}
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def save_grid(self, images: torch.Tensor, server_round: int) -> Path:
        """Save images in [0, 1] as a square-ish grid PNG."""
        path = self.path / "samples" / f"round_{server_round:03d}.png"
        save_image(images, path, nrow=math.ceil(math.sqrt(len(images))), padding=1)
        return path

    def save_checkpoint(
        self,
        unet: UNet2DModel,
        state: dict[str, object],
        optimizer: dict[str, np.ndarray] | None = None,
        ema: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Replace ``checkpoint/`` with ``unet``, ``state``, the server ``optimizer``'s arrays
        and the ``ema`` weights (if kept), atomically (never half-written). A LoRA U-Net is
        saved merged, its adapter beside in ``adapter/``."""
        buffer = io.BytesIO()
        np.savez(buffer, **(optimizer or {}))
        files = {STATE_FILE: json.dumps(state), OPTIMIZER_FILE: buffer.getvalue()}
        if ema is not None:
            buffer = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in ema.items()}, buffer)
            files[EMA_FILE] = buffer.getvalue()

        def write(tmp: Path) -> None:
            model = unet
            if is_lora(unet):
                save_adapter(unet, tmp / ADAPTER_DIR)
                model = merged(unet, tmp / ADAPTER_DIR)
            model.save_pretrained(tmp)
            _write_files(tmp, files)

        return self._replace("checkpoint", write)

    def load_ema(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights of the last checkpoint; None if it kept none."""
        path = self._checkpoint_dir() / EMA_FILE
        return torch.load(path, weights_only=True) if path.exists() else None

    def load_optimizer_state(self) -> dict[str, np.ndarray]:
        """The server optimizer's arrays of the last checkpoint (empty if it kept none)."""
        path = self._checkpoint_dir() / OPTIMIZER_FILE
        if not path.exists():
            return {}
        with np.load(path) as arrays:
            return dict(arrays)

    def has_checkpoint(self) -> bool:
        """Whether a completed round was checkpointed."""
        return (self._checkpoint_dir() / STATE_FILE).exists()

    def load_checkpoint(self) -> tuple[UNet2DModel, dict[str, object]]:
        """The U-Net and state of the last completed round; FileNotFoundError if none."""
        return UNet2DModel.from_pretrained(self._checkpoint_dir()), self.checkpoint_state()

    def checkpoint_state(self) -> dict[str, object]:
        """The strategy state of the last completed round; FileNotFoundError if none."""
        path = self._checkpoint_dir()
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"no checkpoint to resume from in {path}")
        return json.loads((path / STATE_FILE).read_text())

    def checkpoint_adapter(self) -> Path:
        """The LoRA adapter directory of the last checkpoint (peft's format)."""
        return self._checkpoint_dir() / ADAPTER_DIR

    def _checkpoint_dir(self) -> Path:
        path = self.path / "checkpoint"
        if not path.exists():  # a crash between the two renames of _replace
            path = self.path / ".checkpoint.old"
        return path

    def truncate_metrics(self, last_round: int) -> None:
        """Drop metrics lines after ``last_round`` (written before a crash, to be redone)."""
        if not self.metrics_file.exists():
            return
        lines = self.metrics_file.read_text().splitlines()
        kept = [x for x in lines if json.loads(x)["round"] <= last_round]
        tmp = self.metrics_file.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        os.replace(tmp, self.metrics_file)

    def save_pipeline(
        self, unet: UNet2DModel, scheduler: DDPMScheduler, vae: AutoencoderKL | None = None
    ) -> Path:
        """Save the final model as a diffusers pipeline directory: a ``DDPMPipeline``, or with a
        ``vae`` a ``LatentDDPMPipeline`` beside its own source, so that plain diffusers loads it
        (``DiffusionPipeline.from_pretrained(dir, custom_pipeline=dir, trust_remote_code=True)``).
        A LoRA U-Net goes in merged, and its adapter alone in ``adapter/`` (peft's format).
        """
        if is_lora(unet):
            adapter = self._replace(ADAPTER_DIR, lambda tmp: save_adapter(unet, tmp))
            unet = merged(unet, adapter)
        if vae is None:
            pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
            return self._replace("pipeline", pipe.save_pretrained)
        pipe = LatentDDPMPipeline(unet=unet, vae=vae, scheduler=scheduler)
        source = Path(latent_pipeline.__file__).read_text()

        def write(tmp: Path) -> None:
            pipe.save_pretrained(tmp)
            _write_files(tmp, {"pipeline.py": source})

        return self._replace("pipeline", write)

    def _replace(self, name: str, write: Callable[[Path], object]) -> Path:
        """Replace directory ``name`` with what ``write`` puts in a fresh one, atomically."""
        final, tmp, old = self.path / name, self.path / f".{name}.tmp", self.path / f".{name}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return final


def _write_files(directory: Path, files: dict[str, str | bytes]) -> None:
    for filename, content in files.items():
        if isinstance(content, bytes):
            (directory / filename).write_bytes(content)
        else:
            (directory / filename).write_text(content)
