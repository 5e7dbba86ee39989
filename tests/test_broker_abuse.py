"""What a hostile or broken peer can no longer do to the broker (issue 13's findings),
against a real BrokerServer in this process."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import zmq

from broker import protocol as p
from broker.core.machine import FRONTEND, Send
from broker.protocol import PROTOCOL_TAG, Command
from broker.server import BrokerConfig, BrokerServer
from clients import Client
from clients.local import free_port


@pytest.fixture
def broker():
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    server = BrokerServer(BrokerConfig(frontend_address=frontend, backend_address=backend, client_send_hwm=50,
                                       telemetry_address=f"tcp://127.0.0.1:{free_port()}", telemetry_interval_s=0.05))
    server.bind()
    thread = threading.Thread(target=server.serve_forever, name="abused-broker", daemon=True)
    thread.start()
    context = zmq.Context()
    try:
        yield server, frontend, backend, context
    finally:
        server.stop()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the broker's loop did not stop"
        server.close()
        context.destroy(linger=0)


def _raw(command: Command, header: dict) -> list[bytes]:
    return [b"", PROTOCOL_TAG, command.value, msgpack.packb(header)]


def _answers_promptly(frontend: str) -> None:
    started = time.monotonic()
    with Client(frontend, admin_timeout_s=5.0) as client:
        assert client.workflows()
        assert client.stats() is not None
    assert time.monotonic() - started < 5.0


def test_a_client_that_never_reads_is_cut_off_and_the_broker_serves_the_others(broker):
    server, frontend, _, context = broker
    silent = context.socket(zmq.DEALER)
    silent.setsockopt(zmq.RCVHWM, 1)
    silent.setsockopt(zmq.LINGER, 0)
    silent.connect(frontend)
    for _ in range(5000):  # every answer a workflow list: the broker's queue to it fills
        silent.send_multipart(_raw(Command.LIST_WORKFLOWS, {"call_id": "x"}))
    deadline = time.monotonic() + 20
    while server.core.counters["peers_cut_off"] == 0:
        assert time.monotonic() < deadline, "never cut off: a blocking send would have stopped the broker here"
        time.sleep(0.05)
    _answers_promptly(frontend)


@pytest.mark.parametrize("header", [
    {"telemetry": {"batches": 2**64 - 1, "busy_s": 1.0}},
    {"telemetry": {"fetched_bytes": 2**63 + 5}},
    {"sent_at": float("inf")},
])
def test_a_heartbeat_with_huge_numbers_from_a_stranger_is_refused_and_stats_still_work(broker, header):
    server, frontend, backend, context = broker
    stranger = context.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(backend)
    stranger.send_multipart(_raw(Command.HEARTBEAT, {**header, "actor_id": "nobody", "session": "s"}))
    stranger.send_multipart(_raw(Command.CREDIT, {"credits": 2**63 - 1}))
    deadline = time.monotonic() + 5
    while server.core.counters["protocol_errors"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)  # a few telemetry publishes
    _answers_promptly(frontend)
    assert server.core.counters["encode_errors"] == 0


def test_an_unencodable_answer_is_dropped_and_counted_not_fatal(broker):
    server, frontend, _, _ = broker
    bad = p.Error(code="internal", message="x", request_id="r")
    bad.message = object()  # what no codec can write: stands for any bug in a handler's answer
    server._apply([Send(FRONTEND, b"\x00nobody", bad)])  # fails at encode: no socket is touched from here
    assert server.core.counters["encode_errors"] == 1
    _answers_promptly(frontend)



def test_a_frame_over_the_protocols_limit_is_refused_before_it_is_buffered(broker):
    server, frontend, _, context = broker
    big = context.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(frontend)
    big.send_multipart([b"", PROTOCOL_TAG, Command.SUBMIT.value, msgpack.packb({}), bytes(300 * 1024**2)], copy=False)
    time.sleep(1.0)
    _answers_promptly(frontend)
    # libzmq dropped the connection at the frame's size: the loop never saw the message.
    assert server.core.counters["requests_submitted"] == 0 and server.core.counters["protocol_errors"] == 0
