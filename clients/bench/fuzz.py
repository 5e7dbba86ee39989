"""Hostile multipart messages for the broker's two ports and an actor's data port
(issue 13, fuzzing), and one thin function that sends them.

The generators are hypothesis strategies and open no socket, so that hypothesis can
shrink a message that breaks a receiver down to the smallest one that still does.
Each message is the frames a DEALER sends, the empty delimiter included (a missing
delimiter is one of the faults): `[b"", PROTOCOL_TAG, command, header, *payload]`.
Three families, mixed by `hostile_messages`:

- `typed_messages`: the right tag and a real command, its header built from the
  message class's own fields, then damaged or not: fields of the wrong type, numbers
  at and beyond every bound (2^53, 2^63, 2^64 - 1, NaN, infinities), fields left out,
  unknown keys, or no map at all;
- `broken_messages`: truncated or garbage msgpack, length prefixes that lie, nesting
  deeper than any unpacker's stack, ext types, a wrong tag, an unknown command, a
  missing delimiter, too few or too many frames, empty frames, extra payload frames;
- `oversized_messages`: a header just over `Limits.max_header_bytes` (also the data
  socket's MAXMSGSIZE) and payloads of a few MiB.

Strategies are built once per argument set (`functools.cache`): hypothesis validates
a strategy object on its first draw, which would otherwise cost more than the draw.

`fuzz_socket` is the only IO: it sends such messages from DEALER sockets (with a key
when given), never blocking, and counts what comes back. Nothing here uses pickle:
every frame is bytes made by msgpack or by hand. hypothesis is a dev extra
(setup.cfg): only tests/test_fuzz.py imports this module, and nothing of `lego` does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgpack
import zmq
from hypothesis import strategies as st

from broker import auth
from broker.protocol.codec import decode
from broker.protocol.constants import DEFAULT_LIMITS, MAX_CREDITS, MAX_SEED, PROTOCOL_TAG, Command
from broker.protocol.errors import ProtocolError
from broker.protocol.messages import MESSAGE_TYPES, Error
from broker.protocol.structs import INT_BOUND, Struct
from broker.protocol.tasks import TASK_PARAMS, TaskKind, TaskParams

Frames = list[bytes]
Words = tuple[str, ...]  # extra words for text fields (workflow, model names): a tuple, so strategies cache

# Commands by the port that reads them (what a well-behaved peer sends there). The
# fuzzers send other commands to each port as well: a receiver must refuse them.
FRONTEND_COMMANDS = (Command.SUBMIT, Command.CANCEL, Command.LIST_WORKFLOWS, Command.GET_STATS, Command.ADMIN_SPAWN,
                     Command.ADMIN_STOP, Command.ADMIN_CONFIGURE, Command.ADMIN_DRAIN, Command.ADMIN_REPLICAS,
                     Command.ADMIN_PAUSE)
BACKEND_COMMANDS = (Command.ACTOR_HELLO, Command.AGENT_HELLO, Command.HEARTBEAT, Command.CREDIT, Command.BATCH_DONE,
                    Command.BATCH_FAILED, Command.FREE, Command.DISCONNECT, Command.AGENT_EVENT)
DATA_COMMANDS = (Command.FETCH,)
ALL_COMMANDS = tuple(Command)

# Every bound the protocol declares, and one past it: ints are checked against
# [-2^53, 2^53] (structs.INT_BOUND) or a field's own range; msgpack carries -2^63..2^64-1.
EDGE_INTS = (0, 1, -1, MAX_CREDITS, MAX_CREDITS + 1, INT_BOUND, INT_BOUND + 1, -INT_BOUND, -INT_BOUND - 1,
             MAX_SEED, MAX_SEED + 1, -(2**63), 2**64 - 1, 2**32, 2**31 - 1)
EDGE_FLOATS = (math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324, 2.0**53 + 1)
# Words the protocol gives meaning to, so that some typed headers reach deep into a
# handler (a task kind that decodes, a transport, a dtype) instead of failing at once.
PROTOCOL_WORDS = (*(k.value for k in TaskKind), "frame", "shm", "cuda_ipc", "uint8", "float16", "bfloat16",
                  "float32", "int64", "cpu", "cuda:0", "emu:0", "emulated", "diffusers", "started", "exited",
                  "refused", "default", "euler", "canny", "none", "prompt", "seed", "steps", "width", "height")
MiB = 1024**2


# ---------------------------------------------------------------- values


@functools.cache
def numbers() -> st.SearchStrategy:
    """Ints and floats at and beyond every bound, NaN and infinities included."""
    return st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**63), 2**64 - 1), st.sampled_from(EDGE_FLOATS),
                     st.floats(allow_nan=True, allow_infinity=True))


@functools.cache
def words(extra: Words = ()) -> st.SearchStrategy[str]:
    """A word the protocol (or the caller) knows, or short text."""
    return st.one_of(st.sampled_from((*PROTOCOL_WORDS, *extra)), st.text(max_size=12))


def pick(*strategies: st.SearchStrategy) -> st.SearchStrategy:
    """One of `strategies`, each as likely. (`st.one_of` flattens a mapped one_of into
    its branches, so a family with many branches would crowd out the others.)"""
    return st.sampled_from(strategies).flatmap(lambda chosen: chosen)


@functools.cache
def scalars(extra: Words = ()) -> st.SearchStrategy:
    return pick(st.none(), st.booleans(), numbers(), words(extra), st.binary(max_size=16))


@functools.cache
def junk_values(extra: Words = ()) -> st.SearchStrategy:
    """Any msgpack value: scalars, lists and maps nested a few levels, maps keyed by
    ints or bytes now and then (a strict unpacker refuses those)."""
    keys = st.one_of(words(extra), st.integers(-5, 5), st.binary(max_size=4))
    return st.recursive(scalars(extra), lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                st.dictionaries(keys, inner, max_size=3)),
                        max_leaves=8)


@functools.cache
def not_maps(extra: Words = ()) -> st.SearchStrategy:
    """A header that is no map: a scalar or a list."""
    return pick(scalars(extra), st.lists(scalars(extra), max_size=4))


def _optional_inner(hint) -> tuple[typing.Any, bool]:
    """`X | None` -> (X, True); anything else -> (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Any), True
    return hint, False


