"""Fine-tuning: a pretrained diffusers U-Net to start from, and LoRA adapters on it (peft).

``init-from`` names the U-Net; only the ServerApp loads it (nodes get its config and weights
in their messages). Under ``trainable='lora'`` peft injects LoRA layers in place, so the model
stays a ``UNet2DModel`` for every pipeline, and freezes the base: the federation's state is
then the trainable tensors alone (:func:`trainable_state`), which every codec, guard, rule and
optimizer handles as it handles a whole model. What a user keeps is a merged ``UNet2DModel``
(no peft needed) and the adapter in peft's own format (:func:`save_adapter`).

peft is imported only where LoRA is used: with peft installed, diffusers also needs
transformers, which a run that trains all weights (and the GPU kit) can do without.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

from feddm_flower.config import LORA_TARGETS, ConfigError, RunConfig

if TYPE_CHECKING:
    from peft import LoraConfig

State = dict[str, torch.Tensor]
# peft's weights file (its config file is LoraConfig.save_pretrained's) and the key prefix of
# PeftModel.save_pretrained.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# Where a U-Net sits in each directory init-from accepts: a UNet2DModel folder, a
# DDPMPipeline folder, one of our run directories (final pipeline, else last checkpoint).
_UNET_FOLDERS = ("", "unet", "pipeline/unet", "checkpoint")


def load_pretrained(source: str) -> UNet2DModel:
    """The U-Net ``init-from`` names: a local directory (see ``_UNET_FOLDERS``) or a hub id
    (its root or ``unet/`` subfolder). ConfigError naming the key if there is none."""
    path = Path(source).expanduser()
    if path.exists():
        for folder in _UNET_FOLDERS:
            config = path / folder / "config.json"
            if config.is_file() and _class_name(config) == "UNet2DModel":
                return UNet2DModel.from_pretrained(path / folder)
        raise ConfigError(
            f"run-config init-from={source!r}: no UNet2DModel there (looked for config.json "
            f"with _class_name UNet2DModel in {', '.join(repr(f or '.') for f in _UNET_FOLDERS)})"
        )
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1:
        raise ConfigError(f"run-config init-from={source!r}: no such directory")
    errors = []
    for subfolder in (None, "unet"):
        try:
            return UNet2DModel.from_pretrained(source, subfolder=subfolder)
        except (OSError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0])
    raise ConfigError(
        f"run-config init-from={source!r}: not a local directory, and the hub download failed "
        f"({errors[-1]}). Without internet, save it with `save_pretrained(DIR)` on a machine "
        "that has it and pass init-from='DIR'."
    )


def _class_name(config: Path) -> str:
    try:
        return str(json.loads(config.read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


def check_space(unet: UNet2DModel, channels: int, size: int, space: str) -> None:
    """ConfigError unless ``unet`` takes and returns ``channels`` x ``size``² inputs."""
    c = unet.config
    got = (c.in_channels, c.out_channels, c.sample_size)
    if got != (channels, channels, size):
        raise ConfigError(
            f"run-config init-from: the U-Net takes {c.in_channels} channel(s) in, "
            f"{c.out_channels} out, {c.sample_size} px; the {space} needs {channels} in and out "
            f"at {size} px"
        )


def lora_config(cfg: RunConfig) -> LoraConfig:
    """peft's LoraConfig for the run's ``lora-*`` keys."""
    from peft import LoraConfig

    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()] or LORA_TARGETS
    alpha = cfg.lora_alpha or cfg.lora_rank
    return LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, target_modules=list(targets))


def add_lora(unet: UNet2DModel, cfg: RunConfig) -> UNet2DModel:
    """``unet`` with LoRA layers on the ``lora-targets``, base frozen, A seeded by ``seed``
    (the same on every node and the server); under ``lora-variant='ffa'`` A is frozen too.

    ConfigError naming the key for a target that matches no module (listing the names that
    exist) or a rank above what a target layer allows (min of its input and output sizes).
    """
    from peft import inject_adapter_in_model

    config = lora_config(cfg)
    names = {name.rsplit(".", 1)[-1] for name, _ in unet.named_modules()} | {
        ".".join(name.split(".")[-2:]) for name, _ in unet.named_modules()
    }
    unknown = sorted(set(config.target_modules) - names)
    if unknown:
        layers = sorted(n for n in names if n and not n[0].isdigit() and "." not in n)
        raise ConfigError(
            f"run-config lora-targets={cfg.lora_targets!r}: no module named {unknown}; the "
            f"U-Net's module names are {', '.join(layers)} (and 'to_out.0')"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        inject_adapter_in_model(config, unet)
    for name, module in unet.named_modules():
        if name.endswith(".base_layer"):
            sizes = _layer_sizes(module)
            if sizes and cfg.lora_rank > min(sizes):
                raise ConfigError(
                    f"run-config lora-rank={cfg.lora_rank}: above what layer "
                    f"{name.removesuffix('.base_layer')} allows (at most {min(sizes)})"
                )
    if cfg.lora_variant == "ffa":
        for name, p in unet.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    return unet


def _layer_sizes(module: torch.nn.Module) -> tuple[int, int] | None:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def is_lora(unet: torch.nn.Module) -> bool:
    """Whether peft put LoRA layers on ``unet``."""
    return any(".lora_" in name for name, _ in unet.named_parameters())


def trainable_state(unet: torch.nn.Module) -> State:
    """What the federation trains and moves: every tensor, or under LoRA the trainable ones."""
    state = unet.state_dict()
    if not is_lora(unet):
        return state
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def frozen_state(unet: torch.nn.Module) -> State:
    """Under LoRA, the frozen LoRA factors (A under 'ffa'; none under 'ab')."""
    names = {n for n, p in unet.named_parameters() if not p.requires_grad and ".lora_" in n}
    return {k: v for k, v in unet.state_dict().items() if k in names}


def load_trainable(unet: torch.nn.Module, state: State) -> None:
    """Load ``state`` (:func:`trainable_state`'s names) into ``unet``; every name must exist."""
    if not is_lora(unet):
        unet.load_state_dict(state)
        return
    unexpected = unet.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise KeyError(f"not tensors of this model: {unexpected[:5]}")


def base_state(unet: torch.nn.Module) -> State:
    """The weights of the plain U-Net under the LoRA layers (names as ``UNet2DModel``'s)."""
    return {
        k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".lora_" not in k
    }


def save_adapter(unet: torch.nn.Module, directory: Path) -> None:
    """The adapter alone in peft's format: ``adapter_config.json`` and
    ``adapter_model.safetensors``, which ``PeftModel.from_pretrained(base, directory)`` loads."""
    from peft import get_peft_model_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    unet.peft_config["default"].save_pretrained(directory)  # what add_lora configured
    weights = get_peft_model_state_dict(unet)
    save_file(
        {_PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in weights.items()},
        directory / ADAPTER_WEIGHTS,
    )


def merged(unet: UNet2DModel, adapter: Path) -> UNet2DModel:
    """A plain ``UNet2DModel`` with the adapter saved in ``adapter`` merged into the base
    weights of ``unet``, through peft's own loader (what a user runs)."""
    from peft import PeftModel

    base = UNet2DModel.from_config(unet.config)
    base.load_state_dict(base_state(unet))
    return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def load_adapter(unet: torch.nn.Module, adapter: Path) -> None:
    """Load the adapter saved in ``adapter`` (:func:`save_adapter`) into ``unet``'s LoRA layers."""
    from peft import set_peft_model_state_dict

    saved = load_file(adapter / ADAPTER_WEIGHTS)
    set_peft_model_state_dict(unet, {k.removeprefix(_PEFT_PREFIX): v for k, v in saved.items()})
