"""Helpers shared by the tests that start processes through the launch scripts
(tests/test_launch_scripts.py, tests/test_two_hosts.py): pidfiles, liveness, and a
process's environment, so that clean-up kills by pid only what this test started;
and a node agent with no broker (tests/test_recovery_and_admin.py,
tests/test_hosted_actors.py); the `lego` command in a process of its own."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from actors.agent import AgentConfig, NodeAgent
from clients.local import free_port


@contextlib.contextmanager
def idle_agent(run_dir: Path, **config):
    """A node agent on one emulated GPU whose broker address nothing listens on (a started
    actor just keeps saying hello); its actors stopped and its context ended on exit."""
    node = NodeAgent(AgentConfig(emulate_gpus=1, run_dir=str(run_dir),
                                 broker_backend=f"tcp://127.0.0.1:{free_port()}", stop_grace_s=5.0, **config))
    try:
        yield node
    finally:
        node.stop_all()
        node.context.term()


def pidfiles(root: Path) -> dict[Path, int]:
    """Every pidfile under `root` (run dirs' pids/), with its pid; a half-written one is skipped."""
    pids = {}
    for pidfile in root.rglob("pids/*.pid"):
        try:
            pids[pidfile] = int(pidfile.read_text())
        except (OSError, ValueError):  # removed or still being written
            continue
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def environ(pid: int) -> str:
    """The process's environment (it holds the test's run dirs), or "" if unreadable."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def lego_cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m clients.cli ARGV` in a process of its own, from the repository root: run
    in the test's process, its logging setup would outlive the test, bound to a captured
    stream pytest then closes (later tests' warnings would fail)."""
    return subprocess.run([sys.executable, "-m", "clients.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])
