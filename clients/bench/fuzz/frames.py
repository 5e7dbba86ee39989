"""Hostile multipart messages (hypothesis strategies; no sockets): broken framing,
oversized frames, headers near the limits, and the mixes a port receives. See the
package docstring."""

from __future__ import annotations

import functools
import typing

from hypothesis import strategies as st

from broker.protocol.constants import DEFAULT_LIMITS, PROTOCOL_TAG, Command
from broker.protocol.messages import MESSAGE_TYPES
from clients.bench.fuzz.values import (
    ALL_COMMANDS,
    Frames,
    MiB,
    Words,
    optional_inner,
    pack,
    packed_headers,
    pick,
    struct_fields,
    struct_map,
    typed_messages,
)

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
    for name, hint in struct_fields(cls):
        hint = optional_inner(hint)[0]
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
