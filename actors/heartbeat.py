"""The actor's heartbeat thread: pings the broker, and notices when it stops answering.

Runs in the actor process, on its own thread ("actor-heartbeat"), and owns one socket:
a *control* DEALER to the broker's backend, opened afresh for each welcomed session.
Every interval it sends HEARTBEAT with the actor id, the session id and the telemetry,
and reads the pongs. It never waits on the compute thread, so a long batch never
looks like a dead actor; and it is what notices a silent broker, or one that answers
DISCONNECT because it forgot the session: it marks the session lost
(actors/session.py) and the compute thread starts a new one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import zmq

from actors.session import Session
from broker import auth
from broker import protocol as p


class Heartbeat:
    def __init__(self, context: zmq.Context, broker_backend: str, key: auth.KeyFile | None, session: Session,
                 telemetry: Callable[[], p.ActorTelemetry], stopping: threading.Event):
        self.context = context
        self.broker_backend = broker_backend
        self.key = key
        self.session = session
        self.telemetry = telemetry  # folds the other threads' state in; called once per ping
        self.stopping = stopping

    def run(self) -> None:
        """Ping the broker while a session is welcomed; declare it lost when pongs stop."""
        session = self.session
        sock = None
        beating_epoch = -1
        last_heard = last_beat = 0.0
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if not session.welcomed() or session.lost_reason() is not None:
                    time.sleep(0.02)
                    continue
                if beating_epoch != session.epoch:  # a new session: a new control connection
                    if sock is not None:
                        sock.close(linger=0)
                    sock = self._connect()
                    beating_epoch, last_heard, last_beat = session.epoch, now, 0.0
                interval = session.heartbeat_interval_s
                if now - last_beat >= interval:
                    last_beat = now
                    ping = p.Heartbeat(time.time(), self.telemetry(), session.actor_id, session.id)
                    sock.send_multipart([b"", *p.encode(ping)])
                if sock.poll(min(interval, 0.1) * 1000):
                    frames = sock.recv_multipart()
                    try:
                        msg, _ = p.decode(frames[1:])
                    except p.ProtocolError:
                        continue
                    last_heard = time.monotonic()
                    if isinstance(msg, p.Disconnect):
                        session.mark_lost(beating_epoch, f"broker: {msg.reason}")
                if time.monotonic() - last_heard > interval * session.heartbeat_misses:
                    session.mark_lost(beating_epoch, f"broker silent for {time.monotonic() - last_heard:.1f}s")
        finally:
            if sock is not None:
                sock.close(linger=0)

    def _connect(self) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.key is not None:  # keys on: the broker admits this actor's key only
            self.key.as_client(sock)
        sock.connect(self.broker_backend)
        return sock
