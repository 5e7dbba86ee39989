"""Frames <-> typed messages.

Wire layout after the ZeroMQ envelope (identity frames and the empty delimiter,
which the socket layer handles): `PROTOCOL_TAG COMMAND HEADER payload...`.
HEADER is a msgpack map; payload frames are raw tensor bytes, never opened by the
codec. Limits are checked before msgpack sees a byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from broker.protocol.constants import (
    COMMANDS_BY_VALUE,
    DEFAULT_LIMITS,
    PROTOCOL_TAG,
    Command,
    Limits,
)
from broker.protocol.errors import ErrorCode, ProtocolError
from broker.protocol.messages import MESSAGE_TYPES, Message


def encode(msg: Message, payload: Sequence[Any] = ()) -> list[Any]:
    """The frames of `msg` (without envelope); `payload` buffers follow unchanged."""
    return [PROTOCOL_TAG, msg.COMMAND.value, msgpack.packb(msg.to_wire(), use_bin_type=True), *payload]


def _nbytes(frame: Any) -> int:
    if isinstance(frame, (bytes, bytearray)):
        return len(frame)
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    return memoryview(buf if buf is not None else frame).nbytes


def _as_bytes(frame: Any) -> bytes | memoryview:
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return frame
    return frame.buffer  # zmq.Frame received with copy=False


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> tuple[Message, list[Any]]:
    """Parse frames (envelope already stripped) into (message, payload frames).

    Raises ProtocolError with a code; the caller answers or disconnects and keeps going.
    """
    if len(frames) < 3:
        raise ProtocolError(ErrorCode.BAD_FRAMES, f"expected >= 3 frames, got {len(frames)}")
    if len(frames) > limits.max_frames:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(frames)} frames > {limits.max_frames}")
    tag = bytes(_as_bytes(frames[0]))
    if tag != PROTOCOL_TAG:
        raise ProtocolError(ErrorCode.BAD_TAG, f"protocol tag {tag[:16]!r}, expected {PROTOCOL_TAG!r}")
    command = COMMANDS_BY_VALUE.get(bytes(_as_bytes(frames[1])))
    if command is None:
        raise ProtocolError(ErrorCode.UNKNOWN_COMMAND, f"unknown command {bytes(_as_bytes(frames[1]))[:16]!r}")
    header_len = _nbytes(frames[2])
    if header_len > limits.max_header_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header of {header_len} bytes > {limits.max_header_bytes}")
    payload = list(frames[3:])
    payload_len = sum(_nbytes(f) for f in payload)
    if payload_len > limits.max_payload_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"payload of {payload_len} bytes > {limits.max_payload_bytes}")
    try:
        header = msgpack.unpackb(
            _as_bytes(frames[2]),
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_header_bytes,
            max_array_len=limits.max_container_len,
            max_map_len=limits.max_container_len,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header is not valid msgpack: {exc}") from None
    msg = MESSAGE_TYPES[command].from_wire(header)
    return msg, payload


def undecodable_batch_id(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> int | None:
    """The batch id of a TASKS message that `decode` refused, where its header still says
    one (an int `batch_id` in a readable map), else None: an actor answers such a batch
    BATCH_FAILED, so the broker re-runs or fails its tasks instead of waiting for them."""
    if len(frames) < 3 or bytes(_as_bytes(frames[1])) != Command.TASKS.value:
        return None
    if _nbytes(frames[2]) > limits.max_header_bytes:
        return None
    try:
        header = msgpack.unpackb(_as_bytes(frames[2]), raw=False, max_ext_len=0)
    except Exception:  # msgpack raises several unrelated types
        return None
    batch_id = header.get("batch_id") if isinstance(header, dict) else None
    return batch_id if type(batch_id) is int and 0 <= batch_id < 2**63 else None
