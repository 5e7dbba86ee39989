"""Emulated actors hosted on threads of the node agent (agent option `hosted_emulated`).

The agent's bookkeeping (started/exited events, device memory, max_actors_per_device,
stop_all) is driven directly, as tests/test_recovery_and_admin.py drives it; then an
in-process broker and agent serve real requests (so the emulated device can be watched
from the test), and a `LocalCluster` of real processes shows that the agent and all its
actors are one process whose log lines still name each actor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import psutil
import pytest
from process_helpers import idle_agent  # tests/ is on sys.path

from actors.agent import AgentConfig, NodeAgent
from actors.backends.emulated import EmulatedBackend
from actors.backends.emulated_gpu import EmulatedGpu
from actors.hosted import HostedActor, hostable
from broker import auth
from broker import protocol as p
from broker.catalog import load_catalog
from broker.server import BrokerConfig, BrokerServer
from clients import Client
from clients.bench.cluster import emulation_cpu_s
from clients.local import LocalCluster, LocalClusterSpec, free_port

WORKFLOW = "flux-schnell-txt2img"
MODELS = load_catalog().workflows[WORKFLOW].models  # CLIP, T5, the base model, the VAE
SIZE = {"width": 256, "height": 256}


def _events(agent: NodeAgent) -> list[p.AgentEvent]:
    events = [m for m in agent._outbox if isinstance(m, p.AgentEvent)]
    agent._outbox.clear()
    return events


def _reap_until(agent: NodeAgent, actor_id: str, timeout_s: float = 10.0) -> p.AgentEvent:
    deadline = time.monotonic() + timeout_s
    while actor_id in agent.children and time.monotonic() < deadline:
        agent.reap()
        time.sleep(0.05)
    (event,) = [e for e in _events(agent) if e.actor_id == actor_id and e.event == "exited"]
    return event


@pytest.fixture
def agent(tmp_path):
    with idle_agent(tmp_path, hosted_emulated=True) as node:
        yield node


# ------------------------------------------------------------------ what is hosted


def test_only_emulated_backends_off_real_gpus_without_process_faults_are_hosted():
    assert hostable("emulated", "emulated", {"time_scale": 0.1})
    assert hostable("monolith", "emulated", {})
    assert hostable("emulated", "cpu", {})
    assert not hostable("diffusers", "cpu", {})
    assert not hostable("noop", "cpu", {})  # it measures the runtime's own cost: a process of its own
    assert not hostable("emulated", "cuda", {})  # pinned by CUDA_VISIBLE_DEVICES, per process
    assert not hostable("emulated", "emulated", {"crash_on_prompt": "boom"})  # it exits the process


def test_hosting_is_off_by_default():
    assert AgentConfig().hosted_emulated is False


def test_the_device_lock_excludes_threads_of_one_process(tmp_path):
    """flock belongs to an open file description: two threads, each opening the lock, take turns."""
    lock = str(tmp_path / "emu-0.lock")
    gpus = [EmulatedGpu(lock, "fifo"), EmulatedGpu(lock, "fifo")]
    started = time.perf_counter()
    threads = [threading.Thread(target=lambda g=g: [g.compute(0.1) for _ in range(3)]) for g in gpus]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert time.perf_counter() - started >= 0.6 - 0.01  # six turns of 0.1 s, one at a time


# ------------------------------------------------------------------ the agent's bookkeeping


@pytest.mark.timeout(60)
def test_a_hosted_actor_starts_in_the_agents_process_and_stops_cleanly(agent, tmp_path):
    device = agent.devices["emu:0"]
    processes_before = psutil.Process().children(recursive=True)
    agent.spawn(p.SpawnActor("s-vae", "Flux1VAE", "emu:0", "emulated", 8, {"time_scale": 0.1}))
    (event,) = _events(agent)
    assert (event.spawn_id, event.event, event.pid) == ("s-vae", "started", os.getpid())
    child = agent.children[event.actor_id]
    assert isinstance(child.process, HostedActor) and child.pidfile is None
    assert list((tmp_path / "pids").iterdir()) == []
    assert device.free_bytes == device.memory_bytes - child.memory_bytes and child.memory_bytes > 0
    assert psutil.Process().children(recursive=True) == processes_before
    time.sleep(0.3)  # running: saying hello to a broker that is not there
    agent.reap()
    assert child.process.poll() is None and _events(agent) == []

    agent.stop_actor(event.actor_id)
    exited = _reap_until(agent, event.actor_id)

    assert (exited.spawn_id, exited.pid, exited.returncode) == ("s-vae", os.getpid(), 0)
    assert device.free_bytes == device.memory_bytes
    assert agent.children == {}


@pytest.mark.timeout(60)
def test_a_hosted_actor_whose_runtime_raises_exits_non_zero(agent, monkeypatch):
    def broken_load(self):
        raise RuntimeError("the weights are gone")

    monkeypatch.setattr(EmulatedBackend, "load", broken_load)
    agent.spawn(p.SpawnActor("s-bad", "Flux1VAE", "emu:0", "emulated", 8, {"time_scale": 0.1}))
    (started,) = _events(agent)
    assert started.event == "started"

    exited = _reap_until(agent, started.actor_id)

    assert exited.returncode not in (0, None)
    assert agent.devices["emu:0"].free_bytes == agent.devices["emu:0"].memory_bytes


@pytest.mark.timeout(60)
def test_hosted_actors_count_against_max_actors_per_device_and_stop_all_stops_them(tmp_path):
    config = AgentConfig(emulate_gpus=1, run_dir=str(tmp_path), broker_backend=f"tcp://127.0.0.1:{free_port()}",
                         max_actors_per_device=2, hosted_emulated=True)
    node = NodeAgent(config)
    try:
        for i in range(3):
            node.spawn(p.SpawnActor(f"s-{i}", "Flux1VAE", "emu:0", "emulated", 8, {"time_scale": 0.1}))
        events = _events(node)
        assert [e.event for e in events] == ["started", "started", "refused"]
        assert "max_actors_per_device" in events[2].message
        hosted = [child.process for child in node.children.values()]

        node.stop_all()

        assert node.children == {} and all(h.poll() == 0 for h in hosted)
        assert node.devices["emu:0"].free_bytes == node.devices["emu:0"].memory_bytes
    finally:
        node.stop_all()
        node.context.term()


@pytest.mark.timeout(60)
def test_hosted_actors_with_keys_on_run_side_by_side(tmp_path):
    """Keys on, each actor's data socket has a ZAP handler: one per context, so one context each."""
    keys = auth.make_cluster_keys(tmp_path / "keys")
    config = AgentConfig(emulate_gpus=1, run_dir=str(tmp_path), broker_backend=f"tcp://127.0.0.1:{free_port()}",
                         key_file=str(keys["agent"]), actor_key_file=str(keys["actor"]), hosted_emulated=True)
    node = NodeAgent(config)
    try:
        for i in range(2):
            node.spawn(p.SpawnActor(f"s-key-{i}", "Flux1VAE", "emu:0", "emulated", 8, {"time_scale": 0.1}))
        assert [e.event for e in _events(node)] == ["started", "started"]
        time.sleep(0.5)
        node.reap()
        assert _events(node) == [] and len(node.children) == 2  # both running, neither failed to bind
        hosted = [child.process for child in node.children.values()]
        node.stop_all()
        assert [h.poll() for h in hosted] == [0, 0]
    finally:
        node.stop_all()
        node.context.term()


