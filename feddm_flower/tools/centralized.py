"""The centralized baseline at equal compute, and the price of federation.

    python -m feddm_flower.tools.centralized [--run-config "k=v ..."] [--from-run RUN_DIR]
        [--out DIR]

Trains the federated run's U-Net with the clients' training function on the whole training
split, for as many images as the federation trained on, then measures it as the server
measures the global model (``global-loss`` on the same test subset, FID/KID when
``eval-every`` > 0). With ``--from-run`` the config and the images come from a finished run,
and ``metrics.json`` adds the price of federation: the run's final FID and global loss over
the baseline's.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from feddm_flower import configure_logging
from feddm_flower.app.overrides import parse
from feddm_flower.config import ConfigError, RunConfig, parse_classes
from feddm_flower.data.loading import IMAGE_SHAPES, load_dataset
from feddm_flower.evaluation.artifacts import RunDirectory
from feddm_flower.evaluation.budget import central_steps, config_images, run_images
from feddm_flower.evaluation.quality import fid_scores, global_loss, load_eval_inputs
from feddm_flower.protocol import (
    FID,
    GLOBAL_LOSS,
)
from feddm_flower.task.diffusion import train_local
from feddm_flower.task.latents import DEFAULT_LATENT_CACHE, cached_encode, model_space
from feddm_flower.task.models import build_scheduler, build_unet, resolve_device

log = logging.getLogger(__name__)


def price_of_federation(run: dict[str, object], central: dict[str, object]) -> dict[str, float]:
    """Federated ÷ centralized FID and global loss (above 1: federation costs quality)."""
    return {
        f"{key}-ratio": run[key] / central[key]
        for key in (FID, GLOBAL_LOSS)
        if isinstance(run.get(key), float) and isinstance(central.get(key), float)
    }


def train_and_measure(cfg: RunConfig, images: int, out: RunDirectory) -> dict[str, object]:
    """Train the baseline U-Net on ``images`` images of the training split, save its pipeline
    in ``out`` and return its metrics, measured as the server measures the global model."""
    vae, channels, size = model_space(cfg.autoencoder, IMAGE_SHAPES[cfg.dataset])
    device = resolve_device(cfg.device)
    vae = vae.to(device) if vae is not None else None
    unet = build_unet(cfg.model_preset, size, channels, seed=cfg.seed, latent=vae is not None)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    unet.to(device, memory_format=layout)
    classes = parse_classes(cfg.classes)
    inputs = load_dataset(cfg.dataset, cfg.data_root, train=True, classes=classes).images
    if vae is not None:
        cache = Path(cfg.latent_cache_dir or DEFAULT_LATENT_CACHE).expanduser()
        inputs = cached_encode(vae, inputs, cache, batch_size=cfg.batch_size, device=device)
    steps = central_steps(images, cfg.batch_size)
    log.info("Centralized baseline: %d images = %d steps of %d", images, steps, cfg.batch_size)
    result = train_local(
        unet,
        build_scheduler(),
        inputs,
        **cfg.optimizer_options,  # the clients' optimiser, warm-up and clip (once, not per round)
        steps=steps,
        seed=cfg.seed,
        label="centralized",
    )
    unet.to(memory_format=torch.contiguous_format)
    metrics: dict[str, object] = {
        "images-seen": images,
        "train-steps": steps,
        "train-loss": result.mean_loss,
        "train-seconds": round(result.seconds, 3),
    }
    if cfg.server_eval_examples:
        metrics[GLOBAL_LOSS] = global_loss(unet, load_eval_inputs(cfg, vae, device), cfg.seed)
    if cfg.eval_every:
        metrics.update(fid_scores(unet, vae, cfg))
    out.save_pipeline(unet, build_scheduler(), vae)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-config", default="", help="key=value pairs, as for flwr run")
    parser.add_argument("--from-run", type=Path, help="a finished run to match and compare")
    parser.add_argument(
        "--num-supernodes", type=int, default=2, help="nodes of the federation (no --from-run)"
    )
    parser.add_argument("--out", default="", help="'' = ~/feddm-flower/runs/<time>-centralized")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        given = RunConfig().to_dict()
        rows: list[dict[str, object]] = []
        if args.from_run:
            given.update(json.loads((args.from_run / "run_config.json").read_text()))
            lines = (args.from_run / "metrics.jsonl").read_text().splitlines()
            rows = [json.loads(line) for line in lines]
        given.update(parse([args.run_config]) if args.run_config else {})
        cfg = RunConfig.from_mapping(given)
        if rows:
            images = run_images(rows, cfg.batch_size)
        else:
            images = config_images(cfg, args.num_supernodes)
        if images <= 0:
            raise ConfigError(f"{args.from_run} trained the global model on no images")
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = RunDirectory.create(args.out, "centralized")
    out.write_config(cfg.to_dict())
    metrics = train_and_measure(cfg, images, out)
    if rows:
        metrics["price-of-federation"] = price_of_federation(rows[-1], metrics)
        if cfg.server_ema:
            log.info("The run's FID is of its EMA weights; the baseline keeps no EMA")
    (out.path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("Centralized baseline: %s; results in %s", json.dumps(metrics), out.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
