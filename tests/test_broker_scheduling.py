"""The broker core's scheduling behaviours, driven with fake peers (message objects and
an explicit `now`, no sockets): admission control at arrival, parallel CFG groups by the
idle-actor rule (cfg_split="auto"), load telemetry and SLO counts, the queued-work
running total, drain-then-stop (AdminStop) and live settings (AdminConfigure).

Admission and load need profiled models, so most tests use the built-in catalog (the
paper's Flux workflows, H800 profiles) merged with the small profile-less catalog of
tests/broker_helpers.py ("plain" and "guided": models enc-a, enc-b, den, vae).
"""

from __future__ import annotations

import math
from functools import cache

import pytest
from broker_helpers import (
    AGENT,
    CATALOG_DOC,
    CLIENT,
    batches,
    beat,
    done,
    failed,
    hello,
    hello_agent,
    ident,
    make_core,
    of,
    only_batch,
    run,
    standard_actors,
    started,
    submit,
)

from broker import protocol as p
from broker.catalog import load_catalog, parse_catalog
from broker.core.load import RATE_WINDOW_S
from broker.core.machine import BrokerCore, BrokerSettings
from broker.costs.model import CostModel
from broker.protocol.errors import ErrorCode
from scheduler.plan import PlanSettings, plan_round
from scheduler.scaling import ScalingMemory
from scheduler.snapshot import from_stats

GB = 1024**3
CFG = "flux-schnell-txt2img-cfg"
FLUX_MODELS = {"clip-1": "CLIP_Flux", "t5-1": "T5_Flux", "vae-1": "Flux1VAE"}


@cache
def catalog():
    return parse_catalog(CATALOG_DOC, base=load_catalog())


@cache
def cfg_cost():
    """The CFG workflow at its defaults: (min work, alone work by model, solo) in profile seconds."""
    wf = catalog().workflows[CFG]
    params = {name: spec.default for name, spec in wf.inputs.items()}
    cost = CostModel(catalog()).request(wf, params)
    return cost.min_work_s, cost.by_model, cost.solo_s


def flux_core(**settings) -> BrokerCore:
    base = dict(heartbeat_interval_s=1.0, heartbeat_misses=3)
    return BrokerCore(catalog(), BrokerSettings(**{**base, **settings}), broker_id="broker-test", seed=1)


def agent_with(core, devices: int, now=0.0, host="host-1") -> list:
    infos = [p.DeviceInfo(f"emu:{i}", "emulated", "H800", 80 * GB, 80 * GB) for i in range(devices)]
    return core.on_backend(AGENT, p.AgentHello("agent-1", host, 7, infos), [], now)


def flux_actors(core, den=("flux-1",), now=0.0) -> list:
    sends = []
    for actor_id, model in FLUX_MODELS.items():
        sends += hello(core, actor_id, model, max_batch_rows=8, now=now)
    for actor_id in den:
        sends += hello(core, actor_id, "Flux1Schnell", max_batch_rows=2, now=now)
    return sends


def admin(core, msg, now=0.0) -> tuple[p.AdminReply, list]:
    sends = core.on_frontend(CLIENT, msg, [], now)
    (reply,) = of(sends, p.AdminReply, CLIENT)
    return reply, sends


def wf_stats(core, workflow=CFG, now=0.0) -> p.WorkflowStats:
    (stats,) = [w for w in core.snapshot(now).workflows if w.workflow == workflow]
    return stats


def model_load(core, model, now=0.0) -> p.ModelStats:
    found = [m for m in core.snapshot(now).models if m.model == model]
    return found[0] if found else p.ModelStats(model, 0, 0, 0, 0, 0, [])


def no_drift(core, now=0.0) -> None:
    assert core.load.queued_min_s == pytest.approx(0.0, abs=1e-9)
    assert core.requests == {}
    for m in core.snapshot(now).models:
        assert (m.ready_s, m.pending_s, m.queue_depth) == (0.0, 0.0, 0), m


# ================================================================== admission


def fill_until_rejected(core, devices, limit=60):
    """Submit CFG requests at t=0 until one is refused; check each decision on the way."""
    slo, solo = core.load.default_slo(core.catalog.workflows[CFG], core.settings.slo_multiple)
    for i in range(limit):
        queued = core.load.queued_min_s
        sends = submit(core, f"r{i}", CFG)
        admit = max(queued / devices, solo) <= slo
        assert bool(of(sends, p.Accepted)) is admit, (i, queued, slo)
        if not admit:
            (rejected,) = of(sends, p.Rejected)
            return i, queued, rejected
    raise AssertionError("never rejected")


