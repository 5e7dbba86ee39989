"""The wire tap of `lego bench chaos`: a pass-through between the load's client and the
broker's frontend that counts the broker's answers per request id.

Runs in the bench's process, on a thread of its own (`chaos-tap`), and owns its
sockets: a ROUTER bound on a random loopback port for the clients and, per client, a
DEALER to the broker carrying that client's routing id. It forwards every frame both
ways unchanged; it only decodes the broker's replies to count ACCEPTED and terminal
answers (the client library keeps the first answer and drops later ones, so a
duplicate is visible only here), and notes when each request's first answer passed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import zmq

from broker import protocol as p


def terminal_request_id(msg: p.Message) -> str | None:
    """The request a broker-to-client message ends, or None (progress, ACCEPTED, admin
    replies). Mirrors what the client treats as an outcome (clients.core.outcome_of)."""
    if isinstance(msg, (p.Result, p.Failed, p.Rejected)):
        return msg.request_id
    if isinstance(msg, p.Error) and msg.request_id:
        return msg.request_id
    return None


class AnswerTap:
    """A pass-through between clients and the broker's frontend that counts the broker's
    answers per request id: the client library keeps the first answer for an id and
    drops any later one, so a duplicate is visible only on the wire.

    One thread: a ROUTER for the clients and, per client, a DEALER to the broker with
    that client's routing id, so the broker (and a restarted broker's journal) sees the
    client itself. The DEALERs reconnect to a restarted broker as the client would."""

    def __init__(self, broker: str):
        self.broker = broker
        self.answers: Counter[str] = Counter()
        self.accepted: set[str] = set()
        self.answered_at: dict[str, float] = {}  # request id -> when its first answer came (monotonic)
        self.heard_at = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._front = self._context.socket(zmq.ROUTER)
        self._tune(self._front)
        port = self._front.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._run, name="chaos-tap", daemon=True)
        self._thread.start()

    @staticmethod
    def _tune(sock: zmq.Socket) -> None:
        """Queue, never drop or block: the tap must not be a fault of its own."""
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)

    def _upstream(self, identity: bytes, upstreams: dict, poller: zmq.Poller) -> zmq.Socket:
        sock = upstreams.get(identity)
        if sock is None:
            sock = upstreams[identity] = self._context.socket(zmq.DEALER)
            self._tune(sock)
            sock.setsockopt(zmq.ROUTING_ID, identity)
            sock.connect(self.broker)
            poller.register(sock, zmq.POLLIN)
        return sock

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        upstreams: dict[bytes, zmq.Socket] = {}
        identities: dict[zmq.Socket, bytes] = {}
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(100):
                    if sock is self._front:
                        identity, *frames = self._front.recv_multipart(copy=False)
                        up = self._upstream(identity.bytes, upstreams, poller)
                        identities[up] = identity.bytes
                        up.send_multipart(frames, copy=False)
                    else:
                        frames = sock.recv_multipart(copy=False)
                        self._count(frames[1:])
                        self._front.send_multipart([identities[sock], *frames], copy=False)
        finally:
            for sock in (self._front, *upstreams.values()):
                sock.close(linger=0)

    def _count(self, frames: list) -> None:
        try:
            msg, _ = p.decode(frames)
        except p.ProtocolError:
            return  # the client drops what it cannot read too
        with self._lock:
            self.heard_at = time.monotonic()
            if isinstance(msg, p.Accepted):
                self.accepted.add(msg.request_id)
            request_id = terminal_request_id(msg)
            if request_id:
                self.answers[request_id] += 1
                self.answered_at.setdefault(request_id, self.heard_at)

    def wait_quiet(self, quiet_s: float, limit_s: float) -> None:
        """Return once the broker has sent nothing for `quiet_s` (or after `limit_s`):
        a late duplicate (an actor's stale result, a resumed request) has had its chance."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            with self._lock:
                quiet_until = self.heard_at + quiet_s
            if time.monotonic() >= quiet_until:
                return
            self._stop.wait(min(quiet_until, deadline) - time.monotonic())

    def snapshot(self) -> tuple[Counter, set]:
        with self._lock:
            return Counter(self.answers), set(self.accepted)

    def answer_times(self) -> dict[str, float]:
        """When each request's first answer passed (time.monotonic()): its latency as the
        client sees it, a rejection's included."""
        with self._lock:
            return dict(self.answered_at)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._context.term()

    def __enter__(self) -> AnswerTap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

