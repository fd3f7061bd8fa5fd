"""Check `flwr run --run-config` overrides before Flower starts (scripts/run.sh, ablate).

    python -m feddm_flower.app.overrides "uplink='int8' num-server-rounds=3" [...]

Each argument is one ``--run-config`` value, in order (a later key wins, as in Flower). They
are read by Flower's own parser (``parse_config_args``, app/compat.py: space-separated
``key=value`` with TOML values, or the path of one TOML file), merged over the defaults and
validated by ``RunConfig.from_mapping``. Exits 0 if the run-config is valid, else 2 with the
reason on stderr. ``--print-run-dir`` prints where the ServerApp will write (``resume`` if
set, else ``output-dir``, made absolute; empty for the default directory).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from feddm_flower.config import ConfigError, RunConfig, Value

# Flower's key=value pattern (flwr.common.config.parse_config_args); used here only to find
# the text Flower would silently drop and to name the pair it cannot read.
PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def parse(configs: Sequence[str]) -> dict[str, Value]:
    """The ``--run-config`` values as Flower reads them: one flat dict, later keys winning.

    Raises ``ConfigError`` where Flower would fail or silently ignore part of the text.
    """
    import click

    from feddm_flower.app.compat import parse_config_args

    configs = list(configs)
    is_file = len(configs) == 1 and configs[0].endswith(".toml")
    if not is_file:
        for text in configs:
            _check_pairs(text)
    try:
        return parse_config_args(configs)
    except OSError as err:
        raise ConfigError(f"run-config file {configs[0]!r} cannot be read: {err}") from err
    except click.ClickException as err:  # a value that is not TOML (checked above; fallback)
        raise ConfigError(f"run-config {' '.join(configs)!r}: {err.message}") from err
    except ValueError as err:  # a TOML file beside key=value pairs, a list value, bad TOML file
        hint = ""
        if any(c.endswith(".toml") for c in configs) and not is_file:
            hint = (
                " (a run-config TOML file must be the only --run-config; scripts/run.sh and "
                "the ablation set output-dir themselves, so give them key=value pairs)"
            )
        raise ConfigError(f"run-config: {err}{hint}") from err


def _check_pairs(text: str) -> None:
    """Refuse text Flower would drop unread, a value that is not TOML, a key given twice."""
    if text.endswith(".toml"):
        return  # Flower refuses a TOML file beside other --run-config values; parse() says so
    left = PAIR.sub(" ", text).strip()
    if left:
        raise ConfigError(
            f"run-config {text!r}: cannot read {left!r} as key=value (no spaces around '=', "
            "strings quoted, e.g. \"uplink='int8' num-server-rounds=3\")"
        )
    pairs = PAIR.findall(text)
    for key, value in pairs:
        if _is_toml(f"{key} = {value}"):
            continue
        if _is_toml(f"v = {value}"):
            problem = f"{key!r} is not a TOML key"
        elif value in ("True", "False"):
            problem = f"booleans are true/false: {key}={value.lower()}"
        elif value[0] in "'\"":
            problem = f"{value} is not a TOML string (quotes must match)"
        else:
            problem = f"{value} is not a TOML value; a string needs quotes: {key}='{value}'"
        raise ConfigError(f"run-config {key}={value}: {problem}")
    twice = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
    if twice:
        raise ConfigError(f"run-config {text!r}: key {twice[0]!r} given twice")


def _is_toml(text: str) -> bool:
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return False
    return True


def check(configs: Sequence[str]) -> RunConfig:
    """Parse the ``--run-config`` values, merge them over the defaults and validate them;
    with ``init-from`` or LoRA, build the starting model as the server will (its keys'
    errors are ConfigErrors too)."""
    cfg = RunConfig.from_mapping({**RunConfig().to_dict(), **parse(configs)})
    if cfg.init_from or cfg.trainable == "lora":
        from feddm_flower.app.server_app import fresh_model  # torch: only where it is needed
        from feddm_flower.data.loading import IMAGE_SHAPES
        from feddm_flower.task.latents import model_space

        vae, channels, size = model_space(cfg.autoencoder, IMAGE_SHAPES[cfg.dataset])
        fresh_model(cfg, channels, size, latent=vae is not None)
    return cfg


def run_dir(cfg: RunConfig) -> str:
    """Where the ServerApp writes for ``cfg``: ``resume`` or ``output-dir``, absolute; '' if
    it picks a fresh default directory itself."""
    path = cfg.resume or cfg.output_dir
    return str(Path(path).expanduser().resolve()) if path else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", metavar="RUN_CONFIG", help="a --run-config value")
    parser.add_argument(
        "--print-run-dir", action="store_true", help="print the run directory if valid"
    )
    args = parser.parse_args(argv)
    try:
        cfg = check(args.configs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_run_dir:
        print(run_dir(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
