"""What one event makes the broker core send: buffered, and discarded if the event fails.

Runs in the broker process, inside `broker.core.machine.BrokerCore`; no sockets (the
IO shell sends what `flush` returns). Every part of the core queues its messages here
and its FREEs (one message per holder, however many outputs it drops). Nothing leaves
before the event's handler returns: a handler that raises halfway has its half-built
sends and frees dropped with `discard`, so they never leave with the next event.

With `journaling` on (a broker with a request journal), the sends are interleaved with
`Record`s, in the order they must happen: a request's accepted record before its
ACCEPTED, its ended record after its RESULT or FAILED; a workflow registered at run
time (`Registration`) before the reply that accepts it. The shell makes each record
durable before it sends what follows it; the core itself never touches a file. Off (the
default: tests, the simulator), no record is made and the sends are the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from broker import protocol as p
from broker.core.state import BACKEND
from broker.protocol.errors import ErrorCode

# A journaled request's states, as the journal spells them (broker.journal.ENDED).
ACCEPTED, FINISHED, FAILED, CANCELLED = "accepted", "finished", "failed", "cancelled"


@dataclass(frozen=True)
class Record:
    """An instruction for the IO shell: make this durable before sending what follows.
    `status` ACCEPTED carries what a re-run needs (the validated params, the client's
    identity, the tensor inputs as (desc, frame) in frame order); an ended one only its id."""

    request_id: str
    status: str
    client: bytes = b""
    workflow: str = ""
    params: dict | None = None
    tensors: tuple = ()
    progress: bool = False


@dataclass(frozen=True)
class Registration:
    """An instruction for the IO shell: journal this workflow registration (ADMIN_REGISTER)
    before the reply that accepts it leaves; a restarted broker registers it again."""

    name: str
    definition: dict


@dataclass
class Send:
    """An instruction for the IO shell: send `msg` (+ raw payload frames) to a peer."""

    socket: str
    identity: bytes
    msg: p.Message
    payload: list = field(default_factory=list)


class Outbox:
    def __init__(self) -> None:
        self.journaling = False  # set by the IO shell that owns a journal
        self._sends: list[Send | Record | Registration] = []
        self._frees: dict[bytes, list[str]] = {}  # holder identity -> output ids, one FREE each flush

    def send(self, socket: str, identity: bytes, msg: p.Message, payload: list | None = None) -> None:
        self._sends.append(Send(socket, identity, msg, payload or []))

    def error(self, socket: str, identity: bytes, code: ErrorCode, message: str, field: str | None = None,
              request_id: str | None = None) -> None:
        self.send(socket, identity, p.Error(code=code.value, message=message, field=field, request_id=request_id))

    def accepted(self, request) -> None:
        """Journal `request` (a `state.Request` just admitted): before its ACCEPTED is queued."""
        if self.journaling:
            tensors = tuple((dataclasses.replace(desc, frame=i), request.frames[desc.frame])
                            for i, desc in enumerate(request.tensors))
            self._sends.append(Record(request.request_id, ACCEPTED, request.client, request.workflow,
                                      request.params, tensors, request.progress))

    def ended(self, request_id: str, status: str) -> None:
        """Journal the request's end: after its final answer is queued, so a broker killed
        in between runs it again (the client ignores a second answer) rather than never
        answering."""
        if self.journaling:
            self._sends.append(Record(request_id, status))

    def registered(self, name: str, definition: dict) -> None:
        """Journal a workflow registered at run time: before the reply that accepts it."""
        if self.journaling:
            self._sends.append(Registration(name, definition))

    def free(self, identity: bytes, output_id: str) -> None:
        """The holder behind `identity` may drop `output_id` (sent once per event and holder)."""
        self._frees.setdefault(identity, []).append(output_id)

    def flush(self) -> list[Send | Record | Registration]:
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
