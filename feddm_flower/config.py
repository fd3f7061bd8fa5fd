"""Run configuration: every key, its default, and the check that runs before any training."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Value = bool | int | float | str
Check = Callable[[Any], str | None]  # returns what is allowed when the value is not


class ConfigError(ValueError):
    """An invalid run-config value; the message names the key, the value and what is allowed."""


def _one_of(*allowed: Value) -> Check:
    return lambda v: None if v in allowed else f"one of {', '.join(map(repr, allowed))}"


def _at_least(low: float) -> Check:
    return lambda v: None if v >= low else f">= {low}"


def _positive(v: float) -> str | None:
    return None if v > 0 else "> 0"


def _fraction(v: float) -> str | None:
    return None if 0 < v < 1 else "strictly between 0 and 1"


def _in_unit(v: float) -> str | None:
    return None if 0 <= v < 1 else "in [0, 1)"


def _below_half(v: float) -> str | None:
    return None if 0 <= v < 0.5 else "in [0, 0.5)"


def _unit_interval(v: float) -> str | None:
    return None if 0 < v <= 1 else "in (0, 1]"


def _positive_or(sentinel: float) -> Check:
    return lambda v: None if v > 0 or v == sentinel else f"> 0, or {sentinel} = preset's"


def _at_least_or(low: float, sentinel: float) -> Check:
    return lambda v: None if v >= low or v == sentinel else f">= {low}, or {sentinel} = preset's"


def _any(_: Any) -> None:
    return None


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "a non-empty string"


def parse_classes(text: str) -> tuple[int, ...]:
    """Run-config ``classes``: '' = () (every class), else labels and ranges such as '5-9' or
    '0,2,4-6', sorted; ValueError if it does not parse."""
    labels: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, dash, high = part.partition("-")
        first, last = int(low), int(high) if dash else int(low)
        if first < 0 or last < first:
            raise ValueError(part)
        labels.update(range(first, last + 1))
    return tuple(sorted(labels))


def _classes(v: str) -> str | None:
    try:
        parse_classes(v)
    except ValueError:
        return "'' or class labels and ranges, e.g. '5-9' or '0,2,4-6'"
    return None


def _key(default: Value, check: Check = _any, help: str = "") -> Any:
    return field(default=default, metadata={"check": check, "help": help})


STRATEGIES = ("custom", "vanilla", "prox", "quant")
UPLINKS = ("fp32", "fp16", "int8", "int4", "sparse")
# The coded directions' defaults (fed/changes.ChangeCodec, fed/sparse.py use these).
QUANT_BLOCK_SIZE = 256
SPARSE_FRACTION = 0.05
SPARSE_BITS = 4
MIN_SPARSE_FRACTION = 0.001
SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
AGGREGATIONS = ("mean", "median", "trimmed-mean", "krum")
# What each shortcut sets: a key at its default takes the shortcut's value; a key set to
# anything else that the shortcut does not allow is a ConfigError naming both.
SHORTCUTS: dict[str, dict[str, tuple[Value, tuple[Value, ...]]]] = {
    # key: (value when left at its default, values allowed)
    "vanilla": {"proximal-mu": (0.0, (0.0,)), "uplink": ("fp32", ("fp32",))},
    "prox": {"proximal-mu": (0.01, ()), "uplink": ("fp32", ("fp32",))},
    "quant": {"proximal-mu": (0.0, (0.0,)), "uplink": ("int8", ("int8", "int4"))},
}
PARTITIONINGS = ("iid", "dirichlet", "shards", "quantity")
DATASETS = ("fashion-mnist", "cifar10", "celeba", "lsun-church")
NUM_CLASSES = {"fashion-mnist": 10, "cifar10": 10}  # datasets with class labels (for classes)
PRESETS = ("tiny", "paper")
TRAINABLE = ("all", "lora")
# lora-variant: 'ab' trains and averages both factors (the mean of the products is not the
# product of the means); 'ffa' freezes A at its seeded initialisation and trains B alone
# (FFA-LoRA, Sun et al. 2024): the mean of the B's times the shared A is exactly the mean of
# the clients' low-rank updates, and only B travels. 'ab' is the default: it reached the lower
# loss in docs/finetuning.md's comparison, within 2% of full fine-tuning where 'ffa' was 5%.
LORA_VARIANTS = ("ab", "ffa")
# lora-targets '': the U-Net's attention projections, ResNet convolutions, time-embedding
# projections (the names peft matches at the end of a module's path).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")
CLIENT_OPTIMIZERS = ("adamw", "sgd")
# torch.compile modes of the clients' U-Net (models.compile_unet); 'no' = eager. Here, not in
# models.py, so that checking a run-config imports no torch.
COMPILE_MODES = ("no", "default", "max-autotune-no-cudagraphs")
# Each U-Net preset's training defaults, per client optimizer (models.py holds the U-Nets;
# these stay here, so that checking a run-config needs no torch). A key left at its run-config
# default (learning-rate 0, warmup-steps -1, grad-clip -1: no usable value) takes the value
# here; any other value of the key wins. Every round starts a fresh optimiser, so the warm-up
# repeats per round. docs/models.md#training-defaults has the measurements behind the choices.
TRAINING_DEFAULTS: dict[str, dict[str, dict[str, Value]]] = {
    # tiny (0.27 M): AdamW as every documented tiny run trained; SGD 0.1 from {0.03, 0.1, 0.3}.
    "tiny": {
        "adamw": {"learning-rate": 3e-3, "warmup-steps": 0, "grad-clip": 0.0},
        "sgd": {"learning-rate": 0.1, "warmup-steps": 0, "grad-clip": 1.0},
    },
    # paper (26-256 M): the DDPM paper's Adam lr 2e-4 and clip at norm 1.0 (Ho et al. 2020,
    # App. B). Its 5000 warm-up steps come once in 800k; here each round's fresh AdamW first
    # moves every weight by about lr whatever its gradient, which raised the held-out loss at
    # the start of round 2 without a warm-up, so a short one: 20 local steps, a tenth of the
    # default local-steps. SGD: 0.01 from {0.01, 0.03, 0.1} (0.1 diverged).
    "paper": {
        "adamw": {"learning-rate": 2e-4, "warmup-steps": 20, "grad-clip": 1.0},
        "sgd": {"learning-rate": 0.01, "warmup-steps": 20, "grad-clip": 1.0},
    },
}
# The 40 binary attributes of CelebA's list_attr_celeba.txt, in file order.
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip


@dataclass(frozen=True)
class RunConfig:
    """Typed view of ``[tool.flwr.app.config]``; field ``foo_bar`` is run-config key ``foo-bar``."""

    strategy: str = _key(
        "custom", _one_of(*STRATEGIES), "'custom' (the keys below decide) or a preset shortcut"
    )
    num_server_rounds: int = _key(6, _at_least(1), "federated rounds")
    fraction_train: float = _key(1.0, _unit_interval, "fraction of nodes sampled to train")
    fraction_evaluate: float = _key(
        0.0,
        lambda v: None if 0 <= v <= 1 else "in [0, 1]",
        "fraction of nodes sent an evaluate message every round; 0 = one message per node "
        "and round: train messages measure the model they carry (eval-loss, one round later) "
        "and one evaluate message follows the last round (final-eval-loss)",
    )
    min_nodes: int = _key(2, _at_least(1), "nodes that must be connected and replying")
    min_replies: int = _key(1, _at_least(1), "accepted training replies needed to update")
    round_timeout: float = _key(86400.0, _positive, "seconds to wait for replies per round")
    proximal_mu: float = _key(0.0, _at_least(0.0), "weight of (mu/2)·||w - w_global||²; 0 = off")
    uplink: str = _key("fp32", _one_of(*UPLINKS), "what clients send: weights or coded update")
    quant_block_size: int = _key(
        QUANT_BLOCK_SIZE, _at_least(1), "coded payloads: values per absmax scale"
    )
    quant_stochastic: bool = _key(False, help="int8/int4 uplink: unbiased stochastic rounding")
    error_feedback: bool = _key(False, help="int8/int4 uplink: clients carry their residual")
    sparse_fraction: float = _key(
        SPARSE_FRACTION,
        lambda v: None if MIN_SPARSE_FRACTION <= v <= 1 else f"in [{MIN_SPARSE_FRACTION}, 1]",
        "sparse uplink/downlink: share of each tensor's values sent (largest magnitudes)",
    )
    sparse_bits: int = _key(
        SPARSE_BITS, _one_of(8, 4), "sparse uplink/downlink: bits per value sent"
    )
    sparse_feedback: bool = _key(
        True, help="sparse uplink: clients carry what was not sent (false: only to ablate)"
    )
    server_optimizer: str = _key("none", _one_of(*SERVER_OPTIMIZERS), "Flower server optimizer")
    server_lr: float = _key(0.0, _at_least(0.0), "server learning rate; 0 = optimizer's default")
    server_momentum: float = _key(0.9, _in_unit, "fedavgm momentum; beta_1 of fedadam/fedyogi")
    server_beta2: float = _key(0.99, _in_unit, "beta_2 of fedadam/fedyogi")
    server_tau: float = _key(1e-3, _positive, "adaptivity tau of fedadam/fedyogi/fedadagrad")
    aggregation: str = _key("mean", _one_of(*AGGREGATIONS), "how accepted replies combine")
    trim_fraction: float = _key(0.25, _below_half, "trimmed-mean: share cut at each end")
    norm_bound: float = _key(1.0, _at_least(0.0), "update norm cap, x reference median; 0 = off")
    weight_bound: float = _key(2.0, _at_least(0.0), "num-examples cap, x reference median; 0 = off")
    max_loss_ratio: float = _key(
        1.5,
        lambda v: None if v == 0 or v >= 1 else ">= 1, or 0 = off",
        "refuse a new global model whose global-loss is not finite or above this x the current",
    )
    dp_clip_norm: float = _key(0.0, _at_least(0.0), "DP: L2 clip of each client update; 0 = off")
    dp_noise_multiplier: float = _key(
        0.0, _at_least(0.0), "DP: Gaussian noise std over the clip, on the sum; 0 = off"
    )
    dp_delta: float = _key(1e-5, _fraction, "DP: the delta at which epsilon is reported")
    downlink: str = _key(
        "fp32", _one_of(*UPLINKS), "full model (fp32/fp16) or coded changes to nodes behind"
    )
    lossless: bool = _key(False, help="coded payloads' values: zstd, kept where it is smaller")
    dataset: str = _key("fashion-mnist", _one_of(*DATASETS), "training data")
    classes: str = _key(
        "", _classes, "'' = all; else the classes to train and measure on, e.g. '5-9'"
    )
    data_root: str = _key("", help="dataset directory; '' = ~/.cache/feddm-flower/data")
    partitioning: str = _key("iid", _one_of(*PARTITIONINGS), "how images are split over clients")
    partition_by: str = _key(
        "auto", _one_of("auto", "clusters"), "dirichlet/shards label: 'auto' or feature 'clusters'"
    )
    celeba_attribute: str = _key(
        "Smiling", _one_of(*CELEBA_ATTRIBUTES), "celeba, partition-by=auto: binary attribute"
    )
    num_clusters: int = _key(10, _at_least(2), "k-means clusters of image thumbnails")
    dirichlet_alpha: float = _key(0.5, _positive, "Dirichlet concentration (smaller = more skew)")
    shards_per_client: int = _key(2, _at_least(1), "label-sorted shards per client")
    eval_fraction: float = _key(0.1, _fraction, "held-out share of each client's partition")
    seed: int = _key(0, _at_least(0), "seed for partitions, init, noise and sampling")
    model_preset: str = _key("tiny", _one_of(*PRESETS), "U-Net size")
    init_from: str = _key(
        "",
        help="'' = seeded random start; else a diffusers UNet2DModel or DDPMPipeline directory, "
        "a run directory, or a hub id: its config sets the U-Net (only the server loads it)",
    )
    trainable: str = _key(
        "all", _one_of(*TRAINABLE), "'all' weights, or 'lora' adapters on a frozen base (peft)"
    )
    lora_rank: int = _key(8, _at_least(1), "trainable='lora': adapter rank")
    lora_alpha: float = _key(
        0.0, _at_least(0.0), "trainable='lora': scale numerator (alpha / rank); 0 = the rank"
    )
    lora_targets: str = _key(
        "", help=f"trainable='lora': comma-separated module names; '' = {','.join(LORA_TARGETS)}"
    )
    lora_variant: str = _key(
        "ab", _one_of(*LORA_VARIANTS), "trainable='lora': 'ab' (A and B travel) or 'ffa' (A frozen)"
    )
    autoencoder: str = _key("auto", _non_empty, "'auto', 'none', or AutoencoderKL dir / hub id")
    latent_cache_dir: str = _key("", help="'' = ~/.cache/feddm-flower/latents")
    device: str = _key("auto", _one_of("auto", "cpu", "cuda"), "'auto' = cuda if available")
    mixed_precision: str = _key("no", _one_of("no", "fp16", "bf16"), "autocast in training")
    channels_last: bool = _key(False, help="channels-last memory format in training")
    compile: str = _key(
        "no", _one_of(*COMPILE_MODES), "torch.compile mode of the clients' U-Net; 'no' = eager"
    )
    local_epochs: int = _key(1, _at_least(1), "local epochs per round (if local-steps = 0)")
    local_steps: int = _key(200, _at_least(0), "local optimiser steps per round; 0 = use epochs")
    batch_size: int = _key(64, _at_least(1), "local minibatch size")
    client_optimizer: str = _key(
        "adamw", _one_of(*CLIENT_OPTIMIZERS), "local optimiser: 'adamw' or 'sgd' (with momentum)"
    )
    client_momentum: float = _key(0.9, _in_unit, "client-optimizer='sgd': momentum")
    learning_rate: float = _key(
        0.0, _positive_or(0.0), "local learning rate; 0 = the model preset's default"
    )
    warmup_steps: int = _key(
        -1, _at_least_or(0, -1), "linear LR warm-up, local steps per round; -1 = preset's"
    )
    grad_clip: float = _key(
        -1.0, _at_least_or(0.0, -1.0), "clip of the gradient norm, 0 = off; -1 = preset's"
    )
    weight_decay: float = _key(0.0, _at_least(0.0), "decoupled (AdamW) or L2 (SGD) weight decay")
    eval_max_examples: int = _key(256, _at_least(1), "held-out images per client evaluation")
    server_eval_examples: int = _key(
        500, _at_least(0), "class-balanced test images for the server's global-loss; 0 = off"
    )
    server_ema: float = _key(
        0.0, _in_unit, "server EMA of the global weights: decay per round; 0 = off"
    )
    eval_every: int = _key(0, _at_least(0), "FID/KID every N rounds and at the end; 0 = never")
    fid_samples: int = _key(200, _at_least(2), "generated and real images per FID/KID")
    sample_steps: int = _key(50, _at_least(1), "DDIM steps for evaluation samples")
    grid_samples: int = _key(16, _at_least(1), "images in each round's sample grid")
    tensorboard: bool = _key(
        True, help="TensorBoard event files beside metrics.jsonl: scalars, samples, config"
    )
    resume: str = _key("", help="run directory to continue after its last finished round")
    output_dir: str = _key("", help="results directory; '' = ~/feddm-flower/runs/<time>-<strategy>")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Value]) -> RunConfig:
        """Validate ``raw`` (dashed keys, missing keys take defaults) and build a RunConfig.

        Raises ``ConfigError`` on the first unknown key, wrong type or disallowed value.
        """
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in fields:
                raise _unknown_key(key, fields)
        values = {}
        for key, f in fields.items():
            value = raw.get(key, f.default)
            value = _coerce(key, value, type(f.default))
            allowed = f.metadata["check"](value)
            if allowed is not None:
                raise ConfigError(f"run-config {key}={value!r} is invalid: allowed is {allowed}")
            values[f.name] = value
        cfg = _apply_training_defaults(_apply_shortcut(cls(**values)))
        return _check_classes(_check_lora(_check_privacy(cfg)))

    @classmethod
    def key_type(cls, key: str) -> type:
        """The type of run-config ``key`` (bool, int, float or str); ConfigError if unknown."""
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        if key not in fields:
            raise _unknown_key(key, fields)
        return type(fields[key].default)

    @property
    def optimizer_options(self) -> dict[str, Value]:
        """The local optimiser's arguments of ``diffusion.train_local``, the same for the
        clients and the centralized baseline."""
        return {
            "batch_size": self.batch_size,
            "lr": self.learning_rate,
            "weight_decay": self.weight_decay,
            "optimizer": self.client_optimizer,
            "momentum": self.client_momentum,
            "warmup_steps": self.warmup_steps,
            "grad_clip": self.grad_clip,
            "mixed_precision": self.mixed_precision,
        }

    @property
    def label(self) -> str:
        """Short name of the combination, for logs, metrics and run directories."""
        if self.strategy != "custom":
            return self.strategy
        parts = [
            f"prox{self.proximal_mu:g}" if self.proximal_mu else "",
            self.uplink if self.uplink != "fp32" else "",
            f"down{self.downlink}" if self.downlink != "fp32" else "",
            "zstd" if self.lossless else "",
            self.server_optimizer if self.server_optimizer != "none" else "",
            self.aggregation if self.aggregation != "mean" else "",
            "dp" if self.dp_clip_norm else "",
            f"lora{self.lora_rank}-{self.lora_variant}" if self.trainable == "lora" else "",
        ]
        return "-".join(p for p in parts if p) or "vanilla"

    def to_dict(self) -> dict[str, Value]:
        """Dashed-key dict, as written to ``run_config.json`` and accepted by ``from_mapping``."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}


