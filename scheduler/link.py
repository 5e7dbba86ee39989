"""The scheduler's calls to the broker: one DEALER on the broker's frontend.

Runs in the scheduler process and is owned by the controller's thread (it makes one
call at a time and waits for its answer, under a timeout), so it needs no IO thread.
The scheduler is a peer of the broker, like the node agents, not a user of the client
library: it speaks the protocol directly. A call that is refused or not answered
raises `LinkError`; the controller logs it and tries again next round.
"""

from __future__ import annotations

import time
import uuid

import zmq

from broker import auth
from broker import protocol as p


class LinkError(Exception):
    """A call to the broker failed: no answer in time, an error reply, or a refusal."""


class BrokerLink:
    """Admin calls the scheduler makes (stats, spawn, stop, configure), each answered in turn."""

    def __init__(self, address: str, timeout_s: float = 10.0, key: auth.KeyFile | None = None):
        self.address, self.timeout_s = address, timeout_s
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if key is not None:  # keys on: the scheduler's key (role scheduler)
            key.as_client(self.socket)
        self.socket.setsockopt(zmq.ROUTING_ID, f"scheduler-{uuid.uuid4().hex[:8]}".encode())
        self.socket.connect(address)

    def call(self, msg: p.Message) -> p.Message:
        """Send `msg` and return the broker's answer to it (answers to earlier, timed-out calls are skipped)."""
        msg.call_id = uuid.uuid4().hex
        self.socket.send_multipart([b"", *p.encode(msg)], copy=False)
        deadline = time.monotonic() + self.timeout_s
        while (left_ms := (deadline - time.monotonic()) * 1000) > 0:
            if not self.socket.poll(left_ms):
                break
            frames = self.socket.recv_multipart(copy=False)
            try:
                reply, _ = p.decode(frames[1:])
            except p.ProtocolError:
                continue
            if getattr(reply, "call_id", None) == msg.call_id:
                return reply
            if isinstance(reply, p.Error) and reply.request_id == msg.call_id:
                raise LinkError(f"{reply.code}: {reply.message}")
        raise LinkError(f"no answer from the broker at {self.address} within {self.timeout_s}s")

    def _admin(self, msg: p.Message, what: str) -> p.AdminReply:
        reply = self.call(msg)
        if not isinstance(reply, p.AdminReply) or not reply.ok:
            raise LinkError(f"{what} refused: {getattr(reply, 'message', reply)}")
        return reply

    def stats(self) -> p.Stats:
        return self.call(p.GetStats())

    def spawn(self, model: str, device: str = "cpu", backend: str = "emulated", count: int = 1, host: str = "",
              max_batch_rows: int = 8, options: dict | None = None) -> p.AdminReply:
        return self._admin(p.AdminSpawn(model, device, backend, host, count, max_batch_rows, options), "spawn")

    def stop_actor(self, actor_id: str) -> p.AdminReply:
        return self._admin(p.AdminStop(actor_id), "stop")

    def configure(self, settings: dict | None = None, plan: dict | None = None) -> p.AdminReply:
        return self._admin(p.AdminConfigure(settings or {}, plan), "configure")

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()
