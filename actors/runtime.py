"""The model actor process: one model on one device, pulling work from the broker.

`ActorRuntime` builds the parts, each owning its own state and at most one thread's
sockets, and runs the compute thread itself:

- compute (main) thread, here: the *work* DEALER to the broker's backend socket
  (HELLO, TASKS in, BATCH_DONE out, FREE, DISCONNECT); each batch runs in
  actors/batch.py, fetching peers' outputs through actors/fetcher.py (one DEALER per
  peer data socket, also this thread's).
- heartbeat thread (actors/heartbeat.py): a separate *control* DEALER that pings the
  broker, so a long batch never looks like a dead actor, and that notices a silent
  broker (then the compute thread starts a new session).
- data thread (actors/data_server.py): the ROUTER data socket from which peer actors
  FETCH the outputs this actor holds (the data plane is actor-to-actor; the broker
  moves references).

What the threads share is explicit: the store (actors/store.py), the telemetry, the
session (actors/session.py) and the stop event. A session is one hello..disconnect
span; everything tied to an older session (stored tensors, what was exported of them,
a batch that was computing) is dropped when a new one starts: the broker has
re-queued it.
"""

from __future__ import annotations

import os
import signal
import socket as socketlib
import sys
import threading
import time
from dataclasses import dataclass, field

import structlog
import zmq

from actors.backends import create_backend
from actors.batch import BatchRunner
from actors.data_server import DataServer
from actors.fetcher import Fetcher
from actors.heartbeat import Heartbeat
from actors.session import Session
from actors.store import TensorStore
from broker import auth
from broker import protocol as p
from broker.catalog import load_catalog
from broker.config import add_common_arguments, load_config, parse_options
from broker.logs import bind_process_fields, configure_logging

log = structlog.get_logger(__name__)


@dataclass
class ActorConfig:
    model: str = ""
    broker_backend: str = "tcp://127.0.0.1:5556"  # env LEGO_BROKER_BACKEND
    device: str = "cpu"
    backend: str = "emulated"
    catalog: list[str] = field(default_factory=list)
    actor_id: str = ""
    host: str = ""
    # Where peers fetch this actor's outputs; its node agent passes a routable address
    # (actors/addresses.py). A wildcard bind is advertised as the route to the broker.
    data_bind: str = "tcp://127.0.0.1:*"
    # Keys on: this actor's key (role actor; env LEGO_KEY_FILE). Every actor of a cluster
    # holds the same actor key: peers' data sockets are servers of that key.
    key_file: str = ""
    max_batch_rows: int = 8
    credits: int = 2  # batches the broker may queue here (one running, one waiting)
    threads: int = 1  # torch intra-op threads; several actors share the host's cores
    heartbeat_interval_s: float = 1.0  # until the broker's WELCOME says otherwise
    heartbeat_misses: int = 5
    fetch_timeout_s: float = 10.0
    # Fetch from same-host peers through shared memory instead of sockets (env LEGO_SHM=1).
    # Off by default: every output is fetched fresh, and then a segment (made, faulted in,
    # copied into, copied out of) costs more than the frames' two copies. Measured with
    # fresh bundles into torch CPU memory (docs/benchmarks.md, "Shared memory or frames"):
    # 4.5 MiB 6.1 ms by shm, 2.6 ms as frames; 16 MiB 17.9 / 8.6 ms; 64 MiB 84 / 89 ms; on
    # the H200, 64 MiB into CUDA memory 150 / 104 ms.
    shm: bool = False
    shm_min_bytes: int = 1 << 20  # with shm on: below this a segment costs more than sending the bytes
    ipc: bool = True  # CUDA tensors on this actor's GPU, held by a same-host peer: fetch by CUDA IPC
    # Each request's conditioning, once fetched, is kept (up to this many bytes, least
    # recently used out first) so that it crosses to this actor once per request.
    constants_cache_bytes: int = 512 * 1024**2
    reconnect_max_s: float = 5.0
    options: dict = field(default_factory=dict)  # backend settings, e.g. time_scale
    log_format: str = "console"
    log_level: str = "info"


