"""Operator commands in the broker core (no sockets): drain / undrain / stop an actor,
replica bounds for the scheduler, pause / resume a workflow's admission, and the record
of recent refusals and failures and the cumulative meters in the Stats snapshot."""

from __future__ import annotations

import pytest

from broker import protocol as p
from broker.core.metering import RECENT_OUTCOMES
from scheduler.controller import SchedulerConfig, SchedulerController, with_operator_bounds
from scheduler.scaling import ScalingSettings
from tests.broker_helpers import (
    AGENT,
    CLIENT,
    batches,
    hello,
    hello_agent,
    make_core,
    of,
    run,
    standard_actors,
    started,
    submit,
)


def admin(core, msg, now=0.0) -> tuple[p.AdminReply, list]:
    sends = core.on_frontend(CLIENT, msg, [], now)
    (reply,) = of(sends, p.AdminReply, CLIENT)
    return reply, sends


def actor_stats(core, actor_id) -> p.ActorStats:
    (stats,) = [a for a in core.snapshot(0.0).actors if a.actor_id == actor_id]
    return stats


# ================================================================== drain / undrain / stop


def test_a_drained_actor_gets_no_work_stays_alive_and_takes_work_again_when_undrained():
    core = make_core()
    standard_actors(core)
    hello_agent(core)
    reply, _ = admin(core, p.AdminDrain("den-1", call_id="c1"))
    assert (reply.ok, reply.call_id, reply.field) == (True, "c1", None)
    sends = run(core, submit(core, "r1"), dead=("den-1",))
    assert batches(sends, "den-1") == []  # the encoders ran; the step waits for an undrained actor
    assert core.queues["den"].depth == 1
    for tick in (1.0, 2.0):  # kept alive: a drain is no stop
        assert of(core.on_tick(tick), p.StopActor) == []
        core.on_backend(b"den-1", p.Heartbeat(sent_at=tick), [], tick)
    stats = actor_stats(core, "den-1")
    assert (stats.state, stats.stopping) == ("draining", False)
    reply, sends = admin(core, p.AdminDrain("den-1", drained=False), now=2.0)
    assert reply.ok and reply.message == "undrained den-1"
    (batch,) = batches(sends, "den-1")  # dispatched at once
    assert batch.tasks[0].request_id == "r1"
    assert actor_stats(core, "den-1").state == "busy"


def test_stop_marks_the_actor_stopping_and_undrain_then_is_refused_naming_actor_id():
    core = make_core()
    standard_actors(core)
    hello_agent(core)
    reply, sends = admin(core, p.AdminStop("vae-1"))
    assert reply.ok and of(sends, p.StopActor, AGENT) == [p.StopActor("vae-1")]
    assert actor_stats(core, "vae-1").stopping is True
    reply, _ = admin(core, p.AdminDrain("vae-1", drained=False, call_id="c2"))
    assert (reply.ok, reply.field, reply.call_id) == (False, "actor_id", "c2")
    assert "being stopped" in reply.message
    assert core.actors["vae-1"].draining is True


def test_drain_of_an_unknown_actor_is_refused_naming_actor_id():
    core = make_core()
    reply, _ = admin(core, p.AdminDrain("ghost"))
    assert (reply.ok, reply.field) == (False, "actor_id") and "ghost" in reply.message


def test_a_drained_actor_that_holds_an_input_still_serves_it_and_is_never_stopped():
    core = make_core()
    hello_agent(core)
    sends, step0 = started(core, den=("den-1",))
    assert admin(core, p.AdminDrain("den-1"))[0].ok
    sends = run(core, [s for s in sends if s.msg is step0])  # step 0 finishes on the drained actor
    assert core.actors["den-1"].held  # its output waits for a consumer on another actor
    hello(core, "den-2", "den")
    assert of(core.on_tick(0.5), p.StopActor) == []


# ================================================================== replica bounds


def test_replica_bounds_are_stored_shown_in_the_snapshot_and_cleared_with_none():
    core = make_core()
    reply, _ = admin(core, p.AdminReplicas("den", min=2, max=5))
    assert reply.ok and "min 2, max 5" in reply.message
    admin(core, p.AdminReplicas("vae", max=1))
    assert core.snapshot(0.0).replica_bounds == {"den": {"min": 2, "max": 5}, "vae": {"min": None, "max": 1}}
    assert admin(core, p.AdminReplicas("den"))[0].ok
    assert core.snapshot(0.0).replica_bounds == {"vae": {"min": None, "max": 1}}


