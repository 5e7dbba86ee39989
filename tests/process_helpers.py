"""Helpers shared by the tests that start processes through the launch scripts
(tests/test_launch_scripts.py, tests/test_two_hosts.py): pidfiles, liveness, and a
process's environment, so that clean-up kills by pid only what this test started."""

from __future__ import annotations

import os
from pathlib import Path


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
