"""Real deployment on loopback: `flower-superlink`, `flower-supernode` and `flwr run` processes,
started with the scripts of ``scripts/deploy/`` that docs/deployment.md tells users to run.

Every test gets its own FLWR_HOME, free ports and output directory under ``tmp_path``; every
process is bounded by a timeout and killed, with all its descendants, by process id at the end.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TINY_RUN
from diffusers import DDPMPipeline

from feddm_flower.app.launch import free_port, start_on_free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "scripts" / "deploy"
BIN = Path(sys.executable).parent  # the venv's flwr, flower-superlink, flower-supernode
RUN_TIMEOUT = 480  # seconds for one tiny run (about 1 min on 2 idle cores)

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(
        not all((BIN / t).exists() for t in ("flwr", "flower-superlink", "flower-supernode")),
        reason="Flower's deployment CLIs are not installed in this environment",
    ),
]


# --- process helpers -----------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Flower detaches some children into new sessions)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def die_with_pytest() -> None:
    """Run in a started child: the kernel SIGKILLs it should pytest itself be killed before the
    fixture's cleanup runs (Linux; Flower's own children exit when their parent is gone)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants, like a machine that loses power. All are stopped
    (SIGSTOP) first, so none can start another process in between."""
    stopped: set[int] = set()
    while new := set(process_tree(pid)) - stopped:
        for p in new:
            _signal(p, signal.SIGSTOP)
        stopped |= new
    for p in stopped:
        _signal(p, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_for(what: str, check: Callable[[], object], timeout: float, logs: Callable[[], str]):
    """Poll ``check`` until it returns something truthy; fail with the logs after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs()}")


