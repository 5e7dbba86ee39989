"""The `lego` command line end to end: against a LocalCluster of real processes, and
`lego up`, which starts and stops a whole cluster by itself."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from clients.local import LocalCluster, LocalClusterSpec

pytestmark = pytest.mark.cluster

LEGO = str(Path(sys.executable).parent / "lego")
WORKFLOW = "flux-schnell-txt2img"
MODELS = ["CLIP_Flux", "T5_Flux", "Flux1Schnell", "Flux1VAE"]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("LEGO_BROKER", None)
    return env


def lego(*args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LEGO, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=_env())


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    spec = LocalClusterSpec(workflows=[WORKFLOW], options={"time_scale": 0.05}, run_dir=str(run_dir),
                            log_level="warning")
    with LocalCluster(spec) as running:
        yield running


@pytest.mark.timeout(90)
def test_generate_writes_png_and_reports_seed(cluster, tmp_path):
    out = tmp_path / "cat.png"
    proc = lego("generate", "a cat", "-o", str(out), "--seed", "3", "--width", "128", "--height", "128",
                "--broker", cluster.frontend)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    assert _png_size(out) == (128, 128)
    assert re.search(r"\bseed 3\b", proc.stdout), proc.stdout
    assert str(out) in proc.stdout
    assert "128x128" in proc.stdout
    # progress went to stderr, ending at the decode node (4 default steps + 2 encoders + decode)
    assert "7/7" in proc.stderr


@pytest.mark.timeout(90)
def test_generate_is_reproducible_by_seed(cluster, tmp_path):
    outs = []
    for name, seed in (("a.png", "9"), ("b.png", "9"), ("c.png", "10")):
        out = tmp_path / name
        proc = lego("generate", "a dog", "-o", str(out), "--seed", seed, "--steps", "2", "--width", "128",
                    "--height", "128", "--quiet", "--broker", cluster.frontend)
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


@pytest.mark.timeout(60)
def test_generate_uses_lego_broker_env(cluster, tmp_path):
    out = tmp_path / "env.png"
    env = dict(_env(), LEGO_BROKER=cluster.frontend)
    proc = subprocess.run([LEGO, "generate", "x", "-o", str(out), "--steps", "1", "--width", "128", "--height",
                           "128", "--quiet"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert _png_size(out) == (128, 128)


@pytest.mark.timeout(60)
def test_status_json(cluster):
    proc = lego("status", "--json", "--broker", cluster.frontend)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert {"models", "actors", "counters"} <= set(stats)
    assert sorted(a["model"] for a in stats["actors"]) == sorted(MODELS)
    models = {m["model"]: m for m in stats["models"]}
    assert set(MODELS) <= set(models)
    assert all(models[m]["actors"] == 1 for m in MODELS)
    assert isinstance(stats["counters"], dict)
    assert "requests_submitted" in stats["counters"]


@pytest.mark.timeout(60)
def test_status_human_readable(cluster):
    proc = lego("status", "--broker", cluster.frontend)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("models:")
    assert "actors:" in proc.stdout and "counters:" in proc.stdout
    for model in MODELS:
        assert model in proc.stdout


@pytest.mark.timeout(60)
def test_workflows_from_the_broker(cluster):
    proc = lego("workflows", "--broker", cluster.frontend)
    assert proc.returncode == 0, proc.stderr
    assert WORKFLOW in proc.stdout
    assert "prompt*" in proc.stdout  # required input marked
    proc = lego("workflows", "--json", "--broker", cluster.frontend)
    assert proc.returncode == 0, proc.stderr
    infos = {w["name"]: w for w in json.loads(proc.stdout)}
    assert infos[WORKFLOW]["models"] == MODELS
    assert infos[WORKFLOW]["inputs"]["prompt"]["required"] is True


@pytest.mark.timeout(60)
def test_generate_bad_param_fails_with_the_reason(cluster, tmp_path):
    out = tmp_path / "never.png"
    proc = lego("generate", "a cat", "-o", str(out), "--param", "steps=0", "--broker", cluster.frontend)
    assert proc.returncode == 1
    assert "rejected" in proc.stderr and "invalid_param" in proc.stderr
    assert "steps" in proc.stderr and ">= 1" in proc.stderr
    assert not out.exists()


@pytest.mark.timeout(60)
def test_generate_bad_param_names_the_field(cluster, tmp_path):
    out = tmp_path / "never.png"
    proc = lego("generate", "a cat", "-o", str(out), "--param", "steps=0", "--broker", cluster.frontend)
    assert proc.returncode != 0
    assert "params.steps" in proc.stderr
    assert not out.exists()


@pytest.mark.timeout(60)
def test_generate_unknown_workflow_fails(cluster, tmp_path):
    out = tmp_path / "never.png"
    proc = lego("generate", "a cat", "-o", str(out), "-w", "no-such-workflow", "--broker", cluster.frontend)
    assert proc.returncode != 0
    assert "no-such-workflow" in proc.stderr
    assert not out.exists()


@pytest.mark.timeout(60)
def test_up_unknown_workflow_is_a_clean_error(tmp_path):
    proc = lego("up", "-w", "no-such-workflow", "--port", "0", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 1
    assert "no-such-workflow" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("lego up: ")


@pytest.mark.timeout(60)
def test_status_with_no_broker_is_a_clean_error():
    from clients.local import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    proc = lego("status", "--broker", address, timeout=40)
    assert proc.returncode != 0
    assert address in proc.stderr
    assert "Traceback" not in proc.stderr


def _descendants(pid: int) -> dict[int, float]:
    """pid -> create_time of every live descendant of `pid`."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    found = {}
    for child in children:
        with contextlib.suppress(psutil.Error):  # it exited meanwhile
            found[child.pid] = child.create_time()
    return found


