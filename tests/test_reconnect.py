"""Actors and agents outlive a broker restart: they notice the silence and say hello again."""

from __future__ import annotations

import threading
import time

import pytest

from actors.runtime import ActorConfig, ActorRuntime
from broker.server import BrokerConfig, BrokerServer
from clients import Client
from clients.local import free_port

pytestmark = pytest.mark.cluster


def _start_broker(frontend: str, backend: str) -> tuple[BrokerServer, threading.Thread]:
    server = BrokerServer(BrokerConfig(frontend_address=frontend, backend_address=backend, heartbeat_interval_s=0.1, heartbeat_misses=3))
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def _stop_broker(server: BrokerServer, thread: threading.Thread) -> None:
    server.stop()
    thread.join(5)
    server.close()


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(60)
def test_actors_say_hello_to_a_restarted_broker_and_serve_again():
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    server, thread = _start_broker(frontend, backend)
    models = ["CLIP_Flux", "T5_Flux", "Flux1Schnell", "Flux1VAE"]
    actors = [ActorRuntime(ActorConfig(model=m, broker_backend=backend, options={"time_scale": 0.0},
                                       heartbeat_interval_s=0.1, heartbeat_misses=3, reconnect_max_s=0.5))
              for m in models]
    actor_threads = [threading.Thread(target=a.run, daemon=True) for a in actors]
    for t in actor_threads:
        t.start()
    try:
        assert _wait(lambda: len(server.core.actors) == 4, 10)
        first_epochs = [a.session.epoch for a in actors]
        _stop_broker(server, thread)
        time.sleep(0.6)  # longer than interval x misses: every actor notices the silence
        server, thread = _start_broker(frontend, backend)
        assert _wait(lambda: len(server.core.actors) == 4, 15), "actors did not come back"
        assert all(a.session.epoch > e for a, e in zip(actors, first_epochs, strict=True))  # each started a new session
        with Client(frontend) as client:
            result = client.generate("flux-schnell-txt2img", prompt="again", steps=2, width=128, height=128, timeout=30)
        assert result.image.shape == (128, 128, 3)
    finally:
        for a in actors:
            a.stop()
        for t in actor_threads:
            t.join(5)
        _stop_broker(server, thread)