def _is_struct(hint) -> bool:
    return isinstance(hint, type) and issubclass(hint, Struct)


@functools.cache
def typed_value(hint, extra: Words = ()) -> st.SearchStrategy:
    """A value of the type a field declares (its numbers still out of range now and
    then): what gets a header past the type checks and into the handler."""
    hint, optional = _optional_inner(hint)
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if _is_struct(hint) and issubclass(hint, TaskParams):  # TaskSpec.params: any kind's map
        value = st.one_of([struct_map(cls, extra) for cls in TASK_PARAMS.values()])
    elif _is_struct(hint):
        value = struct_map(hint, extra)
    elif origin in (list, tuple) and args and _is_struct(args[0]):
        value = st.lists(struct_map(args[0], extra), max_size=2)
    elif origin in (list, tuple):
        value = st.lists(st.one_of(words(extra), numbers()), max_size=3)
    elif origin is dict:
        value = st.dictionaries(words(extra), junk_values(extra), max_size=3)
    elif hint is bool:
        value = st.booleans()
    elif hint is int:
        value = st.one_of(st.integers(-2, 64), st.sampled_from(EDGE_INTS))
    elif hint is float:
        value = st.one_of(st.floats(0, 100), st.sampled_from(EDGE_FLOATS))
    elif hint is str:
        value = words(extra)
    elif hint is bytes:
        value = st.binary(max_size=32)
    else:
        value = junk_values(extra)
    return st.one_of(value, st.none()) if optional else value


def _fields(cls) -> list[tuple[str, typing.Any]]:
    """(name, type) of a wire struct's fields (PipelineParams is a plain dataclass too)."""
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


@functools.cache
def struct_map(cls, extra: Words = ()) -> st.SearchStrategy[dict]:
    """The wire map of struct `cls`, every field present and of its declared type
    (deferred: structs nest, and each is built once)."""
    return st.fixed_dictionaries({name: st.deferred(lambda hint=hint: typed_value(hint, extra))
                                  for name, hint in _fields(cls)})


# ---------------------------------------------------------------- headers


def _retyped(item: tuple[dict, list, list]) -> dict:
    fields, names, values = item
    return {**fields, **dict(zip(names, values, strict=False))}


def _without(item: tuple[dict, list]) -> dict:
    fields, names = item
    return {k: v for k, v in fields.items() if k not in names}


