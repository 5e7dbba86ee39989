"""The fuzzers' only IO: hostile messages sent from DEALER sockets (with a key when
given), never blocking, and what comes back counted. Runs in the test process; owns
its DEALERs."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import zmq

from broker import auth
from broker.protocol.codec import decode
from broker.protocol.errors import ProtocolError
from broker.protocol.messages import Error

# ---------------------------------------------------------------- IO


@dataclass
class FuzzCounts:
    sent: int = 0  # messages queued on a socket
    refused: int = 0  # messages no socket would take within the send timeout (no pipe: a refused handshake)
    answered: int = 0  # messages that came back
    connections: int = 0  # sockets opened (each a new identity at the receiver)

    def add(self, other: FuzzCounts) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _open(context: zmq.Context, address: str, key: auth.KeyFile | None, server_key: bytes | None,
          sndtimeo_ms: int) -> zmq.Socket:
    """A fresh DEALER whose sends give up after `sndtimeo_ms`: a socket whose CURVE
    handshake was refused has no pipe until ZeroMQ's next try, and would block for ever."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, sndtimeo_ms)
    if key is not None:
        key.as_client(sock, server_key)
    sock.connect(address)
    return sock


def answer_kind(frames: Sequence[zmq.Frame]) -> str:
    """What an answer was: an error's code, else its command's name ("undecodable" if
    the receiver broke the protocol itself)."""
    try:
        msg, _ = decode(frames[1:])  # after the empty delimiter
    except ProtocolError:
        return "undecodable"
    return msg.code if isinstance(msg, Error) else msg.COMMAND.name


def _drain(sock: zmq.Socket, quiet_s: float, codes: Counter | None) -> int:
    """Read whatever came back, until nothing has for `quiet_s`; how many messages.
    `codes` (when given) counts them by `answer_kind`."""
    answered = 0
    while sock.poll(int(quiet_s * 1000)):
        frames = sock.recv_multipart(copy=False)
        answered += 1
        if codes is not None:
            codes[answer_kind(frames)] += 1
    return answered


def _close(sock: zmq.Socket, quiet_s: float, codes: Counter | None) -> int:
    """Count the answers still coming, then close without sending what is queued."""
    answered = _drain(sock, quiet_s, codes)
    sock.close(linger=0)
    return answered


def fuzz_socket(address: str, frames_iter: Iterable[Sequence[bytes]], key: auth.KeyFile | None = None, *,
                server_key: bytes | None = None, context: zmq.Context | None = None, reconnect_every: int = 100,
                sndtimeo_ms: int = 100, quiet_s: float = 0.02, codes: Counter | None = None) -> FuzzCounts:
    """Send every message of `frames_iter` to `address` from DEALER sockets; the counts.

    `key` (and `server_key`, by default the key file's server) makes each socket a
    CurveZMQ client. A new socket, a new identity at the receiver, is opened every
    `reconnect_every` messages and after a send that timed out, so that a refused
    handshake is tried again and the receiver sees peers come and go. Answers are read
    as they come and, before a socket closes, until none has come for `quiet_s`:
    `answered` is what a peer without a valid key must never get, and `codes` (if
    given) counts the answers by kind: an "internal" error means a handler raised."""
    own_context = context is None
    context = context or zmq.Context()
    counts = FuzzCounts()
    sock = None
    try:
        for i, frames in enumerate(frames_iter):
            if sock is not None and i % reconnect_every == 0:
                counts.answered += _close(sock, quiet_s, codes)
                sock = None
            if sock is None:
                sock = _open(context, address, key, server_key, sndtimeo_ms)
                counts.connections += 1
            try:
                sock.send_multipart(frames, copy=False)
            except zmq.Again:
                counts.refused += 1
                counts.answered += _close(sock, 0, codes)
                sock = None
                continue
            counts.sent += 1
            counts.answered += _drain(sock, 0, codes)
        if sock is not None:
            counts.answered += _close(sock, quiet_s, codes)
            sock = None
    finally:
        if sock is not None:
            sock.close(linger=0)
        if own_context:
            context.term()
    return counts