def _unknown_key(key: str, known: Iterable[str]) -> ConfigError:
    """The error for an unknown key: the closest known key, if one is close, then all of them."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    return ConfigError(f"unknown run-config key {key!r}{hint} allowed keys: {', '.join(known)}")


def _apply_shortcut(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the keys its ``strategy`` shortcut sets (see SHORTCUTS)."""
    defaults = RunConfig.__dataclass_fields__
    changes = {}
    for key, (value, allowed) in SHORTCUTS.get(cfg.strategy, {}).items():
        name = key.replace("-", "_")
        given = getattr(cfg, name)
        if given == defaults[name].default:
            changes[name] = value
        elif allowed and given not in allowed:
            raise ConfigError(
                f"run-config strategy={cfg.strategy!r} contradicts {key}={given!r}: "
                f"{cfg.strategy} allows {key} in {list(allowed)}; use strategy='custom' to "
                "combine freely"
            )
    return dataclasses.replace(cfg, **changes)


def _apply_training_defaults(cfg: RunConfig) -> RunConfig:
    """``cfg`` with each training key left at its default set to its preset's value
    (TRAINING_DEFAULTS for ``model-preset`` and ``client-optimizer``)."""
    defaults = RunConfig.__dataclass_fields__
    preset = TRAINING_DEFAULTS[cfg.model_preset][cfg.client_optimizer]
    changes = {}
    for key, value in preset.items():
        name = key.replace("-", "_")
        if getattr(cfg, name) == defaults[name].default:
            changes[name] = value
    return dataclasses.replace(cfg, **changes)


