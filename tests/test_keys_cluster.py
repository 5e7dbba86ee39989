"""A cluster with keys on (CurveZMQ, roles), as an operator runs it: processes started
with their key files, clients with theirs, and peers without the right key refused."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import zmq

from broker import auth
from broker import protocol as p
from broker.catalog.files import tomllib
from broker.journal import Journal
from clients import Client, LegoError, Timeout
from clients.local import LocalCluster, LocalClusterSpec, free_port

pytestmark = pytest.mark.cluster
WORKFLOW = "flux-schnell-txt2img"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("keys") / "run"
    spec = LocalClusterSpec(workflows=[WORKFLOW], options={"time_scale": 0.02}, keys=True, log_level="info",
                            run_dir=str(run_dir), scheduler=True, scheduler_args=["--admission", "false"],
                            journal=str(run_dir.parent / "journal.sqlite"))
    with LocalCluster(spec) as running:
        yield running


def test_a_client_key_generates_and_every_process_runs_with_keys(cluster):
    with Client(cluster.frontend, key_file=cluster.key_file("client")) as client:
        result = client.generate(WORKFLOW, prompt="a lighthouse", seed=3, steps=2, width=256, height=256, timeout=60)
        assert result.image.shape == (256, 256, 3)
    journal = Journal(cluster.run_dir.parent / "journal.sqlite")  # LocalClusterSpec.journal reached the broker
    try:
        deadline = time.monotonic() + 10  # the end is journaled as the result leaves, not before the client has it
        while journal.status(result.request_id) != "finished":
            assert time.monotonic() < deadline, f"journal says {journal.status(result.request_id)!r}"
            time.sleep(0.1)
    finally:
        journal.close()
    with Client(cluster.frontend, key_file=cluster.key_file("admin")) as admin:
        stats = admin.stats()
        assert stats.actors and stats.agents  # the agent and the actors joined with their keys
        deadline = time.monotonic() + 20
        while not admin.stats().plan:  # the scheduler posts its plan with its key
            assert time.monotonic() < deadline, "the scheduler never posted a plan"
            time.sleep(0.2)


def test_a_client_key_cannot_run_any_admin_command(cluster):
    with Client(cluster.frontend, key_file=cluster.key_file("client")) as client:
        actor = client.stats().actors[0].actor_id
        for call in (lambda: client.stop_actor(actor), lambda: client.drain_actor(actor),
                     lambda: client.configure({"admission": True}), lambda: client.pause_workflow(WORKFLOW),
                     lambda: client.spawn("Flux1VAE", "emu:0")):
            with pytest.raises(LegoError, match="forbidden"):
                call()


@pytest.mark.parametrize("role", [None, "actor", "agent"])
def test_no_key_or_a_key_of_another_role_gets_no_answer_on_the_client_port(cluster, role):
    key = cluster.key_file(role) if role else None
    with Client(cluster.frontend, key_file=key, admin_timeout_s=1.5) as stranger, pytest.raises(Timeout):
        stranger.stats()


@pytest.mark.parametrize("role", [None, "client", "admin"])
def test_the_actor_port_answers_no_one_without_an_actor_or_agent_key(cluster, role):
    context = zmq.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        if role:
            auth.load_key_file(cluster.key_file(role)).as_client(sock)
        # A peer without a valid key never completes the handshake, so between ZeroMQ's reconnect tries the
        # socket has no pipe and a blocking send would wait for ever: a send that cannot leave is a refusal too.
        sock.sndtimeo = 1500
        sock.connect(cluster.backend)
        try:
            sock.send_multipart([b"", *p.encode(p.AgentHello("intruder", "evil-host", 0, []))])
        except zmq.Again:
            return
        assert not sock.poll(1500), "an intruder was answered on the backend port"
    finally:
        context.destroy(linger=0)


def test_another_key_cannot_take_over_a_clients_routing_id(cluster):
    """Answers go to the routing id that submitted: a peer with another key that takes that
    id after the client left would get them (and could cancel its requests)."""
    context = zmq.Context()
    try:
        def speak_as(role: str, identity: bytes):
            sock = context.socket(zmq.DEALER)
            sock.linger = 0
            sock.setsockopt(zmq.ROUTING_ID, identity)
            auth.load_key_file(cluster.key_file(role)).as_client(sock)
            sock.connect(cluster.frontend)
            sock.send_multipart([b"", *p.encode(p.ListWorkflows(call_id="c1"))])
            assert sock.poll(10_000), "no answer"
            msg, _ = p.decode(sock.recv_multipart()[1:])
            sock.close(linger=0)
            return msg

        assert isinstance(speak_as("client", b"client-victim"), p.Workflows)
        time.sleep(0.3)  # the client is gone; its routing id is free at the ZeroMQ level
        refused = speak_as("admin", b"client-victim")
        assert isinstance(refused, p.Error) and refused.code == "forbidden" and "routing id" in refused.message
        assert isinstance(speak_as("client", b"client-victim"), p.Workflows)  # its own key still may
    finally:
        context.destroy(linger=0)


def test_no_secret_key_reaches_a_log(cluster):
    secrets = [tomllib.loads(path.read_text())["secret"] for name, path in cluster.keys.items()
               if name != "authorized"]
    logs = "".join(path.read_text(errors="replace") for path in (cluster.run_dir / "logs").glob("*.log"))
    assert "broker_keys_on" in logs  # the broker said keys are on
    assert not [s for s in secrets if s in logs]


def test_without_keys_the_broker_refuses_an_address_other_hosts_reach():
    proc = subprocess.run([sys.executable, "-m", "broker.server", "--frontend", f"tcp://0.0.0.0:{free_port()}",
                           "--backend", f"tcp://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--key-file" in proc.stderr and "loopback" in proc.stderr