class ActorRuntime:
    """Builds the actor's parts, runs the compute thread and starts the other two."""

    def __init__(self, config: ActorConfig, context: zmq.Context | None = None):
        if not config.model:
            raise ValueError("model: an actor needs a model name")
        self.config = config
        catalog = load_catalog(config.catalog)
        spec = catalog.model(config.model)  # a declared model, or a monolith: pipeline/WORKFLOW
        if spec is None:
            raise ValueError(f"model: unknown model {config.model!r} (known: {sorted(catalog.models)}, "
                             "or pipeline/WORKFLOW[+WORKFLOW...])")
        self.host = config.host or socketlib.gethostname()
        self.actor_id = config.actor_id or f"{config.model}@{self.host}:{os.getpid()}"
        self.backend = create_backend(config.backend, spec, config.device, config.options)
        if hasattr(self.backend, "attach_catalog"):  # e.g. a ControlNet reads its base model's scheduler there
            self.backend.attach_catalog(catalog)
        if self.backend.tensor_kind == "torch" or "torch" in sys.modules:
            import torch

            torch.set_num_threads(max(1, config.threads))
        self.context = context or zmq.Context()
        self._own_context = context is None
        # Shared between the threads: the store (compute puts and frees, data serves),
        # the telemetry (compute and fetcher count, heartbeat sends), the session
        # (compute writes, heartbeat reads and marks lost), and the stop signal.
        self.store = TensorStore()
        self.telemetry = p.ActorTelemetry()
        self.session = Session(self.actor_id, config.heartbeat_interval_s, config.heartbeat_misses)
        self.stopping = threading.Event()
        self.key = auth.load_key_file(config.key_file) if config.key_file else None
        self.data_server = DataServer(self.context, bind=config.data_bind, broker_backend=config.broker_backend,
                                      key=self.key, store=self.store, ipc=config.ipc, actor_id=self.actor_id)
        self.data_address = self.data_server.address
        self.fetcher = Fetcher(self.context, actor_id=self.actor_id, host=self.host, device=config.device,
                               as_torch=self.backend.tensor_kind == "torch", key=self.key, telemetry=self.telemetry,
                               timeout_s=config.fetch_timeout_s, shm=config.shm, shm_min_bytes=config.shm_min_bytes,
                               ipc=config.ipc, constants_bytes=config.constants_cache_bytes,
                               transfer_s=getattr(self.backend, "transfer_s", None))
        self.batches = BatchRunner(actor_id=self.actor_id, backend=self.backend, store=self.store,
                                   fetcher=self.fetcher, telemetry=self.telemetry)
        self.heartbeat = Heartbeat(self.context, config.broker_backend, self.key, self.session,
                                   self.refresh_telemetry, self.stopping)
        self._threads: list[threading.Thread] = []
        # Spawned by a node agent: exit with it rather than outlive it as an orphan.
        self._parent_pid = os.getppid() if os.environ.get("LEGO_EXIT_WITH_PARENT") == "1" else None

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Load the model, start the heartbeat and data threads, compute until stopped."""
        log.info("actor_loading", actor_id=self.actor_id, model=self.config.model, backend=self.config.backend)
        self.backend.load()
        self.telemetry.memory_used_bytes = self.backend.memory_bytes()
        self._start_thread(self.heartbeat.run, "heartbeat")
        self._start_thread(self.data_server.run, "data", self.stopping)
        work: zmq.Socket | None = None
        try:
            work = self._compute_loop()
        finally:
            if work is not None:
                if self.session.welcomed():  # tell the broker now, not by timeout
                    work.send_multipart([b"", *p.encode(p.Disconnect("actor shutting down"))])
                work.close(linger=200)
            self.fetcher.close()
            self._stop_threads()
            self.data_server.close()
            if self._own_context:
                self.context.term()
            log.info("actor_stopped", actor_id=self.actor_id)

    def stop(self) -> None:
        self.stopping.set()

    def start_data_plane(self) -> threading.Thread:
        """Serve FETCH from this actor's store without joining a broker (tools and tests)."""
        return self._start_thread(self.data_server.run, "data", self.stopping)

    def close_data_plane(self) -> None:
        """Stop what `start_data_plane` started and close the fetcher's peer sockets."""
        self._stop_threads()
        self.fetcher.close()
        self.data_server.close()
        self.store.clear()
        if self._own_context:
            self.context.term()

    def _start_thread(self, target, name: str, *args) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=f"actor-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def _stop_threads(self) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=2.0)

    def refresh_telemetry(self) -> p.ActorTelemetry:
        """Fold the store's, the fetcher's and the exporters' state into the telemetry (heartbeat thread)."""
        t, exports = self.telemetry, self.data_server
        t.stored_tensors, t.stored_bytes = self.store.stats()
        t.shm_segments = exports.exporter.count()
        t.ipc_pins = exports.ipc.count()
        t.ipc_fallbacks = self.fetcher.ipc_fallbacks + exports.ipc.failures
        t.adapter_switch_s = round(float(getattr(self.backend, "adapter_switch_s", 0.0)), 6)
        return t

    # ------------------------------------------------------------------ compute thread

    def _open_session(self, old: zmq.Socket | None, reason: str) -> zmq.Socket:
        """A fresh work socket and session: the broker re-queued whatever we had."""
        if old is not None:
            old.close(linger=0)
        epoch = self.session.begin()
        self.store.clear(epoch)
        self.data_server.drop_exports()
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # A fixed identity per session: if TCP reconnects underneath, the broker still
        # reaches this session (a random one would change and strand its batches).
        sock.setsockopt(zmq.ROUTING_ID, self.session.id.encode())
        if self.key is not None:  # keys on: the broker admits this actor's key only
            self.key.as_client(sock)
        sock.connect(self.config.broker_backend)
        log.info("actor_new_session", actor_id=self.actor_id, epoch=epoch, reason=reason)
        return sock

    def _hello(self) -> p.ActorHello:
        c = self.config
        return p.ActorHello(
            actor_id=self.actor_id, model=c.model, device=c.device, host=self.host, pid=os.getpid(),
            backend=c.backend, max_batch_rows=c.max_batch_rows, data_address=self.data_address,
            credits=c.credits, capabilities=[self.backend.tensor_kind], memory_bytes=self.backend.memory_bytes(),
        )

    def _compute_loop(self) -> zmq.Socket:
        session = self.session
        work = self._open_session(None, "start")
        backoff, next_hello = 0.5, 0.0
        while not self.stopping.is_set():
            if self._parent_pid is not None and os.getppid() != self._parent_pid:
                log.warning("parent_gone", actor_id=self.actor_id)
                break
            lost = session.lost_reason()
            if lost is not None:
                work = self._open_session(work, lost)
                next_hello = 0.0
            now = time.monotonic()
            if not session.welcomed() and now >= next_hello:
                work.send_multipart([b"", *p.encode(self._hello())])
                next_hello, backoff = now + backoff, min(backoff * 2, self.config.reconnect_max_s)
            if not work.poll(100):
                continue
            frames = work.recv_multipart(copy=False)
            try:
                msg, payload = p.decode(frames[1:])
            except p.ProtocolError as err:
                log.warning("protocol_error", actor_id=self.actor_id, code=err.code.value, error=err.message)
                self._refuse_batch(work, frames[1:], err)
                continue
            if isinstance(msg, p.Tasks):
                if session.welcomed():
                    self.batches.run(session.epoch, msg, payload, work)
            elif isinstance(msg, p.Free):
                self.free(msg.tensor_ids)
            elif isinstance(msg, p.Welcome):
                session.welcome(msg.heartbeat_interval_s, msg.heartbeat_misses)
                backoff = 0.5
                log.info("actor_welcomed", actor_id=self.actor_id, broker_id=msg.broker_id, epoch=session.epoch)
            elif isinstance(msg, p.Disconnect):
                log.warning("actor_disconnected", actor_id=self.actor_id, reason=msg.reason)
                work = self._open_session(work, msg.reason)
                next_hello = 0.0
            elif isinstance(msg, p.Error):
                log.warning("broker_error", actor_id=self.actor_id, code=msg.code, error=msg.message)
        return work

    def _refuse_batch(self, work: zmq.Socket, frames: list, err: p.ProtocolError) -> None:
        """A TASKS message we cannot read still names its batch: fail it back, so that the
        broker re-runs its tasks one by one (or fails the request typed) and gets the
        credit back, rather than waiting on a batch that will never finish."""
        batch_id = p.undecodable_batch_id(frames)
        if batch_id is None or not self.session.welcomed():
            return
        reply = p.BatchFailed(batch_id, [], [], err.code.value, f"the actor could not read the batch: {err.message}")
        work.send_multipart([b"", *p.encode(reply)])

    def free(self, tensor_ids: list[str]) -> None:
        """The broker's FREE (compute thread): the store first, then what was exported.

        The order matters: the data thread registers an export before it checks that
        the bundle is still stored (`DataServer._serve_fetch`), so either it sees the
        bundle gone and undoes its export, or this release comes after the export and
        drops it.
        """
        self.store.free(tensor_ids)
        self.data_server.release(tensor_ids)


def run_actor(config: ActorConfig) -> None:
    runtime = ActorRuntime(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: runtime.stop())
    runtime.run()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="lego actor", description="Run one model actor (one model, one device).")
    parser.add_argument("--model", required=True)
    parser.add_argument("--broker", dest="broker_backend", help="broker backend address (env LEGO_BROKER_BACKEND)")
    parser.add_argument("--device")
    parser.add_argument("--backend")
    parser.add_argument("--catalog", action="append", help="extra workflow catalog TOML (repeatable)")
    parser.add_argument("--actor-id")
    parser.add_argument("--host")
    parser.add_argument("--data-bind")
    parser.add_argument("--key-file", help="keys on: the actors' key file (env LEGO_KEY_FILE)")
    parser.add_argument("--max-batch-rows", type=int)
    parser.add_argument("--credits", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--option", action="append", metavar="KEY=VALUE", help="backend option (repeatable)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if k not in ("option", "config")}
    cli["options"] = parse_options(args.option) or None
    config = load_config(ActorConfig, "actor", args.config, cli)
    configure_logging(config.log_format, config.log_level, process=f"actor:{config.model}")
    if config.actor_id:  # every line of this process concerns this actor
        bind_process_fields(actor_id=config.actor_id)
    run_actor(config)