@pytest.mark.parametrize(("devices", "scale"), [(1, 1.0), (3, 0.5), (8, 0.01)])
def test_admission_rejects_exactly_when_queued_work_per_device_exceeds_the_slack(devices, scale):
    core = flux_core(admission=True, admission_bound="max", cost_scale=scale)
    agent_with(core, devices)
    assert core._device_count() == devices
    min_work, _, solo = cfg_cost()
    slo, solo_scaled = core.load.default_slo(core.catalog.workflows[CFG], core.settings.slo_multiple)
    assert solo_scaled == pytest.approx(solo * scale)
    assert slo == pytest.approx(2.0 * solo * scale)

    index, queued, rejected = fill_until_rejected(core, devices)

    # admitted while queued/devices <= slack: the first refusal is the first over it
    assert index == math.floor(slo * devices / (min_work * scale) + 1e-9) + 1
    assert queued == pytest.approx(index * min_work * scale)
    assert (rejected.request_id, rejected.code, rejected.field) == (f"r{index}", "slo_unattainable", None)
    assert rejected.retry_after_s > 0
    assert "exceeds the SLO slack" in rejected.message
    assert f"r{index}" not in core.requests
    assert core.load.queued_min_s == queued  # a refusal adds nothing
    assert core.counters["requests_rejected"] == 1
    stats = wf_stats(core)
    assert (stats.submitted, stats.rejected) == (index, 1)
    # still full: refused again; cancel one: room again
    assert of(submit(core, "again", CFG), p.Rejected)[0].code == "slo_unattainable"
    core.on_frontend(CLIENT, p.Cancel("r0"), [], 0.0)
    assert of(submit(core, "after-cancel", CFG), p.Accepted)


def test_the_runtime_overhead_counts_at_admission():
    """With the sum bound a request is refused once queue wait + solo + overhead exceeds
    its SLO: the overhead moves the first refusal earlier by exactly what it takes."""
    first_refused = {}
    for overhead in (0.0, 1.0):
        core = flux_core(admission=True, admission_bound="sum", admission_overhead_s=overhead)
        agent_with(core, 1)
        slo, solo = core.load.default_slo(core.catalog.workflows[CFG], core.settings.slo_multiple)
        for i in range(60):
            queued = core.load.queued_min_s
            admitted = bool(of(submit(core, f"r{i}", CFG), p.Accepted))
            assert admitted is (queued + solo + overhead <= slo), (overhead, i)
            if not admitted:
                first_refused[overhead] = i
                break
    assert first_refused[1.0] < first_refused[0.0]
    with pytest.raises(ValueError, match="admission_overhead_s"):
        flux_core(admission_overhead_s=-1.0)


def test_without_admission_nothing_is_rejected():
    core = flux_core(admission=False)
    agent_with(core, 1)
    for i in range(30):
        assert of(submit(core, f"r{i}", CFG), p.Accepted), i
    assert core.counters["requests_rejected"] == 0
    assert wf_stats(core).rejected == 0
    # ... though the work and the deadlines are still accounted
    assert core.load.queued_min_s == pytest.approx(30 * cfg_cost()[0])
    assert core.requests["r0"].deadline == pytest.approx(2.0 * cfg_cost()[2])


def test_a_workflow_without_profiles_is_never_rejected_by_admission():
    core = flux_core(admission=True, admission_bound="max")
    agent_with(core, 1)
    fill_until_rejected(core, 1)
    queued = core.load.queued_min_s
    for i, workflow in enumerate(["plain", "guided"] * 3):
        assert of(submit(core, f"noprof-{i}", workflow), p.Accepted), workflow
    assert core.requests["noprof-0"].deadline is None
    assert core.load.queued_min_s == queued  # no profile: no cost
    assert wf_stats(core, "plain").slo_s == 0.0


