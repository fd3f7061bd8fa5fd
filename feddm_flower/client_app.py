"""ClientApp: records in, the diffusion task on this node's partition, records out."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from diffusers import UNet2DModel
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from . import configure_logging
from .config import RunConfig
from .data import IMAGE_SHAPES, ImageSet, load_client_data
from .diffusion import denoising_loss, train_local
from .downlink import OutOfSync
from .latents import DEFAULT_LATENT_CACHE, cached_encode, model_space
from .models import build_scheduler, build_unet, resolve_device
from .records import (
    CODEC_BITS,
    OUT_OF_SYNC,
    clipped_update,
    encode_uplink,
    received_model,
    uplink_key,
)

app = ClientApp()
RESIDUAL_KEY = "quant-residual"  # error-feedback residual in the node's context.state
MODEL_KEY = "global-model"  # the node's copy of the global model, in context.state


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global U-Net on this node's partition; reply with the weights, or
    under an int8/int4 uplink with the encoded update. Under differential privacy the update
    is first clipped to the ``clipping_norm`` the server's DP wrapper put in the config."""
    cfg, pid, train_inputs, _ = _setup(context)
    config: ConfigRecord = msg.content["config"]
    server_round = int(config["server-round"])
    uplink = str(config.get("uplink", "fp32"))
    clip_norm = float(config.get(KEY_CLIPPING_NORM, 0.0))
    seed = _round_seed(cfg.seed, server_round, pid)
    try:
        unet = _unet(cfg, msg, context)
    except OutOfSync as exc:
        return _out_of_sync(msg, exc)
    # The received weights: the proximal term's anchor lives in train_local; a coded uplink
    # sends the difference from them, and DP clips that difference.
    keep = uplink in CODEC_BITS or clip_norm > 0
    received = {k: v.clone() for k, v in unet.state_dict().items()} if keep else {}
    _place(unet, cfg)
    result = train_local(
        unet,
        build_scheduler(),
        train_inputs,
        **cfg.optimizer_options,
        epochs=cfg.local_epochs,
        steps=cfg.local_steps,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        seed=seed,
        label=f"client {pid} round {server_round}",
    )
    # Records carry plain CPU tensors in the default memory layout, whatever trained them.
    unet.to("cpu", memory_format=torch.contiguous_format)
    metrics = MetricRecord(
        {
            "num-examples": len(train_inputs),
            "train-loss": result.mean_loss,
            "train-steps": result.steps,
            "train-seconds": result.seconds,
        }
    )
    local = unet.state_dict()
    feedback = bool(config.get("error-feedback", False))
    if feedback and RESIDUAL_KEY in context.state:
        residual = context.state[RESIDUAL_KEY].to_torch_state_dict()
        local = {k: v + residual[k] for k, v in local.items()}
    record, sent = encode_uplink(
        local,
        received,
        uplink,
        block_size=int(config.get("quant-block-size", 256)),
        stochastic=bool(config.get("quant-stochastic", False)),
        seed=seed,
        clip_norm=clip_norm,
        lossless=bool(config.get("lossless", False)),
    )
    if feedback:  # what the server did not get of this (clipped) update goes into the next
        update = clipped_update(local, received, clip_norm)
        context.state[RESIDUAL_KEY] = ArrayRecord({k: v - sent[k] for k, v in update.items()})
    content = RecordDict({uplink_key(uplink): record, "metrics": metrics})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out denoising loss of the received global U-Net on this node's eval split."""
    cfg, _, _, eval_inputs = _setup(context)
    try:
        unet = _place(_unet(cfg, msg, context), cfg)
    except OutOfSync as exc:
        return _out_of_sync(msg, exc)
    loss = denoising_loss(unet, build_scheduler(), eval_inputs, seed=cfg.seed)
    metrics = MetricRecord({"num-examples": len(eval_inputs), "eval-loss": loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _setup(context: Context) -> tuple[RunConfig, int, torch.Tensor, torch.Tensor]:
    """Config, partition id and this node's (train, held-out) model inputs."""
    configure_logging()
    cfg = RunConfig.from_mapping(context.run_config)
    pid = int(context.node_config["partition-id"])
    num = int(context.node_config["num-partitions"])
    return (cfg, pid, *_model_inputs(cfg, pid, num))


@lru_cache(maxsize=2)
def _model_inputs(
    cfg: RunConfig, partition_id: int, num_partitions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) images, or with an autoencoder their latents (encoded once, cached)."""
    train_set, eval_set = _client_data(cfg, partition_id, num_partitions)
    held_out = eval_set.images[: cfg.eval_max_examples]
    vae, _, _ = model_space(cfg.autoencoder, IMAGE_SHAPES[cfg.dataset])
    if vae is None:
        return train_set.images, held_out
    cache = Path(cfg.latent_cache_dir or DEFAULT_LATENT_CACHE).expanduser()
    device = resolve_device(cfg.device)

    def encode(images: torch.Tensor, split: str) -> torch.Tensor:
        label = f"client {partition_id} {split} latents"
        return cached_encode(
            vae, images, cache, batch_size=cfg.batch_size, device=device, label=label
        )

    return encode(train_set.images, "train"), encode(held_out, "held-out")


def _client_data(
    cfg: RunConfig, partition_id: int, num_partitions: int
) -> tuple[ImageSet, ImageSet]:
    return load_client_data(
        cfg.dataset,
        cfg.data_root,
        partition_id,
        num_partitions,
        partitioning=cfg.partitioning,
        alpha=cfg.dirichlet_alpha,
        shards_per_client=cfg.shards_per_client,
        eval_fraction=cfg.eval_fraction,
        seed=cfg.seed,
        partition_by=cfg.partition_by,
        celeba_attribute=cfg.celeba_attribute,
        num_clusters=cfg.num_clusters,
    )


def _unet(cfg: RunConfig, msg: Message, context: Context) -> UNet2DModel:
    """The configured U-Net (on CPU) holding the model the message describes, rebuilt from
    this node's copy (none yet: the seeded initial weights) and what the message carries;
    the copy is updated. :class:`OutOfSync` (and the copy dropped) if that is impossible."""
    vae, channels, size = model_space(cfg.autoencoder, IMAGE_SHAPES[cfg.dataset])
    unet = build_unet(cfg.model_preset, size, channels, seed=cfg.seed, latent=vae is not None)
    copy = context.state.get(MODEL_KEY)
    held = copy.to_torch_state_dict() if isinstance(copy, ArrayRecord) else unet.state_dict()
    try:
        weights = received_model(msg.content, held)
    except OutOfSync:
        context.state.pop(MODEL_KEY, None)
        raise
    context.state[MODEL_KEY] = ArrayRecord(weights)
    unet.load_state_dict(weights)
    return unet


def _out_of_sync(msg: Message, exc: OutOfSync) -> Message:
    """The error reply that makes the server resend the full model."""
    return Message(Error(code=OUT_OF_SYNC, reason=f"model out of sync: {exc}"), reply_to=msg)


def _place(unet: UNet2DModel, cfg: RunConfig) -> UNet2DModel:
    """Move ``unet`` to the configured device, channels-last if asked."""
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return unet.to(resolve_device(cfg.device), memory_format=layout)


def _round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Distinct, reproducible noise per (run seed, round, client)."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % 2**63
