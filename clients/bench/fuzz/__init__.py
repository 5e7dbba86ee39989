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

from clients.bench.fuzz.frames import hostile_messages, near_limit_messages, port_messages
from clients.bench.fuzz.sender import FuzzCounts, answer_kind, fuzz_socket
from clients.bench.fuzz.values import (
           ALL_COMMANDS,
           BACKEND_COMMANDS,
           DATA_COMMANDS,
           FRONTEND_COMMANDS,
           typed_messages,
)

__all__ = ["ALL_COMMANDS", "BACKEND_COMMANDS", "DATA_COMMANDS", "FRONTEND_COMMANDS", "FuzzCounts", "answer_kind",
           "fuzz_socket", "hostile_messages", "near_limit_messages", "port_messages", "typed_messages"]