def test_admission_counts_the_agents_accelerators_else_the_actors_devices():
    core = flux_core()
    assert core._device_count() == 1  # nothing known: one
    for i in range(3):
        msg = p.ActorHello(actor_id=f"a{i}", model="Flux1Schnell", device=f"cuda:{i % 2}", host="h", pid=1,
                           backend="emulated", max_batch_rows=1, data_address="tcp://x:1", credits=1)
        core.on_backend(ident(f"a{i}"), msg, [], 0.0)
    assert core._device_count() == 2
    cpu = p.DeviceInfo("cpu", "cpu", "cpu", GB, GB)
    core.on_backend(AGENT, p.AgentHello("agent-1", "h", 7, [cpu]), [], 0.0)
    assert core._device_count() == 2  # a CPU-only agent adds no accelerator
    agent_with(core, 5)
    assert core._device_count() == 5


def test_retry_after_is_no_longer_than_the_queue_takes_to_drain():
    core = flux_core(admission=True, admission_bound="max")
    agent_with(core, 2)
    _, queued, rejected = fill_until_rejected(core, 2)
    slo, _ = core.load.default_slo(core.catalog.workflows[CFG], core.settings.slo_multiple)
    assert rejected.retry_after_s <= queued / 2 + 1e-3
    assert rejected.retry_after_s == pytest.approx(queued / 2 - slo, abs=1e-3)


# ================================================================== parallel CFG groups (auto)


def auto_core():
    return make_core(BrokerSettings(heartbeat_interval_s=1.0, heartbeat_misses=3, cfg_split="auto"))


def branches(core, request_id) -> list[str]:
    return [k for k in core.requests[request_id].nodes if k.startswith("branch/")]


def test_auto_splits_the_first_cfg_request_at_idle_with_two_idle_base_actors():
    core = auto_core()
    standard_actors(core, den=("den-1", "den-2"))
    submit(core, "g1", "guided")
    assert core.requests["g1"].latency_mode is True
    assert branches(core, "g1") == ["branch/0/0", "branch/0/1", "branch/1/0", "branch/1/1"]
    assert wf_stats(core, "guided").latency_mode == 1
    assert wf_stats(core, "plain").latency_mode == 0


def test_auto_does_not_split_with_a_single_idle_base_actor():
    core = auto_core()
    standard_actors(core, den=("den-1",))
    submit(core, "g1", "guided")
    assert core.requests["g1"].latency_mode is False
    assert branches(core, "g1") == []
    assert wf_stats(core, "guided").latency_mode == 0


def test_auto_does_not_split_when_another_live_cfg_request_occupies_the_actors():
    core = auto_core()
    standard_actors(core, den=("den-1", "den-2"))
    submit(core, "g1", "guided")
    submit(core, "g2", "guided")  # g1 is live: 2 x 2 actors needed, 2 idle
    assert [core.requests[r].latency_mode for r in ("g1", "g2")] == [True, False]
    # a non-CFG request is never split and does not count as a live CFG request
    submit(core, "p1", "plain")
    assert branches(core, "p1") == []
    assert core.live_cfg == {"den": 2}
    assert wf_stats(core, "guided").latency_mode == 1


def test_auto_splits_a_second_cfg_request_when_four_base_actors_idle():
    core = auto_core()
    standard_actors(core, den=("den-1", "den-2", "den-3", "den-4"))
    submit(core, "g1", "guided")
    submit(core, "g2", "guided")
    submit(core, "g3", "guided")  # 3 x 2 > 4
    assert [core.requests[r].latency_mode for r in ("g1", "g2", "g3")] == [True, True, False]


def test_auto_does_not_count_a_busy_base_actor_as_idle():
    core = auto_core()
    _, step0 = started(core, "p1", "plain", den=("den-1", "den-2"))  # one of them runs p1's first step
    assert core.live_cfg.get("den", 0) == 0
    submit(core, "g1", "guided")
    assert core.requests["g1"].latency_mode is False


def test_auto_does_not_count_a_draining_base_actor_as_idle():
    core = auto_core()
    standard_actors(core, den=("den-1", "den-2"))
    hello_agent(core)
    assert admin(core, p.AdminStop("den-2"))[0].ok
    submit(core, "g1", "guided")
    assert core.requests["g1"].latency_mode is False


def test_auto_splits_again_once_the_live_cfg_requests_are_gone():
    core = auto_core()
    sends = standard_actors(core, den=("den-1", "den-2"), den_credits=2, den_rows=4)
    sends += submit(core, "g1", "guided")
    submit(core, "g2", "guided")
    assert core.requests["g2"].latency_mode is False
    core.on_frontend(CLIENT, p.Cancel("g2"), [], 0.0)
    (result,) = of(run(core, sends), p.Result, CLIENT)  # g1 completes split
    assert result.request_id == "g1"
    assert core.live_cfg == {"den": 0}
    submit(core, "g3", "guided")
    assert core.requests["g3"].latency_mode is True
    assert wf_stats(core, "guided").latency_mode == 2


