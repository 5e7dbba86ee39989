"""The client's IO core, shared by `Client` and `AsyncClient`.

One IO thread owns the DEALER to the broker's frontend. Callers hand it frames
through a queue and ring an inproc doorbell (the doorbell's sending end is guarded by
a lock, since callers may be many threads); replies are routed to jobs by request id
and to admin calls by the call id the broker echoes.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog
import zmq

from broker import auth
from broker import protocol as p
from broker.protocol.constants import DEFAULT_LIMITS
from broker.protocol.tensors import ITEMSIZE, check_payload, raw_desc
from clients.errors import BrokerUnreachable, Cancelled, LegoError, RequestFailed, RequestRejected
from clients.results import JobResult

log = structlog.get_logger(__name__)

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
DEFAULT_BROKER_SILENCE_S = 60.0  # jobs fail BrokerUnreachable after this long without a word from the broker
PROBE_AFTER_S = 2.0  # with jobs in flight and nothing heard for this long, ask the broker something small
PROBE_CALL = "liveness-probe"  # the call id of those probes: their answers only prove the broker is there
# A SUBMIT the broker has not acknowledged (ACCEPTED, REJECTED or an outcome) within this
# is sent again: a broker that died or was restarted with it unread never saw it, and a
# broker that has it answers a repeat from the same client with the same job.
RESUBMIT_AFTER_S = 5.0
_ids = itertools.count()


def resolve_address(address: str | None) -> str:
    return address or os.environ.get("LEGO_BROKER") or DEFAULT_ADDRESS


def resolve_key(key_file: str | None) -> auth.KeyFile | None:
    """The client's key (argument, else $LEGO_KEY_FILE); None: keys off (a loopback cluster)."""
    path = key_file or os.environ.get("LEGO_KEY_FILE")
    return auth.load_key_file(path) if path else None


class AdminRefused(LegoError):
    """The broker refused an admin call; `field` names what was wrong (`actor_id`, `min`...)."""

    def __init__(self, what: str, message: str, field: str | None = None):
        super().__init__(f"{what} refused: {message}")
        self.message, self.field = message, field


def broker_error(reply: p.Error) -> LegoError:
    """The broker could not read a call (or the client closed): say what and where."""
    return LegoError(f"{reply.code}: {reply.message}" + (f" (field {reply.field})" if reply.field else ""))


def admin_outcome(reply: p.AdminReply, what: str) -> p.AdminReply:
    """The reply of an admin call, or AdminRefused naming the field."""
    if not reply.ok:
        raise AdminRefused(what, reply.message, reply.field)
    return reply


