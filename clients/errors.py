"""Typed exceptions the client library raises."""

from __future__ import annotations


class LegoError(Exception):
    """Base of every client-side error."""


class RequestRejected(LegoError):
    """The broker refused the request before doing any work (bad parameter, overload...)."""

    def __init__(self, request_id: str, code: str, message: str, field: str | None = None,
                 retry_after_s: float = 0.0):
        where = f" (field {field})" if field else ""
        super().__init__(f"request {request_id} rejected: {code}: {message}{where}")
        self.request_id, self.code, self.message, self.field = request_id, code, message, field
        self.retry_after_s = retry_after_s  # admission refusals: when to try again


class RequestFailed(LegoError):
    """The request was accepted but did not complete (task error, attempts exhausted, cancelled)."""

    def __init__(self, request_id: str, code: str, message: str):
        super().__init__(f"request {request_id} failed: {code}: {message}")
        self.request_id, self.code, self.message = request_id, code, message


class BrokerUnreachable(RequestFailed):
    """The broker stopped answering while the request was in flight (code `broker_unreachable`).

    The request may still complete there (a restarted broker resumes its journal), but this
    client stopped waiting for it after `broker_silence_s` without a word from the broker."""


class Cancelled(RequestFailed):
    """The request was cancelled (by this client's `cancel()`)."""


class Timeout(LegoError, TimeoutError):
    """No answer within the time asked for (the request may still complete)."""