@pytest.mark.parametrize(("mode", "split"), [("never", False), ("always", True)])
def test_fixed_cfg_split_modes_ignore_the_load(mode, split):
    core = make_core(BrokerSettings(heartbeat_interval_s=1.0, heartbeat_misses=3, cfg_split=mode))
    standard_actors(core, den=("den-1",) if split else ("den-1", "den-2"))
    submit(core, "g1", "guided")
    assert core.requests["g1"].latency_mode is split
    assert bool(branches(core, "g1")) is split


# ================================================================== telemetry


def test_model_load_after_submits():
    scale = 0.5
    core = flux_core(cost_scale=scale)
    agent_with(core, 2)
    hello(core, "flux-1", "Flux1Schnell")  # no encoder actors: the encodings stay queued
    for i in range(3):
        submit(core, f"r{i}", CFG, now=0.0)
    min_work, by_model, solo = cfg_cost()
    slo = 2.0 * solo * scale
    now = 1.0
    flux = model_load(core, "Flux1Schnell", now)
    assert flux.queue_depth == 0 and flux.ready_s == 0.0  # waits for its encoders
    assert flux.pending_s == pytest.approx(3 * by_model["Flux1Schnell"] * scale, rel=1e-4)
    assert flux.min_slack_s is None  # nothing of it queued
    expected_rate = 3 / RATE_WINDOW_S * math.exp(-now / RATE_WINDOW_S)
    assert flux.arrival_rate == pytest.approx(expected_rate, abs=1e-3)
    assert flux.work_per_request_s == pytest.approx(by_model["Flux1Schnell"] * scale, rel=1e-4)
    t5 = model_load(core, "T5_Flux", now)
    assert t5.queue_depth == 3
    assert 0 < t5.ready_s <= t5.pending_s == pytest.approx(3 * by_model["T5_Flux"] * scale, rel=1e-4)
    assert t5.min_slack_s == pytest.approx(slo - now, abs=1e-3)
    assert t5.arrival_rate == flux.arrival_rate
    # a model no CFG request needs
    assert model_load(core, "Flux1Dev", now).arrival_rate == 0.0
    stats = core.snapshot(now)
    assert stats.settings["devices"] == 2
    assert stats.settings["queued_work_s"] == pytest.approx(3 * min_work * scale, abs=1e-3)
    wf = wf_stats(core, CFG, now)
    assert wf.submitted == 3
    assert (wf.slo_s, wf.solo_s) == (pytest.approx(slo, abs=1e-3), pytest.approx(solo * scale, abs=1e-3))


def test_pending_work_of_a_model_without_actors_or_queue_is_reported():
    core = flux_core()
    for i in range(3):
        submit(core, f"r{i}", CFG)
    assert "Flux1Schnell" in {m.model for m in core.snapshot(1.0).models}


def test_ready_work_moves_to_the_base_model_once_encoded():
    core = flux_core()
    sends = submit(core, "r0", CFG) + submit(core, "r1", CFG)
    run(core, sends + flux_actors(core, den=()), now=0.5)  # no base-model actor yet
    flux = model_load(core, "Flux1Schnell", 1.0)
    assert flux.queue_depth == 2 and flux.ready_s > 0
    assert flux.ready_s < flux.pending_s
    assert 0 < flux.min_slack_s < 2.0 * cfg_cost()[2]
    assert model_load(core, "T5_Flux", 1.0).pending_s == 0.0
    # T5 batches nothing (its profile's time per row is flat), so the two encodes ran one
    # after the other: 0.5 s, then 0 s (dispatched when the first answered), averaged
    assert model_load(core, "T5_Flux", 1.0).service_s == pytest.approx(0.9 * 0.5)