# ------------------------------------------------------------------ serving, in process


@pytest.fixture
def device_turns(monkeypatch):
    """Every turn an emulated device was held, as (lock path, thread, start, end)."""
    turns: list[tuple[str, int, float, float]] = []
    locked = EmulatedGpu._locked

    @contextlib.contextmanager
    def recorded(self):
        with locked(self):
            start = time.monotonic()
            try:
                yield
            finally:
                turns.append((self.path, threading.get_ident(), start, time.monotonic()))

    monkeypatch.setattr(EmulatedGpu, "_locked", recorded)
    return turns


@pytest.fixture
def served(tmp_path):
    """A broker and a hosting agent, both on threads of this process."""
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    server = BrokerServer(BrokerConfig(frontend_address=frontend, backend_address=backend,
                                       heartbeat_interval_s=0.2, heartbeat_misses=5))
    server.bind()
    broker = threading.Thread(target=server.serve_forever, name="test-broker", daemon=True)
    broker.start()
    agent = NodeAgent(AgentConfig(emulate_gpus=1, run_dir=str(tmp_path), broker_backend=backend, host="localhost",
                                  hosted_emulated=True, log_level="warning"))
    runner = threading.Thread(target=agent.run, name="test-agent", daemon=True)
    runner.start()
    try:
        yield frontend, agent
    finally:
        agent.stop()
        runner.join(timeout=20)
        server.stop()
        broker.join(timeout=10)
        server.close()
    assert not runner.is_alive() and not broker.is_alive()


