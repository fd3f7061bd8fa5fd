"""What a node does with a train or evaluate message: the diffusion task on its partition.

Run inside the ClientApp's own process, or inside a node's long-lived worker
(:mod:`feddm_flower.app.worker`), which keeps what these functions cache between messages: the
imports, this node's model inputs, the U-Net on its device (compiled once with ``compile``) and
the CUDA context. Each function takes the message's records and the node's
:class:`~flwr.app.Context` and returns the reply's records, or raises :class:`OutOfSync`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import UNet2DModel
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from feddm_flower.app.compat import KEY_CLIPPING_NORM
from feddm_flower.app.node_settings import Refused, node_view
from feddm_flower.app.records import (
    clipped_update,
    encode_uplink,
    from_record,
    received_model,
    uplink_key,
)
from feddm_flower.config import RunConfig, parse_classes
from feddm_flower.data.loading import IMAGE_SHAPES, load_client_data
from feddm_flower.fed.changes import CODED, ChangeCodec
from feddm_flower.fed.downlink import NoBase, OutOfSync, digest
from feddm_flower.fed.node_store import NodeStore
from feddm_flower.fed.timings import Stopwatch
from feddm_flower.protocol import (
    BASE,
    BASE_DIGEST,
    CONFIG,
    EVAL_EXAMPLES,
    EVAL_LOSS,
    EVALUATE_RECEIVED,
    FROZEN_DIGEST,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    NUM_THREADS,
    PARTITION_ID,
    PROXIMAL_MU,
    SERVER_ROUND,
    STATE_DIR,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    TRAIN_STEPS,
    UNET_CONFIG,
    UPLINK,
)
from feddm_flower.task.diffusion import denoising_loss, train_local
from feddm_flower.task.finetune import add_lora, frozen_state, load_trainable, trainable_state
from feddm_flower.task.latents import DEFAULT_LATENT_CACHE, cached_encode, model_space
from feddm_flower.task.models import build_scheduler, build_unet, compile_unet, resolve_device

RESIDUAL_KEY = "quant-residual"  # the node's error-feedback residual, in its store
MODEL_KEY = "global-model"  # the node's copy of the global model, in its store
STORE_KEY = "node-store"  # context.state: the directory of the node's store
Outcome = tuple[str, RecordDict | str]


def train(content: RecordDict, context: Context, clock: Stopwatch) -> RecordDict:
    """Train the received global U-Net on this node's partition; reply with the weights, or
    under an int8/int4/sparse uplink with the encoded update. Under differential privacy the update
    is first clipped to the ``clipping_norm`` the server's DP wrapper put in the config. If
    the config asks (``evaluate-received``), the received model's held-out loss is measured
    first and sent with the training metrics: what an evaluate message would measure."""
    cfg, pid, train_inputs, eval_inputs = _setup(context)
    clock.mark("data")
    config: ConfigRecord = content[CONFIG]
    server_round = int(config[SERVER_ROUND])
    uplink = str(config.get(UPLINK, "fp32"))
    clip_norm = float(config.get(KEY_CLIPPING_NORM, 0.0))
    seed = _round_seed(cfg.seed, server_round, pid)
    node, weights = _node_model(cfg, content, context)
    # The received weights: the proximal term's anchor lives in train_local; a coded uplink
    # sends the difference from them, and DP clips that difference.
    received = weights if uplink in CODED or clip_norm > 0 else {}
    clock.mark("model")
    evaluation = {}
    if bool(config.get(EVALUATE_RECEIVED, False)):
        evaluation = {EVAL_LOSS: _held_out_loss(cfg, node, eval_inputs),
                      EVAL_EXAMPLES: len(eval_inputs)}  # fmt: skip
        clock.mark("eval")
    result = train_local(
        node.compiled,
        build_scheduler(),
        train_inputs,
        **cfg.optimizer_options,
        epochs=cfg.local_epochs,
        steps=cfg.local_steps,
        proximal_mu=float(config.get(PROXIMAL_MU, 0.0)),
        seed=seed,
        label=f"client {pid} round {server_round}",
    )
    clock.mark("train")
    # Records carry plain CPU tensors in the default memory layout, whatever trained them; the
    # module stays where it is, for the next message.
    local = {
        k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        for k, v in trainable_state(node.unet).items()
    }
    feedback = bool(config.get("error-feedback", False))
    store = node_store(context)
    residual = store.load(RESIDUAL_KEY) if feedback else None
    if residual is not None:
        local = {k: v + residual[k] for k, v in local.items()}
    codec = uplink_codec(uplink, config) if uplink in CODED else None
    record, sent = encode_uplink(
        local, received, uplink, codec=codec, seed=seed, clip_norm=clip_norm
    )
    if feedback:  # what the server did not get of this (clipped) update goes into the next
        update = clipped_update(local, received, clip_norm)
        store.save(RESIDUAL_KEY, {k: v - sent[k] for k, v in update.items()})
    clock.mark("encode")
    metrics = {
        NUM_EXAMPLES: len(train_inputs),
        TRAIN_LOSS: result.mean_loss,
        TRAIN_STEPS: result.steps,
        TRAIN_SECONDS: result.seconds,
        **evaluation,
        **clock.metrics(),
    }
    return RecordDict({uplink_key(uplink): record, METRICS: MetricRecord(metrics)})


def uplink_codec(uplink: str, config: ConfigRecord) -> ChangeCodec:
    """The coded uplink's options, as the server's train config sets them."""
    return ChangeCodec.from_config(uplink, config)


def evaluate(content: RecordDict, context: Context, clock: Stopwatch) -> RecordDict:
    """Held-out denoising loss of the received global U-Net on this node's eval split."""
    cfg, _, _, eval_inputs = _setup(context)
    clock.mark("data")
    node, _ = _node_model(cfg, content, context)
    clock.mark("model")
    loss = _held_out_loss(cfg, node, eval_inputs)
    clock.mark("eval")
    metrics = {NUM_EXAMPLES: len(eval_inputs), EVAL_LOSS: loss, **clock.metrics()}
    return RecordDict({METRICS: MetricRecord(metrics)})


