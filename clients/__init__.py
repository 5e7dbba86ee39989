"""Client side. At this level, the Python client library (sync `Client`, asyncio
`AsyncClient`); below it, `clients.cli` (the `lego` command and operator views),
`clients.gateway` (the HTTP gateway), `clients.bench` (load generator, benchmarks,
simulator) and `clients.local` (a local cluster of processes)."""

from clients.aio import AsyncClient, AsyncJob
from clients.client import Client, Job
from clients.errors import (
    BrokerUnreachable,
    Cancelled,
    LegoError,
    RequestFailed,
    RequestRejected,
    Timeout,
)
from clients.results import JobResult

__all__ = [
    "AsyncClient", "AsyncJob", "BrokerUnreachable", "Cancelled", "Client", "Job", "JobResult", "LegoError",
    "RequestFailed", "RequestRejected", "Timeout",
]
