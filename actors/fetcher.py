"""The actor's fetch client: brings a task's inputs over from the peers that hold them.

Runs in the actor process, on the compute thread (or a tool's or test's thread, which
then owns these sockets), and owns one DEALER per peer data socket it has fetched
from (`peers`, by address), kept open across batches and sessions. Keys on: each is
a CurveZMQ client of the actors' key, which every peer's data socket serves.

A fetch from a peer on another host comes as frames; from one on this host, a big
bundle comes through shared memory (actors/shm.py), and CUDA tensors on this actor's
own GPU come as CUDA IPC handles (actors/cuda_ipc.py), each falling back to the next
when it fails, counted in the telemetry (`ipc_fallbacks` is kept here and folded in
by the runtime, with the data thread's export failures).

A request's constants (its step conditioning) are fetched once: the fetcher keeps them
(actors/request_constants.py) and asks later peers to leave them out of their replies.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
import zmq

from actors import cuda_ipc
from actors.cuda_ipc import IpcUnavailable
from actors.request_constants import DEFAULT_MAX_BYTES, RequestConstants
from actors.shm import PREFIX, ShmUnavailable, attach_bundle
from actors.store import Bundle, unpack_bundle, value_nbytes
from broker import auth
from broker import protocol as p
from broker.protocol.tensors import VIRTUAL

log = structlog.get_logger(__name__)


class InputUnavailable(Exception):
    """An input bundle could not be had (its holder freed it, died or sent garbage)."""


class Fetcher:
    def __init__(self, context: zmq.Context, *, actor_id: str, host: str, device: str, as_torch: bool,
                 key: auth.KeyFile | None, telemetry: p.ActorTelemetry, timeout_s: float, shm: bool,
                 shm_min_bytes: int, ipc: bool, constants_bytes: int = DEFAULT_MAX_BYTES,
                 transfer_s: Callable[[int, str], float] | None = None):
        self.context = context
        self.actor_id = actor_id
        self.host = host
        self.device = device
        self.as_torch = as_torch  # the backend's tensors: torch, or RawTensor (no torch imported)
        self.key = key
        self.telemetry = telemetry  # shared with the heartbeat thread, which reads it
        self.timeout_s = timeout_s
        self.shm, self.shm_min_bytes, self.ipc = shm, shm_min_bytes, ipc
        self.peers: dict[str, zmq.Socket] = {}
        self.ipc_fallbacks = 0  # IPC transfers that failed here and went by another transport
        self._gpu: str | None = None  # this actor's GPU UUID ("" for none), found at the first fetch
        self.constants = RequestConstants(constants_bytes)  # each request's conditioning, once fetched
        # An emulating backend's price of moving virtual bytes: (nbytes, path) -> seconds,
        # path "device" (same host and device), "host" (same host) or "network"
        self.transfer_s = transfer_s

    def local_gpu(self) -> str:
        """This actor's GPU UUID, advertised in same-host fetches; "" when IPC cannot apply."""
        if self._gpu is None:
            usable = self.ipc and self.as_torch
            self._gpu = cuda_ipc.device_uuid(self.device) if usable else ""
        return self._gpu

    def fetch(self, ref: p.TensorRef, request_id: str = "", *, constants: bool = True, shm: bool | None = None,
              gpu: str | None = None) -> Bundle:
        """Fetch a peer's bundle by the best transport that works: CUDA IPC, shared memory, frames.

        Each failed transport is dropped for a retry (counted: `ipc_fallbacks`,
        `fetch_fallbacks`); a holder that has not got the bundle or does not answer is
        no transport failure, and is not retried. `shm`/`gpu` given (tools and tests)
        force one attempt by that transport. `constants=False`: the task reads none of
        the request's constants, so none come (the bundle lacks them).
        """
        held = self.constants.held(request_id) if request_id and constants else {}
        if shm is not None or gpu is not None:
            return self._fetch_from(ref, request_id, bool(shm), gpu or "", held, constants)
        # What will come, for the transport's choice: the request's constants held here stay out.
        nbytes = max(0, ref.nbytes - sum(value_nbytes(v) for v in held.values()))
        shm, gpu = cuda_ipc.fetch_request(same_host=ref.host == self.host, nbytes=nbytes, shm=self.shm,
                                          shm_min_bytes=self.shm_min_bytes, gpu=self.local_gpu())
        while True:
            try:
                return self._fetch_from(ref, request_id, shm, gpu, held, constants)
            except IpcUnavailable as exc:
                self.ipc_fallbacks += 1
                log.warning("cuda_ipc_fetch_fell_back", actor_id=self.actor_id, tensor_id=ref.tensor_id, error=str(exc))
                gpu = ""
            except ShmUnavailable as exc:  # the segment could not be mapped: the bytes can come by socket
                self.telemetry.fetch_fallbacks += 1
                log.warning("shm_fetch_fell_back", actor_id=self.actor_id, tensor_id=ref.tensor_id, error=str(exc))
                shm = False

    def close(self) -> None:
        """Close every peer socket (from the thread that fetched)."""
        for sock in self.peers.values():
            sock.close(linger=0)
        self.peers.clear()

    def _socket(self, address: str) -> zmq.Socket:
        sock = self.peers.get(address)
        if sock is None:
            sock = self.peers[address] = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.key is not None:
                self.key.as_client(sock, server_public=self.key.public)  # a peer's data socket: the actors' key
            sock.connect(address)
        return sock

    def _fetch_from(self, ref: p.TensorRef, request_id: str, shm: bool, gpu: str, held: dict,
                    constants: bool) -> Bundle:
        sock = self._socket(ref.address)
        ask = p.Fetch(ref.tensor_id, request_id, shm, gpu, sorted(held), constants)
        sock.send_multipart([b"", *p.encode(ask)])
        if not sock.poll(self.timeout_s * 1000):
            # A late reply would confuse the next fetch on this socket: start afresh.
            self.peers.pop(ref.address).close(linger=0)
            raise InputUnavailable(f"{ref.holder} did not answer a fetch of {ref.tensor_id} within {self.timeout_s}s")
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
        virtual = sum(d.nbytes for d in msg.tensors if d.where == VIRTUAL)
        if virtual and self.transfer_s is not None:  # the time the emulated hardware would take
            path = "network" if ref.host != self.host else "device" if ref.device == self.device else "host"
            time.sleep(self.transfer_s(virtual, path))
        if not constants:  # none asked for: the task reads none
            return bundle
        unasked = [name for name in msg.omitted if name not in held]
        if unasked:
            raise InputUnavailable(f"{ref.holder} left out {unasked}, which this actor does not hold")
        for name in msg.omitted:
            bundle[name] = held[name]
        self.constants.keep(request_id, bundle)
        self.telemetry.reused_bytes += sum(value_nbytes(held[name]) for name in msg.omitted)
        return bundle

    def _unpack_reply(self, ref: p.TensorRef, msg: p.FetchReply, payload: list, shm: bool, gpu: str) -> Bundle:
        """The bundle a FETCH_REPLY describes, by whichever transport each tensor took."""
        descs = msg.tensors
        shared = [d for d in descs if d.where == cuda_ipc.WHERE]
        if shared:
            if not gpu or not self.as_torch:
                raise InputUnavailable(f"{ref.holder} answered with CUDA IPC handles that were not asked for")
            index = cuda_ipc.device_index(self.device)
            opened = cuda_ipc.open_tensors(shared, index, gpu)  # copies out; IpcUnavailable if it cannot
            rest = unpack_bundle([d for d in descs if d.where != cuda_ipc.WHERE], payload, self.as_torch)
            self.telemetry.ipc_fetches += 1
            self.telemetry.ipc_bytes += sum(d.nbytes for d in shared)
            return {d.name: opened[d.name] if d.where == cuda_ipc.WHERE else rest[d.name] for d in descs}
        if shm and descs and all(d.where == "shm" for d in descs):
            if not all(d.handle.startswith(PREFIX) for d in descs):
                raise ShmUnavailable(f"{ref.holder} named a shared-memory segment that is not ours")
            try:
                bundle = attach_bundle(descs, self.as_torch)
            except (OSError, ValueError) as exc:
                raise ShmUnavailable(f"{type(exc).__name__}: {exc}") from None
            self.telemetry.shm_fetches += 1
            self.telemetry.shm_bytes += sum(d.nbytes for d in descs)
            return bundle
        return unpack_bundle(descs, payload, as_torch=self.as_torch, virtual=True)