def read_rows(run_dir: Path) -> list[dict]:
    """The complete lines of the run's metrics.jsonl (it may be being written)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def toml_overrides(run_config: dict[str, object]) -> str:
    def value(v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        return f"'{v}'" if isinstance(v, str) else repr(v)

    return " ".join(f"{k}={value(v)}" for k, v in run_config.items())


class Federation:
    """A SuperLink and its SuperNodes on 127.0.0.1, each a real process started by the
    ``scripts/deploy`` scripts, plus the `flwr` CLI pointed at them through a connection in
    this test's own FLWR_HOME. ``stop()`` kills everything it started."""

    def __init__(
        self, root: Path, tls: bool = True, auth: bool = False, persistent: bool = False
    ) -> None:
        self.root, self.tls, self.auth = root, tls, auth
        self.port = 0  # the SuperLink's, once started
        self.conn = "deploy"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(root / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "CERTS_DIR": str(root / "certs"),
            "CA_CERT": str(root / "certs" / "ca.crt"),
            # SQLite state only where a restart needs it; in memory it costs less CPU.
            "STATE_DIR": str(root / "superlink-state") if persistent else "",
        }
        self.env.pop("INSECURE", None)
        if tls:
            self.script("make-certs.sh", "127.0.0.1", str(root / "certs"))

    # processes

    def start(self, name: str, cmd: list[str], **env: str) -> subprocess.Popen:
        with (self.root / f"{name}.log").open("w") as log:
            self.procs[name] = subprocess.Popen(
                cmd,
                cwd=REPO,  # `flwr run .` ships the app in the working directory
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # no terminal signals from pytest's session
                preexec_fn=die_with_pytest,
            )
        return self.procs[name]

    def start_superlink(self, name: str = "superlink") -> subprocess.Popen:
        """Start the SuperLink and wait until it listens (SuperNodes retry, `flwr` does not):
        the first time on a free port, then the `flwr` connection to it; again on that port."""
        flags = ([] if self.tls else ["--insecure"]) + (["--auth"] if self.auth else [])
        cmd = [str(DEPLOY / "superlink.sh"), *flags]
        listening = re.compile(r"Uvicorn running on https?://127\.0\.0\.1:\d+")

        def start(port: int) -> subprocess.Popen:
            return self.start(name, cmd, HOST="127.0.0.1", PORT=str(port))

        def wait(proc: subprocess.Popen) -> None:
            def up() -> object:
                assert proc.poll() is None, f"{name} exited:\n{self.logs()}"
                return listening.search(self.log(name))

            wait_for(f"{name} to listen", up, 60, self.logs)

        if self.port:
            wait(proc := start(self.port))
            return proc
        proc, self.port = start_on_free_port(start, wait, lambda: self.log(name))
        self.env["SUPERLINK"] = f"127.0.0.1:{self.port}"
        security = str(self.root / "certs" / "ca.crt") if self.tls else "--insecure"
        self.script("add-connection.sh", self.conn, f"127.0.0.1:{self.port}", security)
        return proc

    def start_supernode(
        self, name: str, partition: int, partitions: int, key: Path | None = None, **env: str
    ) -> subprocess.Popen:
        """A SuperNode; ``env`` sets supernode.sh's variables (its node settings)."""
        cmd = [str(DEPLOY / "supernode.sh"), str(partition), str(partitions)]
        cmd += [] if self.tls else ["--insecure"]
        env = {"PORT": str(free_port()), "AUTH_KEY": str(key) if key else "", **env}
        return self.start(name, cmd, **env)

    def start_two_supernodes(self, **settings: dict[str, str]) -> set[str]:
        """A SuperLink and SuperNodes sn0, sn1 for partitions 0 and 1 of 2 (``settings``: each
        one's supernode.sh variables by name); their node ids."""
        self.start_superlink()
        self.start_supernode("sn0", 0, 2, **settings.get("sn0", {}))
        self.start_supernode("sn1", 1, 2, **settings.get("sn1", {}))
        return {self.node_id("sn0"), self.node_id("sn1")}

    def kill(self, name: str) -> None:
        """Crash one process and its children (no chance to clean up or say goodbye)."""
        proc = self.procs[name]
        kill_tree(proc.pid)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            kill_tree(proc.pid)
        for proc in self.procs.values():
            proc.wait(timeout=30)

    # observing

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        """The end of every process's log, for failure messages."""
        return "\n".join(f"--- {n}.log ---\n{self.log(n)[-3000:]}" for n in self.procs)

    def node_id(self, name: str, timeout: float = 90) -> str:
        """The SuperNode's id, once it is connected to the SuperLink."""

        def connected() -> str | None:
            match = re.search(r"SuperNode ID: (\d+)", self.log(name))
            return match and match.group(1)

        return wait_for(f"SuperNode {name} to connect", connected, timeout, self.logs)

    # the CLI

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def script(self, name: str, *args: str) -> str:
        proc = self.cli(str(DEPLOY / name), *args)
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def run_command(self, run_config: dict[str, object]) -> list[str]:
        """`flwr run . <connection> --stream`: submits the app, then streams the run's logs
        until the run has finished."""
        return ["flwr", "run", ".", self.conn, "--stream", "--run-config"] + [
            toml_overrides(run_config)
        ]

    def run(self, run_config: dict[str, object]) -> tuple[str, str]:
        """Run the app to the end; return the run id and the streamed logs."""
        proc = self.cli(*self.run_command(run_config), timeout=RUN_TIMEOUT)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"flwr run failed:\n{out}\n{self.logs()}"
        return run_id(out), out

    def status(self, run: str) -> str:
        proc = self.cli("flwr", "list", self.conn, "--run-id", run, "--format", "json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout)["runs"][0]["status"]


def run_id(cli_output: str) -> str:
    match = re.search(r"Successfully started run (\d+)", cli_output)
    assert match, f"no run id in:\n{cli_output}"
    return match.group(1)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Callable[..., Federation]]:
    """Make Federations in ``tmp_path``; all their processes are killed afterwards."""
    made: list[Federation] = []

    def make(**kwargs: bool) -> Federation:
        made.append(Federation(tmp_path, **kwargs))
        return made[-1]

    try:
        yield make
    finally:
        for fed in made:
            fed.stop()


def assert_finished(fed: Federation, run: str, out_dir: Path, rounds: int, nodes: set[str]):
    """The run completed all ``rounds`` and saved a loadable pipeline."""
    assert fed.status(run) == "finished:completed", fed.logs()
    rows = read_rows(out_dir)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1)), rows
    for r in rows:
        assert set(r["bytes-up-per-node"]) <= nodes, (r["bytes-up-per-node"], nodes)
    assert DDPMPipeline.from_pretrained(out_dir / "pipeline").unet.config.sample_size == 28
    return rows


# --- tests ---------------------------------------------------------------------------------


