"""Which address an actor's data socket binds and advertises to its peers.

Runs in the node agent (choosing the address for the actors it starts) and in each
actor (what it tells the broker). Peers on other hosts fetch tensors from the
advertised address, so it must be one they can reach: a loopback address only when
the broker itself is reached over loopback (a one-host cluster), otherwise the address
of the interface this host uses to reach the broker (or the operator's choice).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from broker.endpoints import WILDCARDS, endpoint_host, is_ip, is_loopback


def route_to(host: str, port: int = 9) -> str:
    """This host's address on the interface that routes to `host` (no packet is sent:
    connecting a UDP socket only asks the kernel for a route)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return probe.getsockname()[0]


def data_host(broker_endpoint: str, configured: str = "", route: Callable[[str], str] = route_to) -> str:
    """The host part of the actors' data address: the operator's, loopback for a broker
    on loopback, else the local end of the route to the broker."""
    if configured:
        return configured
    broker = endpoint_host(broker_endpoint)
    if is_loopback(broker):
        return "127.0.0.1"
    try:
        return route(broker if is_ip(broker) else socket.gethostbyname(broker))
    except OSError as exc:
        raise ValueError(f"data_host: no route from this host to the broker's {broker!r} ({exc}); "
                         "set --data-host (env LEGO_DATA_HOST) to an address other hosts reach") from None


def advertised(bound: str, broker_endpoint: str, route: Callable[[str], str] = route_to) -> str:
    """The address to give peers for a socket bound at `bound` (`LAST_ENDPOINT`): a
    wildcard bind is advertised as the address that routes to the broker."""
    host = endpoint_host(bound)
    if host not in WILDCARDS:
        return bound
    port = urlsplit(bound).port
    concrete = data_host(broker_endpoint, route=route)
    return f"tcp://{'[' + concrete + ']' if ':' in concrete else concrete}:{port}"