def _still_running(pid: int, create_time: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == create_time and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _mentions(run_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):  # it exited meanwhile
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(run_dir) in cmdline and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


class UpRun:
    """`lego up` as a child in its own session, its output in files, and a record of every
    process it starts (its descendants) and every pid it writes under <run-dir>/pids."""

    def __init__(self, tmp_path: Path, *args: str):
        self.run_dir = tmp_path / "up-run"
        self.stdout_path, self.stderr_path = tmp_path / "up.stdout", tmp_path / "up.stderr"
        cmd = [LEGO, "up", "--port", "0", "--run-dir", str(self.run_dir), "--log-level", "warning", *args]
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=_env(), start_new_session=True)
        self.seen: dict[int, float] = {}
        self.recorded: set[int] = set()

    def observe(self) -> None:
        self.seen.update(_descendants(self.proc.pid))
        pids = self.run_dir / "pids"
        for pidfile in pids.glob("*.pid") if pids.is_dir() else ():
            with contextlib.suppress(OSError, ValueError):  # removed or half-written meanwhile
                self.recorded.add(int(pidfile.read_text().strip()))

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None or condition(), f"lego up exited ({self.proc.returncode}) before {what}: {self.stderr}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.stderr}"
            self.observe()
            time.sleep(0.05)
        self.observe()

    def wait_exit(self, timeout: float) -> int:
        self.wait_for(lambda: self.proc.poll() is not None, timeout, "lego up to exit")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid, created in self.seen.items():
            if _still_running(pid, created):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def assert_nothing_left(self) -> None:
        # broker, agent and the four actors were all started and seen
        assert len(self.seen) >= 2 + len(MODELS), f"expected broker, agent and {len(MODELS)} actors, saw {self.seen}"
        assert self.recorded, "no pidfile was ever written"
        assert self.recorded <= set(self.seen), f"pidfiles {self.recorded} name processes it did not start"
        leftover = sorted(p.name for p in (self.run_dir / "pids").glob("*.pid"))
        assert leftover == [], f"pidfiles left behind: {leftover}"
        deadline = time.monotonic() + 5
        while True:
            alive = [pid for pid, created in self.seen.items() if _still_running(pid, created)]
            mentions = _mentions(self.run_dir)
            if not alive and not mentions:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"processes outlived `lego up`: {alive}; mentioning the run dir: "
                            f"{[(p.pid, p.cmdline()) for p in mentions]}")
            time.sleep(0.2)


@pytest.fixture
def up_run(tmp_path):
    runs = []

    def start(*args: str) -> UpRun:
        runs.append(UpRun(tmp_path, *args))
        return runs[-1]

    yield start
    for run in runs:
        run.kill()


@pytest.mark.timeout(150)
def test_up_generates_and_leaves_nothing_behind(up_run, tmp_path):
    out = tmp_path / "up.png"
    run = up_run("--generate", "x", "-o", str(out), "--width", "128", "--height", "128")
    assert run.wait_exit(timeout=120) == 0, run.stderr
    assert out.is_file() and _png_size(out) == (128, 128)
    assert "wrote" in run.stdout and "seed" in run.stdout
    assert "local cluster up: clients connect to tcp://127.0.0.1:" in run.stderr
    run.assert_nothing_left()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_up_in_the_foreground_stops_everything_on_signal(up_run, how):
    run = up_run("--option", "time_scale=0.05")
    run.wait_for(lambda: "Ctrl-C stops everything" in run.stderr, 60, "the cluster to come up")
    match = re.search(r"clients connect to (tcp://\S+)", run.stderr)
    assert match, run.stderr
    # it serves while it runs
    status = lego("status", "--json", "--broker", match.group(1))
    assert status.returncode == 0, status.stderr
    assert len(json.loads(status.stdout)["actors"]) == len(MODELS)
    run.observe()
    if how == "sigterm":
        run.proc.send_signal(signal.SIGTERM)
    else:  # a terminal's Ctrl-C: SIGINT to the whole foreground process group
        os.killpg(run.proc.pid, signal.SIGINT)
    assert run.wait_exit(timeout=30) == 0, run.stderr
    assert "Traceback" not in run.stderr
    run.assert_nothing_left()