def test_workflow_stats_count_completions_slo_attainment_and_failures():
    core = flux_core()
    sends = flux_actors(core)
    (res,) = of(run(core, sends + submit(core, "fast", CFG, now=0.0), now=1.0), p.Result)
    assert res.request_id == "fast"
    # a slow one: done long after its deadline (2 x 2.0 s)
    of(run(core, submit(core, "slow", CFG, now=2.0), now=50.0), p.Result)
    stats = wf_stats(core, CFG, 50.0)
    assert (stats.submitted, stats.completed, stats.slo_met, stats.failed) == (2, 2, 1, 0)
    # one whose only-task batch fails: failed; a cancelled one is not a failure
    sends = submit(core, "bad", CFG, now=60.0)
    (clip_batch,) = batches(sends, "clip-1")
    failed(core, "clip-1", clip_batch, ErrorCode.TASK_ERROR.value, now=60.0)
    submit(core, "gone", CFG, now=60.0)
    core.on_frontend(CLIENT, p.Cancel("gone"), [], 60.0)
    stats = wf_stats(core, CFG, 61.0)
    assert (stats.submitted, stats.completed, stats.slo_met, stats.failed) == (4, 2, 1, 1)
    assert core.counters["requests_cancelled"] == 1


def test_snapshot_feeds_the_scheduler():
    core = flux_core()
    agent_with(core, 2)
    flux_actors(core)
    for i in range(6):
        submit(core, f"r{i}", CFG)
    snap = from_stats(core.snapshot(1.0), {"flux-1": 0.25})
    assert snap.time == 1.0
    assert {a.actor_id: a.busy_ratio for a in snap.actors}["flux-1"] == 0.25
    assert [(d.device, d.kind) for d in snap.accelerators] == [("emu:0", "emulated"), ("emu:1", "emulated")]
    assert snap.replicas() == {"CLIP_Flux": 1, "T5_Flux": 1, "Flux1Schnell": 1, "Flux1VAE": 1}
    assert snap.load("Flux1Schnell").pending_s > 0
    plan = plan_round(snap, CostModel(catalog()), ScalingMemory(), PlanSettings(workflows=(CFG,)))
    assert {t.model for t in plan.targets} == {"CLIP_Flux", "T5_Flux", "Flux1Schnell", "Flux1VAE"}


# ================================================================== queued work: no drift


def test_queued_work_returns_to_zero_after_completion():
    core = flux_core()
    sends = flux_actors(core, den=("flux-1", "flux-2"))
    for i in range(4):
        sends += submit(core, f"r{i}", CFG)
    assert core.load.queued_min_s == pytest.approx(4 * cfg_cost()[0])
    assert len(of(run(core, sends, now=1.0), p.Result)) == 4
    no_drift(core, 1.0)


def test_queued_work_returns_to_zero_after_split_cfg_completion():
    core = flux_core(cfg_split="always")
    sends = flux_actors(core, den=("flux-1", "flux-2")) + submit(core, "r0", CFG)
    assert of(run(core, sends), p.Result)
    no_drift(core)


def test_queued_work_returns_to_zero_after_failure_and_cancel():
    core = flux_core()
    sends = flux_actors(core) + submit(core, "r0", CFG) + submit(core, "r1", CFG) + submit(core, "r2", CFG)
    sends = run(core, sends, dead={"flux-1"})  # encoders done; r0's first step runs on flux-1
    step0 = only_batch(sends, "flux-1")
    assert [t.request_id for t in step0.tasks] == ["r0"]
    (fail,) = of(failed(core, "flux-1", step0, ErrorCode.TASK_ERROR.value), p.Failed)
    assert fail.request_id == "r0"
    assert core.load.queued_min_s == pytest.approx(2 * cfg_cost()[0] - 2 * sum(
        n.min_cost_s for n in core.requests["r1"].nodes.values() if n.state == "done"))
    for request_id in ("r1", "r2"):  # r1 now runs on flux-1; r2 waits in the queue
        core.on_frontend(CLIENT, p.Cancel(request_id), [], 0.0)
    no_drift(core)


def test_queued_work_returns_to_zero_after_a_requeue():
    core = flux_core()
    sends = flux_actors(core, den=("flux-a",)) + submit(core, "r0", CFG)
    step0 = only_batch(run(core, sends, dead={"flux-a"}), "flux-a")
    before = core.load.queued_min_s
    sends = core.on_backend(ident("flux-a"), p.Disconnect(reason="bye"), [], 0.5)  # lost while running
    assert core.counters["tasks_requeued"] == 1 and core.load.queued_min_s == before
    sends += hello(core, "flux-b", "Flux1Schnell", max_batch_rows=2, now=0.5)
    retry = only_batch(sends, "flux-b")
    assert retry.tasks[0].task_id == step0.tasks[0].task_id
    done(core, "flux-a", step0, now=0.6)  # a late answer of the lost attempt changes nothing
    assert core.load.queued_min_s == before
    assert of(run(core, sends, now=1.0), p.Result)
    no_drift(core, 1.0)


