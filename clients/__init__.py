"""Client side: the Python client library (sync and asyncio), the `lego` CLI, the
local-cluster launcher and the benchmark drivers."""

from clients.aio import AsyncClient, AsyncJob
from clients.client import Client, Job
from clients.errors import Cancelled, LegoError, RequestFailed, RequestRejected, Timeout
from clients.results import JobResult

__all__ = [
    "AsyncClient", "AsyncJob", "Cancelled", "Client", "Job", "JobResult", "LegoError",
    "RequestFailed", "RequestRejected", "Timeout",
]
