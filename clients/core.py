"""The client's IO core, shared by `Client` and `AsyncClient`.

One IO thread owns the DEALER to the broker's frontend. Callers hand it frames
through a queue and ring an inproc doorbell (the doorbell's sending end is guarded by
a lock, since callers may be many threads); replies are routed to jobs by request id
and to admin calls in order of asking (the broker answers one connection in order).
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import structlog
import zmq

from broker import protocol as p
from clients.errors import Cancelled, RequestFailed, RequestRejected
from clients.results import JobResult

log = structlog.get_logger(__name__)

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
_ids = itertools.count()


def resolve_address(address: str | None) -> str:
    return address or os.environ.get("LEGO_BROKER") or DEFAULT_ADDRESS


class JobState:
    """What the IO thread learns about one request; `sink(event)` is called for each."""

    def __init__(self, request_id: str, sink: Callable[[Any], None]):
        self.request_id = request_id
        self.sink = sink
        self.accepted: p.Accepted | None = None
        self.outcome: JobResult | Exception | None = None


def outcome_of(msg: p.Message, payload: list) -> JobResult | Exception | None:
    """The terminal outcome a message carries for a request, or None if it is not terminal."""
    if isinstance(msg, p.Result):
        tensors = {}
        for desc in msg.tensors:
            frame = payload[desc.frame]
            tensors[desc.name] = (desc.dtype, list(desc.shape), bytes(frame.buffer if hasattr(frame, "buffer") else frame))
        return JobResult(msg.request_id, tensors, msg.latency_s, msg.attempts)
    if isinstance(msg, p.Rejected):
        return RequestRejected(msg.request_id, msg.code, msg.message, msg.field)
    if isinstance(msg, p.Failed):
        cls = Cancelled if msg.code == "cancelled" else RequestFailed
        return cls(msg.request_id, msg.code, msg.message)
    if isinstance(msg, p.Error) and msg.request_id:
        return RequestFailed(msg.request_id, msg.code, msg.message)
    return None


class ClientCore:
    def __init__(self, address: str | None = None):
        self.address = resolve_address(address)
        self.context = zmq.Context()
        self.jobs: dict[str, JobState] = {}
        self.admin_waiters: dict[type, collections.deque] = collections.defaultdict(collections.deque)
        self._outgoing: queue.Queue = queue.Queue()
        self._doorbell_address = f"inproc://client-doorbell-{next(_ids)}"
        self._doorbell_lock = threading.Lock()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        bell_in = self.context.socket(zmq.PAIR)
        bell_in.bind(self._doorbell_address)
        self._doorbell = self.context.socket(zmq.PAIR)
        self._doorbell.connect(self._doorbell_address)
        self._thread = threading.Thread(target=self._io_loop, args=(bell_in,), name="lego-client-io", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- caller side

    def send(self, msg: p.Message) -> None:
        self._outgoing.put(p.encode(msg))
        with self._doorbell_lock:
            self._doorbell.send(b"", zmq.NOBLOCK)

    def register(self, request_id: str, sink: Callable[[Any], None]) -> JobState:
        """Route the request's replies to `sink`. A request id still in flight here is refused."""
        with self._lock:
            if request_id in self.jobs:
                raise RequestRejected(request_id, "duplicate_request", "a request with this id is in flight on this client", "request_id")
            state = self.jobs[request_id] = JobState(request_id, sink)
        return state

    def admin(self, msg: p.Message, reply_type: type, sink: Callable[[Any], None]) -> None:
        """Send an admin request; `sink` gets the reply (or an Error) when it comes."""
        with self._lock:
            self.admin_waiters[reply_type].append(sink)
        self.send(msg)

    def close(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._doorbell_lock:
            self._doorbell.send(b"", zmq.NOBLOCK)
        self._thread.join(timeout=5)
        self._doorbell.close(linger=0)
        self.context.term()

    # -------------------------------------------------------------- IO thread

    def _io_loop(self, bell_in: zmq.Socket) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(bell_in, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                events = dict(poller.poll(500))
                if bell_in in events:
                    while bell_in.poll(0):
                        bell_in.recv()
                    while True:
                        try:
                            frames = self._outgoing.get_nowait()
                        except queue.Empty:
                            break
                        sock.send_multipart([b"", *frames], copy=False)
                if sock in events:
                    while sock.poll(0):
                        self._on_frames(sock.recv_multipart(copy=False))
        finally:
            sock.close(linger=0)
            bell_in.close(linger=0)

    def _on_frames(self, frames: list) -> None:
        try:
            msg, payload = p.decode(frames[1:])
        except p.ProtocolError as err:
            log.warning("protocol_error", code=err.code.value, error=err.message)
            return
        request_id = getattr(msg, "request_id", None)
        if request_id:
            with self._lock:
                state = self.jobs.get(request_id)
            if state is None:
                return
            if isinstance(msg, p.Accepted):
                state.accepted = msg
                state.sink(msg)
                return
            outcome = outcome_of(msg, payload)
            if outcome is None:
                state.sink(msg)  # progress
                return
            if isinstance(outcome, JobResult) and state.accepted is not None:
                outcome.params = state.accepted.params
            state.outcome = outcome
            with self._lock:
                self.jobs.pop(request_id, None)
            state.sink(outcome)
            return
        with self._lock:
            waiters = self.admin_waiters.get(type(msg))
            if not waiters and isinstance(msg, p.Error):  # an admin call failed: oldest waiter
                waiters = next((w for w in self.admin_waiters.values() if w), None)
            sink = waiters.popleft() if waiters else None
        if sink is not None:
            sink(msg)
        elif isinstance(msg, p.Error):
            log.warning("broker_error", code=msg.code, error=msg.message, field=msg.field)
