"""Run-config validation: bad values fail fast, naming the key, the value and what is allowed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from feddm_flower.app import overrides
from feddm_flower.config import TRAINING_DEFAULTS, ConfigError, RunConfig, parse_classes

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_defaults_are_the_config_defaults() -> None:
    app_config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == RunConfig().to_dict()
    assert RunConfig.from_mapping(app_config) == RunConfig.from_mapping({})


def test_overrides_are_typed_and_ints_widen_to_floats() -> None:
    cfg = RunConfig.from_mapping(
        {"num-server-rounds": 7, "learning-rate": 1, "strategy": "vanilla"}
    )
    assert cfg.num_server_rounds == 7
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("num-server-rounds", 0, ">= 1"),
        ("dirichlet-alpha", 0.0, "> 0"),
        ("dirichlet-alpha", -1.5, "> 0"),
        ("batch-size", 0, ">= 1"),
        ("strategy", "fedsgd", "'custom', 'vanilla', 'prox', 'quant'"),
        ("proximal-mu", -0.01, ">= 0.0"),
        ("uplink", "int2", "'fp32', 'fp16', 'int8', 'int4'"),
        ("server-optimizer", "sgd", "'fedavgm', 'fedadam'"),
        ("aggregation", "mode", "'median', 'trimmed-mean', 'krum'"),
        ("trim-fraction", 0.5, "[0, 0.5)"),
        ("server-momentum", 1.0, "[0, 1)"),
        ("norm-bound", -1.0, ">= 0.0"),
        ("quant-block-size", 0, ">= 1"),
        ("sparse-fraction", 0.0005, "in [0.001, 1]"),
        ("sparse-fraction", 1.5, "in [0.001, 1]"),
        ("sparse-bits", 2, "one of 8, 4"),
        ("uplink", "topk", "'int4', 'sparse'"),
        ("downlink", "bf16", "'fp32', 'fp16', 'int8', 'int4'"),
        ("partitioning", "by-writer", "'dirichlet'"),
        ("model-preset", "huge", "'paper'"),
        ("eval-fraction", 1.0, "between 0 and 1"),
        ("fraction-train", 0.0, "(0, 1]"),
        ("learning-rate", -0.1, "> 0, or 0.0 = preset's"),
        ("warmup-steps", -2, ">= 0, or -1 = preset's"),
        ("grad-clip", -0.5, ">= 0.0, or -1.0 = preset's"),
        ("client-optimizer", "adam", "'adamw', 'sgd'"),
        ("client-momentum", 1.0, "[0, 1)"),
        ("local-steps", -1, ">= 0"),
        ("seed", -3, ">= 0"),
        ("celeba-attribute", "Smile", "'Smiling'"),
        ("autoencoder", " ", "non-empty"),
        ("device", "tpu", "'auto', 'cpu', 'cuda'"),
        ("mixed-precision", "fp8", "'no', 'fp16', 'bf16'"),
        ("compile", "reduce-overhead", "'no', 'default', 'max-autotune-no-cudagraphs'"),
    ],
)
def test_invalid_values_name_key_value_and_allowed(key: str, value: object, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({key: value})
    message = str(err.value)
    assert key in message and repr(value) in message and allowed in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("batch-size", "64"),
        ("batch-size", 64.0),
        ("num-server-rounds", True),
        ("strategy", 1),
        ("error-feedback", 1),
    ],
)
def test_wrong_types_are_rejected(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"{key}=.*has type"):
        RunConfig.from_mapping({key: value})


def test_unknown_key_lists_the_allowed_keys() -> None:
    with pytest.raises(ConfigError, match="unknown run-config key 'num-rounds'.*num-server-rounds"):
        RunConfig.from_mapping({"num-rounds": 3})


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ("uplnk", "uplink"),
        ("downlink-dtype", "downlink"),
        ("proximal-m", "proximal-mu"),
        ("server-optimiser", "server-optimizer"),
        ("num-server-round", "num-server-rounds"),
    ],
)
def test_unknown_key_names_the_closest_known_key(given: str, meant: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({given: 1})
    assert str(err.value).startswith(
        f"unknown run-config key {given!r}; did you mean {meant!r}? allowed keys: aggregation, "
    )
    with pytest.raises(ConfigError, match=f"did you mean {meant!r}"):
        RunConfig.key_type(given)


def test_unknown_key_far_from_every_key_gets_no_guess() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({"zzzz": 1})
    assert "did you mean" not in str(err.value)
    assert str(err.value).startswith("unknown run-config key 'zzzz'; allowed keys: aggregation")


def test_key_type_is_the_type_of_the_default() -> None:
    assert RunConfig.key_type("uplink") is str
    assert RunConfig.key_type("proximal-mu") is float
    assert RunConfig.key_type("num-server-rounds") is int
    assert RunConfig.key_type("channels-last") is bool


@pytest.mark.parametrize(
    ("shortcut", "overrides", "expected"),
    [
        ("vanilla", {}, {"proximal_mu": 0.0, "uplink": "fp32"}),
        ("prox", {}, {"proximal_mu": 0.01, "uplink": "fp32"}),
        ("prox", {"proximal-mu": 0.5}, {"proximal_mu": 0.5}),
        ("quant", {}, {"uplink": "int8", "proximal_mu": 0.0}),
        ("quant", {"uplink": "int4"}, {"uplink": "int4"}),
        ("quant", {"server-optimizer": "fedadam"}, {"server_optimizer": "fedadam"}),
    ],
)
def test_shortcuts_set_their_keys(shortcut: str, overrides: dict, expected: dict) -> None:
    cfg = RunConfig.from_mapping({"strategy": shortcut, **overrides})
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.label == shortcut


@pytest.mark.parametrize(
    ("shortcut", "key", "value"),
    [
        ("vanilla", "proximal-mu", 0.01),
        ("vanilla", "uplink", "int4"),
        ("prox", "uplink", "int8"),
        ("quant", "uplink", "fp16"),
        ("quant", "proximal-mu", 0.1),
    ],
)
def test_a_key_the_shortcut_contradicts_names_both(shortcut: str, key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({"strategy": shortcut, key: value})
    message = str(err.value)
    assert f"strategy={shortcut!r}" in message and f"{key}={value!r}" in message


def test_custom_combinations_are_named_by_their_keys() -> None:
    cfg = RunConfig.from_mapping(
        {"proximal-mu": 0.01, "uplink": "int4", "server-optimizer": "fedadam"}
    )
    assert cfg.label == "prox0.01-int4-fedadam"
    assert RunConfig.from_mapping({}).label == "vanilla"


@pytest.mark.parametrize(
    ("preset", "optimizer", "lr", "warmup", "clip"),
    [
        ("tiny", "adamw", 3e-3, 0, 0.0),  # what every documented tiny run used
        ("paper", "adamw", 2e-4, 20, 1.0),  # the DDPM paper's lr and clip, a per-round warm-up
        ("tiny", "sgd", 0.1, 0, 1.0),
        ("paper", "sgd", 0.01, 20, 1.0),
    ],
)
def test_presets_carry_their_training_defaults(
    preset: str, optimizer: str, lr: float, warmup: int, clip: float
) -> None:
    cfg = RunConfig.from_mapping({"model-preset": preset, "client-optimizer": optimizer})
    assert (cfg.learning_rate, cfg.warmup_steps, cfg.grad_clip) == (lr, warmup, clip)
    assert TRAINING_DEFAULTS[preset][optimizer] == {
        "learning-rate": lr,
        "warmup-steps": warmup,
        "grad-clip": clip,
    }
    # run_config.json records the effective values, and reading it back changes nothing.
    assert cfg.to_dict()["learning-rate"] == lr
    assert RunConfig.from_mapping(cfg.to_dict()) == cfg
    # scripts/run.sh's pre-flight merges the --run-config over the (unresolved) defaults.
    assert overrides.check([f"model-preset='{preset}' client-optimizer='{optimizer}'"]) == cfg


def test_an_explicit_training_value_overrides_the_preset() -> None:
    cfg = RunConfig.from_mapping(
        {"model-preset": "paper", "learning-rate": 1e-3, "warmup-steps": 0, "grad-clip": 0.0}
    )
    assert (cfg.learning_rate, cfg.warmup_steps, cfg.grad_clip) == (1e-3, 0, 0.0)
    cfg = RunConfig.from_mapping({"model-preset": "tiny", "grad-clip": 2.5})
    assert (cfg.learning_rate, cfg.warmup_steps, cfg.grad_clip) == (3e-3, 0, 2.5)


def test_every_preset_has_training_defaults_for_every_client_optimizer() -> None:
    from feddm_flower.config import CLIENT_OPTIMIZERS, PRESETS
    from feddm_flower.task.models import unet_config

    assert PRESETS == tuple(TRAINING_DEFAULTS)
    for preset in PRESETS:  # and a U-Net for each, at FashionMNIST's 28 px
        assert unet_config(preset, 28, 1)["sample_size"] == 28
    for preset in PRESETS:
        assert tuple(TRAINING_DEFAULTS[preset]) == CLIENT_OPTIMIZERS
        for values in TRAINING_DEFAULTS[preset].values():
            assert RunConfig.from_mapping(values).to_dict().items() >= values.items()


def test_classes_parse_and_fit_the_dataset() -> None:
    assert parse_classes("") == () and parse_classes("5-9") == (5, 6, 7, 8, 9)
    assert parse_classes("0, 2,4-5,2") == (0, 2, 4, 5)
    assert RunConfig.from_mapping({"classes": "0-4"}).classes == "0-4"
    for bad, match in (("5-", "e.g. '5-9'"), ("a", "e.g. '5-9'"), ("9-5", "e.g. '5-9'"),
                       ("3-10", "has classes 0-9")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"classes={bad!r}.*{match}"):
            RunConfig.from_mapping({"classes": bad})
    with pytest.raises(ConfigError, match="classes='1'.*dataset='celeba'"):
        RunConfig.from_mapping({"classes": "1", "dataset": "celeba"})
