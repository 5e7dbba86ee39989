"""A whole cluster on this machine: broker, node agent and actors as real processes.

Used by `lego up` (in the foreground; Ctrl-C stops everything it started), by
`scripts/demo.sh`, by the integration tests and by the benchmarks. Processes are
started by pid and stopped by pid, never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker import auth, rundir
from broker.catalog import load_catalog
from broker.costs.profiles import load_profile
from clients.client import Client
from clients.errors import LegoError, Timeout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalClusterSpec:
    workflows: list[str] = field(default_factory=lambda: ["flux-schnell-txt2img"])
    replicas: dict[str, int] = field(default_factory=dict)  # model -> actors (default 1)
    backend: str = "emulated"
    options: dict = field(default_factory=dict)  # backend options, e.g. {"time_scale": 0.1}
    max_batch_rows: int = 8
    emulate_gpus: int = 2
    # Emulated hosts the GPUs are split over, one node agent each (as many GPUs on each):
    # fetches between them are priced and routed as between hosts. GPU N of `placement`
    # is GPU N % (emulate_gpus / emulate_hosts) of host N // (emulate_gpus / emulate_hosts).
    emulate_hosts: int = 1
    # The node agent runs emulated actors on threads of its own process (actors/hosted.py)
    hosted_emulated: bool = False
    gpu_memory_gib: float = 80.0
    catalog: list[str] = field(default_factory=list)
    frontend_port: int = 0  # 0: pick a free port
    backend_port: int = 0
    heartbeat_interval_s: float = 1.0
    heartbeat_misses: int = 5
    affinity: str = "prefer"
    cfg_split: str = "never"
    admission: bool = False
    serving: str = "micro"  # "monolith": the baselines (pipeline/WORKFLOW actors from `placement`)
    drop_late: bool = False
    drop_hopeless: bool = False
    batch_by_profile: bool = True  # cap batches where the profile says more rows do not pay
    # Explicit actors as (model, device, backend), instead of `replicas` over the workflows' models.
    placement: list[tuple[str, str, str]] = field(default_factory=list)
    # Start the scheduler actor too (`lego scheduler` with these extra flags); it then
    # owns replicas, admission and parallel groups.
    scheduler: bool = False
    scheduler_args: list[str] = field(default_factory=list)
    run_dir: str = "run/local"
    # Keys on: a fresh key for every role in RUN_DIR/keys; every socket speaks CurveZMQ
    # and checks roles (`key_file(role)` gives a role's key to clients of the cluster).
    keys: bool = False
    log_format: str = "console"
    log_level: str = "info"
    # The broker's request journal (a path; empty: none): accepted requests survive a
    # broker restart. Extra `lego broker` flags, e.g. ["--orphan-timeout-s", "10"].
    journal: str = ""
    broker_args: list[str] = field(default_factory=list)


def place(models: list[tuple[str, int]], free: dict[str, int]) -> list[tuple[str, str]]:
    """(model, device) for each actor: the biggest models first, each on the device with most free memory."""
    free = dict(free)
    placement = []
    for model, need in sorted(models, key=lambda m: -m[1]):
        device = max(free, key=lambda d: free[d])
        if free[device] < need:
            raise LegoError(f"replicas: {model} needs {need} bytes, no device has that much free")
        free[device] -= need
        placement.append((model, device))
    return placement


class LocalCluster:
    def __init__(self, spec: LocalClusterSpec):
        self.spec = spec
        self.frontend = f"tcp://127.0.0.1:{spec.frontend_port or free_port()}"
        self.backend = f"tcp://127.0.0.1:{spec.backend_port or free_port()}"
        self.telemetry = f"tcp://127.0.0.1:{free_port()}"
        self.run_dir = Path(spec.run_dir)
        self.keys: dict[str, Path] = {}
        self.processes: dict[str, subprocess.Popen] = {}
        self.catalog = load_catalog(spec.catalog)
        if spec.emulate_hosts < 1 or spec.emulate_gpus % spec.emulate_hosts:
            raise LegoError(f"emulate_hosts: must be >= 1 and divide emulate_gpus ({spec.emulate_gpus}), "
                            f"got {spec.emulate_hosts}")
        for name in spec.workflows:
            if name not in self.catalog.workflows:
                raise LegoError(f"workflows: unknown workflow {name!r} (known: {sorted(self.catalog.workflows)})")

    def _start(self, name: str, args: list[str]) -> None:
        rundir.run_dir(self.run_dir)
        log = rundir.open_private(self.run_dir / "logs" / f"{name}.log")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        try:
            proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        finally:
            log.close()
        rundir.write_private(self.run_dir / "pids" / f"{name}.pid", f"{proc.pid}\n")
        self.processes[name] = proc

    def key_file(self, role: str) -> str | None:
        """Keys on: the key file of `role` (a client of this cluster passes it as `key_file`)."""
        return str(self.keys[role]) if self.keys else None

    def _keys_of(self, role: str, *more: str) -> list[str]:
        """`--key-file ROLE.key` (and `FLAG other.key` pairs in `more`) when keys are on."""
        if not self.keys:
            return []
        pairs = [("--key-file", role), *zip(more[::2], more[1::2], strict=True)]
        return [arg for flag, name in pairs for arg in (flag, str(self.keys[name]))]

    def _device_kind(self) -> str:
        """Emulated actors go on emulated GPUs; real backends on the CPU (GPUs: `lego agent`)."""
        return "emulated" if self.spec.backend in ("emulated", "noop") else "cpu"

    def actor_plan(self) -> list[tuple[str, int]]:
        models = []
        for wf in self.spec.workflows:
            for model in self.catalog.workflows[wf].models:
                if model not in models:
                    models.append(model)
        plan = []
        for model in models:
            spec = self.catalog.models[model]
            need = load_profile(spec.profile or model).resident_bytes if self.spec.backend == "emulated" else 0
            plan += [(model, need)] * self.spec.replicas.get(model, 1)
        return plan

    def start(self, timeout_s: float = 60.0) -> LocalCluster:
        """Start everything and wait until every actor has joined; on failure stop what started."""
        try:
            return self._start_all(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start_all(self, timeout_s: float) -> LocalCluster:
        s = self.spec
        common = ["--log-format", s.log_format, "--log-level", s.log_level]
        catalogs = [arg for path in s.catalog for arg in ("--catalog", str(path))]
        if s.keys:
            rundir.run_dir(self.run_dir)
            self.keys = auth.make_cluster_keys(self.run_dir / "keys")
        broker_keys = ["--key-file", str(self.keys["broker"]), "--authorized-keys", str(self.keys["authorized"])] if s.keys else []
        self._start("broker", ["broker.server", "--frontend", self.frontend, "--backend", self.backend,
                               "--heartbeat-interval-s", str(s.heartbeat_interval_s),
                               "--heartbeat-misses", str(s.heartbeat_misses), "--affinity", s.affinity, "--cfg-split", s.cfg_split,
                               "--admission", "on" if s.admission else "off", "--telemetry", self.telemetry,
                               "--serving", s.serving, "--drop-late", "on" if s.drop_late else "off",
                               "--drop-hopeless", "on" if s.drop_hopeless else "off",
                               "--batch-by-profile", "on" if s.batch_by_profile else "off",
                               "--cost-scale", str(s.options.get("time_scale", 1.0)), *broker_keys, *catalogs,
                               *(["--journal", s.journal] if s.journal else []), *s.broker_args, *common])
        per_host = s.emulate_gpus // s.emulate_hosts
        for index, host in enumerate(self.hosts):
            # each agent its own run directory: device locks and pid files are named by device
            agent_dir = self.run_dir if index == 0 else self.run_dir / host
            self._start(self._agent_name(index), [
                "actors.agent", "--broker", self.backend, "--emulate-gpus", str(per_host),
                "--gpu-memory-gib", str(s.gpu_memory_gib), "--run-dir", str(agent_dir),
                "--host", host, "--hosted-emulated", "on" if s.hosted_emulated else "off",
                *self._keys_of("agent", "--actor-key-file", "actor"), *catalogs, *common])
        deadline = time.monotonic() + timeout_s
        with Client(self.frontend, admin_timeout_s=2.0, key_file=self.key_file("admin")) as client:
            stats = self._wait(client, deadline, lambda st: len(st.agents) >= len(self.hosts),
                               f"{len(self.hosts)} node agent(s) to register")
            devices = {(a.host, d.device): d.free_bytes for a in stats.agents for d in a.devices
                       if d.kind == self._device_kind()}
            devices = devices or {(self.hosts[0], "cpu"): 1 << 62}
            if s.placement:
                plan = s.placement
                for model, device, backend in plan:
                    host, local = self._host_of(device, per_host)
                    client.spawn(model, local, backend, host=host, max_batch_rows=s.max_batch_rows, options=s.options)
            else:
                plan = self.actor_plan()
                for model, (host, device) in place(plan, devices):
                    client.spawn(model, device, s.backend, host=host, max_batch_rows=s.max_batch_rows,
                                 options=s.options)
            self._wait(client, deadline, lambda st: len(st.actors) >= len(plan), f"{len(plan)} actors to join")
        if s.scheduler:
            options = [arg for key, value in s.options.items() for arg in ("--actor-option", f"{key}={value}")]
            self._start("scheduler", ["scheduler.controller", "--broker", self.frontend, "--telemetry", self.telemetry,
                                      "--backend", s.backend,
                                      "--workflows", ",".join(s.workflows), "--max-batch-rows", str(s.max_batch_rows),
                                      *options, *self._keys_of("scheduler"), *catalogs, *s.scheduler_args, *common])
        return self

    @property
    def hosts(self) -> list[str]:
        """The emulated hosts' names, one node agent each."""
        if self.spec.emulate_hosts == 1:
            return ["localhost"]
        return [f"host-{i}" for i in range(self.spec.emulate_hosts)]

    @staticmethod
    def _agent_name(index: int) -> str:
        return "agent" if index == 0 else f"agent-{index}"

    def _host_of(self, device: str, per_host: int) -> tuple[str, str]:
        """(host, its device) of a cluster-wide emulated device `emu:N`; other devices stay on the first host."""
        kind, _, number = device.partition(":")
        if len(self.hosts) == 1 or kind != "emu" or not number.isdigit():
            return self.hosts[0], device
        gpu = int(number)
        return self.hosts[gpu // per_host], f"emu:{gpu % per_host}"

    def _wait(self, client: Client, deadline: float, ready, what: str):
        while True:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise LegoError(f"{name} exited with code {proc.returncode}; see {self.run_dir}/logs/{name}.log")
            try:
                stats = client.stats(timeout=2.0)
            except Timeout:
                stats = None
            if stats is not None:
                if ready(stats):
                    return stats
                for agent in stats.agents:  # an actor that died or was refused will never join
                    for spawn_id, state in agent.actors:
                        if state in ("exited", "refused"):
                            raise LegoError(f"actor {spawn_id} {state} before joining; see {self.run_dir}/logs "
                                            f"(actor-{spawn_id}.log, agent.log)")
            if time.monotonic() > deadline:
                raise LegoError(f"local cluster: timed out waiting for {what}; logs in {self.run_dir}/logs")
            time.sleep(0.1)

    def stop(self, grace_s: float = 10.0) -> None:
        """Scheduler first (it would replace what stops), then the agent (it stops its
        actors), then the broker; SIGKILL what outlives the grace."""
        agents = [self._agent_name(i) for i in range(self.spec.emulate_hosts)]
        for name in ("scheduler", *agents, "broker"):
            proc = self.processes.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name in self.processes:
            (self.run_dir / "pids" / f"{name}.pid").unlink(missing_ok=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
