"""The emulated GPU's time-slicing (actors/backends/emulated_gpu.py): busy tasks of one
device progress at 1/n of their solo speed each, whether they are threads of one process
(hosted actors, counted in memory) or other processes (counted by their marker files)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from actors.backends.emulated_gpu import EmulatedGpu

REPO = Path(__file__).resolve().parent.parent


def _timed(gpu: EmulatedGpu, seconds: float, out: dict, key: str, start: float) -> None:
    gpu.compute(seconds)
    out[key] = time.perf_counter() - start


def test_two_threads_on_one_device_share_it_and_the_short_task_ends_first(tmp_path):
    lock = str(tmp_path / "emu-0.lock")
    short, long = EmulatedGpu(lock, "shared"), EmulatedGpu(lock, "shared")
    ended: dict[str, float] = {}
    start = time.perf_counter()
    threads = [threading.Thread(target=_timed, args=(short, 0.2, ended, "short", start)),
               threading.Thread(target=_timed, args=(long, 0.4, ended, "long", start))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # processor sharing: both at half speed until the short one is done (0.4 s), the long
    # one then alone for its remaining 0.2 s (0.6 s); first come, first served would end
    # them at 0.2 and 0.6, each alone at 0.2 and 0.4
    assert abs(ended["short"] - 0.4) < 0.08, ended
    assert abs(ended["long"] - 0.6) < 0.08, ended


def test_a_task_on_another_device_runs_at_full_speed(tmp_path):
    ended: dict[str, float] = {}
    start = time.perf_counter()
    threads = [threading.Thread(target=_timed, args=(EmulatedGpu(str(tmp_path / f"emu-{i}.lock"), "shared"), 0.3,
                                                     ended, str(i), start)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(abs(v - 0.3) < 0.08 for v in ended.values()), ended


def test_a_busy_task_of_another_process_on_the_device_halves_this_ones_speed(tmp_path):
    lock = str(tmp_path / "emu-0.lock")
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from actors.backends.emulated_gpu import EmulatedGpu; EmulatedGpu(sys.argv[2], 'shared').compute(1.5)"),
        str(REPO), lock])
    try:
        markers = Path(f"{lock}.d")
        deadline = time.monotonic() + 20
        while not (markers.is_dir() and any(markers.iterdir())):  # the child's task has started
            assert child.poll() is None and time.monotonic() < deadline, "the child never started its task"
            time.sleep(0.01)
        start = time.perf_counter()
        EmulatedGpu(lock, "shared").compute(0.3)
        took = time.perf_counter() - start
    finally:
        child.wait(timeout=30)
    assert child.returncode == 0
    assert 0.5 < took < 0.8, took  # 0.3 s of work at half speed beside the child's
