"""The actor's data thread: serves FETCH from peer actors out of this actor's store.

Runs in the actor process, on its own thread ("actor-data"), and owns the data ROUTER
(bound at start on `data_bind`, a random port by default; its advertised address goes
in the actor's hello, and the broker hands it to consumers in each `TensorRef`). The
data plane is actor-to-actor: the broker moves references, never tensors.

A peer's FETCH is answered by the best transport it allows: CUDA IPC handles for CUDA
tensors on the asker's GPU (`IpcExporter`, actors/cuda_ipc.py), else shared-memory
segments if it is on this host and asked for them (`ShmExporter`, actors/shm.py),
else the bytes as frames; the request constants the asker says it holds
(`Fetch.omit`), or all of them for a task that reads none, are left out. The exporters keep what they shared until the compute
thread's FREE (`release`) or a new session (`drop_exports`). Keys on: a ZAP handler
(`RoleAuthenticator`) admits only holders of the actors' key to the data socket.

The store (actors/store.py) is shared with the compute thread, which puts and frees
bundles; the data thread only reads it.
"""

from __future__ import annotations

import threading

import structlog
import zmq

from actors import cuda_ipc
from actors.addresses import advertised
from actors.cuda_ipc import IpcExporter, IpcUnavailable
from actors.shm import ShmExporter
from actors.store import TensorStore, pack_bundle, virtual_nbytes
from broker import auth
from broker import protocol as p
from broker.protocol.constants import DEFAULT_LIMITS, REQUEST_CONSTANT_PREFIX
from broker.protocol.errors import ErrorCode

log = structlog.get_logger(__name__)


class DataServer:
    def __init__(self, context: zmq.Context, *, bind: str, broker_backend: str, key: auth.KeyFile | None,
                 store: TensorStore, ipc: bool, actor_id: str):
        self.store = store
        self.ipc_enabled = ipc
        self.actor_id = actor_id
        self.exporter = ShmExporter()  # segments this actor serves to same-host peers
        self.ipc = IpcExporter()  # CUDA IPC shares this actor serves to peers on its GPU
        self.authenticator: auth.RoleAuthenticator | None = None
        # Made and bound here, before the thread starts, so that the address is known
        # for the hello; from then on only the data thread touches it until `close`.
        self._sock = context.socket(zmq.ROUTER)
        if key is not None:  # only holders of the actors' key may fetch from us
            self.authenticator = auth.RoleAuthenticator(context, {key.public: key.user_id})
            self.authenticator.start()
            key.as_server(self._sock, auth.DATA)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Peers send FETCH requests here, headers only: anything bigger is not a peer.
        self._sock.setsockopt(zmq.MAXMSGSIZE, DEFAULT_LIMITS.max_header_bytes)
        self._sock.bind(bind)
        # A wildcard bind is advertised as the route to the broker (actors/addresses.py).
        self.address = advertised(self._sock.getsockopt(zmq.LAST_ENDPOINT).decode(), broker_backend)

    # ------------------------------------------------------------------ compute thread (or a tool's)

    def release(self, tensor_ids: list[str]) -> None:
        """Drop what was exported of these bundles (after the store freed them: see `free`
        in actors/runtime.py for why that order leaves no export behind)."""
        self.exporter.release(tensor_ids)
        self.ipc.release(tensor_ids)

    def drop_exports(self) -> None:
        """A new session: everything exported for the old one goes with its store."""
        self.exporter.close()
        self.ipc.close()

    def close(self) -> None:
        """After the data thread has stopped: the socket, the ZAP handler, the exports."""
        self._sock.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        self.drop_exports()

    # ------------------------------------------------------------------ data thread

    def run(self, stopping: threading.Event) -> None:
        sock = self._sock
        while not stopping.is_set():
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
        """The reply frames to a FETCH: CUDA IPC handles for CUDA tensors on the asker's
        GPU, else shared-memory segments if asked for, else the bytes."""
        entry = self.store.entry(msg.tensor_id)
        if entry is None:
            return p.encode(p.Error(ErrorCode.NOT_FOUND.value, f"{msg.tensor_id} is not held here", "tensor_id",
                                    msg.request_id))
        held, ready = entry
        cuda_ipc.wait_ready(ready)  # its producing work may still be queued on the GPU
        # The asker holds these request constants already (actors/request_constants.py).
        omitted = [name for name in held if name.startswith(REQUEST_CONSTANT_PREFIX)] if not msg.constants else [
            name for name in msg.omit if name in held]
        bundle = {k: v for k, v in held.items() if k not in omitted} if omitted else held
        descs, buffers = None, []
        shared = cuda_ipc.ipc_candidates(bundle, msg.gpu_uuid, self.ipc.uuid_of) if self.ipc_enabled else []
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
        if descs is None and msg.shm and not virtual_nbytes(bundle):  # a virtual tensor's head is a few bytes
            try:
                descs = self.exporter.export(msg.tensor_id, bundle)
            except OSError as exc:  # e.g. /dev/shm full: answer with frames instead
                log.warning("shm_export_failed", actor_id=self.actor_id, tensor_id=msg.tensor_id, error=str(exc))
        if descs is None:
            descs, buffers = pack_bundle(bundle)
        if self.store.get(msg.tensor_id) is not held:
            # FREEd while we exported, maybe before our export existed to be released:
            # undo it here, and answer as if it had gone before we looked.
            self.ipc.release([msg.tensor_id])
            self.exporter.release([msg.tensor_id])
            return p.encode(p.Error(ErrorCode.NOT_FOUND.value, f"{msg.tensor_id} was freed", "tensor_id",
                                    msg.request_id))
        return p.encode(p.FetchReply(msg.tensor_id, descs, omitted), buffers)
