"""An actor that cannot read a TASKS message fails that batch back (issue 13).

Before, the actor only logged the protocol error: the broker kept the batch "in flight"
for ever, with the actor's credit. Here a real ActorRuntime (emulated backend) talks to a
bare ROUTER playing the broker.
"""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import zmq

from actors.runtime import ActorConfig, ActorRuntime
from broker import protocol as p
from broker.protocol import PROTOCOL_TAG, Command
from clients.local import free_port

pytestmark = pytest.mark.cluster


def _next(sock: zmq.Socket, cls: type, timeout_s: float = 10.0):
    """The next message of type `cls` from any peer: (identity, message)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            identity, _, *frames = sock.recv_multipart()
            msg, _ = p.decode(frames)
            if isinstance(msg, cls):
                return identity, msg
    raise AssertionError(f"no {cls.__name__} within {timeout_s}s")


@pytest.mark.timeout(60)
def test_an_unreadable_batch_is_failed_back_with_its_id_and_the_credit():
    context = zmq.Context()
    broker = context.socket(zmq.ROUTER)
    broker.linger = 0
    backend = f"tcp://127.0.0.1:{free_port()}"
    broker.bind(backend)
    actor = ActorRuntime(ActorConfig(model="Flux1VAE", broker_backend=backend, options={"time_scale": 0.0},
                                     heartbeat_interval_s=0.2, heartbeat_misses=50))
    thread = threading.Thread(target=actor.run, daemon=True)
    thread.start()
    try:
        identity, hello = _next(broker, p.ActorHello)
        broker.send_multipart([identity, b"", *p.encode(p.Welcome("fake-broker", 0.2, 50))])
        time.sleep(0.3)  # the welcome is read before the batch
        task = {"task_id": "r1/decode", "request_id": "r1", "attempt": 0, "node": "decode", "kind": "no-such-kind",
                "model": "Flux1VAE", "workflow": "wf", "rows": 1, "shape": [64, 64], "params": {}, "inputs": [],
                "output_id": "o"}
        header = msgpack.packb({"batch_id": 41, "tasks": [task]})
        broker.send_multipart([identity, b"", PROTOCOL_TAG, Command.TASKS.value, header])

        _, failed = _next(broker, p.BatchFailed)
        assert failed.batch_id == 41 and failed.credits == 1
        assert failed.code == "bad_header" and "kind" in failed.message
        assert hello.actor_id == actor.actor_id
    finally:
        actor.stop()
        thread.join(5)
        context.destroy(linger=0)
