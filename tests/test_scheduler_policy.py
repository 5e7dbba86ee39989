"""The pure scheduling policies on synthetic snapshots: replica targets (scaling), where
replicas go and which go away (placement, conversion), one planning round, the two
per-request rules (parallel groups, admission) and the profile cost model.

No sockets, no processes, no clock: every test builds `Snapshot` objects by hand and
calls the policy functions directly. Profile numbers are the measured H800 profiles the
built-in catalog names (Flux1Schnell: about 23.8 GB resident, 2.9 s to load).
"""

from __future__ import annotations

import math
import random
from functools import cache

import pytest

from broker.catalog import load_catalog, parse_catalog, unroll, validate_params
from broker.core import rules
from broker.costs.model import CostModel
from scheduler.placement import Spawn, Stop, conversion_victim, place, scale_down_victim
from scheduler.plan import PlanSettings, neighbours_of, plan_round, served_models
from scheduler.scaling import (
    ScalingMemory,
    ScalingSettings,
    demand_devices,
    is_bottleneck,
    scale_targets,
)
from scheduler.snapshot import ActorView, DeviceView, ModelLoad, Snapshot

GB = 1024**3
CFG = "flux-schnell-txt2img-cfg"
WF = (CFG,)
CLIP, T5, FLUX, VAE = "CLIP_Flux", "T5_Flux", "Flux1Schnell", "Flux1VAE"


@cache
def catalog():
    return load_catalog()


@cache
def costs() -> CostModel:
    return CostModel(catalog())


def defaults(workflow: str) -> dict:
    wf = catalog().workflows[workflow]
    return {name: spec.default for name, spec in wf.inputs.items()}


def actor(actor_id, model, device="g0", host="h1", **kw) -> ActorView:
    return ActorView(actor_id, model, host, device, **kw)


def dev(device, free_gb, host="h1", memory_gb=80, kind="cuda") -> DeviceView:
    return DeviceView(host, device, kind, int(memory_gb * GB), int(free_gb * GB))


def replicas_of(model: str, n: int, prefix: str | None = None) -> tuple[ActorView, ...]:
    return tuple(actor(f"{prefix or model}-{i}", model, f"g{i}") for i in range(n))


def one_target(snapshot, memory, settings, model="M"):
    (target,), memory = scale_targets(snapshot, [model], memory, settings)
    return target, memory


# Flat cost settings: demand == pending_s exactly (horizon 1 s, full utilisation); a
# bottleneck counts at once (the sustain rule has its own tests).
FLAT = ScalingSettings(horizon_s=1.0, target_utilization=1.0, sustain_s=0.0)


# ================================================================== scaling


def burst_loads(n: int = 20) -> dict[str, ModelLoad]:
    """`n` CFG requests just arrived: every one waits for its first Flux step; the
    encoders are (nearly) done; each will still need one decode from the VAE."""
    by_model = costs().request(catalog().workflows[CFG], defaults(CFG)).by_model
    rate = n / 5.0
    step = by_model[FLUX] / 4
    return {
        CLIP: ModelLoad(CLIP, 0, 0.0, 0.0, rate, by_model[CLIP]),
        T5: ModelLoad(T5, 0, 0.0, n * by_model[T5] / 2, rate, by_model[T5]),
        FLUX: ModelLoad(FLUX, n, n * step, n * by_model[FLUX], rate, by_model[FLUX], min_slack_s=2.0),
        VAE: ModelLoad(VAE, 0, 0.0, n * by_model[VAE], rate, by_model[VAE]),
    }


def one_each(time=0.0, loads=None) -> Snapshot:
    actors = (actor("clip-0", CLIP), actor("t5-0", T5), actor("flux-0", FLUX, "g1"), actor("vae-0", VAE))
    return Snapshot(time, loads or {}, actors, (dev("g0", 40), dev("g1", 50)))


def test_burst_scales_up_only_the_bottleneck_model():
    settings = ScalingSettings()  # sustain_s 1 s
    models = served_models(catalog(), WF)
    assert models == [CLIP, T5, FLUX, VAE]
    targets, memory = scale_targets(one_each(0.0, burst_loads(20)), models, ScalingMemory(), settings)
    assert [(t.current, t.target) for t in targets] == [(1, 1)] * 4  # not yet sustained
    assert memory.hot_since == {FLUX: 0.0}

    snap = one_each(1.0, burst_loads(20))
    targets, memory = scale_targets(snap, models, memory, settings)

    by = {t.model: t for t in targets}
    assert by[FLUX].current == 1 and by[FLUX].target > 1
    assert "bottleneck" in by[FLUX].reason
    # up at once to the full demand
    assert by[FLUX].target == math.ceil(demand_devices(snap.load(FLUX), settings))
    for model in (CLIP, T5, VAE):
        assert (by[model].current, by[model].target) == (1, 1), by[model]
    # the VAE has pending work worth more than one device: only its empty queue keeps it at 1
    assert demand_devices(snap.load(VAE), settings) > 1
    assert not is_bottleneck(snap.load(VAE), 1, settings)
    assert memory.last_up == {FLUX: 1.0}