def _check_privacy(cfg: RunConfig) -> RunConfig:
    """``cfg`` unless its differential-privacy keys contradict each other or the aggregation.

    DP needs both the clip (the sensitivity) and the noise, and the Gaussian mechanism's
    sensitivity clip/n holds for the mean of clipped updates only: a median, trimmed mean or
    Krum pick can move further than clip/n when one client changes.
    """
    clip, noise = cfg.dp_clip_norm, cfg.dp_noise_multiplier
    if (clip > 0) != (noise > 0):
        raise ConfigError(
            f"run-config dp-clip-norm={clip!r} and dp-noise-multiplier={noise!r} contradict: "
            "differential privacy needs both > 0 (or both 0 = off)"
        )
    if clip > 0 and cfg.aggregation != "mean":
        raise ConfigError(
            f"run-config dp-clip-norm={clip!r} (differential privacy) contradicts "
            f"aggregation={cfg.aggregation!r}: the Gaussian mechanism's sensitivity (clip / "
            "number of clients) holds for aggregation='mean' only"
        )
    return cfg


def _check_lora(cfg: RunConfig) -> RunConfig:
    """``cfg`` unless a ``lora-*`` key is set while ``trainable`` is not 'lora'."""
    if cfg.trainable == "lora":
        return cfg
    defaults = RunConfig.__dataclass_fields__
    for name in ("lora_rank", "lora_alpha", "lora_targets", "lora_variant"):
        if getattr(cfg, name) != defaults[name].default:
            key = name.replace("_", "-")
            raise ConfigError(
                f"run-config {key}={getattr(cfg, name)!r} contradicts "
                f"trainable={cfg.trainable!r}: lora-* keys need trainable='lora'"
            )
    return cfg


def _check_classes(cfg: RunConfig) -> RunConfig:
    """``cfg`` unless ``classes`` names labels its ``dataset`` does not have."""
    labels = parse_classes(cfg.classes)
    if not labels:
        return cfg
    if cfg.dataset not in NUM_CLASSES:
        raise ConfigError(
            f"run-config classes={cfg.classes!r} contradicts dataset={cfg.dataset!r}: only "
            f"{', '.join(NUM_CLASSES)} have class labels"
        )
    if labels[-1] >= NUM_CLASSES[cfg.dataset]:
        raise ConfigError(
            f"run-config classes={cfg.classes!r} is invalid: {cfg.dataset} has classes "
            f"0-{NUM_CLASSES[cfg.dataset] - 1}"
        )
    return cfg


def _coerce(key: str, value: Any, kind: type) -> Value:
    """Accept ints where floats are expected; reject everything else of the wrong type."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise ConfigError(
            f"run-config {key}={value!r} has type {type(value).__name__}; "
            f"allowed is a {kind.__name__}"
        )
    return value
