"""Client side: the Python client library (sync and asyncio), the `lego` CLI and the
benchmark drivers."""

from clients.errors import LegoError, RequestFailed, RequestRejected, Timeout  # noqa: F401
