"""ClientApp: records in, the diffusion task on this node's partition, records out."""

from __future__ import annotations

from functools import lru_cache

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import configure_logging
from .config import RunConfig
from .data import IMAGE_SHAPES, ImageSet, load_client_data
from .diffusion import denoising_loss, train_local
from .models import build_scheduler, build_unet

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global U-Net on this node's partition; reply with the weights."""
    cfg, pid, train_set, _ = _setup(context)
    server_round = int(msg.content["config"]["server-round"])
    unet = _unet(cfg, msg)
    result = train_local(
        unet,
        build_scheduler(),
        train_set.images,
        batch_size=cfg.batch_size,
        lr=cfg.learning_rate,
        epochs=cfg.local_epochs,
        steps=cfg.local_steps,
        weight_decay=cfg.weight_decay,
        seed=_round_seed(cfg.seed, server_round, pid),
        label=f"client {pid} round {server_round}",
    )
    metrics = MetricRecord(
        {
            "num-examples": len(train_set),
            "train-loss": result.mean_loss,
            "train-steps": result.steps,
            "train-seconds": result.seconds,
        }
    )
    content = RecordDict({"arrays": ArrayRecord(unet.state_dict()), "metrics": metrics})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out denoising loss of the received global U-Net on this node's eval split."""
    cfg, _, _, eval_set = _setup(context)
    images = eval_set.images[: cfg.eval_max_examples]
    loss = denoising_loss(_unet(cfg, msg), build_scheduler(), images, seed=cfg.seed)
    metrics = MetricRecord({"num-examples": len(images), "eval-loss": loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _setup(context: Context) -> tuple[RunConfig, int, ImageSet, ImageSet]:
    configure_logging()
    cfg = RunConfig.from_mapping(context.run_config)
    pid = int(context.node_config["partition-id"])
    num = int(context.node_config["num-partitions"])
    return (cfg, pid, *_client_data(cfg, pid, num))


@lru_cache(maxsize=2)
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
    )


def _unet(cfg: RunConfig, msg: Message):
    channels, size = IMAGE_SHAPES[cfg.dataset]
    unet = build_unet(cfg.model_preset, size, channels, seed=cfg.seed)
    unet.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return unet


def _round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Distinct, reproducible noise per (run seed, round, client)."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % 2**63
