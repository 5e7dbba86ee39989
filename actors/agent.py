"""The node agent: one per host; starts and stops actor processes on the broker's word.

Owns one DEALER to the broker's backend socket (single thread). Reports the host's
devices (real GPUs from nvidia-smi, or N emulated GPUs of a given memory size, plus
the CPU), accounts the resident memory each actor's profile says it needs, pins
actors to GPUs with CUDA_VISIBLE_DEVICES, writes a pidfile and a log per actor, and
reports every start and exit. It restarts nothing on its own: replacing a dead actor
is the scheduler's decision.

With `hosted_emulated` on, emulated actors run on threads of this process instead
(actors/hosted.py: each its own runtime, sockets and ZeroMQ context), with the same
bookkeeping: an emulated cluster then costs one process, not
one per actor, on a machine with few cores.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket as socketlib
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import zmq

from actors.addresses import data_host
from actors.hosted import HostedActor, hostable
from actors.runtime import ActorConfig
from broker import auth, rundir
from broker import protocol as p
from broker.actor_options import check_options
from broker.catalog import load_catalog
from broker.config import add_common_arguments, load_config
from broker.costs.model import CostModel
from broker.costs.profiles import load_profile
from broker.logs import bind_process_fields, configure_logging

log = structlog.get_logger(__name__)


@dataclass
class AgentConfig:
    broker_backend: str = "tcp://127.0.0.1:5556"
    host: str = ""
    agent_id: str = ""
    emulate_gpus: int = 0  # > 0: report N emulated GPUs instead of probing real ones
    gpu_memory_gib: float = 80.0  # memory of each emulated GPU
    catalog: list[str] = field(default_factory=list)
    run_dir: str = "run"  # logs/ and pids/ of the actors this agent starts
    # The address its actors serve tensors on, reachable from the other hosts (env
    # LEGO_DATA_HOST); empty: loopback for a broker on loopback, else this host's end
    # of the route to the broker.
    data_host: str = ""
    # Keys on: the agent's own key (role agent; env LEGO_KEY_FILE) and the actors' key it
    # hands to every actor it starts (role actor, the same on every host).
    key_file: str = ""
    actor_key_file: str = ""
    # A spawn beyond this many actors on one device is refused: a bound on what one
    # admin call after another can start (a test cluster runs 20 tiny actors on the CPU).
    max_actors_per_device: int = 64
    heartbeat_interval_s: float = 1.0
    heartbeat_misses: int = 5
    stop_grace_s: float = 5.0
    actor_log_format: str = ""  # of the actors it starts; empty: the agent's own (and its level)
    # Emulated actors (backends emulated and monolith, no `crash_on_prompt`) run on threads
    # of this process (actors/hosted.py) instead of a process each; env LEGO_HOSTED_EMULATED.
    hosted_emulated: bool = False
    log_format: str = "console"
    log_level: str = "info"


def detect_devices(emulate_gpus: int, gpu_memory_gib: float) -> list[p.DeviceInfo]:
    devices = []
    if emulate_gpus > 0:
        size = int(gpu_memory_gib * 1024**3)
        devices = [p.DeviceInfo(f"emu:{i}", "emulated", "emulated GPU", size, size) for i in range(emulate_gpus)]
    elif shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"]
        try:
            lines = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
        except (subprocess.SubprocessError, OSError):
            lines = []
        for line in lines:
            index, name, total, free = (x.strip() for x in line.split(","))
            devices.append(p.DeviceInfo(f"cuda:{index}", "cuda", name, int(total) * 1024**2, int(free) * 1024**2))
    import psutil

    mem = psutil.virtual_memory()
    devices.append(p.DeviceInfo("cpu", "cpu", f"{os.cpu_count()} cores", mem.total, mem.available))
    return devices


@dataclass
class Child:
    spawn_id: str
    actor_id: str
    device: str
    memory_bytes: int
    process: subprocess.Popen | HostedActor
    pidfile: Path | None  # None: hosted, no process of its own
    stop_requested_at: float = 0.0

    def forget_pidfile(self) -> None:
        if self.pidfile is not None:
            self.pidfile.unlink(missing_ok=True)


class NodeAgent:
    def __init__(self, config: AgentConfig, context: zmq.Context | None = None):
        self.config = config
        self.host = config.host or socketlib.gethostname()
        self.agent_id = config.agent_id or f"agent@{self.host}"
        self.catalog = load_catalog(config.catalog)
        self.devices = {d.device: d for d in detect_devices(config.emulate_gpus, config.gpu_memory_gib)}
        self.children: dict[str, Child] = {}  # actor_id -> child
        self.run_dir = Path(config.run_dir)
        self.data_host = data_host(config.broker_backend, config.data_host)
        if bool(config.key_file) != bool(config.actor_key_file):
            raise auth.KeyFileError("key_file and actor_key_file: set both (keys on) or neither")
        self.key = auth.load_key_file(config.key_file) if config.key_file else None
        if config.actor_key_file:
            auth.load_key_file(config.actor_key_file)  # a bad actors' key fails here, not in every actor
        rundir.run_dir(self.run_dir, ("logs", "pids", "locks"))
        self.context = context or zmq.Context()
        self._own_context = context is None
        self.stopping = threading.Event()
        self._outbox: list[p.Message] = []

    # ------------------------------------------------------------------ actors

    def _memory_needed(self, model: str, backend: str, options: dict) -> int:
        spec = self.catalog.model(model)
        if backend == "monolith":  # its largest hosted workflow, every model its own copy

            costs = CostModel(self.catalog)
            return max(sum(costs.resident_bytes(m) for m in wf.models) for wf in spec.workflows)
        if backend != "emulated":
            return 0  # real backends report what they hold once loaded

        return load_profile(options.get("profile") or spec.profile or spec.name).resident_bytes

    def spawn(self, msg: p.SpawnActor) -> None:
        def refuse(reason: str) -> None:
            log.warning("spawn_refused", spawn_id=msg.spawn_id, model=msg.model, device=msg.device, reason=reason)
            self._outbox.append(p.AgentEvent(msg.spawn_id, "refused", message=reason, devices=list(self.devices.values())))

        try:  # what the broker checked, checked again here: this process runs what it says
            options = check_options(msg.backend, msg.options)
        except ValueError as exc:
            return refuse(str(exc))
        if any(child.spawn_id == msg.spawn_id for child in self.children.values()):
            return refuse(f"spawn_id: {msg.spawn_id} is already running here")
        device = self.devices.get(msg.device)
        if device is None:
            return refuse(f"device: no device {msg.device!r} on {self.host} (has {sorted(self.devices)})")
        if self.catalog.model(msg.model) is None:
            return refuse(f"model: unknown model {msg.model!r}")
        on_device = sum(1 for child in self.children.values() if child.device == msg.device)
        if on_device >= self.config.max_actors_per_device:
            return refuse(f"device: {msg.device} already runs {on_device} actors (max_actors_per_device)")
        try:
            need = self._memory_needed(msg.model, msg.backend, options)
        except Exception as exc:  # a bad option must not take the agent (and its actors) down
            return refuse(f"options: {type(exc).__name__}: {exc}")
        if device.kind != "cpu" and need > device.free_bytes:
            return refuse(f"device: {msg.device} has {device.free_bytes} bytes free, {msg.model} needs {need}")
        actor_id = f"{msg.model}@{self.host}/{msg.device}#{msg.spawn_id}"
        if device.kind == "emulated":  # the agent's own lock file: never a path from the wire
            # Actors on one emulated GPU take turns computing, as kernels on one GPU do.
            options["device_lock"] = str((self.run_dir / "locks" / f"{msg.device.replace(':', '-')}.lock").resolve())
        try:
            if self.config.hosted_emulated and hostable(msg.backend, device.kind, options):
                process, pidfile = self._start_hosted(msg, actor_id, options), None
            else:
                process, pidfile = self._start_process(msg, actor_id, device.kind, options)
        except OSError as exc:
            return refuse(f"could not start: {exc}")
        device.free_bytes -= need
        self.children[actor_id] = Child(msg.spawn_id, actor_id, msg.device, need, process, pidfile)
        log.info("actor_started", spawn_id=msg.spawn_id, actor_id=actor_id, pid=process.pid, device=msg.device,
                 hosted=pidfile is None)
        self._outbox.append(p.AgentEvent(msg.spawn_id, "started", actor_id, process.pid, devices=list(self.devices.values())))

    def _start_process(self, msg: p.SpawnActor, actor_id: str, device_kind: str,
                       options: dict) -> tuple[subprocess.Popen, Path]:
        """`python -m actors ...` with its own log file and pidfile; OSError if it cannot start."""
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LEGO_EXIT_WITH_PARENT="1")
        env.pop("LEGO_KEY_FILE", None)  # the agent's own key: an actor gets the actors' key, by flag
        actor_device = msg.device
        if device_kind == "cuda":  # pin: the actor sees exactly one GPU, as cuda:0
            env["CUDA_VISIBLE_DEVICES"] = msg.device.split(":")[1]
            actor_device = "cuda:0"
        cmd = [sys.executable, "-m", "actors", "--model", msg.model, "--broker", self.config.broker_backend,
               "--device", actor_device, "--backend", msg.backend, "--actor-id", actor_id, "--host", self.host,
               "--max-batch-rows", str(msg.max_batch_rows), "--data-bind", f"tcp://{self.data_host}:*",
               *(["--key-file", self.config.actor_key_file] if self.config.actor_key_file else []),
               "--log-format", self.config.actor_log_format or self.config.log_format, "--log-level", self.config.log_level]
        for path in self.config.catalog:
            cmd += ["--catalog", str(path)]
        for key, value in options.items():
            cmd += ["--option", f"{key}={value}"]
        safe = msg.spawn_id.replace("/", "_")
        logfile = rundir.open_private(self.run_dir / "logs" / f"actor-{safe}.log")
        try:
            process = subprocess.Popen(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            logfile.close()
        pidfile = self.run_dir / "pids" / f"actor-{safe}.pid"
        rundir.write_private(pidfile, f"{process.pid}\n")
        return process, pidfile

    def _start_hosted(self, msg: p.SpawnActor, actor_id: str, options: dict) -> HostedActor:
        """The same actor on a thread of this process.

        It gets a ZeroMQ context of its own (an IO thread, as its process would have),
        not this process's: keys on, its data socket starts a ZAP handler, and a context
        holds one; and a socket it failed to close (a runtime that raised while being
        built) would keep this process's context from terminating, and the agent from
        exiting.

        It fetches peers' outputs as frames, not through shared memory: its peers are
        mostly threads of this process too, and multiprocessing's resource tracker keeps
        one set of segment names per process, which an attach-then-forget (actors/shm.py)
        of a segment this process created would empty under its creator."""
        config = ActorConfig(model=msg.model, broker_backend=self.config.broker_backend, device=msg.device,
                             backend=msg.backend, catalog=list(self.config.catalog), actor_id=actor_id,
                             host=self.host, data_bind=f"tcp://{self.data_host}:*",
                             key_file=self.config.actor_key_file, max_batch_rows=msg.max_batch_rows,
                             options=dict(options), shm=False)
        try:
            return HostedActor(config).start()
        except RuntimeError as exc:  # no thread to be had
            raise OSError(str(exc)) from exc

    def stop_actor(self, actor_id: str) -> None:
        child = self.children.get(actor_id)
        if child is None:
            log.warning("stop_unknown_actor", actor_id=actor_id)
            return
        if not child.stop_requested_at:
            child.stop_requested_at = time.monotonic()
            child.process.terminate()

    def reap(self) -> None:
        """Report exited children; SIGKILL those that ignored SIGTERM for too long."""
        now = time.monotonic()
        for actor_id, child in list(self.children.items()):
            code = child.process.poll()
            if code is None:
                if child.stop_requested_at and now - child.stop_requested_at > self.config.stop_grace_s:
                    child.process.kill()
                continue
            del self.children[actor_id]
            child.forget_pidfile()
            self.devices[child.device].free_bytes += child.memory_bytes
            log.info("actor_exited", actor_id=actor_id, returncode=code)
            self._outbox.append(p.AgentEvent(child.spawn_id, "exited", actor_id, child.process.pid, code,
                                             devices=list(self.devices.values())))

    def stop_all(self) -> None:
        for actor_id in list(self.children):
            self.stop_actor(actor_id)
        deadline = time.monotonic() + self.config.stop_grace_s
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for child in self.children.values():
            child.process.kill()
            child.process.wait()
            child.forget_pidfile()
        self.children.clear()

    # ------------------------------------------------------------------ broker link

    def _hello(self) -> p.AgentHello:
        return p.AgentHello(self.agent_id, self.host, os.getpid(), list(self.devices.values()))

    def run(self) -> None:
        sock = None
        interval, misses = self.config.heartbeat_interval_s, self.config.heartbeat_misses
        welcomed, next_hello, backoff = False, 0.0, 0.5
        last_heard = last_beat = time.monotonic()
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if sock is None:
                    sock = self.context.socket(zmq.DEALER)
                    sock.setsockopt(zmq.LINGER, 0)
                    if self.key is not None:
                        self.key.as_client(sock)
                    sock.connect(self.config.broker_backend)
                if not welcomed and now >= next_hello:
                    sock.send_multipart([b"", *p.encode(self._hello())])
                    next_hello, backoff = now + backoff, min(backoff * 2, 5.0)
                if sock.poll(100):
                    frames = sock.recv_multipart()
                    last_heard = time.monotonic()
                    try:
                        msg, _ = p.decode(frames[1:])
                    except p.ProtocolError as err:
                        log.warning("protocol_error", code=err.code.value, error=err.message)
                        continue
                    if isinstance(msg, p.Welcome):
                        welcomed, backoff = True, 0.5
                        interval, misses = msg.heartbeat_interval_s, msg.heartbeat_misses
                        log.info("agent_welcomed", agent_id=self.agent_id, broker_id=msg.broker_id)
                    elif isinstance(msg, p.SpawnActor):
                        try:
                            self.spawn(msg)
                        except Exception as exc:  # refuse this one; keep serving the rest
                            log.exception("spawn_failed", spawn_id=msg.spawn_id)
                            self._outbox.append(p.AgentEvent(msg.spawn_id, "refused", message=f"{type(exc).__name__}: {exc}"))
                    elif isinstance(msg, p.StopActor):
                        self.stop_actor(msg.actor_id)
                    elif isinstance(msg, p.Disconnect):
                        welcomed, next_hello = False, 0.0
                        log.warning("agent_disconnected", reason=msg.reason)
                self.reap()
                now = time.monotonic()
                if welcomed and now - last_heard > interval * misses:
                    log.warning("broker_silent", seconds=round(now - last_heard, 1))
                    sock.close(linger=0)
                    sock, welcomed, next_hello, last_heard = None, False, 0.0, now
                    continue
                if welcomed and now - last_beat >= interval:
                    last_beat = now
                    self._outbox.append(p.Heartbeat(time.time()))
                while self._outbox and welcomed:
                    sock.send_multipart([b"", *p.encode(self._outbox.pop(0))])
        finally:
            self.stop_all()
            if sock is not None:
                if welcomed:
                    sock.send_multipart([b"", *p.encode(p.Disconnect("agent shutting down"))])
                sock.close(linger=100)
            if self._own_context:
                self.context.term()

    def stop(self) -> None:
        self.stopping.set()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="lego agent", description="Run the node agent of this host.")
    parser.add_argument("--broker", dest="broker_backend", help="broker backend address (env LEGO_BROKER_BACKEND)")
    parser.add_argument("--host")
    parser.add_argument("--agent-id")
    parser.add_argument("--emulate-gpus", type=int)
    parser.add_argument("--gpu-memory-gib", type=float)
    parser.add_argument("--catalog", action="append")
    parser.add_argument("--run-dir")
    parser.add_argument("--key-file", help="keys on: this agent's key file (env LEGO_KEY_FILE)")
    parser.add_argument("--actor-key-file", help="keys on: the actors' key file, handed to every actor it starts")
    parser.add_argument("--hosted-emulated", choices=("on", "off"),
                        help="run emulated actors on threads of the agent, not a process each "
                             "(env LEGO_HOSTED_EMULATED; default off)")
    parser.add_argument("--data-host", help="the address this host's actors serve tensors on, reachable from other "
                        "hosts (env LEGO_DATA_HOST; default: loopback for a broker on loopback, else the local end "
                        "of the route to the broker)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    config = load_config(AgentConfig, "agent", args.config, {k: v for k, v in vars(args).items() if k != "config"})
    configure_logging(config.log_format, config.log_level, process="agent")
    agent = NodeAgent(config)
    bind_process_fields(agent_id=agent.agent_id)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    agent.run()


if __name__ == "__main__":
    main()