def test_a_bottleneck_must_last_sustain_s():
    s = ScalingSettings(horizon_s=1.0, target_utilization=1.0, sustain_s=1.0, up_cooldown_s=0.0)
    deep, empty = {"M": ModelLoad("M", 8, 4.0, 6.0)}, {"M": ModelLoad("M", 0, 0.0, 6.0)}
    memory = ScalingMemory()
    # spikes: the queue empties every 0.75 s (one batch clears it): never a bottleneck
    for tick in range(40):
        now = tick * 0.25
        loads = empty if tick % 3 == 2 else deep
        t, memory = one_target(Snapshot(now, loads, replicas_of("M", 1)), memory, s)
        assert t.target == 1, now
    assert memory.hot_since == {"M": 9.75}  # restarted after the last emptying
    # deep for a whole sustain_s: up, to the full demand
    t, memory = one_target(Snapshot(10.5, deep, replicas_of("M", 1)), memory, s)
    assert t.target == 1
    t, memory = one_target(Snapshot(10.75, deep, replicas_of("M", 1)), memory, s)
    assert t.target == 6
    t, memory = one_target(Snapshot(11.0, empty, replicas_of("M", 6)), memory, s)
    assert memory.hot_since == {}


def test_bottleneck_needs_a_queue_waiting_longer_than_queue_wait_s():
    s = ScalingSettings(queue_wait_s=0.5)
    assert not is_bottleneck(ModelLoad("M", 0, 0.0, 100.0), 1, s)  # no queue
    assert not is_bottleneck(ModelLoad("M", 3, 1.0, 100.0), 2, s)  # 0.5 s per replica: not beyond
    assert is_bottleneck(ModelLoad("M", 3, 1.01, 100.0), 2, s)
    assert is_bottleneck(ModelLoad("M", 1, 0.6, 0.6), 0, s)  # no replica at all: per one


def test_demand_is_rate_times_work_plus_backlog_over_horizon_over_utilization():
    load = ModelLoad("M", arrival_rate=2.0, work_per_request_s=0.5, pending_s=8.0)
    s = ScalingSettings(horizon_s=4.0, target_utilization=0.5)
    assert demand_devices(load, s) == pytest.approx((2.0 * 0.5 + 8.0 / 4.0) / 0.5)


def test_lora_switching_time_counts_as_work_in_the_demand():
    from broker import protocol as p
    from scheduler.snapshot import switch_shares

    s = ScalingSettings(horizon_s=4.0, target_utilization=0.5)
    plain = ModelLoad("M", arrival_rate=2.0, work_per_request_s=0.5, pending_s=8.0)
    switching = ModelLoad("M", arrival_rate=2.0, work_per_request_s=0.5, pending_s=8.0, switch_share=0.25)
    assert demand_devices(switching, s) == pytest.approx(demand_devices(plain, s) / 0.75)
    capped = ModelLoad("M", arrival_rate=2.0, work_per_request_s=0.5, switch_share=1.0)
    assert math.isfinite(demand_devices(capped, s))

    def actor(actor_id, model, busy_s, switch_s):
        telemetry = p.ActorTelemetry(busy_s=busy_s, adapter_switch_s=switch_s)
        return p.ActorStats(actor_id, model, "h", "cuda:0", "busy", 1, 1, 1, 1, 0, 1, 0, telemetry)

    actors = [actor("a", "M", 10.0, 1.0), actor("b", "M", 30.0, 9.0), actor("c", "N", 5.0, 0.0)]
    shares = switch_shares(actors)
    assert shares["M"] == pytest.approx(10.0 / 40.0)  # time-weighted over the pool
    assert shares["N"] == 0.0 and "X" not in shares


def test_up_cooldown_spaces_two_scale_ups():
    s = ScalingSettings(horizon_s=1.0, target_utilization=1.0, up_cooldown_s=1.0, sustain_s=0.0)
    hot = {"M": ModelLoad("M", 10, 5.0, 3.0)}
    t, memory = one_target(Snapshot(0.0, hot, replicas_of("M", 1)), ScalingMemory(), s)
    assert t.target == 3
    hotter = {"M": ModelLoad("M", 10, 5.0, 5.0)}
    t, memory2 = one_target(Snapshot(0.5, hotter, replicas_of("M", 3)), memory, s)
    assert t.target == 3  # in the cooldown
    assert memory2.last_up == {"M": 0.0}
    t, memory3 = one_target(Snapshot(1.0, hotter, replicas_of("M", 3)), memory2, s)
    assert t.target == 5
    assert memory3.last_up == {"M": 1.0}


def test_scale_down_one_replica_at_a_time_after_the_cooldown():
    s = ScalingSettings(down_cooldown_s=10.0, hysteresis=0.3)
    idle = {"M": ModelLoad("M")}
    memory, n, history = ScalingMemory(), 4, []
    for tick in range(0, 81):  # every 0.5 s for 40 s, replicas follow the target at once
        now = tick * 0.5
        t, memory = one_target(Snapshot(now, idle, replicas_of("M", n)), memory, s)
        assert t.target in (n, n - 1)
        if t.target != n:
            history.append((now, n, t.target))
            n = t.target
    assert history == [(10.0, 4, 3), (20.0, 3, 2), (30.0, 2, 1)]  # never below the minimum of 1


def test_no_scale_down_sooner_than_down_cooldown_after_a_scale_up():
    s = ScalingSettings(down_cooldown_s=10.0)
    snap = lambda now: Snapshot(now, {"M": ModelLoad("M")}, replicas_of("M", 3))  # noqa: E731
    # low for long enough, but scaled up at t=5
    memory = ScalingMemory(last_up={"M": 5.0}, low_since={"M": 0.0})
    t, memory = one_target(snap(12.0), memory, s)
    assert t.target == 3
    t, memory = one_target(snap(14.99), memory, s)
    assert t.target == 3
    t, _ = one_target(snap(15.0), memory, s)
    assert t.target == 2


