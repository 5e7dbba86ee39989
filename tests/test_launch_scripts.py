"""The bare-metal launch scripts, end to end on loopback.

`scripts/lego-cluster.sh` with a hosts file of `localhost` entries (run here, no
ssh): a head (broker + scheduler) and two node agents with two emulated GPUs each,
as real detached processes. The scheduler starts the actors of one workflow through
the agents; requests complete; `stop` leaves no process of any pidfile (actors
included) alive and no pidfile behind.

Its key copying, with a stand-in `ssh` that runs the copies here and only echoes the
launch commands: each remote host gets its own files, private, and no others. (Over a
real sshd, in a second network namespace: tests/test_two_hosts.py.)
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from process_helpers import alive, environ, pidfiles  # tests/ is on sys.path

from broker import auth
from broker.catalog import load_catalog
from clients import Client
from clients.errors import Timeout
from clients.local import free_port

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = "flux-schnell-txt2img"
SCRIPT_TIMEOUT_S = 90


def _env(frontend_port: int, backend_port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEGO_")}
    env.update(
        LEGO_VENV=sys.prefix, LEGO_INSTALL="0",  # this interpreter's environment, as it is
        LEGO_FRONTEND_PORT=str(frontend_port), LEGO_BACKEND_PORT=str(backend_port),
        LEGO_WORKFLOWS=WORKFLOW,
        LEGO_BROKER_ARGS="--cost-scale 0.05",
        LEGO_SCHEDULER_ARGS="--admission off --actor-option time_scale=0.05 --interval-s 0.3",
        LEGO_START_TIMEOUT_S="45", LEGO_STOP_TIMEOUT_S="10",
    )
    return env


def _cluster(hosts: Path, action: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "lego-cluster.sh"), str(hosts), action],
                          env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)


def _logs(run: Path) -> str:
    return "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in sorted(run.rglob("*.log")))


def _wait_for_actors(frontend: str, models: set[str], timeout_s: float, key_file: str | None = None):
    deadline = time.monotonic() + timeout_s
    with Client(frontend, admin_timeout_s=2.0, key_file=key_file) as client:
        while True:
            try:
                stats = client.stats()
            except Timeout:
                stats = None
            if stats is not None and models <= {a.model for a in stats.actors if a.state != "draining"}:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"actors of {sorted(models)} did not all join within {timeout_s}s: {stats}")
            time.sleep(0.2)


def _assert_private(root: Path) -> None:
    """Run directories (made by the scripts), their logs/ and pids/ 0700; every log and pidfile 0600."""
    run_dirs = {p.parent for p in root.rglob("pids")}
    assert len(run_dirs) == 3  # the head's and the two nodes'
    for run in run_dirs:
        for folder in (run, run / "logs", run / "pids"):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    files = [*root.rglob("logs/*.log"), *root.rglob("pids/*.pid")]
    assert any(f.name.startswith("actor-") for f in files)  # the agents' files are checked too
    loose = {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files if stat.S_IMODE(f.stat().st_mode) != 0o600}
    assert not loose, loose


@pytest.mark.skipif(not shutil.which("setsid") or not (Path(sys.prefix) / "bin" / "python").exists(),
                    reason="needs setsid and a virtualenv")
@pytest.mark.parametrize("keys", [False, True], ids=["loopback", "keys-on-all-interfaces"])
def test_cluster_script_starts_serves_and_stops_everything(tmp_path, keys):
    frontend_port, backend_port = free_port(), free_port()
    frontend = f"tcp://127.0.0.1:{frontend_port}"
    env = _env(frontend_port, backend_port)
    key_file = {}
    if keys:  # keys on: the broker may bind every interface; each process gets its key from LEGO_KEYS_DIR
        paths = auth.make_cluster_keys(tmp_path / "keys")
        key_file = {"admin": str(paths["admin"]), "client": str(paths["client"])}
        env.update(LEGO_KEYS_DIR=str(tmp_path / "keys"), LEGO_BIND_HOST="0.0.0.0")
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "# head: broker + scheduler\n"
        f"localhost LEGO_RUN_DIR={tmp_path}/head\n"
        "\n"
        f"localhost LEGO_RUN_DIR={tmp_path}/a LEGO_NODE_HOST=node-a LEGO_EMULATE_GPUS=2  # node a\n"
        f"127.0.0.1 LEGO_RUN_DIR={tmp_path}/b LEGO_NODE_HOST=node-b LEGO_EMULATE_GPUS=2\n"
    )
    models = set(load_catalog([]).workflows[WORKFLOW].models)
    seen: dict[Path, int] = {}
    stopped = False
    try:
        started = _cluster(hosts, "start", env)
        assert started.returncode == 0, f"{started.stdout}\n{started.stderr}\n{_logs(tmp_path)}"
        seen.update(pidfiles(tmp_path))
        stats = _wait_for_actors(frontend, models, timeout_s=60, key_file=key_file.get("admin"))
        assert sorted(a.host for a in stats.agents) == ["node-a", "node-b"]
        seen.update(pidfiles(tmp_path))  # the actors' pidfiles, written by the agents

        with Client(frontend, key_file=key_file.get("client")) as client:
            for seed in range(3):
                result = client.generate(WORKFLOW, prompt=f"a lighthouse {seed}", seed=seed, steps=2,
                                         width=256, height=256, timeout=30)
                assert result.image.shape == (256, 256, 3)

        status = _cluster(hosts, "status", env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "scheduler: running" in status.stdout and status.stdout.count("agent: running") == 2

        seen.update(pidfiles(tmp_path))
        names = {pidfile.name for pidfile in seen}
        assert {"broker.pid", "scheduler.pid", "agent.pid"} <= names
        assert sum(name.startswith("actor-") for name in names) >= len(models)
        _assert_private(tmp_path)
        journal = tmp_path / "head" / "head" / "journal.sqlite"  # on by default: accepted work outlives a restart
        assert journal.exists() and stat.S_IMODE(journal.stat().st_mode) == 0o600

        result = _cluster(hosts, "stop", env)
        stopped = True
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in seen.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        running = {str(pidfile): pid for pidfile, pid in seen.items() if alive(pid)}
        assert not running, f"still running after stop: {running}"
        assert list(tmp_path.rglob("*.pid")) == []
    finally:
        if not stopped:
            _cluster(hosts, "stop", env)
        for pid in {**seen, **pidfiles(tmp_path)}.values():  # last resort, by pid, never by name
            if alive(pid) and str(tmp_path) in environ(pid):
                os.kill(pid, signal.SIGKILL)


FAKE_SSH = """#!/usr/bin/env bash
# A stand-in for ssh: records its arguments, runs a key copy here (stdin included),
# echoes a launch script's command instead of running it.
printf '%s\\n' "$*" >>"$FAKE_SSH_LOG"
case "${!#}" in
  *scripts/lego-*) echo "would run: ${!#}" ;;
  *) exec bash -c "${!#}" ;;
