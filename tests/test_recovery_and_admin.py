"""Recovery and admin behaviours added recently: partial batch answers, failed batches
re-run solo, stale/unknown batches, unreachable actors, session-checked heartbeats,
admin validation and call ids, the node agent's refusals, and the client's admin routing
and shutdown.

The broker-core tests drive `BrokerCore` with message objects and an explicit `now`
(same catalog and helpers as tests/test_broker_core.py, copied here so that this file
does not depend on tests/ being importable). The agent tests call `NodeAgent.spawn`
directly and read its outbox. The client tests run an in-process `BrokerServer` in a
thread with no actors at all.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from broker_helpers import (  # tests/ is on sys.path
    AGENT,
    CLIENT,
    batches,
    done,
    failed,
    freed,
    hello,
    hello_agent,
    ident,
    make_core,
    of,
    only_batch,
    result_of,
    run,
    standard_actors,
    started,
    submit,
    task_ids,
)
from process_helpers import idle_agent  # tests/ is on sys.path

from actors.agent import AgentConfig, NodeAgent
from broker import protocol as p
from broker.core.machine import BACKEND, FRONTEND
from broker.core.state import DONE, RUNNING, WAITING
from broker.protocol.constants import DEFAULT_LIMITS
from broker.protocol.errors import ErrorCode
from broker.server import BrokerConfig, BrokerServer
from clients import Client, RequestFailed, RequestRejected
from clients.local import free_port


def two_requests_in_one_denoise_batch():
    """r1 and r2 (plain) have their encodings; den-1 (2 rows) got both first steps in one batch."""
    core = make_core()
    submit(core, "r1")
    submit(core, "r2")
    sends = run(core, standard_actors(core, den_credits=0, den_rows=2))
    assert batches(sends, "den-1") == []
    batch = only_batch(core.on_backend(ident("den-1"), p.Credit(1), [], 1.0), "den-1")
    assert task_ids(batch) == ["r1/denoise/0", "r2/denoise/0"]
    assert core.actors["den-1"].credits == 0
    return core, batch


def state_of(core) -> dict:
    """Everything observable about the live requests and actors, for "nothing changed" checks."""
    return {
        "counters": dict(core.counters),
        "nodes": {tid: (n.state, n.attempt, n.actor_id, n.solo) for tid, n in core.tasks.items()},
        "actors": {a.actor_id: (a.identity, a.credits, sorted(a.in_flight), sorted(a.held)) for a in core.actors.values()},
        "queues": {m: q.depth for m, q in core.queues.items()},
    }


# ------------------------------------------------------------------ 1-2: BatchDone with `missing`


def test_missing_task_restarts_only_its_request_and_both_complete():
    core, batch = two_requests_in_one_denoise_batch()
    r1_task, r2_task = batch.tasks
    payload: list = []
    msg = p.BatchDone(batch.batch_id, [result_of(r2_task, payload)], missing=[r1_task.task_id],
                      missing_reason="holder enc-a-1 freed it")

    sends = core.on_backend(ident("den-1"), msg, payload, 2.0)

    # r2's step completed normally and its next step went out
    r2 = core.requests["r2"]
    assert r2.nodes["denoise/0"].state == DONE
    assert r2.restarts == 0
    assert [(e.request_id, e.node) for e in of(sends, p.Progress, CLIENT)] == [("r2", "denoise/0")]
    # only r1 was restarted: re-armed from its encode, everything else waiting again
    assert core.counters["requests_restarted"] == 1
    assert core.counters["tasks_requeued"] == 0
    r1 = core.requests["r1"]
    assert r1.restarts == 1 and r1.done_nodes == 0
    assert r1.nodes["encode/enc-a"].state == RUNNING  # enc-a-1 had its credit back
    assert r1.nodes["encode/enc-a"].attempt == 1
    assert {k: n.state for k, n in r1.nodes.items() if k != "encode/enc-a"} == {
        "denoise/0": WAITING, "denoise/1": WAITING, "decode": WAITING}
    (enc,) = batches(sends, "enc-a-1")
    assert [(t.task_id, t.attempt) for t in enc.tasks] == [("r1/encode/enc-a", 1)]
    # r1's old encoding is dropped (restart), r2's because its only consumer is done
    assert sorted(freed(sends, "enc-a-1")) == ["r1/encode/enc-a@0", "r2/encode/enc-a@0"]
    den_next = [tid for b in batches(sends, "den-1") for tid in task_ids(b)]
    assert den_next == ["r2/denoise/1"]
    assert of(sends, p.Failed) == []

    results = {r.request_id: r for r in of(run(core, sends, now=3.0), p.Result, CLIENT)}
    assert set(results) == {"r1", "r2"}
    assert results["r1"].attempts == 2
    assert results["r2"].attempts == 1
    assert core.requests == {} and core.tasks == {}
    assert core.counters["requests_completed"] == 2
    assert core.counters["requests_restarted"] == 1


def test_missing_task_of_a_cancelled_request_restarts_nothing():
    core, batch = two_requests_in_one_denoise_batch()
    r1_task, r2_task = batch.tasks
    (cancelled,) = of(core.on_frontend(CLIENT, p.Cancel("r1"), [], 1.5), p.Failed, CLIENT)
    assert cancelled.code == "cancelled"
    payload: list = []
    msg = p.BatchDone(batch.batch_id, [result_of(r2_task, payload)], missing=[r1_task.task_id], missing_reason="gone")

    sends = core.on_backend(ident("den-1"), msg, payload, 2.0)

    assert core.counters["requests_restarted"] == 0
    assert core.counters["tasks_requeued"] == 0
    assert "r1" not in core.requests
    assert not any(t.request_id == "r1" for b in of(sends, p.Tasks) for t in b.tasks)
    assert of(sends, p.Failed) == []  # r1 was already answered once
    assert core.requests["r2"].nodes["denoise/0"].state == DONE
    assert core.actors["den-1"].credits == 0  # the credit came back and r2's next step took it
    results = of(run(core, sends, now=3.0), p.Result, CLIENT)
    assert [r.request_id for r in results] == ["r2"]


# ------------------------------------------------------------------ 3: BatchFailed task_error


def test_task_error_of_a_shared_batch_reruns_each_task_alone_then_fails_only_the_solo_one():
    core, batch = two_requests_in_one_denoise_batch()

    sends = failed(core, "den-1", batch, ErrorCode.TASK_ERROR.value, now=2.0)

    assert of(sends, p.Failed) == []
    assert core.counters["requests_failed"] == 0
    assert set(core.requests) == {"r1", "r2"}
    assert core.counters["tasks_requeued"] == 2
    for request_id in ("r1", "r2"):
        node = core.requests[request_id].nodes["denoise/0"]
        assert node.solo is True
        assert node.attempt == 1
    # The credit came back: one batch, with one task although max_batch_rows=2 allows both
    first = only_batch(sends, "den-1")
    assert [(t.task_id, t.attempt) for t in first.tasks] == [("r1/denoise/0", 1)]
    # ... and nothing joins a solo task on its actor, even with a credit to spare
    assert batches(core.on_backend(ident("den-1"), p.Credit(1), [], 2.5), "den-1") == []
    assert core.actors["den-1"].max_batch_rows == 2

    # Alone, the error is the task's own: r1 fails with task_error, r2 is untouched and runs next
    sends = failed(core, "den-1", first, ErrorCode.TASK_ERROR.value, now=3.0)

    (failed_msg,) = of(sends, p.Failed, CLIENT)
    assert (failed_msg.request_id, failed_msg.code) == ("r1", "task_error")
    assert "r1" not in core.requests
    assert core.counters["requests_failed"] == 1
    assert core.counters["tasks_requeued"] == 2
    second = only_batch(sends, "den-1")
    assert [(t.task_id, t.attempt) for t in second.tasks] == [("r2/denoise/0", 1)]
    assert core.requests["r2"].nodes["denoise/0"].state == RUNNING
    results = of(run(core, done(core, "den-1", second, now=4.0), now=4.0), p.Result, CLIENT)
    assert [r.request_id for r in results] == ["r2"]


# ------------------------------------------------------------------ 4: unknown batches


@pytest.mark.parametrize("answer", ["done", "failed"])
def test_unknown_batch_returns_no_credit_and_changes_nothing(answer):
    core, batch = two_requests_in_one_denoise_batch()
    before = state_of(core)
    if answer == "done":
        msg = p.BatchDone(batch.batch_id + 1000, [], credits=1)
    else:
        msg = p.BatchFailed(batch.batch_id + 1000, ["r1/denoise/0"], [0], ErrorCode.TASK_ERROR.value, "boom", credits=1)

    sends = core.on_backend(ident("den-1"), msg, [], 2.0)

    assert sends == []
    assert core.actors["den-1"].credits == 0
    assert state_of(core) == before


def test_repeated_batch_answer_returns_no_second_credit():
    core, batch = two_requests_in_one_denoise_batch()
    run(core, done(core, "den-1", batch, now=2.0), now=2.0, dead={"den-1"})
    credits = core.actors["den-1"].credits
    before = state_of(core)

    again = done(core, "den-1", batch, now=3.0)

    assert again == []
    assert core.actors["den-1"].credits == credits
    assert state_of(core) == before


def test_restarts_a_suspected_poison_causes_do_not_count_against_its_victims():
    """An encoder actor dies running a task that already killed an actor (a suspect,
    solo): the requests that only lose the embeddings it held restart without coming
    nearer to max_request_restarts; the same loss without a suspect counts."""
    for suspect in (True, False):
        core = make_core()
        started(core, "r1", den=("den-1",))  # r1's embedding is held on enc-a-1, its step 0 on den-1
        sends = submit(core, "r2")
        (batch,) = batches(sends, "enc-a-1")
        node = core.requests["r2"].nodes[batch.tasks[0].task_id.split("/", 1)[1]]
        node.solo, node.losses = suspect, int(suspect)
        core.on_unreachable(BACKEND, ident("enc-a-1"), 1.0)
        assert core.requests["r1"].restarts == 1
        assert core.requests["r1"].forgiven == int(suspect)


# ------------------------------------------------------------------ 5: unreachable peers


def test_an_actor_its_agent_reports_exited_is_lost_at_once_and_its_work_goes_elsewhere():
    """No waiting for a failed send or missed heartbeats: the agent saw the process end."""
    core = make_core()
    hello_agent(core)
    _, step0 = started(core, den=("den-a", "den-b"))
    holder = next(a for a in ("den-a", "den-b") if core.actors[a].in_flight)
    other = "den-b" if holder == "den-a" else "den-a"
    sends = core.on_backend(AGENT, p.AgentEvent("s1", "exited", actor_id=holder, returncode=-9), [], 0.5)
    assert holder not in core.actors and core.counters["actors_lost"] == 1
    retry = only_batch(sends, other)
    assert task_ids(retry) == task_ids(step0)
    # another host's agent cannot declare this host's actor dead
    core.on_backend(b"agent-2", p.AgentHello("agent-2", "host-2", 7, []), [], 0.6)
    core.on_backend(b"agent-2", p.AgentEvent("s2", "exited", actor_id=other, returncode=0), [], 0.7)
    assert other in core.actors



def test_unreachable_actor_is_lost_and_its_work_requeued():
    core = make_core()
    _, step0 = started(core, den=("den-a", "den-b"))

    sends = core.on_unreachable(BACKEND, ident("den-a"), 1.0)

    assert core.counters["actors_lost"] == 1
    assert "den-a" not in core.actors and ident("den-a") not in core.actor_by_identity
    retry = only_batch(sends, "den-b")
    assert task_ids(retry) == task_ids(step0) == ["r1/denoise/0"]
    assert retry.tasks[0].attempt == step0.tasks[0].attempt + 1
    assert core.counters["tasks_requeued"] == 1
    results = of(run(core, sends, now=2.0), p.Result, CLIENT)
    assert [r.request_id for r in results] == ["r1"]


@pytest.mark.parametrize(("socket", "identity"), [(BACKEND, b"ghost"), (FRONTEND, b"den-a"), (FRONTEND, CLIENT)])
def test_unreachable_unknown_peer_or_frontend_changes_nothing(socket, identity):
    core = make_core()
    started(core, den=("den-a", "den-b"))
    before = state_of(core)

    sends = core.on_unreachable(socket, identity, 1.0)

    assert sends == []
    assert core.counters["actors_lost"] == 0
    assert state_of(core) == before
    assert "r1" in core.requests


# ------------------------------------------------------------------ 6: heartbeat sessions


def test_heartbeat_for_a_stale_session_is_disconnected_and_does_not_keep_the_actor_alive():
    core = make_core()
    hello(core, "den-1", "den", now=0.0)

    sends = core.on_backend(b"den-1-control", p.Heartbeat(sent_at=2.0, actor_id="den-1", session="old-session"), [], 2.0)

    assert [(s.socket, s.identity, type(s.msg)) for s in sends] == [(BACKEND, b"den-1-control", p.Disconnect)]
    assert "old-session" in sends[0].msg.reason
    assert core.actors["den-1"].last_seen == 0.0
    assert core.counters["actors_lost"] == 0  # the current session is not touched

    sends = core.on_backend(b"den-1-control", p.Heartbeat(sent_at=2.5, actor_id="den-1", session="den-1"), [], 2.5)

    assert [(s.socket, s.identity, type(s.msg)) for s in sends] == [(BACKEND, b"den-1-control", p.Heartbeat)]
    assert core.actors["den-1"].last_seen == 2.5


def test_only_current_session_pings_keep_an_actor_alive():
    core = make_core()
    hello(core, "den-1", "den", now=0.0)
    hello(core, "den-2", "den", now=0.0)
    for now in (1.0, 2.0, 3.0, 4.0):
        core.on_backend(b"c1", p.Heartbeat(sent_at=now, actor_id="den-1", session="den-1"), [], now)
        core.on_backend(b"c2", p.Heartbeat(sent_at=now, actor_id="den-2", session="stale"), [], now)
        core.on_tick(now)
    assert set(core.actors) == {"den-1"}
    assert core.counters["actors_lost"] == 1


# ------------------------------------------------------------------ 7: admin validation and call ids


def _spawn(core, call_id="", **kwargs) -> tuple[p.AdminReply, list[p.SpawnActor]]:
    fields = {"model": "den", "device": "cpu", "backend": "emulated", "call_id": call_id, **kwargs}
    sends = core.on_frontend(CLIENT, p.AdminSpawn(**fields), [], 0.0)
    (reply,) = of(sends, p.AdminReply, CLIENT)
    return reply, of(sends, p.SpawnActor, AGENT)


def test_admin_spawn_refuses_zero_batch_rows():
    core = make_core()
    hello_agent(core)
    reply, spawns = _spawn(core, call_id="c-rows", max_batch_rows=0)
    assert reply.ok is False
    assert "max_batch_rows" in reply.message
    assert reply.call_id == "c-rows"
    assert spawns == []


@pytest.mark.parametrize(("options", "key"), [({"profile": [1]}, "profile"), ({"x": True}, "x"),
                                              ({"a": {"b": 1}}, "a"), ({"k=v": "1"}, "k=v")])
def test_admin_spawn_refuses_options_that_are_not_strings_or_numbers(options, key):
    core = make_core()
    hello_agent(core)
    reply, spawns = _spawn(core, call_id="c-opt", options=options)
    assert reply.ok is False
    assert reply.message.startswith(f"options.{key}")
    assert reply.call_id == "c-opt"
    assert spawns == []
    assert core.agents[AGENT].actors == {}


def test_admin_spawn_accepts_string_and_number_options_and_echoes_the_call_id():
    core = make_core()
    hello_agent(core)
    options = {"profile": "Flux1VAE", "time_scale": 0.5, "lora_resident": 2}
    reply, spawns = _spawn(core, call_id="c-ok", options=options, count=2)
    assert reply.ok is True
    assert reply.call_id == "c-ok"
    assert [s.options for s in spawns] == [options] * 2
    assert reply.spawn_ids == [s.spawn_id for s in spawns]


@pytest.mark.parametrize(("fields", "field"), [
    # Each reached the actor unchecked before (issue 13): a directory made anywhere, any
    # JSON file read, an option no backend knows, 1,024 actors per call.
    ({"options": {"device_lock": "/etc/lego/x.lock"}}, "options.device_lock"),
    ({"options": {"profile": "../../etc/passwd"}}, "options.profile"),
    ({"options": {"profile": "/tmp/profile"}}, "options.profile"),
    ({"options": {"n": 2}}, "options.n"),
    ({"options": {"time_scale": -1}}, "options.time_scale"),
    ({"options": {"time_scale": "nan"}}, "options.time_scale"),
    ({"options": {"batching": "fused"}}, "options.batching"),  # a diffusers option, not an emulated one
    ({"backend": "diffusers", "options": {"time_scale": 0.5}}, "options.time_scale"),
    ({"backend": "python-eval"}, "backend"),
    ({"count": 1024}, "count"),
])
def test_admin_spawn_takes_only_the_options_its_backend_declares(fields, field):
    core = make_core()
    hello_agent(core)
    reply, spawns = _spawn(core, call_id="c-bad", **fields)
    assert reply.ok is False and reply.field == field, reply
    assert spawns == []


def test_list_workflows_and_stats_echo_the_call_id():
    core = make_core()
    (workflows,) = of(core.on_frontend(CLIENT, p.ListWorkflows(call_id="c-wf"), [], 0.0), p.Workflows, CLIENT)
    (stats,) = of(core.on_frontend(CLIENT, p.GetStats(call_id="c-st"), [], 0.0), p.Stats, CLIENT)
    assert workflows.call_id == "c-wf"
    assert {w.name for w in workflows.workflows} == {"plain", "guided"}
    assert stats.call_id == "c-st"
    (plain,) = of(core.on_frontend(CLIENT, p.GetStats(), [], 0.0), p.Stats, CLIENT)
    assert plain.call_id == ""


def test_spawn_ids_of_two_brokers_never_collide():
    ids = []
    for _ in range(2):
        core = make_core(broker_id=f"broker-{uuid.uuid4().hex[:8]}")
        hello_agent(core)
        first, _ = _spawn(core, count=3)
        second, _ = _spawn(core, count=2)
        assert first.ok and second.ok
        ids.append(first.spawn_ids + second.spawn_ids)
        assert len(set(ids[-1])) == 5
        assert all(i.startswith(core.broker_id) for i in ids[-1])
    assert set(ids[0]).isdisjoint(ids[1])


# ------------------------------------------------------------------ 8: repeated hello


def test_repeated_hello_from_the_same_identity_keeps_the_actor_and_its_work():
    core = make_core()
    _, step0 = started(core)
    in_flight = dict(core.actors["den-1"].in_flight)

    sends = hello(core, "den-1", "den", now=1.0)

    assert [(s.identity, type(s.msg)) for s in sends] == [(ident("den-1"), p.Welcome)]
    assert core.counters["actors_lost"] == 0
    assert core.counters["tasks_requeued"] == 0
    assert core.actors["den-1"].in_flight == in_flight
    assert core.requests["r1"].nodes["denoise/0"].state == RUNNING
    assert core.requests["r1"].nodes["denoise/0"].attempt == step0.tasks[0].attempt
    results = of(run(core, done(core, "den-1", step0, now=2.0), now=2.0), p.Result, CLIENT)
    assert [r.attempts for r in results] == [1]


def test_hello_from_a_new_identity_loses_the_old_session_and_requeues_its_work():
    core = make_core()
    _, step0 = started(core)
    new = b"den-1-session-2"

    sends = hello(core, "den-1", "den", now=1.0, identity=new)

    assert core.counters["actors_lost"] == 1
    (disconnect,) = of(sends, p.Disconnect, ident("den-1"))
    assert "new session" in disconnect.reason
    assert of(sends, p.Welcome, new)
    assert ident("den-1") not in core.actor_by_identity
    assert core.actor_by_identity[new].actor_id == "den-1"
    (retry,) = of(sends, p.Tasks, new)
    assert [(t.task_id, t.attempt) for t in retry.tasks] == [("r1/denoise/0", step0.tasks[0].attempt + 1)]
    # the old session's late answer is refused; the new one completes the request
    late = done(core, "den-1", step0, now=1.5)
    assert [(s.identity, type(s.msg)) for s in late] == [(ident("den-1"), p.Disconnect)]
    results = of(run(core, done(core, "den-1", retry, now=2.0, identity=new), now=2.0), p.Result, CLIENT)
    assert [r.request_id for r in results] == ["r1"]


# ------------------------------------------------------------------ node agent


@pytest.fixture
def agent(tmp_path):
    with idle_agent(tmp_path) as node:
        yield node


def _events(agent) -> list[p.AgentEvent]:
    events = [m for m in agent._outbox if isinstance(m, p.AgentEvent)]
    agent._outbox.clear()
    return events


def test_agent_refuses_a_non_string_profile_option(agent):
    agent.spawn(p.SpawnActor("s-prof", "Flux1VAE", "emu:0", "emulated", 8, {"profile": 1}))
    (event,) = _events(agent)
    assert (event.spawn_id, event.event) == ("s-prof", "refused")
    assert event.message.startswith("options")
    assert agent.children == {}
    assert agent.devices["emu:0"].free_bytes == agent.devices["emu:0"].memory_bytes


@pytest.mark.parametrize("options", [{"device_lock": "/tmp/elsewhere/x.lock"}, {"profile": "/etc/passwd"}, {"x": 1}])
def test_agent_checks_the_options_again_whatever_the_broker_let_through(agent, options, tmp_path):
    agent.spawn(p.SpawnActor("s-opt", "Flux1VAE", "emu:0", "emulated", 8, options))
    (event,) = _events(agent)
    assert event.event == "refused" and event.message.startswith("options.")
    assert agent.children == {} and not (tmp_path / "elsewhere").exists()


def test_agent_refuses_more_actors_on_a_device_than_max_actors_per_device(tmp_path):
    config = AgentConfig(emulate_gpus=1, run_dir=str(tmp_path), broker_backend=f"tcp://127.0.0.1:{free_port()}",
                         max_actors_per_device=0)
    node = NodeAgent(config)
    try:
        node.spawn(p.SpawnActor("s-many", "Flux1VAE", "cpu", "noop", 4))
        (event,) = _events(node)
        assert event.event == "refused" and "max_actors_per_device" in event.message
    finally:
        node.stop_all()
        node.context.term()


def test_agent_refuses_an_unknown_device(agent):
    agent.spawn(p.SpawnActor("s-dev", "Flux1VAE", "cuda:7", "emulated"))
    (event,) = _events(agent)
    assert (event.spawn_id, event.event) == ("s-dev", "refused")
    assert event.message.startswith("device")
    assert "cuda:7" in event.message
    assert agent.children == {}


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_agent_refuses_a_duplicate_spawn_id_and_stops_its_child(agent, tmp_path):
    agent.spawn(p.SpawnActor("s-dup", "Flux1VAE", "cpu", "noop", 4))
    (event,) = _events(agent)
    assert (event.spawn_id, event.event) == ("s-dup", "started")
    (child,) = agent.children.values()
    assert child.actor_id == event.actor_id and child.process.pid == event.pid
    assert child.pidfile.exists() and child.pidfile.read_text().strip() == str(event.pid)
    assert child.process.poll() is None

    agent.spawn(p.SpawnActor("s-dup", "Flux1VAE", "cpu", "noop", 4))

    (again,) = _events(agent)
    assert (again.spawn_id, again.event) == ("s-dup", "refused")
    assert again.message.startswith("spawn_id")
    assert list(agent.children.values()) == [child]

    agent.stop_all()

    assert child.process.poll() is not None
    assert not child.pidfile.exists()
    assert agent.children == {}
    assert list((tmp_path / "pids").iterdir()) == []


# ------------------------------------------------------------------ client (in-process broker, no actors)


@pytest.fixture(scope="module")
def broker():
    frontend = f"tcp://127.0.0.1:{free_port()}"
    backend = f"tcp://127.0.0.1:{free_port()}"
    server = BrokerServer(BrokerConfig(frontend_address=frontend, backend_address=backend,
                                       heartbeat_interval_s=0.2, heartbeat_misses=5))
    server.bind()
    thread = threading.Thread(target=server.serve_forever, name="test-broker-admin", daemon=True)
    thread.start()
    try:
        yield frontend
    finally:
        server.stop()
        thread.join(timeout=10)
        server.close()
    assert not thread.is_alive(), "the broker thread did not stop"


@pytest.fixture
def client(broker):
    with Client(broker, submit_timeout_s=10.0, admin_timeout_s=10.0) as c:
        yield c


@pytest.mark.timeout(60)
def test_concurrent_admin_calls_get_their_own_replies(client):
    n = 50
    errors: list = []
    kinds: dict[str, list] = {"stats": [], "workflows": []}

    def work(kind):
        try:
            for _ in range(n):
                kinds[kind].append(client.stats() if kind == "stats" else client.workflows())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in kinds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(kinds["stats"]) == len(kinds["workflows"]) == n
    assert all(isinstance(s, p.Stats) for s in kinds["stats"])
    for listing in kinds["workflows"]:
        assert isinstance(listing, list) and listing
        assert all(isinstance(w, p.WorkflowInfo) for w in listing)
    assert client._core.admin_waiters == {}


@pytest.mark.timeout(60)
def test_a_forgotten_admin_call_does_not_shift_later_replies(client):
    core = client._core
    entered, release = threading.Event(), threading.Event()

    def blocker(reply):  # runs on the IO thread: holds it until the forgotten call is set up
        entered.set()
        release.wait(10)

    core.admin(p.GetStats(), blocker)
    assert entered.wait(10)
    forgotten: list = []
    call_id = core.admin(p.GetStats(), forgotten.append)
    core.forget_admin(call_id)
    assert call_id not in core.admin_waiters
    release.set()

    # the forgotten call's reply comes back first (same connection, answered in order)
    workflows = client.workflows()
    stats = client.stats()

    assert isinstance(workflows, list) and all(isinstance(w, p.WorkflowInfo) for w in workflows)
    assert isinstance(stats, p.Stats)
    assert forgotten == []
    assert core.admin_waiters == {}


@pytest.mark.timeout(60)
def test_oversized_prompt_is_rejected_at_submit_without_registering_a_job(client):
    prompt = "x" * (5 * 1024 * 1024)
    assert len(prompt) > DEFAULT_LIMITS.max_header_bytes
    with pytest.raises(RequestRejected) as err:
        client.submit("flux-dev-txt2img", request_id="too-big", prompt=prompt)
    assert err.value.field == "params"
    assert err.value.request_id == "too-big"
    assert "too-big" not in client._core.jobs
    assert client._core.jobs == {}
    # the client still works, and the id can be used again
    job = client.submit("flux-dev-txt2img", request_id="too-big", prompt="small", width=128, height=128, steps=2)
    job.cancel()
    with pytest.raises(RequestFailed):
        job.result(timeout=10)


@pytest.mark.timeout(60)
def test_closing_the_client_fails_outstanding_jobs(broker):
    client = Client(broker, submit_timeout_s=10.0)
    try:
        # Flux1Dev has no actor: the request is accepted and queues forever
        job = client.submit("flux-dev-txt2img", prompt="never runs", width=128, height=128, steps=2)
        assert not job.done()
    finally:
        client.close()
    with pytest.raises(RequestFailed) as err:
        job.result(timeout=5)
    assert err.value.code == "client_closed"
    assert err.value.request_id == job.request_id
    assert job.done()
    assert client._core.jobs == {}


@pytest.mark.timeout(60)
def test_progress_after_the_end_returns_at_once(client):
    job = client.submit("flux-dev-txt2img", prompt="cancel me", width=128, height=128, steps=2)
    job.cancel()
    with pytest.raises(RequestFailed):
        job.result(timeout=10)
    first = list(job.progress(timeout=5))
    assert all(e.kind == "encode" for e in first)

    out: list = []
    reader = threading.Thread(target=lambda: out.append(list(job.progress())), daemon=True)
    started_at = time.monotonic()
    reader.start()
    reader.join(timeout=5)
    assert not reader.is_alive(), "a second progress() after the end blocked"
    assert out == [[]]
    assert time.monotonic() - started_at < 1.0