def test_free_ports_are_never_handed_out_twice_and_a_taken_port_is_retried(
    tmp_path: Path,
) -> None:
    """Two nodes started one after the other never get the same port, even before either
    binds it; a process whose port another process took in between starts again on a new one
    (here a real listener holds the first port, and the process says so as Flower does)."""
    assert len({free_port() for _ in range(200)}) == 200
    log = tmp_path / "server.log"
    holder = socket.socket()
    tried: list[int] = []

    def start(port: int) -> subprocess.Popen:
        if not tried:
            holder.bind(("127.0.0.1", port))  # another process takes it first
            holder.listen()
        tried.append(port)
        code = (
            "import socket, sys\n"
            "s = socket.socket()\n"
            f"try: s.bind(('127.0.0.1', {port}))\n"
            f"except OSError: sys.exit('Port in server address :{port} is already in use.')\n"
            "print('listening', flush=True)\n"
        )
        with log.open("w") as out:
            return subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=out)

    def wait(proc: subprocess.Popen) -> None:
        assert proc.wait(timeout=60) == 0 and "listening" in log.read_text()

    with holder:
        proc, port = start_on_free_port(start, wait, log.read_text)
    assert len(tried) == 2 and port == tried[1] != tried[0] and proc.returncode == 0


def test_two_supernodes_complete_a_run_insecure_each_on_its_own_settings(
    federation, tmp_path: Path
) -> None:
    """Under the default run-config each node gets one message a round (the train message,
    which measures the model it received: eval-loss) and one evaluate message after the last
    round (final-eval-loss). A run that names its own data-root: sn0, started with its own,
    reads that one and logs the run value it ignored; sn1 refuses run-chosen paths, answers
    every message with an error reply and keeps running; the run completes on sn0."""
    fed = federation(tls=False)
    own = tmp_path / "sn0-data"
    nodes = fed.start_two_supernodes(sn0={"NODE_DATA_ROOT": str(own)},
                                     sn1={"RUN_PATHS": "refuse"})  # fmt: skip
    assert "WARNING: SuperLink WITHOUT TLS" in fed.log("superlink")  # never silently insecure
    sn0, sn1 = fed.node_id("sn0"), fed.node_id("sn1")

    out, the_runs = tmp_path / "run", tmp_path / "the-run-s-data"
    run, logs = fed.run({**TINY_RUN, "output-dir": str(out), "data-root": str(the_runs)})
    assert "FedDM run finished" in logs  # `--stream` shows the ServerApp's log to the end
    rows = assert_finished(fed, run, out, 2, nodes)
    # sn0 unpacked its data into its own directory, and named the run's only to say it
    # ignored it (the server read the run's: it measures global-loss there).
    assert f"into {own / 'FashionMNIST' / 'raw'}" in fed.log("sn0")
    assert f"node-config data-root='{own}' wins over run-config data-root" in fed.log("sn0")
    assert fed.log("sn0").count(str(the_runs)) == 1
    for name in ("sn0", "sn1"):  # every ClientApp message, as the SuperNode received it
        received = re.findall(r"Receiving: (\w+) message", fed.log(name))
        assert received == ["train", "train", "evaluate"], (name, received)
    for r in rows:
        assert set(r["bytes-up-per-node"]) == {sn0} and "missing" not in r
        assert r["eval-loss"] > 0  # sn0's loss of the model it received
        phases = ["train", "evaluate"] if r["round"] == 2 else ["train"]
        assert [(x["node"], x["phase"]) for x in r["rejected"]] == [(sn1, p) for p in phases]
        assert all("refuses run-chosen paths" in x["reason"] for x in r["rejected"])
    # Round 2's nodes received round 1's model, which trained: its loss is below the start's.
    assert rows[1]["eval-loss"] < rows[0]["eval-loss"]
    assert "final-eval-loss" not in rows[0] and rows[1]["final-eval-loss"] > 0
    assert fed.procs["sn1"].poll() is None  # the refusing node keeps running


