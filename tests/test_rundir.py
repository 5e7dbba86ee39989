"""Run directories are private to their owner, whatever the umask (broker/rundir.py)."""

from __future__ import annotations

import os
import stat

from broker import rundir


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_run_dir_its_subdirs_and_files_are_owner_only_under_a_lax_umask(tmp_path):
    old = os.umask(0o002)
    try:
        run = rundir.run_dir(tmp_path / "run", ("logs", "pids", "locks"))
        with rundir.open_private(run / "logs" / "a.log") as log:
            log.write(b"line\n")
        rundir.write_private(run / "pids" / "a.pid", "123\n")
    finally:
        os.umask(old)
    assert [_mode(run / sub) for sub in ("", "logs", "pids", "locks")] == [0o700] * 4
    assert _mode(run / "logs" / "a.log") == 0o600 and _mode(run / "pids" / "a.pid") == 0o600


def test_existing_loose_files_and_subdirs_are_tightened_but_a_shared_parent_is_left_alone(tmp_path):
    shared = tmp_path / "shared"
    (shared / "logs").mkdir(parents=True)
    os.chmod(shared, 0o755)
    os.chmod(shared / "logs", 0o777)
    loose = shared / "logs" / "old.log"
    loose.write_text("before\n")
    os.chmod(loose, 0o644)
    rundir.run_dir(shared)
    with rundir.open_private(loose) as log:  # appends
        log.write(b"after\n")
    assert _mode(shared) == 0o755  # an operator's own folder: not ours to change
    assert _mode(shared / "logs") == 0o700 and _mode(loose) == 0o600
    assert loose.read_text() == "before\nafter\n"
