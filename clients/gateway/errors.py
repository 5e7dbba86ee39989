"""HTTP errors: one exception type, the broker's refusals mapped to statuses, and the two
JSON shapes errors take (native, and OpenAI's for the OpenAI route). Pure functions."""

from __future__ import annotations

import math

from clients.errors import LegoError, RequestFailed, RequestRejected, Timeout

# Broker refusal codes (ErrorCode values) -> HTTP status. Anything else is bad input.
STATUS_BY_CODE = {
    "slo_unattainable": 429,  # admission: the queue is too deep to meet the SLO now
    "overloaded": 503,  # the broker's cap on requests in flight
    "no_capacity": 503,
    "paused": 503,  # an operator paused the workflow's admission
    "duplicate_request": 409,
    "unknown_workflow": 400,
    "invalid_param": 400,
}

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                415: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An error answer: HTTP status, a machine-readable code, the offending field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}  # whole seconds, RFC 9110

    def native_body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}

    def openai_body(self) -> dict:
        kind = OPENAI_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.field, "code": self.code}}


def from_client_error(exc: LegoError) -> ApiError:
    """The HTTP answer for what the client library raised while submitting or waiting."""
    if isinstance(exc, RequestRejected):
        status = STATUS_BY_CODE.get(exc.code, 400)
        retry = exc.retry_after_s if exc.code == "slo_unattainable" else (1.0 if status == 503 else None)
        return ApiError(status, exc.code, exc.message, exc.field, retry)
    if isinstance(exc, Timeout):
        return ApiError(503, "broker_unavailable", "the broker did not answer in time", None, 1.0)
    if isinstance(exc, RequestFailed):
        if exc.code == "client_closed":
            return ApiError(503, "broker_unavailable", exc.message, None, 1.0)
        return ApiError(500, exc.code, exc.message)
    return ApiError(500, "internal", str(exc))


def admin_refusal(exc: LegoError) -> ApiError:
    """A refused admin call (AdminRefused names the field: `actor_id`, `model`, `min`...)."""
    if isinstance(exc, Timeout):
        return ApiError(503, "broker_unavailable", "the broker did not answer in time", None, 1.0)
    message, field = getattr(exc, "message", str(exc)), getattr(exc, "field", None)
    missing = field in ("actor_id", "model", "workflow") and ("no " in message or "unknown" in message)
    return ApiError(404 if missing else 400, "refused", message, field)
