"""One emulated GPU shared by several actor processes: how their work overlaps.

Actors on one real GPU share it by time-slicing: each of n busy processes progresses at
about 1/n of its solo speed, and a small task is never stuck behind a whole batch of
a big one. `shared` mode reproduces that (processor sharing): a busy actor puts a
marker file in the device's directory (how actors in other processes count it), and
its task advances by elapsed / (busy tasks). The busy tasks of this process (actors
hosted on threads of the node agent: actors/hosted.py) are counted in memory and wake
each other when one starts or ends, so a task sleeps until it is due instead of
looking every few milliseconds: with dozens of hosted actors busy at once, that
polling cost a core of a 2-core machine and slowed the emulation it was keeping. Tasks
of other processes are seen through their markers, looked at every `TICK_S` while
there are any, every `EXTERNAL_LOOK_S` while there are none. `fifo` mode runs whole
batches one after another (a lock file), the pessimistic bound. Without a path the
device is the actor's alone.

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

TICK_S = 0.004  # how often a device shared with other processes' busy tasks is looked at
EXTERNAL_LOOK_S = 0.1  # how often a task with no other process's busy task in sight looks for one


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
        device = _local_device(self.markers)
        with device.changed:
            device.busy += 1
            device.changed.notify_all()  # the others now progress more slowly: they wait longer
            try:
                done, last = 0.0, time.perf_counter()
                others = self._external_busy()
                while done < seconds:
                    sharing = device.busy + others
                    look = TICK_S if others else EXTERNAL_LOOK_S
                    device.changed.wait(min(look, (seconds - done) * sharing))
                    now = time.perf_counter()
                    done += (now - last) / sharing
                    last = now
                    others = self._external_busy()
            finally:
                device.busy -= 1
                device.changed.notify_all()

    def _external_busy(self) -> int:
        """Busy tasks of other (live) processes on this device."""
        mine = f"{os.getpid()}-"
        try:
            names = os.listdir(self.markers)
        except OSError:
            return 0
        return sum(1 for name in names if not name.startswith(mine) and _alive(name))


class _LocalDevice:
    """The busy tasks of this process on one shared device, and a condition they wait on."""

    def __init__(self):
        self.busy = 0
        self.changed = threading.Condition()


_LOCAL_DEVICES: dict[Path, _LocalDevice] = {}
_LOCAL_DEVICES_LOCK = threading.Lock()


def _local_device(markers: Path) -> _LocalDevice:
    with _LOCAL_DEVICES_LOCK:
        device = _LOCAL_DEVICES.get(markers)
        if device is None:
            device = _LOCAL_DEVICES[markers] = _LocalDevice()
        return device


def _alive(marker: str) -> bool:
    """A marker of a process that died mid-task must not slow the others forever."""
    try:
        os.kill(int(marker.split("-", 1)[0]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
