"""Every accepted request ends (issue 13): a request nobody can finish fails typed
instead of waiting for ever, and a second process cannot take a live actor's slot.

Broker-core tests: `BrokerCore` driven with message objects and an explicit `now`
(tests/broker_helpers.py). Today's code (before broker/core/expiry.py) leaves every
request below "in flight" for good and lets any hello take a live actor's id.
"""

from __future__ import annotations

import dataclasses

from broker_helpers import (  # tests/ is on sys.path
    CLIENT,
    SETTINGS,
    beat,
    hello,
    hello_agent,
    ident,
    make_core,
    of,
    run,
    started,
    submit,
)

from broker import protocol as p

SHORT = dataclasses.replace(SETTINGS, request_timeout_s=30.0, orphan_timeout_s=8.0)
ALL = ("enc-a-1", "enc-b-1", "vae-1", "den-1")


def _failures(sends) -> dict[str, p.Failed]:
    return {f.request_id: f for f in of(sends, p.Failed, CLIENT)}


def test_a_request_unfinished_past_request_timeout_fails_deadline_exceeded():
    core = make_core(SHORT)
    submit(core, "r1", now=0.0)  # no actor ever joins, and no orphan rule (never had one)...
    submit(core, "r2", now=20.0)
    core.settings = dataclasses.replace(SHORT, orphan_timeout_s=0.0)  # ...so only the timeout can end them

    assert _failures(core.on_tick(29.9)) == {}
    first = _failures(core.on_tick(30.0))
    assert list(first) == ["r1"]
    assert first["r1"].code == "deadline_exceeded" and "request_timeout_s = 30" in first["r1"].message
    assert list(_failures(core.on_tick(50.0))) == ["r2"]
    assert core.requests == {} and core.counters["requests_expired"] == 2


def test_request_timeout_zero_means_never():
    core = make_core(dataclasses.replace(SHORT, request_timeout_s=0.0, orphan_timeout_s=0.0))
    submit(core, "r1", now=0.0)
    assert _failures(core.on_tick(10_000.0)) == {}
    assert "r1" in core.requests


def test_work_whose_actors_all_died_fails_no_capacity_after_the_grace_naming_the_model():
    core = make_core(SHORT)
    sends, step0 = started(core)  # r1's step 0 is running on den-1
    r2 = submit(core, "r2", now=0.0)  # its encode runs on enc-a-1, not answered yet
    beat(core, [a for a in ALL if a != "den-1"], 4.0)
    sends = core.on_tick(4.0)  # den-1 silent past 3 x 1 s: lost; its step re-queued, no den actor left
    assert core.counters["actors_lost"] == 1 and _failures(sends) == {}

    beat(core, [a for a in ALL if a != "den-1"], 11.0)
    assert _failures(core.on_tick(11.0)) == {}  # 7 s without a den actor: inside the 8 s grace
    beat(core, [a for a in ALL if a != "den-1"], 12.5)
    failures = _failures(core.on_tick(12.5))
    assert list(failures) == ["r1"]  # r2 has nothing queued for den yet
    assert failures["r1"].code == "no_capacity" and "'den'" in failures["r1"].message

    run(core, r2, now=13.0, dead=("den-1",))  # r2's encode finishes: its step 0 queues for den...
    assert "r2" in core.requests
    beat(core, [a for a in ALL if a != "den-1"], 13.5)
    failures = _failures(core.on_tick(13.5))  # ...and fails at the next tick: den is unserved past the grace
    assert list(failures) == ["r2"] and failures["r2"].code == "no_capacity"
    assert core.counters["requests_orphaned"] == 2 and core.requests == {}


def test_a_replacement_actor_within_the_grace_takes_the_orphaned_work():
    core = make_core(SHORT)
    started(core)
    beat(core, [a for a in ALL if a != "den-1"], 4.0)
    core.on_tick(4.0)  # den-1 lost
    sends = hello(core, "den-2", "den", now=6.0, host="host-2", pid=7)
    (retry,) = of(sends, p.Tasks, ident("den-2"))
    assert [t.task_id for t in retry.tasks] == ["r1/denoise/0"]
    beat(core, [a for a in ALL if a != "den-1"] + ["den-2"], 20.0)
    assert _failures(core.on_tick(20.0)) == {}
    assert core.counters["requests_orphaned"] == 0
    run(core, sends, now=20.0)
    assert "r1" not in core.requests  # it completed on the replacement


def test_a_lost_agent_is_counted():
    core = make_core(SHORT)
    hello_agent(core, now=0.0)
    core.on_tick(10.0)
    assert core.counters["agents_lost"] == 1 and core.agents == {}


def test_a_hello_from_another_process_cannot_take_a_live_actors_slot():
    core = make_core(SHORT)
    _, step0 = started(core)
    impostor = b"den-1-elsewhere"

    sends = hello(core, "den-1", "den", now=1.0, identity=impostor, host="host-9", pid=4242)

    (error,) = of(sends, p.Error, impostor)
    assert error.code == "duplicate_actor" and error.field == "actor_id" and "host-1" in error.message
    assert not of(sends, p.Welcome) and not of(sends, p.Disconnect)
    assert core.actors["den-1"].identity == ident("den-1") and core.actors["den-1"].in_flight  # untouched
    assert core.counters["hellos_refused"] == 1 and core.counters["actors_lost"] == 0

    # Once the live session goes silent and is declared dead, the claimant's retried hello gets in.
    beat(core, [a for a in ALL if a != "den-1"], 4.0)
    core.on_tick(4.0)
    sends = hello(core, "den-1", "den", now=4.5, identity=impostor, host="host-9", pid=4242)
    assert of(sends, p.Welcome, impostor)
    assert core.actor_by_identity[impostor].actor_id == "den-1"