def _with_unknown(item: tuple[dict, dict]) -> dict:
    fields, unknown = item
    return {**unknown, **fields}


@functools.cache
def header(cls, extra: Words = ()) -> st.SearchStrategy:
    """A header for message class `cls`: its fields well typed, or damaged one way:
    some of the wrong type, some left out, unknown keys added, or no map at all."""
    fields, junk = struct_map(cls, extra), junk_values(extra)
    names = sorted(name for name, _ in _fields(cls))
    unknown = st.dictionaries(st.text(min_size=1, max_size=10), junk, min_size=1, max_size=3)
    damaged = [st.tuples(fields, unknown).map(_with_unknown), not_maps(extra)]
    if names:
        some = st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)
        damaged += [st.tuples(fields, some, st.lists(junk, min_size=3, max_size=3)).map(_retyped),
                    st.tuples(fields, st.lists(st.sampled_from(names), min_size=1, unique=True)).map(_without)]
    return pick(fields, *damaged)


def pack(value: typing.Any) -> bytes:
    """msgpack as peers write it (bin type for bytes)."""
    return msgpack.packb(value, use_bin_type=True)


@functools.cache
def _packed_header(command: Command, extra: Words) -> st.SearchStrategy[bytes]:
    return header(MESSAGE_TYPES[command], extra).map(pack)


@functools.cache
def packed_headers(commands: tuple[Command, ...], extra: Words = ()) -> st.SearchStrategy[tuple[bytes, bytes]]:
    """(command frame, its header's msgpack) for one of `commands`."""
    return pick(*(_packed_header(c, extra).map(lambda h, c=c: (c.value, h)) for c in commands))


SMALL_PAYLOAD = st.lists(st.binary(max_size=64), max_size=2)


@functools.cache
def typed_messages(commands: tuple[Command, ...] = ALL_COMMANDS, extra: Words = ()) -> st.SearchStrategy[Frames]:
    """The right tag, a real command and a (maybe damaged) header of its type; a few
    small payload frames now and then (tensor bytes nobody described)."""
    return st.tuples(packed_headers(commands, extra), SMALL_PAYLOAD).map(
        lambda t: [b"", PROTOCOL_TAG, t[0][0], t[0][1], *t[1]])


# ---------------------------------------------------------------- broken framing


def nested_bytes(depth: int, container: str) -> bytes:
    """msgpack nested `depth` deep, written by hand (msgpack.packb refuses past 512 levels)."""
    one_level = b"\x91" if container == "array" else b"\x81\xa1k"  # [x] or {"k": x}
    return one_level * depth + b"\xc0"


# Headers whose length prefixes lie (4 GiB strings, bins, arrays and maps with no data),
# an ext type, a timestamp, a map keyed by a float, a reserved byte, and nothing at all.
LYING_HEADERS = (b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                 b"\x81\xa6params\xdf\x7f\xff\xff\xff", b"\xc7\x01\x05x", b"\xd6\xff\x00\x00\x00\x00",
                 b"\x81\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00\xc0", b"", b"\xc1", b"\x81")
DEPTHS = (100, 511, 512, 513, 1000, 1023, 1024, 1025, 5000, 100_000)  # around msgpack's and Python's limits
DEEP_VALUES = st.builds(nested_bytes, st.sampled_from(DEPTHS), st.sampled_from(("array", "map")))


def splice(fields: dict, name: str, packed_value: bytes) -> bytes:
    """The msgpack map of `fields` with `name` set to bytes packed already (by hand:
    what msgpack.packb refuses to write, or would be slow to)."""
    rest = {k: v for k, v in fields.items() if k != name}
    body = b"".join(pack(k) + pack(v) for k, v in rest.items())
    return b"\xdf" + (len(rest) + 1).to_bytes(4, "big") + body + pack(name) + packed_value


def _field_names(cls, kinds: tuple[type, ...]) -> tuple[str, ...]:
    """The fields of `cls` whose declared type (bare, or in `X | None`) is one of `kinds`
    (a container: also `list[Struct]`, `dict`; typing.Any counts as every kind)."""
    names = []
    for name, hint in _fields(cls):
        hint = _optional_inner(hint)[0]
        if hint is typing.Any or (typing.get_origin(hint) or hint) in kinds:
            names.append(name)
    return tuple(names)


