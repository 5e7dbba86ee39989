"""`lego top`: the broker's snapshot redrawn every second on a full screen.

Runs in the CLI process, a client of the broker (one `Client`). Plain ANSI redraws on
the terminal's alternate screen (no curses: nothing to restore if it dies half-way
but the screen mode, which `finally` does); `q` or Ctrl-C quits. With `--once`, or
when stdin/stdout is not a terminal (a pipe, a test), it prints one screen and exits.
The screen's content comes from `clients.cli.status_view.top_lines` (pure).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys

from clients.cli.status_view import top_lines
from clients.errors import LegoError

ENTER_SCREEN, LEAVE_SCREEN = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"  # alternate screen, cursor hidden
HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
UNLIMITED = 1_000_000


def render(lines: list[str]) -> str:
    """One frame: from the top-left corner, each line cleared to its end, the rest below cleared."""
    return HOME + "".join(line + CLEAR_LINE + "\n" for line in lines) + CLEAR_BELOW


def run_top(client, interval_s: float = 1.0, once: bool = False, out=None, keys=None) -> int:
    out = out or sys.stdout
    keys = keys or sys.stdin
    if once or not (out.isatty() and keys.isatty()):
        try:
            stats = client.stats()
        except LegoError as exc:
            print(f"lego top: {exc}", file=sys.stderr)
            return 1
        out.write("\n".join(top_lines(stats, None, UNLIMITED, UNLIMITED, client.address)) + "\n")
        return 0
    previous = None
    out.write(ENTER_SCREEN)
    interrupted = _InterruptFlag()
    try:
        with _keys_unbuffered(keys):
            while not interrupted():
                size = _screen_size(out)
                try:
                    stats = client.stats(timeout=max(1.0, interval_s))
                    lines = top_lines(stats, previous, size.lines - 1, size.columns, client.address)
                    previous = stats
                except LegoError as exc:  # the broker went away: say so, keep trying
                    lines = [f"lego top (q quits)  {client.address}  no snapshot: {exc}"]
                out.write(render(lines))
                out.flush()
                if _quit_pressed(keys, interval_s):
                    return 0
        return 0
    finally:
        interrupted.restore()
        out.write(LEAVE_SCREEN)
        out.flush()


class _InterruptFlag:
    """Ctrl-C as a flag the loop reads between frames, not a KeyboardInterrupt that may land
    inside a client call or a terminal write and leave either half done on the way out:
    the wait in progress (a key wait, a snapshot) ends at its own timeout, then the loop
    stops and restores the screen."""

    def __init__(self):
        self.set = False
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        self.set = True

    def __call__(self) -> bool:
        return self.set

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _screen_size(out) -> os.terminal_size:
    """The terminal's size now (it may be resized while we run; COLUMNS/LINES may be stale)."""
    try:
        size = os.get_terminal_size(out.fileno())
    except OSError:
        return shutil.get_terminal_size()
    return size if size.columns > 0 and size.lines > 0 else shutil.get_terminal_size()  # 0x0: a bare pty


def _quit_pressed(keys, wait_s: float) -> bool:
    """Wait up to `wait_s` for a key; True for q."""
    readable, _, _ = select.select([keys], [], [], wait_s)  # a signal ends no wait early (PEP 475)
    return bool(readable) and os.read(keys.fileno(), 1).lower() == b"q"


@contextlib.contextmanager
def _keys_unbuffered(keys):
    """Keys arrive one at a time, unechoed; Ctrl-C still interrupts (cbreak mode)."""
    import termios
    import tty

    fd = keys.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)  # now: never wait on output nobody may read