def _wait_for(client: Client, ready, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = client.stats(timeout=5.0)
        if ready(stats):
            return stats
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_hosted_actors_serve_requests_and_take_turns_on_their_device(served, device_turns):
    frontend, agent = served
    options = {"time_scale": 0.05, "device_sharing": "fifo"}
    with Client(frontend, admin_timeout_s=10.0) as client:
        _wait_for(client, lambda st: st.agents)
        for model in [*MODELS, "Flux1Schnell"]:  # two base-model actors: both busy under load
            client.spawn(model, "emu:0", "emulated", max_batch_rows=2, options=options)
        stats = _wait_for(client, lambda st: len(st.actors) == 5)
        assert {a.pid for a in stats.actors} == {os.getpid()}
        with ThreadPoolExecutor(6) as pool:
            jobs = [pool.submit(client.generate, WORKFLOW, prompt=f"p{i}", seed=i, steps=4, timeout=60, **SIZE)
                    for i in range(6)]
            images = [job.result().image for job in jobs]
        assert all(image.shape == (256, 256, 3) for image in images)
        (agent_stats,) = client.stats().agents
        spawn_ids = [spawn_id for spawn_id, _ in agent_stats.actors]
        for actor_id in list(agent.children):
            client.stop_actor(actor_id)
        _wait_for(client, lambda st: not st.actors and {s for _, s in st.agents[0].actors} == {"exited"})
    assert len(spawn_ids) == 5
    assert len({thread for _, thread, _, _ in device_turns}) >= 4  # every model computed, each on its own thread
    turns = sorted(device_turns, key=lambda t: t[2])
    overlaps = [(a, b) for a, b in pairwise(turns) if b[2] < a[3]]
    assert overlaps == [], "two actors computed on one emulated device at once"


# ------------------------------------------------------------------ a cluster of real processes


def _actor_processes(agent: psutil.Process) -> list[psutil.Process]:
    """The agent's children that run actors (not multiprocessing's resource tracker)."""
    return [c for c in agent.children(recursive=True) if "actors" in c.cmdline()]


@pytest.mark.cluster
@pytest.mark.timeout(120)
@pytest.mark.parametrize("hosted", [True, False], ids=["hosted", "processes"])
def test_the_bench_cluster_hosts_actors_in_the_agent_and_counts_the_cpu_it_uses(tmp_path, hosted):
    spec = LocalClusterSpec(workflows=[WORKFLOW], options={"time_scale": 0.05}, emulate_gpus=2,
                            heartbeat_interval_s=0.2, heartbeat_misses=5, run_dir=str(tmp_path / "run"),
                            log_level="info")
    with LocalCluster(dataclasses.replace(spec, hosted_emulated=hosted)) as cluster, Client(cluster.frontend) as client:
        cpu_before = emulation_cpu_s(cluster)
        # a few requests: one 2-step request can fit inside psutil's 10 ms CPU tick (seen: 0.0 s)
        for seed in range(4):
            result = client.generate(WORKFLOW, prompt="one process", seed=seed, steps=4, timeout=60, **SIZE)
        cpu_s = emulation_cpu_s(cluster) - cpu_before
        agent = psutil.Process(cluster.processes["agent"].pid)
        actors = _actor_processes(agent)
        stats = client.stats()
    assert result.image.shape == (256, 256, 3) and cpu_s > 0
    assert len(stats.actors) == len(MODELS)
    if not hosted:
        assert len(actors) == len(MODELS) and {a.pid for a in stats.actors} == {a.pid for a in actors}
        return
    assert actors == [] and {a.pid for a in stats.actors} == {agent.pid}
    log = (tmp_path / "run" / "logs" / "agent.log").read_text()
    for actor in stats.actors:  # each hosted actor's lines still name it
        assert f"actor_id={actor.actor_id}" in log
    welcomed = [line for line in log.splitlines() if "actor_welcomed" in line]
    assert len(welcomed) >= len(MODELS) and all("actor_id=" in line for line in welcomed)
    assert not list((tmp_path / "run" / "logs").glob("actor-*.log"))
    assert not psutil.pid_exists(agent.pid) or agent.status() == psutil.STATUS_ZOMBIE
