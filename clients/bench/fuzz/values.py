"""Hostile values and message headers (hypothesis strategies; no sockets): the
protocol's bounds and one past them, type-confused fields, and headers built from each
message class's own fields, then damaged. See the package docstring."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing

import msgpack
from hypothesis import strategies as st

from broker.protocol.constants import MAX_CREDITS, MAX_SEED, PROTOCOL_TAG, Command
from broker.protocol.messages import MESSAGE_TYPES
from broker.protocol.structs import INT_BOUND, Struct
from broker.protocol.tasks import TASK_PARAMS, TaskKind, TaskParams

Frames = list[bytes]
Words = tuple[str, ...]  # extra words for text fields (workflow, model names): a tuple, so strategies cache

# Commands by the port that reads them (what a well-behaved peer sends there). The
# fuzzers send other commands to each port as well: a receiver must refuse them.
FRONTEND_COMMANDS = (Command.SUBMIT, Command.CANCEL, Command.LIST_WORKFLOWS, Command.GET_STATS, Command.ADMIN_SPAWN,
                     Command.ADMIN_STOP, Command.ADMIN_CONFIGURE, Command.ADMIN_DRAIN, Command.ADMIN_REPLICAS,
                     Command.ADMIN_PAUSE, Command.ADMIN_REGISTER)
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


def optional_inner(hint) -> tuple[typing.Any, bool]:
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
    hint, optional = optional_inner(hint)
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


def struct_fields(cls) -> list[tuple[str, typing.Any]]:
    """(name, type) of a wire struct's fields (PipelineParams is a plain dataclass too)."""
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


@functools.cache
def struct_map(cls, extra: Words = ()) -> st.SearchStrategy[dict]:
    """The wire map of struct `cls`, every field present and of its declared type
    (deferred: structs nest, and each is built once)."""
    return st.fixed_dictionaries({name: st.deferred(lambda hint=hint: typed_value(hint, extra))
                                  for name, hint in struct_fields(cls)})


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
    names = sorted(name for name, _ in struct_fields(cls))
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
