"""A node's own settings: what its operator started the SuperNode with wins over the run's.

A node's operator owns its machine: where it reads data, writes caches and finds the
autoencoder, which device and how many threads it uses. Flower hands a SuperNode's
``--node-config`` to every ClientApp as ``Context.node_config`` (``scripts/deploy/supernode.sh``
fills it from its environment); the keys below set there replace the run-config's values, and
the node logs once which run-config value it ignored. With ``run-paths='refuse'`` the node also
refuses any run that names a path or a model source of its own (a :class:`Refused` error
reply; the node keeps running). In a simulation node-configs hold none of these keys, so the
run-config decides, as before. Ours: Flower has no notion of run keys a node may override.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Mapping

from feddm_flower.config import ConfigError, RunConfig
from feddm_flower.protocol import NUM_THREADS, STATE_DIR

log = logging.getLogger(__name__)

# Run-config keys a node-config may set: node-config wins.
NODE_OWNED = ("data-root", "latent-cache-dir", "autoencoder", "device")
# Of these, the ones that name a path or a model source on the node.
PATH_KEYS = ("data-root", "latent-cache-dir", "autoencoder")
RUN_PATHS = "run-paths"  # node-config: 'allow' (default) or 'refuse' run-chosen PATH_KEYS
RUN_PATHS_VALUES = ("allow", "refuse")
# Node-config keys that are the node's alone (no run-config key), with their types.
NODE_ONLY = {STATE_DIR: str, NUM_THREADS: int, RUN_PATHS: str}
_logged: set[tuple[str, str, str]] = set()


class Refused(Exception):
    """The node refuses the run: it names a path or model source the node's operator did
    not allow, or the node's own settings are invalid (the message says which key)."""


def check_node_config(node_config: Mapping[str, object]) -> dict[str, object]:
    """The node-owned run-config values of ``node_config``, checked as the run-config checks
    them; :class:`~feddm_flower.config.ConfigError` naming the key (``node-config ...``) for a
    value of the wrong type or outside what the key allows."""
    owned = {k: v for k, v in node_config.items() if k in NODE_OWNED}
    for key, kind in NODE_ONLY.items():
        value = node_config.get(key)
        if value is not None and (type(value) is not kind):
            raise ConfigError(f"node-config {key}={value!r} has type {type(value).__name__}; "
                              f"allowed is a {kind.__name__}")  # fmt: skip
    paths = node_config.get(RUN_PATHS, "allow")
    if paths not in RUN_PATHS_VALUES:
        raise ConfigError(f"node-config {RUN_PATHS}={paths!r} is invalid: allowed is one of "
                          f"{', '.join(map(repr, RUN_PATHS_VALUES))}")  # fmt: skip
    try:
        RunConfig.from_mapping(owned)
    except ConfigError as exc:
        raise ConfigError(f"node-config {str(exc).removeprefix('run-config ')}") from exc
    return owned


def node_view(cfg: RunConfig, node_config: Mapping[str, object]) -> RunConfig:
    """``cfg`` as this node runs it: its node-config's own values in place of the run's
    (each ignored run value logged once); :class:`Refused` if the node refuses the run."""
    try:
        owned = check_node_config(node_config)
    except ConfigError as exc:
        raise Refused(str(exc)) from exc
    run = cfg.to_dict()
    defaults = RunConfig().to_dict()
    if node_config.get(RUN_PATHS, "allow") == "refuse":
        for key in PATH_KEYS:
            if key not in owned and run[key] != defaults[key]:
                raise Refused(f"run-config {key}={run[key]!r} is chosen by the run, and this "
                              f"node refuses run-chosen paths (node-config {RUN_PATHS}="
                              f"'refuse'); its operator sets {key} in its node-config")  # fmt: skip
    for key, value in owned.items():
        seen = (key, str(run[key]), str(value))
        if run[key] != value and seen not in _logged:
            _logged.add(seen)
            log.warning("node-config %s=%r wins over run-config %s=%r (ignored on this node)",
                        key, value, key, run[key])  # fmt: skip
    return dataclasses.replace(cfg, **{k.replace("-", "_"): v for k, v in owned.items()})


def main(argv: list[str]) -> int:
    """``python -m feddm_flower.app.node_settings "<node-config>"``: check a SuperNode's
    node-config before it starts (scripts/deploy/supernode.sh); exit 2 naming the bad key."""
    from feddm_flower.app.overrides import parse

    try:
        check_node_config(parse(argv))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