def test_queued_work_returns_to_zero_after_a_requeue_and_a_restart():
    core = flux_core()
    sends = flux_actors(core, den=("flux-a", "flux-b")) + submit(core, "r0", CFG)
    sends = run(core, sends, dead={"flux-a", "flux-b"})
    (step0,) = batches(sends, "flux-a") + batches(sends, "flux-b")
    first = "flux-a" if batches(sends, "flux-a") else "flux-b"
    other = "flux-b" if first == "flux-a" else "flux-a"
    step1 = only_batch(done(core, first, step0, now=0.1), first)  # it holds step 0 and runs step 1
    total = core.requests["r0"].min_cost_s
    assert core.load.queued_min_s < total
    beat(core, [*FLUX_MODELS, other], 2.5)
    sends = core.on_tick(3.5)  # `first` is silent: its held output is lost: restart
    assert core.counters["requests_restarted"] == 1
    assert core.load.queued_min_s == pytest.approx(total)
    assert step1.tasks[0].node == "denoise/1"
    (result,) = of(run(core, sends, now=3.5, dead={first}), p.Result)
    assert result.attempts == 2
    no_drift(core, 3.5)


def test_queued_work_returns_to_zero_after_restarts_are_exhausted():
    core = BrokerCore(catalog(), BrokerSettings(heartbeat_interval_s=1.0, heartbeat_misses=3, max_request_restarts=1),
                      seed=1)
    sends = flux_actors(core) + submit(core, "r0", CFG)
    sends = run(core, sends, dead={"flux-1"})
    step0 = only_batch(sends, "flux-1")
    for _ in range(2):  # its input holder is gone, twice
        step0_sends = failed(core, "flux-1", step0, ErrorCode.INPUT_UNAVAILABLE.value)
        if of(step0_sends, p.Failed):
            break
        step0 = only_batch(run(core, step0_sends, dead={"flux-1"}), "flux-1")
    assert core.counters["requests_restarted"] == 1
    (fail,) = of(step0_sends, p.Failed)
    assert fail.code == "attempts_exhausted"
    no_drift(core)


# ================================================================== AdminStop


def test_admin_stop_of_an_unknown_actor_is_refused_naming_actor_id():
    core = make_core()
    hello_agent(core)
    reply, sends = admin(core, p.AdminStop("nope", call_id="c7"))
    assert (reply.ok, reply.call_id) == (False, "c7")
    assert reply.message.startswith("actor_id:") and "nope" in reply.message
    assert of(sends, p.StopActor) == []


def test_admin_stop_without_an_agent_on_its_host_is_refused():
    core = make_core()
    standard_actors(core)
    reply, _ = admin(core, p.AdminStop("vae-1"))
    assert not reply.ok and reply.message.startswith("actor_id:")
    assert core.actors["vae-1"].draining is False


def test_admin_stop_of_an_idle_actor_stops_it_at_once():
    core = make_core()
    standard_actors(core)
    hello_agent(core)
    reply, sends = admin(core, p.AdminStop("vae-1", call_id="c1"))
    assert (reply.ok, reply.call_id) == (True, "c1")
    assert of(sends, p.StopActor, AGENT) == [p.StopActor("vae-1")]
    stats = core.snapshot(0.0)
    assert {a.actor_id: a.state for a in stats.actors}["vae-1"] == "draining"
    assert {m.model: m.actors for m in stats.models}["vae"] == 0
    assert of(core.on_tick(0.5), p.StopActor) == []  # not twice