def test_hysteresis_band_resets_the_low_timer():
    # 3 replicas, hysteresis 0.3: low means demand <= 2 x 0.7 = 1.4 devices
    s = ScalingSettings(horizon_s=1.0, target_utilization=1.0, down_cooldown_s=10.0, hysteresis=0.3)
    low, band = {"M": ModelLoad("M", pending_s=1.4)}, {"M": ModelLoad("M", pending_s=1.5)}
    three = replicas_of("M", 3)
    t, memory = one_target(Snapshot(0.0, low, three), ScalingMemory(), s)
    assert (t.target, memory.low_since) == (3, {"M": 0.0})  # exactly at the margin counts as low
    t, memory = one_target(Snapshot(9.0, band, three), memory, s)
    assert (t.target, memory.low_since) == (3, {})  # above the margin: the timer starts over
    t, memory = one_target(Snapshot(10.0, low, three), memory, s)
    assert t.target == 3 and memory.low_since == {"M": 10.0}
    t, _ = one_target(Snapshot(20.0, low, three), memory, s)
    assert t.target == 2


def test_oscillating_load_faster_than_the_cooldown_does_not_flap():
    s = ScalingSettings()
    high = {"M": ModelLoad("M", 10, 5.0, 8.0, 2.0, 0.5)}  # a bottleneck wanting 4 devices
    low = {"M": ModelLoad("M")}
    assert math.ceil(demand_devices(high["M"], s)) == 4
    memory, n = ScalingMemory(), 1
    ups = downs = 0
    for tick in range(0, 240):  # every 0.25 s for 60 s; the load flips every 2 s
        now = tick * 0.25
        loads = high if int(now // 2) % 2 == 0 else low
        t, memory = one_target(Snapshot(now, loads, replicas_of("M", n)), memory, s)
        ups += t.target > n
        downs += t.target < n
        n = t.target
    assert (ups, downs, n) == (1, 0, 4)
    # once the load stays low, it comes down a replica per cooldown
    changes = []
    for tick in range(240, 240 + 4 * 45):
        now = tick * 0.25
        t, memory = one_target(Snapshot(now, low, replicas_of("M", n)), memory, s)
        if t.target != n:
            changes.append((now, n, t.target))
            n = t.target
    assert [c[1:] for c in changes] == [(4, 3), (3, 2), (2, 1)]
    assert all(b[0] - a[0] >= s.down_cooldown_s for a, b in zip(changes, changes[1:], strict=False))


def test_targets_stay_within_the_per_model_bounds():
    s = ScalingSettings(per_model_min={"M": 2}, per_model_max={"M": 3}, horizon_s=1.0, target_utilization=1.0,
                        sustain_s=0.0)
    burst = {"M": ModelLoad("M", 50, 50.0, 100.0)}
    t, _ = one_target(Snapshot(0.0, burst, replicas_of("M", 2)), ScalingMemory(), s)
    assert t.target == 3  # demand 100, capped at the maximum
    t, _ = one_target(Snapshot(0.0, {}, replicas_of("M", 5)), ScalingMemory(), s)
    assert t.target == 3  # above the maximum: back within it
    # at the minimum and idle for ages: stays there
    t, _ = one_target(Snapshot(1000.0, {}, replicas_of("M", 2)), ScalingMemory(low_since={"M": 0.0}), s)
    assert t.target == 2
    assert s.bounds("M") == (2, 3) and s.bounds("other") == (1, 64)


@pytest.mark.parametrize("current", [0, 1])
def test_below_minimum_is_raised_at_once_without_demand(current):
    s = ScalingSettings(min_replicas=2)
    t, memory = one_target(Snapshot(0.0, {}, replicas_of("M", current)), ScalingMemory(last_up={"M": 0.0}), s)
    assert (t.current, t.target) == (current, 2)  # even inside the up cooldown
    assert "minimum" in t.reason


def test_draining_actors_do_not_count_as_replicas():
    snap = Snapshot(0.0, {}, (actor("a", "M"), actor("b", "M", draining=True), actor("c", "N")))
    assert snap.replicas() == {"M": 1, "N": 1}
    assert [a.actor_id for a in snap.actors_of("M")] == ["a"]
    t, _ = one_target(snap, ScalingMemory(), ScalingSettings(min_replicas=2))
    assert (t.current, t.target) == (1, 2)


def test_scale_targets_never_mutates_the_memory_it_is_given():
    memory = ScalingMemory(last_up={"M": 0.0}, low_since={"N": 1.0}, hot_since={"M": 40.0})
    snap = Snapshot(50.0, {"M": ModelLoad("M", 10, 10.0, 10.0)}, replicas_of("M", 1) + replicas_of("N", 2))
    _, new = scale_targets(snap, ["M", "N"], memory, ScalingSettings(horizon_s=1.0, target_utilization=1.0))
    assert memory == ScalingMemory(last_up={"M": 0.0}, low_since={"N": 1.0}, hot_since={"M": 40.0})
    assert new.last_up == {"M": 50.0}


# ================================================================== placement

NEED = 24 * GB
HEAD = 4 * GB


def snap_of(devices, actors=()) -> Snapshot:
    return Snapshot(0.0, {}, tuple(actors), tuple(devices))


def test_place_never_overcommits_memory():
    exact = dev("g0", 28)  # NEED + HEAD exactly
    short = DeviceView("h1", "g1", "cuda", 80 * GB, 28 * GB - 1)
    assert place(FLUX, NEED, snap_of([short, exact]), set(), {FLUX}, headroom_bytes=HEAD) == exact
    assert place(FLUX, NEED, snap_of([short]), set(), {FLUX}, headroom_bytes=HEAD) is None
    assert place(FLUX, NEED, snap_of([]), set(), {FLUX}) is None
    # bytes promised to spawns not yet reported count as used
    assert place(FLUX, NEED, snap_of([dev("g0", 50)]), set(), {FLUX}, {("h1", "g0"): 23 * GB}, HEAD) is None
    assert place(FLUX, NEED, snap_of([dev("g0", 50)]), set(), {FLUX}, {("h1", "g0"): 22 * GB}, HEAD) is not None
    # a reservation on another host's same-named device does not count here
    assert place(FLUX, NEED, snap_of([dev("g0", 50)]), set(), {FLUX}, {("h2", "g0"): 40 * GB}, HEAD) is not None


def test_place_ignores_cpu_devices():
    cpu = DeviceView("h1", "cpu", "cpu", 1000 * GB, 1000 * GB)
    assert place(VAE, GB, snap_of([cpu]), set(), set()) is None
    gpu = dev("g0", 2)
    assert place(VAE, GB, snap_of([cpu, gpu]), set(), set()) == gpu


def test_place_never_puts_a_second_replica_of_a_base_model_on_a_device():
    crowded_but_light = dev("g1", 30)  # a busy VAE, no base model
    with_base = dev("g0", 60)  # an idle base model, much more memory
    actors = [actor("dev-0", "Flux1Dev", "g0"), actor("vae-0", VAE, "g1", busy_ratio=0.9)]
    heavy = {FLUX, "Flux1Dev"}
    # a device without a base model first; beside another base model when it fits
    assert place(FLUX, NEED, snap_of([with_base, crowded_but_light], actors), set(), heavy) == crowded_but_light
    assert place(FLUX, NEED, snap_of([with_base], actors), set(), heavy) == with_base
    # never beside a replica of itself (memory, no compute), nor one promised this round
    assert place("Flux1Dev", NEED, snap_of([with_base], actors), set(), heavy) is None
    assert place(FLUX, NEED, snap_of([dev("g2", 80)]), set(), heavy, reserved_heavy={("h1", "g2", FLUX): 1}) is None


def test_place_prefers_a_device_without_a_base_model_even_for_a_light_model():
    crowded_but_light = dev("g1", 30)
    with_base = dev("g0", 60)
    actors = [actor("dev-0", "Flux1Dev", "g0"), actor("vae-0", VAE, "g1", busy_ratio=0.9)]
    heavy = {FLUX, "Flux1Dev"}
    assert place(VAE, GB, snap_of([with_base, crowded_but_light], actors), set(), heavy) == crowded_but_light
    # ... and a promised base-model spawn counts like a running one
    g2, g3 = dev("g2", 80), dev("g3", 40)
    assert place(VAE, GB, snap_of([g2, g3]), set(), heavy, reserved_heavy={("h1", "g2"): 1}) == g3
    # with a base model everywhere, the light model still goes somewhere
    assert place(VAE, GB, snap_of([with_base], actors), set(), heavy) == with_base


def test_place_prefers_less_busy_then_neighbours_then_free_memory():
    g0, g1, g2 = dev("g0", 70, host="h1"), dev("g1", 40, host="h2"), dev("g2", 60, host="h2")
    # busy first: g0 runs a half-busy VAE; g1/g2 run idle CLIP actors
    actors = [actor("vae-0", VAE, "g0", "h1", busy_ratio=0.5), actor("clip-0", CLIP, "g1", "h2"),
              actor("clip-1", CLIP, "g2", "h2")]
    assert place(FLUX, NEED, snap_of([g0, g1, g2], actors), {CLIP, T5, VAE}, {FLUX}) == g2
    # equal load: the host with the workflow's other models wins over more free memory
    g3 = dev("g3", 78, host="h3")
    idle = [actor("clip-0", CLIP, "g1", "h2")]
    assert place(FLUX, NEED, snap_of([g3, g1], idle), {CLIP, T5, VAE}, {FLUX}) == g1
    assert place(FLUX, NEED, snap_of([g3, g1], idle), set(), {FLUX}) == g3  # no neighbours: most free
    # busy ratios within rounding count as equal
    near = [actor("clip-0", CLIP, "g1", "h2", busy_ratio=0.101), actor("t5-0", T5, "g3", "h3", busy_ratio=0.099)]
    assert place(FLUX, NEED, snap_of([g3, g1], near), set(), {FLUX}) == g3


def test_neighbours_are_the_models_sharing_a_workflow():
    assert {CLIP, T5, VAE} <= neighbours_of(catalog(), FLUX)
    assert FLUX not in neighbours_of(catalog(), FLUX)
    assert FLUX in neighbours_of(catalog(), "Flux1DevControlNetCanny")
    assert "StableDiffusion15" not in neighbours_of(catalog(), FLUX)


# ------------------------------------------------------------------ conversion


def conversion_snapshot(cold_actor: ActorView, *extra: ActorView, free_gb=10, queue=0) -> Snapshot:
    """Every device full; the cold model (T5, about 9.5 GB) has another replica on g0."""
    actors = (actor("flux-0", FLUX, "g0"), cold_actor, *extra, actor("t5-keep", T5, "g0"))
    loads = {T5: ModelLoad(T5, queue, 0.1 * queue, 0.1 * queue)}
    return Snapshot(0.0, loads, actors, (dev("g0", 1), dev("g1", free_gb)))


def convert(snap, backlog_s=40.0, load_s=3.0, need=NEED + HEAD, targets=None, minimums=None):
    resident = {T5: costs().resident_bytes(T5), FLUX: NEED, VAE: costs().resident_bytes(VAE)}
    return conversion_victim(FLUX, snap, targets if targets is not None else {FLUX: 4, T5: 1},
                             minimums or {FLUX: 1, T5: 1, VAE: 1}, backlog_s, load_s, need, resident)


def test_conversion_picks_an_idle_actor_of_a_cold_model_when_the_backlog_outweighs_loading():
    cold = actor("t5-1", T5, "g1")
    snap = conversion_snapshot(cold, free_gb=20)  # 20 GB + T5's 9.5 GB >= 28 GB
    assert convert(snap, backlog_s=40.0, load_s=3.0) == cold
    # backlog per hot replica vs the load time: equal is not enough
    assert convert(snap, backlog_s=3.0, load_s=3.0) is None
    assert convert(snap, backlog_s=3.01, load_s=3.0) == cold
    two_hot = Snapshot(0.0, snap.models, snap.actors + (actor("flux-1", FLUX, "g0"),), snap.devices)
    assert convert(two_hot, backlog_s=5.0, load_s=3.0) is None  # 2.5 s per replica


def test_conversion_needs_the_freed_device_to_fit_the_hot_model():
    cold = actor("t5-1", T5, "g1")
    assert convert(conversion_snapshot(cold, free_gb=10)) is None  # 10 + 9.5 < 28
    cpu_actor = actor("t5-1", T5, "cpu")
    assert convert(conversion_snapshot(cpu_actor, free_gb=100)) is None  # not on an accelerator


@pytest.mark.parametrize(
    "blocked",
    [dict(in_flight=1), dict(held=2), dict(draining=True)],
    ids=["busy", "holding-tensors", "draining"],
)
def test_conversion_never_picks_a_busy_or_tensor_holding_actor(blocked):
    cold = actor("t5-1", T5, "g1", **blocked)
    assert convert(conversion_snapshot(cold, free_gb=40)) is None
    other = actor("t5-2", T5, "g1")  # an idle one beside it is fine
    assert convert(conversion_snapshot(cold, other, free_gb=40), targets={FLUX: 4, T5: 0}) == other


def test_conversion_never_takes_a_model_at_its_minimum_with_work_queued():
    sole = actor("t5-1", T5, "g1")
    snap = Snapshot(0.0, {T5: ModelLoad(T5, 2, 0.2, 0.2)}, (actor("flux-0", FLUX), sole), (dev("g0", 1), dev("g1", 40)))
    assert convert(snap, targets={FLUX: 4, T5: 1}) is None
    # at its target, but with an empty queue and more than its minimum: cold
    snap = conversion_snapshot(sole, free_gb=40, queue=0)
    assert convert(snap, targets={FLUX: 4, T5: 2}) == sole
    # the same with work queued: not cold
    snap = conversion_snapshot(sole, free_gb=40, queue=3)
    assert convert(snap, targets={FLUX: 4, T5: 2}) is None


def test_conversion_prefers_the_larger_surplus_then_the_less_busy():
    vae_a, vae_b = actor("vae-a", VAE, "g1", busy_ratio=0.3), actor("vae-b", VAE, "g1", busy_ratio=0.1)
    t5 = actor("t5-1", T5, "g1")
    snap = Snapshot(0.0, {}, (actor("flux-0", FLUX), vae_a, vae_b, actor("vae-c", VAE, "g0"), t5,
                              actor("t5-keep", T5)), (dev("g0", 1), dev("g1", 40)))
    # VAE: 3 replicas for a target of 1 (surplus 2); T5: 2 for 1 (surplus 1)
    assert convert(snap, targets={FLUX: 4, T5: 1, VAE: 1}) == vae_b
    assert convert(snap, targets={FLUX: 4, T5: 0, VAE: 2}) == t5


def test_conversion_never_picks_the_hot_models_own_actor():
    snap = Snapshot(0.0, {}, (actor("flux-0", FLUX, "g0"), actor("flux-1", FLUX, "g1")), (dev("g0", 1), dev("g1", 40)))
    assert convert(snap, targets={FLUX: 1}) is None


# ------------------------------------------------------------------ scale-down victim


def test_scale_down_victim_prefers_idle_then_holding_nothing_then_crowded():
    busy = actor("a-busy", "M", "g0", in_flight=1)
    holding = actor("b-holding", "M", "g1", held=3)
    idle = actor("c-idle", "M", "g2", busy_ratio=0.9)
    assert scale_down_victim("M", snap_of([], [busy, holding, idle])) == idle
    assert scale_down_victim("M", snap_of([], [busy, holding])) == holding
    assert scale_down_victim("M", snap_of([], [busy])) == busy
    # both idle and empty: the one on the more crowded device, then the less busy
    alone, crowded = actor("d-alone", "M", "g3"), actor("e-crowded", "M", "g4", busy_ratio=0.5)
    neighbours = [actor("x", "N", "g4"), actor("y", "N", "g4")]
    assert scale_down_victim("M", snap_of([], [alone, crowded, *neighbours])) == crowded
    lazy = actor("f-lazy", "M", "g3", busy_ratio=0.1)
    assert scale_down_victim("M", snap_of([], [actor("g-eager", "M", "g3", busy_ratio=0.2), lazy])) == lazy


def test_scale_down_victim_skips_draining_actors_and_absent_models():
    draining = actor("a", "M", draining=True)
    assert scale_down_victim("M", snap_of([], [draining])) is None
    assert scale_down_victim("M", snap_of([], [])) is None
    keep = actor("b", "M", in_flight=2)
    assert scale_down_victim("M", snap_of([], [draining, keep])) == keep


# ================================================================== a planning round


def cluster(time=0.0, loads=None, free=(30, 80, 80, 80), extra=()) -> Snapshot:
    """One actor per model of the CFG workflow on g0; the other devices empty."""
    actors = (actor("clip-0", CLIP), actor("t5-0", T5), actor("flux-0", FLUX), actor("vae-0", VAE), *extra)
    devices = tuple(dev(f"g{i}", f) for i, f in enumerate(free))
    return Snapshot(time, loads or {}, actors, devices)


PLAN = PlanSettings(ScalingSettings(max_replicas=4, sustain_s=0.0), workflows=WF)


def test_plan_round_spawns_only_the_bottleneck_and_places_each_on_its_own_device():
    settings = PlanSettings(ScalingSettings(max_replicas=4), workflows=WF)  # default sustain_s
    first = plan_round(cluster(0.0, burst_loads(20)), costs(), ScalingMemory(), settings)
    assert first.actions == []
    plan = plan_round(cluster(1.0, burst_loads(20)), costs(), first.memory, settings)
    assert {t.model: (t.current, t.target) for t in plan.targets} == {CLIP: (1, 1), T5: (1, 1), FLUX: (1, 4), VAE: (1, 1)}
    assert all(isinstance(a, Spawn) for a in plan.actions)
    assert [(a.model, a.host) for a in plan.actions] == [(FLUX, "h1")] * 3
    assert sorted(a.device for a in plan.actions) == ["g1", "g2", "g3"]  # g0 lacks the room and has a base model
    assert all("scale 1->4" in a.reason for a in plan.actions)
    assert plan.memory.last_up == {FLUX: 1.0}


def test_plan_round_reserves_memory_across_spawns_of_one_round():
    # g1 has room for one Flux (24 + 4 GB headroom), not two; g2 too
    plan = plan_round(cluster(loads=burst_loads(20), free=(1, 45, 40)), costs(), ScalingMemory(), PLAN)
    assert [(a.model, a.device) for a in plan.actions] == [(FLUX, "g1"), (FLUX, "g2")]
    # one device with room for one: one spawn, not two
    plan = plan_round(cluster(loads=burst_loads(20), free=(1, 45)), costs(), ScalingMemory(), PLAN)
    assert [(a.model, a.device) for a in plan.actions] == [(FLUX, "g1")]
    # room for two base models on one device: still one (a second would only take turns)
    plan = plan_round(cluster(loads=burst_loads(20), free=(1, 80)), costs(), ScalingMemory(), PLAN)
    assert [(a.model, a.device) for a in plan.actions] == [(FLUX, "g1")]
    # light models: two spawns of one round share a device only while it has room for both
    loads = {VAE: ModelLoad(VAE, 10, 10.0, 12.0)}
    vae_need = costs().resident_bytes(VAE)
    room_for_one = 4 + 1.5 * vae_need / GB  # headroom + one and a half VAEs
    settings = PlanSettings(ScalingSettings(max_replicas=3, sustain_s=0.0), workflows=WF)
    plan = plan_round(cluster(loads=loads, free=(1, room_for_one)), costs(), ScalingMemory(), settings)
    assert [(a.model, a.device) for a in plan.actions] == [(VAE, "g1")]
    plan = plan_round(cluster(loads=loads, free=(1, room_for_one + 1)), costs(), ScalingMemory(), settings)
    assert [(a.model, a.device) for a in plan.actions] == [(VAE, "g1"), (VAE, "g1")]


def test_plan_round_skips_models_with_a_change_in_progress():
    loads = {**burst_loads(20), VAE: ModelLoad(VAE)}
    snap = cluster(loads=loads, extra=(actor("vae-1", VAE, "g1"), actor("vae-2", VAE, "g1")))
    memory = ScalingMemory(low_since={VAE: -100.0})
    plan = plan_round(snap, costs(), memory, PLAN)
    assert sorted({type(a).__name__ + ":" + a.model for a in plan.actions}) == [f"Spawn:{FLUX}", f"Stop:{VAE}"]
    plan = plan_round(snap, costs(), memory, PLAN, in_progress=frozenset({FLUX}))
    assert [(type(a), a.model) for a in plan.actions] == [(Stop, VAE)]
    target = next(t for t in plan.targets if t.model == FLUX)
    assert (target.target, target.reason) == (target.current, "change in progress")  # judged once it settles
    plan = plan_round(snap, costs(), memory, PLAN, in_progress=frozenset({FLUX, VAE}))
    assert plan.actions == []


def test_plan_round_scales_down_one_idle_replica():
    # vae-0 shares the crowded g0; vae-1 is busy; vae-2 is alone on g2
    snap = cluster(extra=(actor("vae-1", VAE, "g1", in_flight=1), actor("vae-2", VAE, "g2")))
    plan = plan_round(snap, costs(), ScalingMemory(low_since={VAE: -100.0}), PLAN)
    assert plan.actions == [Stop("vae-0", VAE, plan.actions[0].reason)]
    assert plan.actions[0].reason.startswith("scale 3->2")
    snap = cluster(extra=(actor("vae-1", VAE, "g1", in_flight=1), actor("vae-2", VAE, "g2")))
    snap = Snapshot(snap.time, snap.models, tuple(a for a in snap.actors if a.actor_id != "vae-0"), snap.devices)
    plan = plan_round(snap, costs(), ScalingMemory(low_since={VAE: -100.0}), PLAN)
    assert [a.actor_id for a in plan.actions] == ["vae-2"]  # the idle one, never the busy one


def test_plan_round_converts_a_cold_actor_when_nothing_fits():
    # every device full; a second T5 replica idles on g1 with 20 GB free beside it
    snap = cluster(loads=burst_loads(20), free=(1, 20), extra=(actor("t5-1", T5, "g1"),))
    plan = plan_round(snap, costs(), ScalingMemory(), PLAN)
    assert len(plan.actions) == 1
    (stop,) = plan.actions
    assert isinstance(stop, Stop) and (stop.actor_id, stop.model) == ("t5-1", T5)
    assert stop.reason.startswith(f"convert g1 to {FLUX}")
    # a small backlog: loading a Flux replica (2.9 s) does not pay; nothing happens
    small = dict(burst_loads(20))
    small[FLUX] = ModelLoad(FLUX, 4, 2.0, 2.5, 2.0, 1.7)  # wants 4 devices, but 2.5 s of backlog
    plan = plan_round(cluster(loads=small, free=(1, 20), extra=(actor("t5-1", T5, "g1"),)), costs(), ScalingMemory(), PLAN)
    assert {t.model: t.target for t in plan.targets}[FLUX] == 4
    assert plan.actions == []


def test_plan_round_with_nothing_to_do_is_empty_and_all_models_are_targeted():
    plan = plan_round(cluster(), costs(), ScalingMemory(), PLAN)
    assert plan.actions == []
    assert [t.model for t in plan.targets] == [CLIP, T5, FLUX, VAE]
    # every workflow when none is named
    everything = plan_round(Snapshot(0.0), costs(), ScalingMemory(), PlanSettings())
    assert {t.model for t in everything.targets} == {m for wf in catalog().workflows.values() for m in wf.models}


def test_two_base_model_spawns_of_one_round_go_to_different_devices():
    # one H200 (141 GB) and one H100 (80 GB), both empty: the larger does not get both
    snap = cluster(loads=burst_loads(20), free=(1, 141, 80))
    plan = plan_round(snap, costs(), ScalingMemory(), PlanSettings(ScalingSettings(max_replicas=3, sustain_s=0.0),
                                                                   workflows=WF))
    assert [a.model for a in plan.actions] == [FLUX, FLUX]
    assert sorted(a.device for a in plan.actions) == ["g1", "g2"]


def _stop_and_convert_snapshot(t5_a: ActorView, t5_b: ActorView, extra=()) -> Snapshot:
    actors = (actor("clip-0", CLIP, "g0"), actor("flux-0", FLUX, "g0"), actor("vae-0", VAE, "g0"), t5_a, t5_b, *extra)
    return Snapshot(100.0, burst_loads(20), actors, (dev("g0", 1), dev("g1", 20)))


def test_a_round_never_stops_a_model_below_its_minimum():
    # T5 has been idle long enough to drop to 1; Flux is hot and nothing fits
    t5_a = actor("t5-a", T5, "g0", busy_ratio=0.5)  # on the crowded device: the scale-down victim
    t5_b = actor("t5-b", T5, "g1")  # idle, its device fits Flux once it stops: the conversion victim
    plan = plan_round(_stop_and_convert_snapshot(t5_a, t5_b), costs(), ScalingMemory(low_since={T5: 0.0}), PLAN)
    stopped = [a.actor_id for a in plan.actions if isinstance(a, Stop)]
    remaining = [a for a in ("t5-a", "t5-b") if a not in stopped]
    assert len(remaining) >= 1, plan.actions


def test_a_round_never_stops_one_actor_twice():
    t5_a = actor("t5-a", T5, "g1")  # on the crowded device and first by id: both rules pick it
    t5_b = actor("t5-b", T5, "g0")
    extra = (actor("clip-1", CLIP, "g1"), actor("vae-1", VAE, "g1"), actor("vae-2", VAE, "g1"))
    plan = plan_round(_stop_and_convert_snapshot(t5_a, t5_b, extra), costs(),
                      ScalingMemory(low_since={T5: 0.0}), PLAN)
    stopped = [a.actor_id for a in plan.actions if isinstance(a, Stop)]
    assert len(stopped) == len(set(stopped)), plan.actions


def test_conversion_only_frees_a_device_the_hot_model_may_use():
    # one GPU with all four models and a second, idle T5 replica; 20 GB free: Flux
    # would fit by memory once a T5 stops, but g0 already runs a base model (flux-0)
    snap = cluster(loads=burst_loads(20), free=(20,), extra=(actor("t5-1", T5, "g0"),))
    plan = plan_round(snap, costs(), ScalingMemory(), PLAN)
    heavy_beside = {a.actor_id: any(b.model == FLUX and b.device == a.device for b in snap.actors)
                    for a in snap.actors}
    pointless = [a for a in plan.actions if isinstance(a, Stop) and heavy_beside[a.actor_id]]
    assert pointless == []


# ================================================================== rules


@pytest.mark.parametrize(
    ("needed", "idle", "mode"),
    [(2, 2, "latency"), (2, 3, "latency"), (2, 1, "throughput"), (4, 3, "throughput"), (4, 4, "latency"),
     (0, 0, "latency"), (1, 0, "throughput")],
)
def test_parallel_mode_is_latency_iff_needed_is_at_most_idle(needed, idle, mode):
    assert rules.parallel_mode(needed, idle) == mode


def test_cfg_actors_needed_is_two_per_live_cfg_request():
    assert [rules.cfg_actors_needed(n) for n in (1, 2, 3)] == [2, 4, 6]
    assert rules.cfg_actors_needed(2, branches=3) == 6


@pytest.mark.parametrize(
    ("solo", "queued", "devices", "slack", "admit", "bound"),
    [
        (1.0, 8.0, 2, 4.0, True, 4.0),  # queued/devices equals the slack: admitted
        (1.0, 8.0 + 1e-9, 2, 4.0, False, 4.0 + 5e-10),  # just above: refused
        (1.0, 8.0, 4, 4.0, True, 2.0),
        (4.0, 0.0, 1, 4.0, True, 4.0),  # its own solo latency equals the slack
        (4.0 + 1e-9, 0.0, 8, 4.0, False, 4.0 + 1e-9),  # solo alone exceeds: refused on an idle cluster
        (2.0, 6.0, 3, 2.0, True, 2.0),  # both bounds equal the slack
        (0.0, 0.0, 1, 0.0, True, 0.0),
    ],
)
def test_admission_admits_exactly_when_the_lower_bound_is_within_the_slack(solo, queued, devices, slack, admit, bound):
    decision = rules.admission(solo, queued, devices, slack)
    assert decision.admit is admit
    assert decision.bound_s == pytest.approx(bound, abs=1e-12)
    assert decision.slack_s == slack
    assert ("within" if admit else "exceeds") in decision.reason


@pytest.mark.parametrize("devices", [0, -1])
def test_admission_with_no_device_raises(devices):
    with pytest.raises(ValueError, match="devices"):
        rules.admission(1.0, 1.0, devices, 10.0)


# ================================================================== costs


def test_solo_latency_of_the_cfg_workflow_matches_the_paper():
    wf = catalog().workflows[CFG]
    params = validate_params(wf, {"prompt": "a lego brick"}, random.Random(0))
    solo = costs().solo_s(wf, params)
    assert solo == pytest.approx(1.99, abs=0.06)  # the paper measures 1.99 s on an H800
    assert solo == costs().request(wf, params, cfg_split=False).solo_s
    split = costs().request(wf, params, cfg_split=True)
    assert split.solo_s < 0.75 * solo  # the two branches of each step run side by side
    # splitting does not make the work smaller: two batch-1 calls cost about a batch-2 one
    assert split.work_s >= 0.9 * costs().request(wf, params).work_s


def test_request_cost_parts_are_consistent():
    wf = catalog().workflows[CFG]
    cost = costs().request(wf, defaults(CFG))
    assert set(cost.by_model) == {CLIP, T5, FLUX, VAE}
    assert sum(cost.by_model.values()) == pytest.approx(cost.work_s)
    assert 0 < cost.min_work_s <= cost.work_s
    assert cost.solo_s <= cost.work_s + 1e-9  # a chain: the critical path is at most all the work
    assert cost.by_model[FLUX] > 0.8 * cost.work_s  # the base model dominates
    plans = unroll(wf, defaults(CFG), cfg_split=True)
    combines = [pl for pl in plans if pl.kind == "denoise" and pl.params.split]
    assert len(combines) == 4
    assert all(costs().plan_costs(pl) == (0.0, 0.0) for pl in combines)
    for pl in plans:
        alone, full = costs().plan_costs(pl)
        assert 0 <= full <= alone


@pytest.mark.parametrize("workflow", ["flux-schnell-canny-cfg", "flux-schnell-depth-cfg"])
def test_controlnet_workflows_cost_a_little_more(workflow):
    base = costs().solo_s(catalog().workflows[CFG], defaults(CFG))
    with_net = costs().solo_s(catalog().workflows[workflow], defaults(workflow))
    assert base < with_net < 1.2 * base


def test_workflows_with_an_unknown_profile_have_no_cost():
    doc = {
        "models": {"enc": {"kind": "text_encoder"}, "den": {"kind": "denoiser", "profile": "NoSuchProfile"},
                   "vae": {"kind": "vae", "profile": "Flux1VAE"}},
        "workflows": {"w": {"text_encoders": ["enc"], "denoiser": "den", "vae": "vae", "cfg": True}},
    }
    cat = parse_catalog(doc)
    model = CostModel(cat)
    wf = cat.workflows["w"]
    params = validate_params(wf, {"prompt": "x"}, random.Random(0))
    assert not model.knows(wf)
    assert model.request(wf, params) is None
    assert model.request(wf, params, cfg_split=True) is None
    assert model.solo_s(wf, params) is None
    assert model.profile("den") is None and model.profile("vae") is not None
    assert (model.load_s("den"), model.resident_bytes("den")) == (0.0, 0)
    assert model.node_s("den", "denoise", 2, (1024, 1024)) == 0.0


def test_node_cost_in_a_full_batch_is_its_share():
    alone = costs().node_s(FLUX, "denoise", 2, (1024, 1024))
    shared = costs().node_s(FLUX, "denoise", 2, (1024, 1024), batch_rows=8)
    assert 0 < shared < alone
    assert costs().node_s(FLUX, "denoise", 0, (1024, 1024)) == 0.0
    assert costs().load_s(FLUX) > 1.0 and costs().resident_bytes(FLUX) > 20 * GB


def test_the_sum_admission_bound_adds_the_queue_wait_to_the_solo_latency():
    # 8 devices, 16 s of queued work: 2 s of queue before a 2 s request; SLO 3.5 s
    assert rules.admission(2.0, 16.0, 8, 3.5).admit  # max(2, 2) = 2 <= 3.5: the paper's bound admits
    decision = rules.admission(2.0, 16.0, 8, 3.5, bound="sum")
    assert not decision.admit and decision.bound_s == pytest.approx(4.0)
    assert rules.admission(2.0, 12.0, 8, 3.5, bound="sum").admit  # 1.5 + 2 = 3.5: exactly the slack
    with pytest.raises(ValueError, match="bound"):
        rules.admission(2.0, 1.0, 8, 3.5, bound="min")
