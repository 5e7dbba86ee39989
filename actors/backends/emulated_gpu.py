"""One emulated GPU shared by several actor processes: how their work overlaps.

Actors on one real GPU share it by time-slicing: each of n busy processes progresses at
about 1/n of its solo speed, and a small task is never stuck behind a whole batch of
a big one. `shared` mode reproduces that (processor sharing): a busy actor puts a
marker file in the device's directory, and advances its task by elapsed / (markers)
every few milliseconds. `fifo` mode runs whole batches one after another (a lock
file), the pessimistic bound. Without a path the device is the actor's alone.

The node agent passes the path (`options.device_lock`, one per emulated device);
`options.device_sharing` picks the mode. The simulator's device models are the same
two rules, so emulated and simulated runs agree.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import uuid
from pathlib import Path

TICK_S = 0.004  # how often a shared device's load is looked at: the error per change


class EmulatedGpu:
    def __init__(self, path: str = "", mode: str = "shared"):
        if mode not in ("shared", "fifo"):
            raise ValueError(f"options.device_sharing: expected 'shared' or 'fifo', got {mode!r}")
        self.path, self.mode = path, mode
        self.markers = Path(f"{path}.d") if path and mode == "shared" else None
        if self.markers is not None:
            self.markers.mkdir(parents=True, exist_ok=True)

    def compute(self, seconds: float) -> None:
        """Spend `seconds` of this device's time (solo time: longer when shared)."""
        if seconds <= 0:
            return
        if not self.path:
            time.sleep(seconds)
        elif self.mode == "fifo":
            with self._locked():
                time.sleep(seconds)
        else:
            with self._busy():
                self._share(seconds)

    @contextlib.contextmanager
    def _locked(self):
        with open(self.path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            yield

    @contextlib.contextmanager
    def _busy(self):
        marker = self.markers / f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"
        marker.touch()
        try:
            yield
        finally:
            marker.unlink(missing_ok=True)

    def _share(self, seconds: float) -> None:
        done, last = 0.0, time.perf_counter()
        while done < seconds:
            sharing = max(1, self._busy_count())
            time.sleep(min(TICK_S, (seconds - done) * sharing))
            now = time.perf_counter()
            done += (now - last) / sharing
            last = now

    def _busy_count(self) -> int:
        try:
            names = os.listdir(self.markers)
        except OSError:
            return 1
        return sum(1 for name in names if _alive(name))


def _alive(marker: str) -> bool:
    """A marker of a process that died mid-task must not slow the others forever."""
    try:
        os.kill(int(marker.split("-", 1)[0]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