def test_over_tls_authentication_refuses_unregistered_nodes(federation, tmp_path: Path):
    """TLS with node authentication: the registered nodes complete a run, the others are
    refused."""
    fed = federation(tls=True, auth=True)
    fed.start_superlink()
    assert "Uvicorn running on https://127.0.0.1" in fed.log("superlink")
    keys = tmp_path / "keys"
    registered = set()
    for name in ("sn0", "sn1"):
        out = fed.script("register-supernode.sh", str(keys / name), fed.conn)
        registered |= set(re.findall(r"SuperNode (\d+) registered successfully", out))
    assert len(registered) == 2
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(keys / "rogue")],
        check=True,
    )
    fed.start_supernode("sn0", 0, 2, key=keys / "sn0")
    fed.start_supernode("sn1", 1, 2, key=keys / "sn1")
    rogue = fed.start_supernode("rogue", 0, 2, key=keys / "rogue")  # key never registered
    anonymous = fed.start_supernode("anonymous", 1, 2)  # no key at all
    assert {fed.node_id("sn0"), fed.node_id("sn1")} == registered
    assert "--insecure" not in fed.log("sn0") + fed.log("sn1")

    for name, proc in (("rogue", rogue), ("anonymous", anonymous)):
        assert proc.wait(timeout=60) != 0, fed.log(name)
        assert "Failed to initialize the connection to the SuperLink" in fed.log(name)
        assert "SuperNode ID" not in fed.log(name)
    assert "No SuperNode found with the given public key" in fed.log("superlink")

    out = tmp_path / "run"  # one round: TLS changes the transport, not the rounds
    run, _ = fed.run({**TINY_RUN, "num-server-rounds": 1, "output-dir": str(out)})
    [row] = assert_finished(fed, run, out, 1, registered)
    assert set(row["bytes-up-per-node"]) == registered


def test_a_supernode_that_dies_mid_run_is_reported_missing(federation, tmp_path: Path):
    fed = federation(tls=True)
    fed.start_superlink()
    fed.start_supernode("survivor", 0, 2)
    fed.start_supernode("victim", 1, 2)
    survivor, victim = fed.node_id("survivor"), fed.node_id("victim")

    out = tmp_path / "run"
    # The round stops waiting for the dead node when Flower marks it offline (no heartbeat for
    # 60 s) or at round-timeout. 30 s would be quicker, but on a busy 2-core machine even a
    # healthy node's first ClientApp call can take longer: then every node is "missing".
    config = {**TINY_RUN, "round-timeout": 90, "min-nodes": 1, "output-dir": str(out)}
    flwr_run = fed.start("flwr-run", fed.run_command(config))
    wait_for(
        "the victim to receive its first training message",
        lambda: "Receiving: train message" in fed.log("victim"),
        RUN_TIMEOUT,
        fed.logs,
    )
    fed.kill("victim")  # mid-training of round 1

    assert flwr_run.wait(timeout=RUN_TIMEOUT) == 0, fed.logs()
    run = run_id(fed.log("flwr-run"))
    rows = assert_finished(fed, run, out, 2, {survivor, victim})
    assert rows[0].get("missing") == [victim], rows[0]
    assert "rejected" not in rows[0], rows[0]  # the SuperLink's stand-in error is no bad reply
    assert set(rows[0]["bytes-up-per-node"]) == {survivor}  # aggregated what came
    assert all(set(r["bytes-up-per-node"]) == {survivor} for r in rows)
    assert f"Round 1: no training reply from nodes [{victim}]" in fed.log("flwr-run")


def test_resume_after_the_superlink_crashes(federation, tmp_path: Path) -> None:
    fed = federation(tls=True, persistent=True)
    nodes = fed.start_two_supernodes()

    out = tmp_path / "run"
    first = fed.start("flwr-run", fed.run_command({**TINY_RUN, "output-dir": str(out)}))

    def round_one_saved() -> bool:  # its metrics line, then its checkpoint, are written
        try:
            state = json.loads((out / "checkpoint" / "feddm_state.json").read_text())
        except FileNotFoundError:
            return False
        return state["round"] >= 1 and 1 in [r["round"] for r in read_rows(out)]

    wait_for("round 1 to be checkpointed", round_one_saved, RUN_TIMEOUT, fed.logs)
    fed.kill("superlink")  # the server machine dies: SuperLink, SuperExec and ServerApp
    assert first.wait(timeout=60) != 0  # the streaming CLI notices the lost SuperLink
    assert not (out / "pipeline").exists()

    # Restarted on the same state (STATE_DIR), it knows the SuperNodes, which reconnect by
    # themselves; the crashed run is still `running` in that state and is stopped by hand.
    fed.start_superlink("superlink-restarted")
    crashed = run_id(fed.log("flwr-run"))
    assert fed.status(crashed) == "running"
    stop = fed.cli("flwr", "stop", crashed, fed.conn)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert fed.status(crashed) == "finished:stopped"
    run, logs = fed.run({**TINY_RUN, "num-server-rounds": 3, "resume": str(out)})
    assert "Resuming after round 1 of 3" in logs
    rows = assert_finished(fed, run, out, 3, nodes)  # rounds 1, 2, 3, each once
    assert all(set(r["bytes-up-per-node"]) == nodes for r in rows)  # same SuperNodes
    assert (out / "samples" / "round_003.png").exists()
