"""`lego status` / `lego top` formatting (pure: snapshot -> lines) and the live view
in a pseudo-terminal, which redraws and quits on `q`."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from broker import protocol as p
from broker.server import BrokerConfig, BrokerServer
from clients.cli.status_view import (
    actor_lines,
    bounds_label,
    status_lines,
    table,
    task_rates,
    top_lines,
)
from clients.cli.top import run_top
from clients.local import free_port
from tests.broker_helpers import CLIENT, hello_agent, make_core, run, standard_actors, submit

LEGO = str(Path(sys.executable).parent / "lego")


def busy_core():
    """A core with two completed requests, a refusal, a drained and a stopping actor,
    a paused workflow, operator bounds and a scheduler plan."""
    core = make_core()
    hello_agent(core)
    run(core, submit(core, "r1") + submit(core, "r2") + standard_actors(core), now=0.5)
    submit(core, "bad-steps", steps=-1, now=1.0)
    core.on_frontend(CLIENT, p.AdminDrain("enc-b-1"), [], 1.0)
    core.on_frontend(CLIENT, p.AdminStop("vae-1"), [], 1.0)
    core.on_frontend(CLIENT, p.AdminPause("guided"), [], 1.0)
    core.on_frontend(CLIENT, p.AdminReplicas("den", min=2), [], 1.0)
    core.plan = {"targets": {"den": 2}, "bounds": {"den": [1, 8], "vae": [1, 4]},
                 "in_progress": ["spawn den (s-1)"],
                 "decisions": ["10:00:00 start den on h/emu:0: first", "10:00:01 start den on h/emu:1: second"]}
    return core


def test_table_aligns_numbers_right_and_text_left():
    lines = table(["name", "n"], [["a", 5], ["long-name", 12.5], ["b", None]])
    assert lines == ["  name           n", "  a              5", "  long-name  12.50", "  b              -"]


def test_status_lines_show_drained_stopping_paused_bounds_refusals_and_decisions():
    core = busy_core()
    text = "\n".join(status_lines(core.snapshot(3.0)))
    states = {line.split()[0]: line.split()[2] for line in actor_lines(core.snapshot(3.0))[1:]}
    assert states == {"den-1": "idle", "enc-a-1": "idle", "enc-b-1": "drained", "vae-1": "stopping"}
    assert "paused workflows: guided" in text
    assert "2..8*" in text  # the operator's min over the scheduler's bounds, marked
    assert "1..4" in text and "1..4*" not in text
    assert "2.0s ago  rejected bad-steps" in text and "invalid_param (params.steps)" in text
    # newest decision first
    assert "scheduler plan: targets den=2" in text
    assert text.index("10:00:01 start den") < text.index("10:00:00 start den")
    assert "in progress: spawn den (s-1)" in text
    assert text.startswith("models:") and "counters:" in text


def test_bounds_label_without_a_plan_or_bounds_is_a_dash():
    stats = make_core().snapshot(0.0)
    assert bounds_label(stats, "den") == "-"
    stats.replica_bounds = {"den": {"min": None, "max": 3}}
    assert bounds_label(stats, "den") == "-..3*"


def test_top_lines_fit_the_screen_and_show_task_rates_between_snapshots():
    core = busy_core()
    before = core.snapshot(1.0)
    run(core, submit(core, "r3", now=1.5), now=2.0)
    after = core.snapshot(3.0)
    assert task_rates(after, before)["den"] == pytest.approx(2 / 2.0)  # two steps in two seconds
    lines = top_lines(after, before, height=8, width=40, address="tcp://x")
    assert len(lines) == 8 and all(len(line) <= 40 for line in lines)
    assert lines[0].startswith("lego top (q quits)  tcp://x")
    full = top_lines(after, before, height=1000, width=1000)
    assert "tasks/s" in full[2] and any(line.split()[:1] == ["den"] and "1.00" in line for line in full)
    assert "tasks/s" not in top_lines(after, None, 1000, 1000)[2]  # no rate from a single snapshot


class SnapshotClient:
    address = "tcp://snapshot"

    def __init__(self, stats):
        self.snapshot = stats

    def stats(self, timeout=None):
        return self.snapshot


def test_top_once_prints_one_whole_screen_without_escape_codes():
    out = io.StringIO()
    assert run_top(SnapshotClient(busy_core().snapshot(3.0)), once=True, out=out) == 0
    text = out.getvalue()
    assert "\x1b" not in text and "enc-b-1" in text and "drained" in text
    assert text.splitlines()[0].startswith("lego top (q quits)  tcp://snapshot")


@pytest.fixture
def broker_only():
    """A broker with no actors, in this process: enough for a client of snapshots."""
    config = BrokerConfig(frontend_address=f"tcp://127.0.0.1:{free_port()}",
                          backend_address=f"tcp://127.0.0.1:{free_port()}")
    server = BrokerServer(config)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield config.frontend_address
    server.stop()
    thread.join(5)
    server.close()


def read_until(fd: int, needle: bytes, timeout_s: float) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout_s
    while needle not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
    return seen


def start_top(broker: str) -> tuple[subprocess.Popen, int]:
    """`lego top` on a pseudo-terminal of 20 lines x 60 columns: (process, the terminal's other end)."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 60, 0, 0))
    proc = subprocess.Popen([LEGO, "top", "--broker", broker, "--interval-s", "0.2"],
                            stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    return proc, main


@pytest.mark.timeout(60)
@pytest.mark.parametrize("quit_by", ["q", "sigint"])
def test_live_top_in_a_terminal_redraws_every_interval_and_quits_on_q_or_ctrl_c(broker_only, quit_by):
    proc, main = start_top(broker_only)
    try:
        first = read_until(main, b"q quits", 30)
        assert first.startswith(b"\x1b[?1049h")  # the alternate screen
        later = read_until(main, b"\x1b[H", 5)  # the next frame, drawn from the top-left corner
        later += read_until(main, b"q quits", 5)
        assert b"lego top (q quits)" in later
        frame = later.rsplit(b"\x1b[H", 1)[-1]
        assert all(len(line.split(b"\x1b[K")[0]) <= 60 for line in frame.split(b"\n"))  # cut to the width
        if quit_by == "q":
            os.write(main, b"q")
        else:
            proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        rest = read_until(main, b"\x1b[?1049l", 5)
        assert b"\x1b[?1049l" in later + rest  # the screen restored
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)


@pytest.mark.timeout(60)
def test_top_with_no_terminal_prints_once_and_exits(broker_only):
    proc = subprocess.run([LEGO, "top", "--broker", broker_only], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"lego top (q quits)  {broker_only}") and "\x1b" not in proc.stdout
