"""What every handler shares, built once per gateway process (one per aiohttp app)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from clients.errors import LegoError
from clients.gateway.auth import Sessions
from clients.gateway.config import GatewayConfig
from clients.gateway.errors import from_client_error
from clients.gateway.keys import KeyRing
from clients.gateway.observe import GatewayMetrics, History


@dataclass
class Gateway:
    config: GatewayConfig
    keys: KeyRing
    sessions: Sessions
    metrics: GatewayMetrics
    history: History
    client: Any = None  # clients.aio.AsyncClient, made on startup inside the event loop
    store: Any = None  # clients.gateway.runs.RunStore, idem
    # HTTP errors the gateway answered (quota, bad input, broker down), for the console.
    recent_errors: collections.deque = field(default_factory=lambda: collections.deque(maxlen=50))


GATEWAY = web.AppKey("gateway", Gateway)


def gateway_of(request: web.Request) -> Gateway:
    return request.app[GATEWAY]


async def ask_broker(gw: Gateway, call) -> Any:
    """Await a broker call (`gw.client.stats()`...), noting whether the broker answered;
    a client error becomes the ApiError to answer with (503 when the broker is away)."""
    try:
        answer = await call
    except LegoError as exc:
        gw.metrics.broker_up.set(0)
        raise from_client_error(exc) from None
    gw.metrics.broker_up.set(1)
    return answer
