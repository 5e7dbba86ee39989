"""What one event makes the broker core send: buffered, and discarded if the event fails.

Runs in the broker process, inside `broker.core.machine.BrokerCore`; no sockets (the
IO shell sends what `flush` returns). Every part of the core queues its messages here
and its FREEs (one message per holder, however many outputs it drops). Nothing leaves
before the event's handler returns: a handler that raises halfway has its half-built
sends and frees dropped with `discard`, so they never leave with the next event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker import protocol as p
from broker.core.state import BACKEND
from broker.protocol.errors import ErrorCode


@dataclass
class Send:
    """An instruction for the IO shell: send `msg` (+ raw payload frames) to a peer."""

    socket: str
    identity: bytes
    msg: p.Message
    payload: list = field(default_factory=list)


class Outbox:
    def __init__(self) -> None:
        self._sends: list[Send] = []
        self._frees: dict[bytes, list[str]] = {}  # holder identity -> output ids, one FREE each flush

    def send(self, socket: str, identity: bytes, msg: p.Message, payload: list | None = None) -> None:
        self._sends.append(Send(socket, identity, msg, payload or []))

    def error(self, socket: str, identity: bytes, code: ErrorCode, message: str, field: str | None = None,
              request_id: str | None = None) -> None:
        self.send(socket, identity, p.Error(code=code.value, message=message, field=field, request_id=request_id))

    def free(self, identity: bytes, output_id: str) -> None:
        """The holder behind `identity` may drop `output_id` (sent once per event and holder)."""
        self._frees.setdefault(identity, []).append(output_id)

    def flush(self) -> list[Send]:
        """The event's sends, its FREEs last; the box is empty again."""
        for identity, tensor_ids in self._frees.items():
            self._sends.append(Send(BACKEND, identity, p.Free(tensor_ids)))
        self._frees.clear()
        out, self._sends = self._sends, []
        return out

    def discard(self) -> None:
        """The event failed: nothing it queued may leave."""
        self._sends = []
        self._frees.clear()