def _spliced(cls, extra: Words, kinds: tuple[type, ...], values: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A typed header of `cls` with one field of those `kinds` (else a new field
    "params") set to one of `values`."""
    names = _field_names(cls, kinds) or ("params",)
    return st.tuples(struct_map(cls, extra), st.sampled_from(names), values).map(lambda t: splice(*t))


@functools.cache
def deep_headers(command: Command, extra: Words = ()) -> st.SearchStrategy[bytes]:
    """A typed header with one list or map field nested past every unpacker's stack."""
    return _spliced(MESSAGE_TYPES[command], extra, (list, tuple, dict), DEEP_VALUES)


def _truncated(item: tuple[bytes, int]) -> bytes:
    good, cut = item
    return good[: cut % max(1, len(good))]


@functools.cache
def broken_headers(commands: tuple[Command, ...], extra: Words = ()) -> st.SearchStrategy[bytes]:
    """Header bytes that are not one good msgpack map: truncated, garbage, lying, too deep
    (alone, or in one field of a typed header), or a good map with trailing bytes."""
    good = packed_headers(commands, extra).map(lambda t: t[1])
    return pick(
        st.tuples(good, st.integers(0, 2**16)).map(_truncated),
        st.binary(max_size=256),
        st.sampled_from(LYING_HEADERS),
        DEEP_VALUES,
        pick(*(deep_headers(c, extra) for c in commands)),
        st.tuples(good, st.binary(min_size=1, max_size=16)).map(lambda t: t[0] + t[1]),
    )


WRONG_TAGS = st.one_of(st.sampled_from((b"", b"LEGO/0", b"LEGO/2", b"lego/1", PROTOCOL_TAG + b"\x00",
                                        PROTOCOL_TAG * 1000)), st.binary(max_size=16))
UNKNOWN_COMMANDS = st.binary(max_size=8).filter(lambda c: c not in {c.value for c in Command})


def _empties(item: tuple[Frames, list[int]]) -> Frames:
    frames, indexes = item
    return [b"" if i in indexes else f for i, f in enumerate(frames)]


@functools.cache
def broken_messages(commands: tuple[Command, ...] = ALL_COMMANDS, extra: Words = ()) -> st.SearchStrategy[Frames]:
    """Frames that break the framing: a broken header, a wrong tag or command, a missing
    delimiter, too few or too many frames, empty frames where content belongs, extra
    payload frames."""
    good = packed_headers(commands, extra).map(lambda t: [b"", PROTOCOL_TAG, t[0], t[1]])
    too_many = DEFAULT_LIMITS.max_frames + 1  # all empty: cheap to send, refused unread
    return pick(
        st.tuples(packed_headers(commands, extra), broken_headers(commands, extra)).map(
            lambda t: [b"", PROTOCOL_TAG, t[0][0], t[1]]),
        st.tuples(good, WRONG_TAGS).map(lambda t: [b"", t[1], *t[0][2:]]),
        st.tuples(good, UNKNOWN_COMMANDS).map(lambda t: [b"", PROTOCOL_TAG, t[1], t[0][3]]),
        good.map(lambda frames: frames[1:]),  # no delimiter
        st.tuples(good, st.integers(1, 3)).map(lambda t: t[0][: t[1]]),  # too few frames
        st.tuples(good, st.lists(st.integers(1, 3), min_size=1, max_size=3)).map(_empties),
        st.tuples(good, st.lists(st.binary(max_size=16), min_size=1, max_size=40)).map(lambda t: t[0] + t[1]),
        good.map(lambda frames: frames + [b""] * too_many),
    )


# ---------------------------------------------------------------- oversized frames


def big_header(over: int) -> bytes:
    """A msgpack str `over` bytes past the header limit: a receiver that unpacked
    before it measured would hold all of it."""
    size = DEFAULT_LIMITS.max_header_bytes + over
    return b"\xdb" + (size - 5).to_bytes(4, "big") + bytes(size - 5)


@functools.cache
def oversized_messages(commands: tuple[Command, ...] = ALL_COMMANDS) -> st.SearchStrategy[Frames]:
    """A header just over the protocol's header limit (the data socket's MAXMSGSIZE
    too), or an empty header with a few MiB of payload. The bytes are made from a drawn
    size, never drawn byte by byte."""
    command = st.sampled_from([c.value for c in commands])
    return pick(
        st.tuples(command, st.sampled_from((1, 7, MiB))).map(lambda t: [b"", PROTOCOL_TAG, t[0], big_header(t[1])]),
        st.tuples(command, st.lists(st.integers(MiB // 2, 3 * MiB), min_size=1, max_size=2)).map(
            lambda t: [b"", PROTOCOL_TAG, t[0], pack({}), *(bytes(n) for n in t[1])]),
    )


# ---------------------------------------------------------------- near the limits


def long_str(size: int) -> bytes:
    """A packed str of `size` bytes (str32, written by hand)."""
    return b"\xdb" + size.to_bytes(4, "big") + b"x" * size


def long_container(total: int, as_map: bool) -> bytes:
    """A packed list (or map) of strs just under `max_str_len` each, `total` bytes in all:
    a header close to `max_header_bytes` that no single limit refuses."""
    chunk = DEFAULT_LIMITS.max_str_len - 64
    sizes = [chunk] * (total // chunk) + ([total % chunk] if total % chunk else [])
    items = [(pack(f"k{i}") if as_map else b"") + long_str(n) for i, n in enumerate(sizes)]
    return (b"\xdf" if as_map else b"\xdd") + len(items).to_bytes(4, "big") + b"".join(items)


# Strings at, just under and just over max_str_len, and a third of it; containers that
# bring the header to just under max_header_bytes.
LONG_STRS = st.sampled_from((DEFAULT_LIMITS.max_str_len, DEFAULT_LIMITS.max_str_len + 1,
                             DEFAULT_LIMITS.max_str_len - 512, DEFAULT_LIMITS.max_str_len // 3)).map(long_str)
LONG_CONTAINERS = st.builds(long_container, st.just(DEFAULT_LIMITS.max_header_bytes - 4096), st.booleans())


@functools.cache
def near_limit_headers(command: Command, extra: Words = ()) -> st.SearchStrategy[bytes]:
    """A typed header with one text field close to `max_str_len`, or one container
    field that brings the header close to `max_header_bytes`: accepted by every limit,
    and then echoed, stored or summed up wherever the receiver keeps what it was told."""
    cls = MESSAGE_TYPES[command]
    return pick(_spliced(cls, extra, (str,), LONG_STRS), _spliced(cls, extra, (list, tuple, dict), LONG_CONTAINERS))


@functools.cache
def near_limit_messages(commands: tuple[Command, ...] = ALL_COMMANDS, extra: Words = ()) -> st.SearchStrategy[Frames]:
    """The right tag and command, and a header at the edge of the limits (MiBs on the wire)."""
    return pick(*(near_limit_headers(c, extra).map(lambda h, c=c: [b"", PROTOCOL_TAG, c.value, h]) for c in commands))


@functools.cache
def hostile_messages(commands: tuple[Command, ...] = ALL_COMMANDS, extra: Words = (), oversized_percent: int = 1,
                     near_limit_percent: int = 0) -> st.SearchStrategy[Frames]:
    """One hostile message: typed headers mostly (they reach the handlers), broken
    framing often, oversized frames and headers near the limits rarely (each is MiBs
    on the wire; near-limit ones are opt-in, since a receiver keeps what they say).
    A percentage roll picks the family (`one_of` cannot weight), ordered so that a
    failure shrinks towards a small typed message."""
    typed, broken = typed_messages(commands, extra), broken_messages(commands, extra)
    big, near = oversized_messages(commands), near_limit_messages(commands, extra)

    def family(roll: int) -> st.SearchStrategy[Frames]:
        if roll < 60:
            return typed
        if roll < 100 - oversized_percent - near_limit_percent:
            return broken
        return big if roll < 100 - near_limit_percent else near

    return st.sampled_from(range(100)).flatmap(family)


@functools.cache
def port_messages(commands: tuple[Command, ...], extra: Words = (), oversized_percent: int = 1,
                  near_limit_percent: int = 0) -> st.SearchStrategy[Frames]:
    """Hostile messages for a port that reads `commands`: three in four use them (and
    reach its handlers), the rest any command (which it must refuse)."""
    own = hostile_messages(commands, extra, oversized_percent, near_limit_percent)
    others = hostile_messages(ALL_COMMANDS, extra, oversized_percent, near_limit_percent)
    return st.sampled_from(range(4)).flatmap(lambda roll: own if roll < 3 else others)


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
