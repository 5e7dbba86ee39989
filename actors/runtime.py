"""The model actor process: one model on one device, pulling work from the broker.

Threads and the sockets each one owns:
- compute (main) thread: the *work* DEALER to the broker's backend socket (HELLO,
  TASKS in, BATCH_DONE out, FREE, DISCONNECT) and one DEALER per peer it fetches
  inputs from. Receiving a batch and answering it on the thread that computes it
  keeps thread hand-offs off the per-task path.
- heartbeat thread: a separate *control* DEALER on which it pings the broker with the
  actor id and telemetry every interval and reads the pongs. It never waits on
  compute, so a long batch never looks like a dead actor, and it is what notices a
  silent broker (then the compute thread starts a new session).
- data thread: the ROUTER data socket from which peer actors FETCH the outputs this
  actor holds (the data plane is actor-to-actor; the broker moves references).

A fetch from a peer on another host comes as frames; from one on this host, a big
bundle comes through shared memory (actors/shm.py), and CUDA tensors on this actor's
own GPU come as CUDA IPC handles (actors/cuda_ipc.py), each falling back to the next
when it fails, counted in the telemetry.

A session is one hello..disconnect span; everything tied to an older session
(stored tensors, a batch that was computing) is dropped when a new one starts: the
broker has re-queued it.
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

from actors import cuda_ipc
from actors.addresses import advertised
from actors.backends import create_backend
from actors.cuda_ipc import IpcExporter, IpcUnavailable
from actors.shm import PREFIX, ShmExporter, ShmUnavailable, attach_bundle
from actors.store import Bundle, TensorStore, bundle_nbytes, pack_bundle, unpack_bundle
from broker import auth
from broker import protocol as p
from broker.catalog import load_catalog
from broker.config import add_common_arguments, load_config, parse_options
from broker.logs import bind_process_fields, configure_logging
from broker.protocol.constants import DEFAULT_LIMITS
from broker.protocol.errors import ErrorCode

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
    shm: bool = True  # fetch from same-host peers through shared memory instead of sockets
    shm_min_bytes: int = 1 << 20  # below this a segment costs more than sending the bytes
    ipc: bool = True  # CUDA tensors on this actor's GPU, held by a same-host peer: fetch by CUDA IPC
    reconnect_max_s: float = 5.0
    options: dict = field(default_factory=dict)  # backend settings, e.g. time_scale
    log_format: str = "console"
    log_level: str = "info"


class InputUnavailable(Exception):
    """An input bundle could not be had (its holder freed it, died or sent garbage)."""


class ActorRuntime:
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
        self.store = TensorStore()
        self.exporter = ShmExporter()  # segments this actor serves to same-host peers
        self.ipc = IpcExporter()  # CUDA IPC shares this actor serves to peers on its GPU
        self._gpu: str | None = None  # this actor's GPU UUID ("" for none), found at the first fetch
        self._ipc_fetch_fallbacks = 0  # compute thread; the exporter counts the data thread's
        self.stopping = threading.Event()
        self.telemetry = p.ActorTelemetry()
        # Session state, written by the compute thread, read by the heartbeat thread.
        self.epoch = 0
        self.welcomed_epoch = -1  # the session the broker has welcomed
        self.heartbeat_interval_s = config.heartbeat_interval_s
        self.heartbeat_misses = config.heartbeat_misses
        # (epoch, reason), set by the heartbeat thread when the broker went silent or
        # forgot that session; the compute thread ignores it for an older session.
        self.session_lost: tuple[int, str] | None = None
        self.key = auth.load_key_file(config.key_file) if config.key_file else None
        self.authenticator: auth.RoleAuthenticator | None = None
        self._data_sock = self.context.socket(zmq.ROUTER)
        if self.key is not None:  # only holders of the actors' key may fetch from us
            self.authenticator = auth.RoleAuthenticator(self.context, {self.key.public: self.key.user_id})
            self.authenticator.start()
            self.key.as_server(self._data_sock, auth.DATA)
        self._data_sock.setsockopt(zmq.LINGER, 0)
        # Peers send FETCH requests here, headers only: anything bigger is not a peer.
        self._data_sock.setsockopt(zmq.MAXMSGSIZE, DEFAULT_LIMITS.max_header_bytes)
        self._data_sock.bind(config.data_bind)
        self.data_address = advertised(self._data_sock.getsockopt(zmq.LAST_ENDPOINT).decode(), config.broker_backend)
        self._threads: list[threading.Thread] = []
        # Spawned by a node agent: exit with it rather than outlive it as an orphan.
        self._parent_pid = os.getppid() if os.environ.get("LEGO_EXIT_WITH_PARENT") == "1" else None

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Load the model, start the heartbeat and data threads, compute until stopped."""
        log.info("actor_loading", actor_id=self.actor_id, model=self.config.model, backend=self.config.backend)
        self.backend.load()
        self.telemetry.memory_used_bytes = self.backend.memory_bytes()
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._data_loop, "data")):
            thread = threading.Thread(target=target, name=f"actor-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        work: zmq.Socket | None = None
        peers: dict[str, zmq.Socket] = {}
        try:
            work = self._compute_loop(peers)
        finally:
            if work is not None:
                if self.welcomed_epoch == self.epoch:  # tell the broker now, not by timeout
                    work.send_multipart([b"", *p.encode(p.Disconnect("actor shutting down"))])
                work.close(linger=200)
            for sock in peers.values():
                sock.close(linger=0)
            self.stopping.set()
            for thread in self._threads:
                thread.join(timeout=2.0)
            self._data_sock.close(linger=0)
            self._stop_authenticator()
            self.exporter.close()
            self.ipc.close()
            if self._own_context:
                self.context.term()
            log.info("actor_stopped", actor_id=self.actor_id)

    def stop(self) -> None:
        self.stopping.set()

    def _secure(self, sock: zmq.Socket) -> None:
        """Keys on: a socket to the broker speaks CurveZMQ as this actor's key."""
        if self.key is not None:
            self.key.as_client(sock)

    def _stop_authenticator(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None

    # ------------------------------------------------------------------ compute thread

    def _open_session(self, old: zmq.Socket | None, reason: str) -> zmq.Socket:
        """A fresh work socket and session: the broker re-queued whatever we had."""
        if old is not None:
            old.close(linger=0)
        self.epoch += 1
        self.store.clear(self.epoch)
        self.exporter.close()
        self.ipc.close()
        self.session_lost = None
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # A fixed identity per session: if TCP reconnects underneath, the broker still
        # reaches this session (a random one would change and strand its batches).
        sock.setsockopt(zmq.ROUTING_ID, self.session_id.encode())
        self._secure(sock)
        sock.connect(self.config.broker_backend)
        log.info("actor_new_session", actor_id=self.actor_id, epoch=self.epoch, reason=reason)
        return sock

    @property
    def session_id(self) -> str:
        return f"{self.actor_id}#{self.epoch}"[-250:]  # ZeroMQ caps identities at 255 bytes

    def _hello(self) -> p.ActorHello:
        c = self.config
        return p.ActorHello(
            actor_id=self.actor_id, model=c.model, device=c.device, host=self.host, pid=os.getpid(),
            backend=c.backend, max_batch_rows=c.max_batch_rows, data_address=self.data_address,
            credits=c.credits, capabilities=[self.backend.tensor_kind], memory_bytes=self.backend.memory_bytes(),
        )

    def _compute_loop(self, peers: dict) -> zmq.Socket:
        work = self._open_session(None, "start")
        backoff, next_hello = 0.5, 0.0
        while not self.stopping.is_set():
            if self._parent_pid is not None and os.getppid() != self._parent_pid:
                log.warning("parent_gone", actor_id=self.actor_id)
                break
            lost = self.session_lost
            if lost is not None and lost[0] == self.epoch:
                work = self._open_session(work, lost[1])
                next_hello = 0.0
            now = time.monotonic()
            if self.welcomed_epoch != self.epoch and now >= next_hello:
                work.send_multipart([b"", *p.encode(self._hello())])
                next_hello, backoff = now + backoff, min(backoff * 2, self.config.reconnect_max_s)
            if not work.poll(100):
                continue
            frames = work.recv_multipart(copy=False)
            try:
                msg, payload = p.decode(frames[1:])
            except p.ProtocolError as err:
                log.warning("protocol_error", actor_id=self.actor_id, code=err.code.value, error=err.message)
                continue
            if isinstance(msg, p.Tasks):
                if self.welcomed_epoch == self.epoch:
                    self._run_batch(self.epoch, msg, payload, work, peers)
            elif isinstance(msg, p.Free):
                self.free(msg.tensor_ids)
            elif isinstance(msg, p.Welcome):
                self.heartbeat_interval_s, self.heartbeat_misses = msg.heartbeat_interval_s, msg.heartbeat_misses
                self.welcomed_epoch, backoff = self.epoch, 0.5
                log.info("actor_welcomed", actor_id=self.actor_id, broker_id=msg.broker_id, epoch=self.epoch)
            elif isinstance(msg, p.Disconnect):
                log.warning("actor_disconnected", actor_id=self.actor_id, reason=msg.reason)
                work = self._open_session(work, msg.reason)
                next_hello = 0.0
            elif isinstance(msg, p.Error):
                log.warning("broker_error", actor_id=self.actor_id, code=msg.code, error=msg.message)
        return work

    def free(self, tensor_ids: list[str]) -> None:
        """The broker's FREE (compute thread): the store first, then what was exported.

        The order matters: the data thread registers an export before it checks that
        the bundle is still stored (`_serve_fetch`), so either it sees the bundle gone
        and undoes its export, or this release comes after the export and drops it.
        """
        self.store.free(tensor_ids)
        self.exporter.release(tensor_ids)
        self.ipc.release(tensor_ids)

    def _run_batch(self, epoch: int, batch: p.Tasks, payload: list, work: zmq.Socket, peers: dict) -> None:
        bound = log.bind(actor_id=self.actor_id, batch_id=batch.batch_id)
        started = time.perf_counter()
        tasks, inputs, missing = self._resolve_inputs(batch.tasks, payload, peers)
        missing_reason = "; ".join(sorted(set(missing.values())))[:500]
        if missing:
            bound.warning("inputs_unavailable", task_ids=sorted(missing), reason=missing_reason)
        try:
            outputs = self.backend.run(tasks, inputs) if tasks else []
            if len(outputs) != len(tasks):
                raise RuntimeError(f"backend returned {len(outputs)} outputs for {len(tasks)} tasks")
        except Exception as exc:
            bound.exception("batch_failed", task_ids=[t.task_id for t in batch.tasks])
            self._report_failure(work, batch, ErrorCode.TASK_ERROR, f"{type(exc).__name__}: {exc}", bound)
            return
        exec_s = time.perf_counter() - started
        results, payload = [], []
        for task, bundle in zip(tasks, outputs, strict=True):
            nbytes = bundle_nbytes(bundle)
            if task.return_output:
                descs, buffers = pack_bundle(bundle, first_frame=len(payload))
                payload.extend(buffers)
                results.append(p.TaskResult(task.task_id, task.attempt, task.output_id, nbytes, descs))
            else:
                if not self.store.put(task.output_id, bundle, epoch, ready=cuda_ipc.record_ready(bundle)):
                    return  # the session ended meanwhile; the broker re-queued this batch
                results.append(p.TaskResult(task.task_id, task.attempt, task.output_id, nbytes))
        t = self.telemetry
        t.batches += 1
        t.tasks += len(tasks)
        t.rows += sum(task.rows for task in tasks)
        t.busy_s += exec_s
        t.memory_used_bytes = getattr(self.backend, "peak_bytes", t.memory_used_bytes)
        done = p.BatchDone(batch.batch_id, results, exec_s, 1, sorted(missing), missing_reason)
        work.send_multipart([b"", *p.encode(done, payload)], copy=False)

    def _report_failure(self, work, batch: p.Tasks, code: ErrorCode, message: str, bound) -> None:
        bound.warning("batch_not_done", code=code.value, error=message)
        msg = p.BatchFailed(batch.batch_id, [t.task_id for t in batch.tasks], [t.attempt for t in batch.tasks], code.value, message, 1)
        work.send_multipart([b"", *p.encode(msg)])

    def _resolve_inputs(self, tasks: list[p.TaskSpec], payload: list, peers: dict):
        """(runnable tasks, their input bundles, {task_id: why} for tasks lacking an input).

        A task's own client tensors (an img2img image, carried in the batch's payload)
        come last among its inputs.

        One task's missing input (its request was cancelled, its holder died) must not
        cost the other requests of the batch their step.
        """
        fetched: dict[str, Bundle] = {}
        runnable, resolved, missing = [], [], {}
        for task in tasks:
            try:
                bundles = []
                for ref in task.inputs:
                    if ref.holder == self.actor_id:
                        bundle = self.store.get(ref.tensor_id)
                    else:
                        bundle = fetched.get(ref.tensor_id) or self._fetch(ref, task.request_id, peers)
                        fetched[ref.tensor_id] = bundle
                    if bundle is None:
                        raise InputUnavailable(f"{ref.tensor_id} is not in this actor's store")
                    bundles.append(bundle)
                if task.tensors:
                    bundles.append(unpack_bundle(task.tensors, payload, as_torch=self.backend.tensor_kind == "torch"))
            except InputUnavailable as exc:
                missing[task.task_id] = str(exc)
                continue
            runnable.append(task)
            resolved.append(bundles)
        return runnable, resolved, missing

    def local_gpu(self) -> str:
        """This actor's GPU UUID, advertised in same-host fetches; "" when IPC cannot apply."""
        if self._gpu is None:
            usable = self.config.ipc and self.backend.tensor_kind == "torch"
            self._gpu = cuda_ipc.device_uuid(self.config.device) if usable else ""
        return self._gpu

    def _fetch(self, ref: p.TensorRef, request_id: str, peers: dict) -> Bundle:
        """Fetch a peer's bundle by the best transport that works: CUDA IPC, shared memory, frames.

        Each failed transport is dropped for a retry (counted: `ipc_fallbacks`,
        `fetch_fallbacks`); a holder that has not got the bundle or does not answer is
        no transport failure, and is not retried.
        """
        shm, gpu = cuda_ipc.fetch_request(same_host=ref.host == self.host, nbytes=ref.nbytes, shm=self.config.shm,
                                          shm_min_bytes=self.config.shm_min_bytes, gpu=self.local_gpu())
        while True:
            try:
                return self._fetch_from(ref, request_id, peers, shm, gpu)
            except IpcUnavailable as exc:
                self._ipc_fetch_fallbacks += 1
                log.warning("cuda_ipc_fetch_fell_back", actor_id=self.actor_id, tensor_id=ref.tensor_id, error=str(exc))
                gpu = ""
            except ShmUnavailable as exc:  # the segment could not be mapped: the bytes can come by socket
                self.telemetry.fetch_fallbacks += 1
                log.warning("shm_fetch_fell_back", actor_id=self.actor_id, tensor_id=ref.tensor_id, error=str(exc))
                shm = False

    def _fetch_from(self, ref: p.TensorRef, request_id: str, peers: dict, shm: bool, gpu: str = "") -> Bundle:
        sock = peers.get(ref.address)
        if sock is None:
            sock = peers[ref.address] = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.key is not None:
                self.key.as_client(sock, server_public=self.key.public)  # a peer's data socket: the actors' key
            sock.connect(ref.address)
        sock.send_multipart([b"", *p.encode(p.Fetch(ref.tensor_id, request_id, shm, gpu))])
        if not sock.poll(self.config.fetch_timeout_s * 1000):
            # A late reply would confuse the next fetch on this socket: start afresh.
            peers.pop(ref.address).close(linger=0)
            raise InputUnavailable(f"{ref.holder} did not answer a fetch of {ref.tensor_id} within {self.config.fetch_timeout_s}s")
        frames = sock.recv_multipart(copy=False)
        try:
            msg, payload = p.decode(frames[1:])
            if isinstance(msg, p.Error):
                raise InputUnavailable(f"{ref.holder}: {msg.code}: {msg.message}")
            if not isinstance(msg, p.FetchReply) or msg.tensor_id != ref.tensor_id:
                raise InputUnavailable(f"{ref.holder} answered a fetch of {ref.tensor_id} with {msg.COMMAND.name}")
            bundle = self._unpack_reply(ref, msg, payload, shm, gpu)
        except p.ProtocolError as err:  # a garbled reply is as good as none: recompute
            raise InputUnavailable(f"{ref.holder} sent a bad fetch reply: {err}") from None
        self.telemetry.fetches += 1
        self.telemetry.fetched_bytes += sum(d.nbytes for d in msg.tensors)
        return bundle

    def _unpack_reply(self, ref: p.TensorRef, msg: p.FetchReply, payload: list, shm: bool, gpu: str) -> Bundle:
        """The bundle a FETCH_REPLY describes, by whichever transport each tensor took."""
        as_torch = self.backend.tensor_kind == "torch"
        descs = msg.tensors
        shared = [d for d in descs if d.where == cuda_ipc.WHERE]
        if shared:
            if not gpu or not as_torch:
                raise InputUnavailable(f"{ref.holder} answered with CUDA IPC handles that were not asked for")
            index = cuda_ipc.device_index(self.config.device)
            opened = cuda_ipc.open_tensors(shared, index, gpu)  # copies out; IpcUnavailable if it cannot
            rest = unpack_bundle([d for d in descs if d.where != cuda_ipc.WHERE], payload, as_torch)
            self.telemetry.ipc_fetches += 1
            self.telemetry.ipc_bytes += sum(d.nbytes for d in shared)
            return {d.name: opened[d.name] if d.where == cuda_ipc.WHERE else rest[d.name] for d in descs}
        if shm and descs and all(d.where == "shm" for d in descs):
            if not all(d.handle.startswith(PREFIX) for d in descs):
                raise ShmUnavailable(f"{ref.holder} named a shared-memory segment that is not ours")
            try:
                bundle = attach_bundle(descs, as_torch)
            except (OSError, ValueError) as exc:
                raise ShmUnavailable(f"{type(exc).__name__}: {exc}") from None
            self.telemetry.shm_fetches += 1
            self.telemetry.shm_bytes += sum(d.nbytes for d in descs)
            return bundle
        return unpack_bundle(descs, payload, as_torch=as_torch)

    def fetch(self, ref: p.TensorRef, peers: dict, request_id: str = "", *, shm: bool | None = None,
              gpu: str | None = None) -> Bundle:
        """Fetch a bundle outside a task (tools and tests driving the data plane; the
        caller's thread then owns the sockets in `peers`). By default the transport is
        chosen as for a task, with its fallbacks; `shm`/`gpu` given force one attempt."""
        if shm is None and gpu is None:
            return self._fetch(ref, request_id, peers)
        return self._fetch_from(ref, request_id, peers, bool(shm), gpu or "")

    # ------------------------------------------------------------------ data thread

    def start_data_plane(self) -> threading.Thread:
        """Serve FETCH from this actor's store without joining a broker (tools and tests)."""
        thread = threading.Thread(target=self._data_loop, name="actor-data", daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def close_data_plane(self, peers: dict | None = None) -> None:
        """Stop what `start_data_plane` started and close the fetch sockets in `peers`."""
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=2.0)
        for sock in (peers or {}).values():
            sock.close(linger=0)
        self._data_sock.close(linger=0)
        self._stop_authenticator()
        self.exporter.close()
        self.ipc.close()
        self.store.clear()
        if self._own_context:
            self.context.term()

    def _data_loop(self) -> None:
        sock = self._data_sock
        while not self.stopping.is_set():
            if not sock.poll(100):
                continue
            frames = sock.recv_multipart(copy=False)
            identity = frames[0].bytes
            try:
                if len(frames) < 2 or frames[1].bytes != b"":
                    raise p.ProtocolError(ErrorCode.BAD_FRAMES, "missing empty delimiter frame")
                msg, _ = p.decode(frames[2:])
                if not isinstance(msg, p.Fetch):
                    raise p.ProtocolError(ErrorCode.UNKNOWN_COMMAND, f"{msg.COMMAND.name} is not a data-plane command")
            except p.ProtocolError as err:
                sock.send_multipart([identity, b"", *p.encode(p.Error(err.code.value, err.message, err.field))])
                continue
            try:
                reply = self._serve_fetch(msg)
            except Exception as exc:  # a bundle that cannot travel must not take the data thread down
                log.exception("fetch_failed", actor_id=self.actor_id, tensor_id=msg.tensor_id)
                reply = p.encode(p.Error(ErrorCode.INTERNAL.value, f"{type(exc).__name__}: {exc}", "tensor_id",
                                         msg.request_id))
            # Zero-copy: ZeroMQ keeps the tensor buffers alive until sent. Served by a
            # method of its own, and the reply dropped here, so that no bundle outlives
            # the request in this loop's locals (a FREEd bundle must go at once).
            sock.send_multipart([identity, b"", *reply], copy=False)
            del reply

    def _serve_fetch(self, msg: p.Fetch) -> list:
        """The reply frames to a FETCH (data thread): CUDA IPC handles for CUDA tensors on
        the asker's GPU, else shared-memory segments if asked for, else the bytes."""
        entry = self.store.entry(msg.tensor_id)
        if entry is None:
            return p.encode(p.Error(ErrorCode.NOT_FOUND.value, f"{msg.tensor_id} is not held here", "tensor_id",
                                    msg.request_id))
        bundle, ready = entry
        cuda_ipc.wait_ready(ready)  # its producing work may still be queued on the GPU
        descs, buffers = None, []
        shared = cuda_ipc.ipc_candidates(bundle, msg.gpu_uuid, self.ipc.uuid_of) if self.config.ipc else []
        if shared:
            try:
                by_name = dict(zip(shared, self.ipc.export(msg.tensor_id, {n: bundle[n] for n in shared}), strict=True))
            except IpcUnavailable as exc:  # counted by the exporter; the bytes go instead
                log.warning("cuda_ipc_export_failed", actor_id=self.actor_id, tensor_id=msg.tensor_id, error=str(exc))
            else:
                # The rest (CPU-side sampler state, small) as frames of the same reply.
                rest, buffers = pack_bundle({k: v for k, v in bundle.items() if k not in by_name})
                by_name.update((d.name, d) for d in rest)
                descs = [by_name[name] for name in bundle]
        if descs is None and msg.shm:
            try:
                descs = self.exporter.export(msg.tensor_id, bundle)
            except OSError as exc:  # e.g. /dev/shm full: answer with frames instead
                log.warning("shm_export_failed", actor_id=self.actor_id, tensor_id=msg.tensor_id, error=str(exc))
        if descs is None:
            descs, buffers = pack_bundle(bundle)
        if self.store.get(msg.tensor_id) is not bundle:
            # FREEd while we exported, maybe before our export existed to be released:
            # undo it here, and answer as if it had gone before we looked.
            self.ipc.release([msg.tensor_id])
            self.exporter.release([msg.tensor_id])
            return p.encode(p.Error(ErrorCode.NOT_FOUND.value, f"{msg.tensor_id} was freed", "tensor_id",
                                    msg.request_id))
        return p.encode(p.FetchReply(msg.tensor_id, descs), buffers)

    def refresh_telemetry(self) -> p.ActorTelemetry:
        """Fold the store's and the exporters' state into the telemetry (heartbeat thread)."""
        t = self.telemetry
        t.stored_tensors, t.stored_bytes = self.store.stats()
        t.shm_segments = self.exporter.count()
        t.ipc_pins = self.ipc.count()
        t.ipc_fallbacks = self._ipc_fetch_fallbacks + self.ipc.failures
        t.adapter_switch_s = round(float(getattr(self.backend, "adapter_switch_s", 0.0)), 6)
        return t

    # ------------------------------------------------------------------ heartbeat thread

    def _heartbeat_loop(self) -> None:
        """Ping the broker while a session is welcomed; declare it lost when pongs stop."""
        sock = None
        beating_epoch = -1
        last_heard = last_beat = 0.0
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                lost = self.session_lost
                if self.welcomed_epoch != self.epoch or (lost is not None and lost[0] == self.epoch):
                    time.sleep(0.02)
                    continue
                if beating_epoch != self.epoch:  # a new session: a new control connection
                    if sock is not None:
                        sock.close(linger=0)
                    sock = self.context.socket(zmq.DEALER)
                    sock.setsockopt(zmq.LINGER, 0)
                    self._secure(sock)
                    sock.connect(self.config.broker_backend)
                    beating_epoch, last_heard, last_beat = self.epoch, now, 0.0
                interval = self.heartbeat_interval_s
                if now - last_beat >= interval:
                    last_beat = now
                    ping = p.Heartbeat(time.time(), self.refresh_telemetry(), self.actor_id, self.session_id)
                    sock.send_multipart([b"", *p.encode(ping)])
                if sock.poll(min(interval, 0.1) * 1000):
                    frames = sock.recv_multipart()
                    try:
                        msg, _ = p.decode(frames[1:])
                    except p.ProtocolError:
                        continue
                    last_heard = time.monotonic()
                    if isinstance(msg, p.Disconnect):
                        self.session_lost = (beating_epoch, f"broker: {msg.reason}")
                if time.monotonic() - last_heard > interval * self.heartbeat_misses:
                    self.session_lost = (beating_epoch, f"broker silent for {time.monotonic() - last_heard:.1f}s")
        finally:
            if sock is not None:
                sock.close(linger=0)


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