@pytest.mark.parametrize(("msg", "field"), [
    (p.AdminReplicas("nope", min=1), "model"),
    (p.AdminReplicas("den", min=3, max=2), "min"),
    (p.AdminReplicas("den", min=-1), "min"),
    (p.AdminReplicas("den", max=-2), "max"),
    (p.AdminReplicas("den", max=10**6), "max"),
], ids=["unknown-model", "min-above-max", "negative-min", "negative-max", "huge-max"])
def test_bad_replica_bounds_are_refused_naming_the_field_and_change_nothing(msg, field):
    core = make_core()
    admin(core, p.AdminReplicas("den", min=1, max=4))
    reply, _ = admin(core, msg)
    assert (reply.ok, reply.field) == (False, field)
    assert reply.message.startswith(f"{field}:")
    assert core.replica_bounds == {"den": {"min": 1, "max": 4}}


def test_operator_bounds_override_the_flags_and_win_where_they_contradict_them():
    flags = ScalingSettings(min_replicas=1, max_replicas=8, per_model_min={"a": 2}, per_model_max={"b": 3})
    merged = with_operator_bounds(flags, {"a": {"min": None, "max": 6}, "b": {"min": 5, "max": None},
                                          "c": {"min": 2, "max": 2}})
    assert merged.bounds("a") == (2, 6)  # the flag's min stays, the operator's max is added
    assert merged.bounds("b") == (5, 5)  # the operator's min 5 beats the flag's max 3
    assert merged.bounds("c") == (2, 2)
    assert merged.bounds("d") == (1, 8)
    assert with_operator_bounds(flags, {"a": {"min": 9, "max": None}}).bounds("a") == (9, 9)
    assert with_operator_bounds(ScalingSettings(per_model_min={"a": 4}), {"a": {"min": None, "max": 2}}).bounds("a") == (2, 2)
    assert with_operator_bounds(flags, {}) is flags


class PlanRecorder:
    """The scheduler controller's client, answering from a core and recording its calls."""

    def __init__(self, core):
        self.core, self.plans, self.spawns = core, [], []

    def stats(self):
        return self.core.snapshot(0.0)

    def configure(self, settings=None, plan=None):
        self.plans.append(plan)

    def spawn(self, model, *args, **kwargs):
        self.spawns.append(model)
        return p.AdminReply(True, "ok", [f"s-{len(self.spawns)}"])

    def stop_actor(self, actor_id):
        return p.AdminReply(True, "ok")


def test_the_scheduler_controller_targets_an_operator_minimum_above_its_flags():
    from broker.catalog import load_catalog
    from broker.core.machine import BrokerCore

    core = BrokerCore(load_catalog([]), broker_id="b")
    for model in ("CLIP_Flux", "T5_Flux", "Flux1Schnell", "Flux1VAE"):
        hello(core, f"{model}-1", model)
    recorder = PlanRecorder(core)
    config = SchedulerConfig(workflows=["flux-schnell-txt2img"], model_max=["Flux1VAE=1"])
    controller = SchedulerController(config, client=recorder)
    controller.step(now=0.0)
    assert recorder.plans[-1]["targets"]["Flux1VAE"] == 1
    admin(core, p.AdminReplicas("Flux1VAE", min=3))
    controller.step(now=1.0)
    assert recorder.plans[-1]["targets"]["Flux1VAE"] == 3  # over the flag's max of 1
    admin(core, p.AdminReplicas("Flux1VAE"))
    controller.changes.clear()
    controller.step(now=2.0)
    assert recorder.plans[-1]["targets"]["Flux1VAE"] == 1


# ================================================================== pause / resume


def test_a_paused_workflow_rejects_new_requests_naming_it_while_accepted_ones_complete():
    core = make_core()
    sends = submit(core, "r1") + standard_actors(core)
    reply, _ = admin(core, p.AdminPause("plain", call_id="c3"))
    assert (reply.ok, reply.call_id) == (True, "c3")
    (rejected,) = of(submit(core, "r2", now=1.0), p.Rejected)
    assert (rejected.code, rejected.field) == ("paused", "workflow")
    assert "'plain'" in rejected.message
    assert of(submit(core, "g1", "guided"), p.Accepted)  # another workflow is not paused
    (result,) = [r for r in of(run(core, sends), p.Result, CLIENT) if r.request_id == "r1"]
    stats = core.snapshot(2.0)
    assert stats.paused_workflows == ["plain"]
    assert {w.workflow: w.paused for w in stats.workflows} == {"plain": True, "guided": False}
    assert admin(core, p.AdminPause("plain", paused=False))[0].ok
    assert of(submit(core, "r3"), p.Accepted)
    assert core.snapshot(3.0).paused_workflows == []


def test_pausing_an_unknown_workflow_is_refused_naming_workflow():
    reply, _ = admin(make_core(), p.AdminPause("nope"))
    assert (reply.ok, reply.field) == (False, "workflow") and "nope" in reply.message


