"""ZeroMQ tcp endpoints: which host one names, and whether only this host can reach it.

Read by the broker (it binds loopback only when keys are off) and by the actors and
node agents (the data address they advertise).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

WILDCARDS = ("0.0.0.0", "*", "::", "")


def endpoint_host(endpoint: str) -> str:
    """`tcp://HOST:PORT` -> HOST (brackets of an IPv6 literal removed)."""
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or parts.hostname is None:
        raise ValueError(f"expected tcp://HOST:PORT, got {endpoint!r}")
    return parts.hostname


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    return host == "localhost" or (is_ip(host) and ipaddress.ip_address(host).is_loopback)


def is_loopback_endpoint(endpoint: str) -> bool:
    """Whether binding `endpoint` exposes nothing beyond this host (ipc:// and inproc:// never do)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = urlsplit(endpoint).hostname
    return host is not None and host not in WILDCARDS and is_loopback(host)