def replicas_message(model: str, min: int | None, max: int | None) -> p.AdminReplicas:  # noqa: A002 (the API's names)
    """Counts must be whole numbers; the broker checks their range and the model."""
    for name, value in (("min", min), ("max", max)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise AdminRefused("set_replicas", f"{name}: expected a whole number or None, got {value!r}", name)
    return p.AdminReplicas(model, min, max)


class JobState:
    """What the IO thread learns about one request; `sink(event)` is called for each."""

    def __init__(self, request_id: str, sink: Callable[[Any], None]):
        self.request_id = request_id
        self.sink = sink
        self.accepted: p.Accepted | None = None
        self.outcome: JobResult | Exception | None = None


def split_tensor_params(params: dict) -> tuple[dict, list[p.TensorDesc], list]:
    """Parameters that are arrays (an img2img `image`) travel as tensor frames, not msgpack."""
    import numpy as np

    plain, descs, frames = {}, [], []
    for name, value in params.items():
        if isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
            descs.append(raw_desc(name, str(array.dtype), list(array.shape), array, len(frames)))
            frames.append(array)
        else:
            plain[name] = value
    return plain, descs, frames


def _row_major(raw: bytes, desc: p.TensorDesc) -> bytes:
    """Bytes in another dense layout (TensorDesc.strides) rearranged row-major."""
    import numpy as np

    itemsize = ITEMSIZE[desc.dtype]
    elements = np.frombuffer(raw, dtype=np.dtype(f"V{itemsize}"))  # any dtype, bf16 too
    strided = np.lib.stride_tricks.as_strided(elements, desc.shape, [s * itemsize for s in desc.strides])
    return np.ascontiguousarray(strided).tobytes()


def outcome_of(msg: p.Message, payload: list) -> JobResult | Exception | None:
    """The terminal outcome a message carries for a request, or None if it is not terminal."""
    if isinstance(msg, p.Result):
        try:
            check_payload(msg.tensors, payload)
        except p.ProtocolError as err:
            return RequestFailed(msg.request_id, err.code.value, f"malformed result: {err.message}")
        tensors = {}
        for desc in msg.tensors:
            frame = payload[desc.frame]
            raw = bytes(frame.buffer if hasattr(frame, "buffer") else frame)
            if desc.strides is not None:
                raw = _row_major(raw, desc)
            tensors[desc.name] = (desc.dtype, list(desc.shape), raw)
        return JobResult(msg.request_id, tensors, msg.latency_s, msg.attempts)
    if isinstance(msg, p.Rejected):
        return RequestRejected(msg.request_id, msg.code, msg.message, msg.field, msg.retry_after_s)
    if isinstance(msg, p.Failed):
        cls = Cancelled if msg.code == "cancelled" else RequestFailed
        return cls(msg.request_id, msg.code, msg.message)
    if isinstance(msg, p.Error) and msg.request_id:
        return RequestFailed(msg.request_id, msg.code, msg.message)
    return None


class SilenceWatch:
    """When to probe a broker that has said nothing, and when to give up on it (pure).

    A request may run for minutes with no message (progress off), so silence alone
    proves nothing: with jobs in flight, the IO thread asks the broker something small
    (a workflow list) every PROBE_AFTER_S of silence, and any answer resets the clock.
    Only `limit_s` without any answer while jobs wait ends them; None never does. The
    clock runs only while something waits: an idle client owes the broker no traffic."""

    PROBE, GIVE_UP = "probe", "give_up"

    def __init__(self, limit_s: float | None, now: float):
        if limit_s is not None and (isinstance(limit_s, bool) or not isinstance(limit_s, (int, float)) or limit_s <= 0):
            raise ValueError(f"broker_silence_s: expected seconds > 0 or None, got {limit_s!r}")
        self.limit_s = limit_s
        self.heard_at = self.probed_at = now

    def heard(self, now: float) -> None:
        self.heard_at = now

    def check(self, now: float, waiting: bool) -> str | None:
        if not waiting:
            self.heard_at = now
            return None
        if self.limit_s is not None and now - self.heard_at >= self.limit_s:
            self.heard_at = now  # the jobs given up on now are gone; later ones get a fresh clock
            return self.GIVE_UP
        if now - max(self.heard_at, self.probed_at) >= PROBE_AFTER_S:
            self.probed_at = now
            return self.PROBE
        return None


class ClientCore:
    def __init__(self, address: str | None = None, key_file: str | None = None,
                 broker_silence_s: float | None = DEFAULT_BROKER_SILENCE_S):
        self.silence = SilenceWatch(broker_silence_s, time.monotonic())  # checks the value before any thread starts
        self.address = resolve_address(address)
        self.key = resolve_key(key_file)  # read here, so that a bad key file fails the constructor
        self.context = zmq.Context()
        self.jobs: dict[str, JobState] = {}
        # request id -> [SUBMIT frames, when last sent] until the broker acknowledges it (IO thread).
        self._unacked: dict[str, list] = {}
        self.admin_waiters: dict[str, Callable[[Any], None]] = {}  # call_id -> sink
        # One identity for the client's lifetime: if TCP reconnects underneath, replies
        # addressed to it still arrive.
        self.identity = f"client-{uuid.uuid4().hex}".encode()
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

    def send(self, msg: p.Message, payload: list | None = None) -> None:
        """Queue `msg` for the broker. ValueError if the broker would refuse it unread."""
        frames = p.encode(msg, payload or [])
        if len(frames[2]) > DEFAULT_LIMITS.max_header_bytes:
            raise ValueError(f"message of {len(frames[2])} bytes exceeds the broker's {DEFAULT_LIMITS.max_header_bytes}-byte limit")
        if self._stopping.is_set():
            raise LegoError("client is closed")
        self._outgoing.put((msg.request_id if isinstance(msg, p.Submit) else None, frames))
        self._ring()

    def submit(self, request_id: str, workflow: str, params: dict, progress: bool) -> None:
        """Send a registered job's SUBMIT; array parameters travel as tensor frames."""
        try:
            plain, tensors, frames = split_tensor_params(params)
        except p.ProtocolError as err:  # an array of a dtype that cannot travel
            self.forget_job(request_id)
            raise RequestRejected(request_id, "invalid_param", err.message, "params") from None
        try:
            self.send(p.Submit(request_id, workflow, plain, progress, tensors), frames)
        except ValueError as exc:
            self.forget_job(request_id)
            raise RequestRejected(request_id, "too_large", str(exc), "params") from None

    def _ring(self) -> None:
        with self._doorbell_lock:
            try:
                self._doorbell.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # the bell is already ringing: the IO thread will drain the queue

    def register(self, request_id: str, sink: Callable[[Any], None]) -> JobState:
        """Route the request's replies to `sink`. A request id still in flight here is refused."""
        with self._lock:
            if request_id in self.jobs:
                raise RequestRejected(request_id, "duplicate_request", "a request with this id is in flight on this client", "request_id")
            state = self.jobs[request_id] = JobState(request_id, sink)
        return state

    def admin(self, msg: p.Message, sink: Callable[[Any], None]) -> str:
        """Send an admin request; `sink` gets the reply (or an Error) with its call id."""
        msg.call_id = uuid.uuid4().hex
        with self._lock:
            self.admin_waiters[msg.call_id] = sink
        self.send(msg)
        return msg.call_id

    def forget_job(self, request_id: str) -> None:
        with self._lock:
            self.jobs.pop(request_id, None)

    def forget_admin(self, call_id: str) -> None:
        """The caller stopped waiting: a late reply is dropped, not given to another call."""
        with self._lock:
            self.admin_waiters.pop(call_id, None)

    def close(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._ring()
        self._thread.join(timeout=5)
        self._doorbell.close(linger=0)
        self.context.term()

    # -------------------------------------------------------------- IO thread

    def _io_loop(self, bell_in: zmq.Socket) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        sock.setsockopt(zmq.SNDHWM, 0)  # queue while the broker is unreachable; never block this thread
        if self.key is not None:
            self.key.as_client(sock)
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
                            submitted, frames = self._outgoing.get_nowait()
                        except queue.Empty:
                            break
                        sock.send_multipart([b"", *frames], copy=False)
                        if submitted is not None:
                            self._unacked[submitted] = [frames, time.monotonic()]
                if sock in events:
                    self.silence.heard(time.monotonic())
                    while sock.poll(0):
                        frames = sock.recv_multipart(copy=False)
                        try:
                            self._on_frames(frames)
                        except Exception:  # one bad reply must not deafen the client
                            log.exception("client_reply_failed")
                self._watch_silence(sock)
                self._resubmit_unacknowledged(sock)
        except Exception:
            log.exception("client_io_failed")
        finally:
            sock.close(linger=0)
            bell_in.close(linger=0)
            self._fail_everything("the client's connection to the broker is closed")

    def _resubmit_unacknowledged(self, sock: zmq.Socket) -> None:
        """Send again each SUBMIT the broker has not acknowledged for RESUBMIT_AFTER_S
        (its job still waits here; a forgotten one is dropped)."""
        if not self._unacked:
            return
        now = time.monotonic()
        for request_id, entry in list(self._unacked.items()):
            if request_id not in self.jobs:
                del self._unacked[request_id]
            elif now - entry[1] >= RESUBMIT_AFTER_S:
                log.info("client_resubmit", request_id=request_id, unacknowledged_s=round(now - entry[1], 1))
                sock.send_multipart([b"", *entry[0]], copy=False)
                entry[1] = now

    def _watch_silence(self, sock: zmq.Socket) -> None:
        """Probe a silent broker while jobs wait on it; fail them once it has been silent too long."""
        now = time.monotonic()
        silent_s = now - self.silence.heard_at
        action = self.silence.check(now, waiting=bool(self.jobs))
        if action == SilenceWatch.PROBE:
            sock.send_multipart([b"", *p.encode(p.ListWorkflows(call_id=PROBE_CALL))], copy=False)
        elif action == SilenceWatch.GIVE_UP:
            with self._lock:
                jobs, self.jobs = list(self.jobs.values()), {}
            log.warning("broker_unreachable", address=self.address, silent_s=round(silent_s, 1), jobs=len(jobs))
            for state in jobs:
                state.outcome = BrokerUnreachable(
                    state.request_id, "broker_unreachable",
                    f"no answer from the broker at {self.address} for {silent_s:.0f} s "
                    f"(broker_silence_s = {self.silence.limit_s:g}); it may still finish there")
                self._deliver(state.sink, state.outcome)

    def _fail_everything(self, reason: str) -> None:
        """Nothing may wait forever on a client that can no longer hear answers."""
        with self._lock:
            jobs, self.jobs = list(self.jobs.values()), {}
            waiters, self.admin_waiters = list(self.admin_waiters.values()), {}
        for state in jobs:
            state.outcome = RequestFailed(state.request_id, "client_closed", reason)
            self._deliver(state.sink, state.outcome)
        for sink in waiters:
            self._deliver(sink, p.Error("client_closed", reason))

    @staticmethod
    def _deliver(sink: Callable[[Any], None], event: Any) -> None:
        try:
            sink(event)
        except Exception:  # e.g. the asyncio loop of an async job has closed
            log.exception("client_sink_failed", event_type=type(event).__name__)

    def _on_frames(self, frames: list) -> None:
        try:
            msg, payload = p.decode(frames[1:])
        except p.ProtocolError as err:
            log.warning("protocol_error", code=err.code.value, error=err.message)
            return
        call_id = getattr(msg, "call_id", None) or (msg.request_id if isinstance(msg, p.Error) else None)
        if call_id == PROBE_CALL:
            return  # a liveness probe's answer: hearing it was the point
        if call_id:
            with self._lock:
                sink = self.admin_waiters.pop(call_id, None)
            if sink is not None:
                self._deliver(sink, msg)
                return
        request_id = getattr(msg, "request_id", None)
        if request_id:
            self._unacked.pop(request_id, None)  # any answer about it: the broker has it
            with self._lock:
                state = self.jobs.get(request_id)
            if state is None:
                return
            if isinstance(msg, p.Accepted):
                state.accepted = msg
                self._deliver(state.sink, msg)
                return
            outcome = outcome_of(msg, payload)
            if outcome is None:
                self._deliver(state.sink, msg)  # progress
                return
            if isinstance(outcome, JobResult) and state.accepted is not None:
                outcome.params = state.accepted.params
            state.outcome = outcome
            with self._lock:
                self.jobs.pop(request_id, None)
            self._deliver(state.sink, outcome)
            return
        if isinstance(msg, p.Error):  # about a message the broker could not read
            log.warning("broker_error", code=msg.code, error=msg.message, field=msg.field)
