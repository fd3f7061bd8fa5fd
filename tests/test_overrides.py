"""Pre-flight of `flwr run --run-config` values: Flower's parsing, our validation, run.sh."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from feddm_flower.app import overrides
from feddm_flower.app.compat import parse_config_args
from feddm_flower.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "configs",
    [
        ["uplink='int8' num-server-rounds=3 proximal-mu=0.01 channels-last=true"],
        ["data-root='/tmp/a b' seed=2", 'autoencoder="none"', "seed=5"],
        ["learning-rate=1e-3", ""],
    ],
)
def test_values_are_read_as_flower_reads_them(configs: list[str]) -> None:
    parsed = overrides.parse(configs)
    assert parsed == parse_config_args(configs)
    overrides.check(configs)


def test_later_values_win_and_are_typed() -> None:
    cfg = overrides.check(["seed=1 uplink='int8'", "seed=2 learning-rate=1"])
    assert (cfg.seed, cfg.uplink, cfg.learning_rate) == (2, "int8", 1.0)


@pytest.mark.parametrize(
    ("configs", "message"),
    [
        (["uplnk='int8'"], "unknown run-config key 'uplnk'; did you mean 'uplink'?"),
        (["uplink='int3'"], "run-config uplink='int3' is invalid: allowed is one of 'fp32'"),
        (["uplink=int8"], "a string needs quotes: uplink='int8'"),
        (["channels-last=True"], "booleans are true/false: channels-last=true"),
        (["uplink='int8"], "quotes must match"),
        (["uplink = 'int8'"], "cannot read \"uplink = 'int8'\" as key=value"),
        (["seed=1 num-server-rounds"], "cannot read 'num-server-rounds' as key=value"),
        (["seed=1 seed=2"], "key 'seed' given twice"),
        (["seed=[1,2]"], "needs to be of type"),
        (["seed=1", "more.toml"], "must be the only --run-config"),
        (["/nonexistent/run.toml"], "run-config file '/nonexistent/run.toml' cannot be read"),
        (["strategy='vanilla' uplink='int4'"], "strategy='vanilla' contradicts uplink='int4'"),
    ],
)
def test_what_flower_refuses_or_drops_is_a_clear_error(configs: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        overrides.check(configs)
    assert message in str(err.value)


def test_a_toml_file_alone_is_read(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("uplink = 'int4'\nnum-server-rounds = 2\n")
    cfg = overrides.check([str(path)])
    assert (cfg.uplink, cfg.num_server_rounds) == ("int4", 2)
    path.write_text("uplnk = 'int4'\n")
    with pytest.raises(ConfigError, match="did you mean 'uplink'"):
        overrides.check([str(path)])


def test_cli_exit_codes_and_run_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert overrides.main(["uplnk='int8'"]) == 2
    err = capsys.readouterr().err
    assert "error: unknown run-config key 'uplnk'; did you mean 'uplink'?" in err
    out = f"output-dir='{tmp_path / 'out'}'"
    assert overrides.main(["--print-run-dir", out, "seed=1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert overrides.main(["--print-run-dir", out, f"resume='{tmp_path / 'old'}'"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "old")
    assert overrides.main(["--print-run-dir", "output-dir=''"]) == 0
    assert capsys.readouterr().out == "\n"


def test_the_pre_flight_builds_the_starting_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """init-from and the lora-* keys fail here, with the key, before Flower starts."""
    assert overrides.main([f"init-from='{tmp_path / 'none'}'"]) == 2
    assert f"init-from='{tmp_path / 'none'}': no such directory" in capsys.readouterr().err
    assert overrides.main(["trainable='lora' lora-targets='conv1,nope'"]) == 2
    assert "lora-targets='conv1,nope': no module named ['nope']" in capsys.readouterr().err
    assert overrides.main(["trainable='lora' lora-rank=16"]) == 0


def _run_sh(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDDM_FLWR_HOME": str(tmp_path / "flwr-home")}
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "run.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--run-config", "num-server-rounds=1", "--run-config", "uplnk='int8'"],
        ["-c", "uplnk='int8'"],
        ["--run-config=uplnk='int8'"],
    ],
)
def test_run_sh_refuses_a_misspelt_key_before_flower_starts(
    tmp_path: Path, args: list[str]
) -> None:
    start = time.monotonic()
    proc = _run_sh(tmp_path, *args, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unknown run-config key 'uplnk'; did you mean 'uplink'?" in proc.stderr
    assert time.monotonic() - start < 15  # ~1 s idle: setup check + one Python start
    assert not (tmp_path / "flwr-home").exists()  # `flwr run` never ran: it creates FLWR_HOME


def test_run_sh_fails_when_the_server_app_fails(tmp_path: Path) -> None:
    """One real `flwr run`: a resume directory that is no run directory passes the pre-flight
    (it is a valid string) and makes the ServerApp raise; `flwr run` itself exits 0. The stale
    summary.json in it must not count as this run's."""
    stale = tmp_path / "not-a-run"
    stale.mkdir()
    (stale / "summary.json").write_text(json.dumps({"round": 1}))
    os.utime(stale / "summary.json", (time.time() - 3600, time.time() - 3600))
    config = (
        f"resume='{stale}' num-server-rounds=1 local-steps=1 sample-steps=1 grid-samples=1 "
        "eval-max-examples=8 batch-size=8"
    )
    proc = _run_sh(tmp_path, "--run-config", config, timeout=600)
    output = proc.stdout + proc.stderr
    assert "is not a feddm-flower run directory" in output  # the ServerApp ran and raised
    assert proc.returncode == 1, output
    assert f"run did not finish: no summary.json in {stale}; see the log above" in proc.stderr