esac
"""


def test_cluster_script_copies_each_remote_host_its_own_keys(tmp_path):
    paths = auth.make_cluster_keys(tmp_path / "keys")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ssh").write_text(FAKE_SSH)
    (tmp_path / "bin" / "ssh").chmod(0o755)
    checkout = tmp_path / "checkout"  # LEGO_REMOTE_DIR: a relative keys folder is under it
    checkout.mkdir()
    stale = tmp_path / "gpu-01-keys"  # an older copy, too open: replaced, made private
    stale.mkdir(mode=0o755)
    (stale / "agent.key").write_text("old")
    (stale / "agent.key").chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEGO_")}
    env.update(PATH=f"{tmp_path / 'bin'}:{env.get('PATH', '')}", FAKE_SSH_LOG=str(tmp_path / "ssh.log"),
               LEGO_KEYS_DIR=str(tmp_path / "keys"), LEGO_REMOTE_KEYS_DIR=str(tmp_path / "head-keys"),
               LEGO_REMOTE_DIR=str(checkout))
    hosts = tmp_path / "hosts"
    hosts.write_text("head.example\n"
                     f"gpu-01 LEGO_KEYS_DIR={stale}\n"
                     "gpu-02 LEGO_KEYS_DIR=keys  # relative: under LEGO_REMOTE_DIR\n")
    started = _cluster(hosts, "start", env)
    assert started.returncode == 0, started.stdout + started.stderr

    head, node = {"broker.key", "authorized", "scheduler.key", "admin.key"}, {"agent.key", "actor.key"}
    for host, given, folder, files in [("head.example", tmp_path / "head-keys", tmp_path / "head-keys", head),
                                       ("gpu-01", stale, stale, node), ("gpu-02", "keys", checkout / "keys", node)]:
        assert {f.name for f in folder.iterdir()} == files, (host, sorted(folder.iterdir()))
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        for name in files:
            copy = folder / name
            assert stat.S_IMODE(copy.stat().st_mode) == 0o600, copy
            assert copy.read_bytes() == (tmp_path / "keys" / name).read_bytes(), copy
        launch = [line for line in started.stdout.splitlines() if line.startswith(f"[{host}] would run:")]
        assert len(launch) == 1 and f"LEGO_KEYS_DIR={given} " in launch[0], launch  # the script reads them there

    # No key material on any command line: the files went over stdin.
    commands = (tmp_path / "ssh.log").read_text()
    for path in paths.values():
        if path.name != "authorized":
            assert auth.load_key_file(path).secret.decode() not in commands, path

    # Only `start` copies.
    for folder in (tmp_path / "head-keys", stale, checkout / "keys"):
        shutil.rmtree(folder)
    status = _cluster(hosts, "status", env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert not any(folder.exists() for folder in (tmp_path / "head-keys", stale, checkout / "keys"))