# ================================================================== recent outcomes and meters


def test_refusals_and_failures_are_recorded_with_their_reasons_newest_last_and_bounded():
    core = make_core()
    submit(core, "bad", now=1.0, steps=-3)
    submit(core, "lost", "no-such-workflow", now=2.0)
    submit(core, "r1", now=3.0)
    core.on_frontend(CLIENT, p.Cancel("r1"), [], 4.0)  # a client's cancel is counted, not listed
    _, step0 = started(core, "r2")
    core.on_backend(b"den-1", p.BatchFailed(step0.batch_id, [t.task_id for t in step0.tasks],
                                            [t.attempt for t in step0.tasks], "task_error", "boom"), [], 5.0)
    stats = core.snapshot(6.0)
    outcomes = [(o.kind, o.request_id, o.workflow, o.code, o.field) for o in stats.recent_outcomes]
    assert outcomes == [
        ("rejected", "bad", "plain", "invalid_param", "params.steps"),
        ("rejected", "lost", "no-such-workflow", "unknown_workflow", "workflow"),
        ("failed", "r2", "plain", "task_error", None),
    ]
    assert stats.recent_outcomes[0].time == 1.0 and "steps" in stats.recent_outcomes[0].message
    assert "boom" in stats.recent_outcomes[2].message
    assert stats.rejections == {"invalid_param": 1, "unknown_workflow": 1}
    assert stats.failures == {"cancelled": 1, "task_error": 1}
    for i in range(RECENT_OUTCOMES + 5):
        submit(core, f"x{i}", "nope", now=10.0 + i)
    recent = core.snapshot(500.0).recent_outcomes
    assert len(recent) == RECENT_OUTCOMES and recent[-1].request_id == f"x{RECENT_OUTCOMES + 4}"


def test_latency_histograms_count_every_task_and_request_by_model_kind_and_workflow():
    core = make_core()
    sends = submit(core, "r1") + submit(core, "r2") + standard_actors(core)
    results = of(run(core, sends, now=0.5), p.Result, CLIENT)
    assert len(results) == 2
    stats = core.snapshot(1.0)
    tasks = {(h.labels["model"], h.labels["mode"]): h for h in stats.task_latency}
    assert set(tasks) == {("enc-a", "encode"), ("den", "denoise"), ("vae", "decode")}
    assert tasks["den", "denoise"].count == 4  # 2 steps x 2 requests
    assert sum(h.count for h in tasks.values()) == stats.counters["tasks_done"]
    for hist in [*tasks.values(), *stats.request_latency]:
        assert sum(hist.counts) == hist.count and len(hist.counts) == len(hist.bounds) + 1
    (req,) = stats.request_latency
    assert (req.labels, req.count, req.sum) == ({"workflow": "plain"}, 2, 1.0)  # submitted at 0, done at 0.5
    assert req.counts[req.bounds.index(0.5)] == 2  # 0.5 s lies in the bucket whose bound is 0.5


def test_bytes_moved_accumulate_from_heartbeat_deltas_and_never_go_down_when_an_actor_restarts():
    core = make_core()
    standard_actors(core)

    def beat(actor, identity, now, **counts):
        core.on_backend(identity, p.Heartbeat(now, p.ActorTelemetry(**counts), actor, identity.decode()), [], now)

    beat("den-1", b"den-1", 1.0, fetches=2, fetched_bytes=1000, shm_bytes=600, ipc_bytes=100, fetch_fallbacks=1)
    beat("den-1", b"den-1", 2.0, fetches=3, fetched_bytes=1500, shm_bytes=600, ipc_bytes=100, ipc_fallbacks=2,
         fetch_fallbacks=1)
    t = core.snapshot(2.0).transfers
    assert (t.shm_bytes, t.ipc_bytes, t.frames_bytes, t.fetches, t.shm_fallbacks, t.ipc_fallbacks) == (
        600, 100, 800, 3, 1, 2)
    hello(core, "den-1", "den", identity=b"den-1-new")  # a new session counts from zero again
    beat("den-1", b"den-1-new", 3.0, fetches=1, fetched_bytes=50)
    t = core.snapshot(3.0).transfers
    assert (t.frames_bytes, t.fetches) == (850, 4)


def test_inputs_held_by_the_actor_that_runs_the_task_count_as_local_bytes():
    core = make_core()
    sends = submit(core, "r1") + standard_actors(core)
    run(core, sends)  # the broker_helpers results say every output is 64 bytes
    # step 1 ran where step 0's output was (affinity), decode on the VAE fetched step 1's
    assert core.snapshot(1.0).transfers.local_bytes == 64
