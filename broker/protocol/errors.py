"""Typed errors with stable codes: what a peer sees when something is refused."""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    # protocol violations: the message was not understood
    BAD_TAG = "bad_tag"
    UNKNOWN_COMMAND = "unknown_command"
    BAD_FRAMES = "bad_frames"
    BAD_HEADER = "bad_header"
    TOO_LARGE = "too_large"
    # request-level outcomes
    INVALID_PARAM = "invalid_param"
    UNKNOWN_WORKFLOW = "unknown_workflow"
    DUPLICATE_REQUEST = "duplicate_request"
    OVERLOADED = "overloaded"
    PAUSED = "paused"  # an operator paused admission for the workflow
    SLO_UNATTAINABLE = "slo_unattainable"  # admission control: it could not finish in time
    DEADLINE_EXCEEDED = "deadline_exceeded"  # drop_late: its deadline passed before its work ran
    CANCELLED = "cancelled"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    TASK_ERROR = "task_error"
    INPUT_UNAVAILABLE = "input_unavailable"
    UNKNOWN_REQUEST = "unknown_request"
    # cluster-level
    NOT_FOUND = "not_found"
    NO_CAPACITY = "no_capacity"
    INTERNAL = "internal"
    FORBIDDEN = "forbidden"  # keys on: the sender's role may not send that command
    DUPLICATE_ACTOR = "duplicate_actor"  # a hello for an actor id live on another host or process


class ProtocolError(Exception):
    """A message that breaks the protocol. `field` names the offending part when known."""

    def __init__(self, code: ErrorCode, message: str, field: str | None = None):
        super().__init__(f"{code.value}: {message}" + (f" (field {field!r})" if field else ""))
        self.code = code
        self.message = message
        self.field = field