def _held_out_loss(cfg: RunConfig, node: NodeModel, eval_inputs: torch.Tensor) -> float:
    """``eval-loss``: the denoising loss of the node's model on its held-out split, at the
    run's fixed timesteps and noise."""
    return denoising_loss(node.unet, build_scheduler(), eval_inputs, seed=cfg.seed)


def node_config(context: Context) -> RunConfig:
    """The run's config as this node runs it: its node-config's own settings win
    (:mod:`~feddm_flower.app.node_settings`; :class:`Refused` if it refuses the run)."""
    return node_view(RunConfig.from_mapping(context.run_config), context.node_config)


def _setup(context: Context) -> tuple[RunConfig, int, torch.Tensor, torch.Tensor]:
    """Config, partition id and this node's (train, held-out) model inputs; node-config
    ``num-threads`` (> 0) sets torch's CPU threads, the node's share of the machine."""
    cfg = node_config(context)
    threads = int(context.node_config.get(NUM_THREADS, 0))
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    pid = int(context.node_config[PARTITION_ID])
    num = int(context.node_config[NUM_PARTITIONS])
    return (cfg, pid, *_model_inputs(cfg, pid, num))


@lru_cache(maxsize=2)
def _model_inputs(
    cfg: RunConfig, partition_id: int, num_partitions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) images, or with an autoencoder their latents (encoded once, cached)."""
    train_set, eval_set = load_client_data(
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
        classes=parse_classes(cfg.classes),
    )
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


@dataclass
class NodeModel:
    """This process's U-Net for one model configuration, on its device: ``unet`` holds the
    weights, ``compiled`` is what trains (the same module unless ``compile`` is on),
    ``initial`` the seeded initial state a node without a copy starts from (its trainable
    tensors: :func:`~feddm_flower.task.finetune.trainable_state`) and ``frozen`` the digest
    of its frozen LoRA factors."""

    unet: UNet2DModel
    compiled: torch.nn.Module
    initial: dict[str, torch.Tensor]
    frozen: str


# The one NodeModel this process keeps, under what builds it (model_key): a node's worker
# keeps it, compiled, from one run to the next that builds the same.
_BUILT: dict[tuple[object, ...], NodeModel] = {}
_BUILT_BY = (
    "model_preset dataset autoencoder seed device channels_last compile "
    "trainable lora_rank lora_alpha lora_targets lora_variant"
).split()


def _model(cfg: RunConfig, content: RecordDict, context: Context) -> NodeModel:
    """Built once per process and configuration; every message loads its weights into it.

    The U-Net is the preset's, or the one whose config the message names (``init-from``),
    on the base weights the message names by digest: from the node's base store, else from
    the message (:class:`NoBase` if neither has them). ``trainable='lora'`` adds adapters."""
    config = content[CONFIG]
    arch, base_digest = str(config.get(UNET_CONFIG, "")), str(config.get(BASE_DIGEST, ""))
    key = (*(getattr(cfg, name) for name in _BUILT_BY), arch, base_digest)
    if key in _BUILT:
        return _BUILT[key]
    vae, channels, size = model_space(cfg.autoencoder, IMAGE_SHAPES[cfg.dataset])
    if arch:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            unet = UNet2DModel.from_config(json.loads(arch))
    else:
        unet = build_unet(cfg.model_preset, size, channels, seed=cfg.seed, latent=vae is not None)
    if base_digest:
        unet.load_state_dict(_base_weights(base_digest, content, context))
    if cfg.trainable == "lora":
        add_lora(unet, cfg)
    initial = {k: v.clone() for k, v in trainable_state(unet).items()}
    frozen = digest(frozen_state(unet))
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    unet = unet.to(resolve_device(cfg.device), memory_format=layout)
    _BUILT.clear()
    _BUILT[key] = NodeModel(unet, compile_unet(unet, cfg.compile), initial, frozen)
    return _BUILT[key]


def _base_weights(want: str, content: RecordDict, context: Context) -> dict[str, torch.Tensor]:
    """The base weights with digest ``want``: the node's copy, else the message's ``base``
    record (checked, then kept under its digest for later runs); :class:`NoBase` if neither.
    A stored copy whose digest differs (altered on disk) is dropped, as if absent."""
    store = base_store(context)
    held = store.load(want)
    if held is not None and digest(held) == want:
        return held
    if held is not None:  # altered on disk: not the base the server names
        store.drop(want)
    if BASE not in content:
        raise NoBase(f"the node holds no base model {want}")
    try:
        weights = from_record(content[BASE])
    except ValueError as exc:
        raise NoBase(f"base model: {exc}") from exc
    if (have := digest(weights)) != want:
        raise NoBase(f"base model {have} received, the server names {want}")
    store.save(want, weights)
    return weights


def _node_model(
    cfg: RunConfig, content: RecordDict, context: Context
) -> tuple[NodeModel, dict[str, torch.Tensor]]:
    """This process's U-Net holding the model the message describes, and those weights (fp32,
    CPU), rebuilt from the node's copy (none yet: the seeded initial weights) and what the
    message carries; the copy is updated. :class:`OutOfSync` (and the copy dropped) if that is
    impossible."""
    node = _model(cfg, content, context)
    frozen = str(content[CONFIG].get(FROZEN_DIGEST, node.frozen))
    if frozen != node.frozen:
        raise RuntimeError(
            f"frozen LoRA factors {node.frozen} here, {frozen} on the server: seeded "
            "initialisation differs (torch or peft versions?)"
        )
    store = node_store(context)
    held = store.load(MODEL_KEY)
    try:
        weights = received_model(content, node.initial if held is None else held)
    except OutOfSync:
        store.drop(MODEL_KEY)
        raise
    if held is None or weights is not held:  # (a node that is current keeps its file)
        store.save(MODEL_KEY, weights)
    load_trainable(node.unet, weights)
    return node, weights


def base_store(context: Context) -> NodeStore:
    """Base models this node was sent, by digest, kept across runs (under ``state-dir``)."""
    return NodeStore.bases(str(context.node_config.get(STATE_DIR, "")))


def node_store(context: Context) -> NodeStore:
    """This node's store (node_store.py): the directory its state names, or a new one, named
    there; a node whose state is lost starts a new, empty store."""
    record = context.state.get(STORE_KEY)
    if isinstance(record, ConfigRecord) and isinstance(record.get("dir"), str):
        return NodeStore(Path(str(record["dir"])))
    base = str(context.node_config.get(STATE_DIR, ""))
    store = NodeStore.create(base, prefix=f"run{context.run_id}-node{context.node_id}-")
    context.state[STORE_KEY] = ConfigRecord({"dir": str(store.root)})
    return store


def held_model(context: Context) -> dict[str, torch.Tensor] | None:
    """The node's copy of the global model, None if it has none."""
    return node_store(context).load(MODEL_KEY)


def receive(content: RecordDict, context: Context) -> dict[str, torch.Tensor]:
    """The weights a message describes, kept as the node's copy, without training on them."""
    cfg = node_config(context)
    return _node_model(cfg, content, context)[1]


def _round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Distinct, reproducible noise per (run seed, round, client)."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % 2**63


TASKS = {"train": train, "evaluate": evaluate}


def run_task(kind: str, content: RecordDict, context: Context, clock: Stopwatch) -> Outcome:
    """``kind`` ('train' or 'evaluate') on ``content``: ("ok", the reply's records),
    ("out-of-sync", why) when the node cannot rebuild the model the message describes, or
    ("no-base", why) when it lacks the base model the message names, ("refused", why) when
    the node's own settings refuse the run."""
    try:
        return "ok", TASKS[kind](content, context, clock)
    except Refused as exc:
        return "refused", str(exc)
    except NoBase as exc:
        return "no-base", str(exc)
    except OutOfSync as exc:
        return "out-of-sync", str(exc)
