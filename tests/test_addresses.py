"""The data address an actor advertises must be reachable from other hosts (actors/addresses.py)."""

from __future__ import annotations

import pytest

from actors.addresses import advertised, data_host
from broker.endpoints import endpoint_host, is_loopback_endpoint


def _route(host: str) -> str:
    assert host == "10.1.2.3"  # asked for the route to the broker, by IP
    return "10.1.2.77"


def test_a_broker_on_another_host_gives_the_actors_this_hosts_end_of_the_route():
    assert data_host("tcp://10.1.2.3:5556", route=_route) == "10.1.2.77"
    assert data_host("tcp://127.0.0.1:5556", route=_route) == "127.0.0.1"  # one-host cluster
    assert data_host("tcp://localhost:5556", route=_route) == "127.0.0.1"
    assert data_host("tcp://10.1.2.3:5556", "192.168.9.9", route=_route) == "192.168.9.9"  # the operator's


def test_a_wildcard_bind_is_advertised_as_a_concrete_routable_address():
    assert advertised("tcp://0.0.0.0:41234", "tcp://10.1.2.3:5556", route=_route) == "tcp://10.1.2.77:41234"
    assert advertised("tcp://10.1.2.77:41234", "tcp://10.1.2.3:5556", route=_route) == "tcp://10.1.2.77:41234"
    assert advertised("tcp://127.0.0.1:5000", "tcp://127.0.0.1:5556") == "tcp://127.0.0.1:5000"


def test_the_real_route_to_a_non_loopback_broker_is_not_loopback():
    """Today's finding: actors advertised tcp://127.0.0.1 whatever the broker's address."""
    try:
        ip = data_host("tcp://192.0.2.200:5556")  # TEST-NET: routed (or refused) without a packet sent
    except ValueError as exc:  # a host with no route there: the agent says which setting to give
        assert "--data-host" in str(exc)
    else:
        assert not ip.startswith("127."), ip


@pytest.mark.parametrize("bad", ["ipc:///tmp/x", "127.0.0.1:5556", "tcp://"])
def test_an_endpoint_that_is_not_tcp_host_port_is_refused(bad):
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        endpoint_host(bad)


def test_only_loopback_ipc_and_inproc_endpoints_count_as_this_host_only():
    assert is_loopback_endpoint("tcp://127.0.0.1:5555") and is_loopback_endpoint("tcp://[::1]:5555")
    assert is_loopback_endpoint("tcp://localhost:5555") and is_loopback_endpoint("ipc:///tmp/lego")
    for open_to_others in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.0.2.2:5555", "tcp://head:5555"):
        assert not is_loopback_endpoint(open_to_others), open_to_others