def test_drained_actor_gets_no_new_work_and_is_stopped_once_it_runs_and_holds_nothing():
    core = make_core()
    sends, step0 = started(core, den=("den-1",))  # den-1 runs r1's first step
    hello_agent(core)
    reply, sends = admin(core, p.AdminStop("den-1"), now=0.1)
    assert reply.ok and of(sends, p.StopActor) == []
    sends = run(core, submit(core, "r2", now=0.2), now=0.2, dead={"den-1"})
    assert batches(sends, "den-1") == []  # r2's step waits
    sends = done(core, "den-1", step0, now=0.3)  # credit back, output held
    sends += core.on_backend(ident("den-1"), p.Credit(credits=3), [], 0.3)
    assert batches(sends, "den-1") == []
    assert core.actors["den-1"].held and not core.actors["den-1"].in_flight
    assert of(core.on_tick(0.4), p.StopActor) == []  # still holds r1's step 0 for its consumer
    # a new actor takes the queued steps; r1's step 1 reads den-1's output, then frees it
    sends = run(core, hello(core, "den-2", "den", now=0.5), now=0.5)
    assert len(of(sends, p.Result, CLIENT)) == 2
    assert core.actors["den-1"].held == set()
    assert batches(sends, "den-1") == []
    beat(core, ["enc-a-1", "enc-b-1", "vae-1", "den-1", "den-2"], 1.0)
    assert of(core.on_tick(1.0), p.StopActor, AGENT) == [p.StopActor("den-1")]
    assert of(core.on_tick(1.5), p.StopActor) == []  # once


# ================================================================== AdminConfigure


def test_admin_configure_sets_the_live_settings():
    core = flux_core()
    reply, _ = admin(core, p.AdminConfigure({"admission": True, "slo_multiple": 3, "cfg_split": "auto"},
                                            call_id="c2"))
    assert (reply.ok, reply.call_id) == (True, "c2")
    assert (core.settings.admission, core.settings.slo_multiple, core.settings.cfg_split) == (True, 3, "auto")
    settings = core.snapshot(0.0).settings
    assert (settings["admission"], settings["slo_multiple"], settings["cfg_split"]) == (True, 3, "auto")
    assert wf_stats(core, CFG).slo_s == pytest.approx(3 * cfg_cost()[2], abs=1e-3)
    # the new multiple applies to requests from now on
    submit(core, "r0", CFG, now=10.0)
    assert core.requests["r0"].deadline == pytest.approx(10.0 + 3 * cfg_cost()[2])


def test_admission_switched_on_live_takes_effect():
    core = flux_core()
    agent_with(core, 1)
    for i in range(5):
        submit(core, f"r{i}", CFG)
    assert of(submit(core, "before", CFG), p.Accepted)
    admin(core, p.AdminConfigure({"admission": True}))
    assert of(submit(core, "after", CFG), p.Rejected)[0].code == "slo_unattainable"


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"affinity": "avoid"}, "affinity"),
        ({"cost_scale": 2.0}, "cost_scale"),
        ({"bogus": 1}, "bogus"),
        ({"admission": "yes"}, "admission"),
        ({"admission": 1}, "admission"),
        ({"slo_multiple": True}, "slo_multiple"),
        ({"slo_multiple": "2"}, "slo_multiple"),
        ({"slo_multiple": 0}, "slo_multiple"),
        ({"slo_multiple": -1.5}, "slo_multiple"),
        ({"cfg_split": "sometimes"}, "cfg_split"),
        ({"cfg_split": 1}, "cfg_split"),
        ({"admission": True, "cfg_split": "bogus"}, "cfg_split"),  # all or nothing
    ],
)
def test_admin_configure_refuses_unknown_keys_and_bad_values(settings, key):
    core = flux_core()
    before = core.settings
    reply, _ = admin(core, p.AdminConfigure(settings, plan={"x": 1}, call_id="c3"))
    assert (reply.ok, reply.call_id) == (False, "c3")
    assert reply.message.startswith(f"settings.{key}"), reply.message
    assert core.settings == before
    assert core.snapshot(0.0).plan is None


def test_admin_configure_stores_the_plan_for_stats():
    core = flux_core()
    assert core.snapshot(0.0).plan is None
    plan = {"targets": {"Flux1Schnell": 3}, "replicas": {"Flux1Schnell": 1}, "in_progress": [], "decisions": ["x"]}
    reply, _ = admin(core, p.AdminConfigure(plan=plan))
    assert reply.ok
    assert core.snapshot(1.0).plan == plan
    before = core.settings
    admin(core, p.AdminConfigure({"slo_multiple": 4.0}))  # settings alone keep the plan
    assert core.snapshot(2.0).plan == plan
    assert core.settings.slo_multiple == 4.0 and core.settings.cfg_split == before.cfg_split
    stats = core.on_frontend(CLIENT, p.GetStats(call_id="s1"), [], 3.0)
    (msg,) = of(stats, p.Stats)
    assert msg.plan == plan and msg.call_id == "s1"
