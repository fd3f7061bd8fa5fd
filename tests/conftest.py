"""Shared fixtures: a real `flwr run` against a local SuperLink in a throw-away FLWR_HOME."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from feddm_flower.app.compat import act_as_server_app
from feddm_flower.app.launch import flwr_executable, run_config_text, stop_local_superlink

REPO = Path(__file__).resolve().parents[1]
FLWR = flwr_executable()
# A run small enough for tests: 2 rounds of 2 local steps, tiny evaluation and sampling.
TINY_RUN = {
    "num-server-rounds": 2,
    "local-steps": 2,
    "batch-size": 16,
    "eval-max-examples": 16,
    "server-eval-examples": 50,
    "sample-steps": 3,
    "grid-samples": 4,
}


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A randomly initialised KL-f8 AutoencoderKL (4 levels, 4 latent channels), cheap on CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=256,
        )


@pytest.fixture(scope="module")
def server_identity() -> None:
    """Flower's task identity as a ServerApp process sets it: strategies build messages."""
    act_as_server_app()


@pytest.fixture(scope="session")
def flwr_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("flwr-home")
    yield home
    stop_local_superlink(home)


@pytest.fixture(scope="session")
def flwr_run(flwr_home: Path):
    """Run the app with `flwr run . --stream` on the simulation engine; return the process."""

    def run(
        run_config: dict[str, object],
        num_supernodes: int = 2,
        timeout: float = 600,
        app_dir: Path = REPO,
    ) -> subprocess.CompletedProcess[str]:
        overrides = run_config_text(run_config)
        env = {
            **os.environ,
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        cmd = [FLWR, "run", str(app_dir), "--stream", "--run-config", overrides]
        cmd.append("--federation-config")
        cmd.append(f"num-supernodes={num_supernodes} client-resources-num-cpus=1")
        return subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )

    return run
