"""The discrete-event simulator: the real broker core and scheduler in virtual time.

H800 profiles, the paper's three true-CFG FLUX.1-schnell workflows (4 steps, 1024 px)
on simulated 80 GB GPUs; every check mirrors one made on the emulated cluster of real
processes (tests/test_scheduler_cluster.py, the benchmark's systems).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter

import pytest

from broker.catalog import load_catalog, validate_params
from broker.costs.model import CostModel
from clients.bench.loadgen import Arrival, burst_arrivals, poisson_arrivals, summarize
from clients.bench.sim.bench import PAPER_MIX, cluster_systems
from clients.bench.sim.cluster import SimDevice
from clients.bench.sim.control import scheduler_config
from clients.bench.sim.simulator import Simulation, simulate
from clients.bench.sim.timing import (
    EMULATION_2026_11_27,
    MEASURED,
    NO_OVERHEADS,
    Overheads,
    fetch_s,
)
from clients.bench.systems import PAPER_WORKFLOWS, SystemSpec

WORKFLOWS = list(PAPER_WORKFLOWS.values())
BASE = "Flux1Schnell"
SMALL = ["CLIP_Flux", "T5_Flux", "Flux1VAE", "Flux1DevControlNetCanny", "Flux1DevControlNetDepth"]


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def systems(catalog):
    # the paper's systems by name (the pooled baseline has its own tests: test_pooled_baseline.py)
    return {s.name: s for s in cluster_systems(catalog, 8, ("lego", "basic", "shepherd", "clockwork"))}


def _request_cost(catalog, workflow: str):
    spec = catalog.workflows[workflow]
    return CostModel(catalog).request(spec, validate_params(spec, {"prompt": "x", "seed": 0}))


def _one(system, catalog, workflow=WORKFLOWS[0], **options):
    options.setdefault("overheads", NO_OVERHEADS)  # the profiles' times alone, unless a test asks
    outcomes, stats = simulate(system, [Arrival(0.0, workflow, 0)], catalog, 8, **options)
    (outcome,) = outcomes
    assert outcome.status == "ok", outcome
    return outcome, stats


def test_one_request_at_idle_on_lego_runs_its_cfg_branches_on_two_actors(catalog, systems):
    outcome, stats = _one(systems["lego"], catalog)
    split_cost = CostModel(catalog).request(catalog.workflows[WORKFLOWS[0]],
                                            validate_params(catalog.workflows[WORKFLOWS[0]], {"prompt": "x"}), cfg_split=True)
    # the critical path with both branches in parallel (~1.19 s), plus a few data fetches
    assert split_cost.solo_s <= outcome.latency_s < split_cost.solo_s + 0.01
    assert 1.15 < outcome.latency_s < 1.25
    assert outcome.slo_met and outcome.slo_s == pytest.approx(2 * _request_cost(catalog, WORKFLOWS[0]).solo_s, rel=1e-3)
    assert stats["workflows"][WORKFLOWS[0]]["latency_mode"] == 1


def test_one_request_at_idle_on_a_monolith_takes_its_whole_workflow(catalog, systems):
    for name in ("basic", "shepherd", "clockwork"):
        outcome, _ = _one(systems[name], catalog)
        assert outcome.latency_s == pytest.approx(_request_cost(catalog, WORKFLOWS[0]).work_s, abs=1e-6)  # ~2.02 s


def test_a_monolith_loads_a_cold_workflow_first(catalog, systems):
    # clockwork's actors start with the first workflow resident; a canny request waits for its models' load
    outcome, stats = _one(systems["clockwork"], catalog, WORKFLOWS[1], load_time_scale=0.5)
    costs = CostModel(catalog)
    load = 0.5 * sum(costs.load_s(m) for m in catalog.workflows[WORKFLOWS[1]].models)
    assert outcome.latency_s == pytest.approx(_request_cost(catalog, WORKFLOWS[1]).work_s + load, abs=1e-6)
    assert stats["monolith_loads"] == 8 + 1


def test_an_overloaded_baseline_drops_late_requests(catalog, systems):
    arrivals = burst_arrivals(64, WORKFLOWS)
    outcomes, stats = simulate(systems["basic"], arrivals, catalog, 8)
    assert len(outcomes) == len(arrivals) and {o.index for o in outcomes} == set(range(64))
    codes = Counter(o.code for o in outcomes)
    assert codes["deadline_exceeded"] > 20 and codes[None] >= 8
    assert all(o.status in ("ok", "failed") for o in outcomes)
    # a request starts only before its deadline passed: it ends at most one run after it
    assert all(o.latency_s <= o.slo_s + 2.2 for o in outcomes if o.status == "ok")
    assert stats["counters"]["requests_in_flight"] == 0


def test_lego_with_admission_refuses_what_cannot_meet_its_slo(catalog, systems):
    outcomes, _ = simulate(systems["lego"], burst_arrivals(64, WORKFLOWS), catalog, 8)
    rejected = [o for o in outcomes if o.status == "rejected"]
    assert rejected and all(o.code == "slo_unattainable" for o in rejected)
    assert all(o.finished_at == 0.0 for o in rejected)  # at once, at arrival
    assert 8 <= sum(o.accepted for o in outcomes) < 32  # about what 8 GPUs can finish within the SLO
    assert len(outcomes) == 64 and all(o.status != "timeout" for o in outcomes)


def test_requests_not_answered_in_time_are_cancelled_as_timeouts(catalog, systems):
    system = SystemSpec("basic-no-drop", "monolith", systems["basic"].placement, drop_late=False)
    outcomes, stats = simulate(system, burst_arrivals(40, WORKFLOWS), catalog, 8, timeout_s=5.0)
    timeouts = [o for o in outcomes if o.status == "timeout"]
    assert timeouts and all(o.code == "client_timeout" and o.finished_at is None for o in timeouts)
    assert stats["counters"]["requests_cancelled"] >= len(timeouts) - 8  # some were running already
    assert len(outcomes) == 40


def test_same_seed_same_outcomes(catalog, systems):
    arrivals = poisson_arrivals(3.0, 20.0, PAPER_MIX, seed=7)

    def run():
        outcomes, _ = simulate(systems["lego"], arrivals, catalog, 8, seed=3)
        return [(o.index, o.status, o.code, o.latency_s) for o in outcomes]

    first = run()
    assert first == run()
    assert len(first) == len(arrivals) and len({status for _, status, _, _ in first}) >= 1


def test_the_scheduler_scales_only_the_base_model_under_a_burst_then_falls_back(catalog):
    # as tests/test_scheduler_cluster.py: 2 base replicas, time_scale 0.5, short cooldowns
    ts = 0.5
    placement = [(BASE, "emu:0", "emulated"), (BASE, "emu:1", "emulated")]
    placement += [(m, f"emu:{i}", "emulated") for i, m in enumerate(SMALL)]
    args = ["--admission", "false", "--interval-s", "0.25", "--up-cooldown-s", "0.5", "--down-cooldown-s", "2.0",
            "--queue-wait-s", str(0.5 * ts), "--sustain-s", str(1.0 * ts), "--horizon-s", str(4.0 * ts)]
    system = SystemSpec("lego-2", "micro", tuple(placement), scheduler=True, cfg_split="auto", drop_late=False,
                        scheduler_args=tuple(args))
    outcomes, stats = simulate(system, burst_arrivals(24, WORKFLOWS[:1]), catalog, 8, time_scale=ts,
                               load_time_scale=0.0, process_start_s=1.0, drain_s=40.0)
    assert all(o.status == "ok" for o in outcomes)
    timeline = stats["timeline"]
    scaled_at = next(t for t, replicas in timeline if replicas.get(BASE, 0) >= 4)
    assert scaled_at < 5.0
    assert stats["peak_replicas"][BASE] <= 8  # at most one base-model actor per GPU
    # encoders and ControlNets stay packed; the VAE (which batches little) may gain one when
    # the base replicas' decodes arrive together
    assert all(stats["peak_replicas"][m] == 1 for m in SMALL if m != "Flux1VAE")
    assert stats["peak_replicas"]["Flux1VAE"] <= 2
    first = next(line for line in stats["decisions"] if " start " in line)
    assert f"start {BASE} " in first and "bottleneck" in first
    assert stats["workflows"][WORKFLOWS[0]]["latency_mode"] <= 4  # under load the groups collapse
    assert timeline[-1][1][BASE] <= 2  # back down once the burst is over
    assert any(line.split(" ", 1)[1].startswith("stop") for line in stats["decisions"])


def test_32_gpus_for_a_minute_take_seconds(catalog):
    (lego,) = cluster_systems(catalog, 32, ("lego",), hosts=4)
    arrivals = poisson_arrivals(10.0, 60.0, PAPER_MIX, seed=1)
    started = time.perf_counter()
    outcomes, stats = simulate(lego, arrivals, catalog, 32, hosts=4)
    wall = time.perf_counter() - started
    print(f"\n32 GPUs, {len(arrivals)} requests over 60 s: {wall:.2f} s wall, {stats['events']} events, "
          f"attainment {summarize(outcomes, 60.0)['slo_attainment']:.3f}")
    assert len(outcomes) == len(arrivals) and all(o.status != "timeout" for o in outcomes)
    assert stats["hosts"] == 4 and stats["replicas"][BASE] == 32
    assert wall < 20.0  # a few seconds on an idle core


def test_baseline_placements_on_8_gpus_are_the_artifacts(catalog, systems):
    def per_workflow(system):
        return sorted(Counter(m for m, _, _ in system.placement).values(), reverse=True)

    assert per_workflow(systems["basic"]) == [3, 3, 2]
    assert per_workflow(systems["shepherd"]) == [4, 2, 2]
    assert len(systems["clockwork"].placement) == 8 and all("+" in m for m, _, _ in systems["clockwork"].placement)
    # a decoder on every GPU and the heavy text encoder on every second one (burst_replicas),
    # each ControlNet beside every base-model actor (controlnets_beside_base)
    assert Counter(m for m, _, _ in systems["lego"].placement) == Counter({
        BASE: 8, **dict.fromkeys(SMALL, 1), "Flux1VAE": 8, "T5_Flux": 4,
        "Flux1DevControlNetCanny": 8, "Flux1DevControlNetDepth": 8})
    big_basic, big_shepherd = cluster_systems(catalog, 256, ("basic", "shepherd"), hosts=32)
    assert per_workflow(big_basic) == [86, 85, 85] and per_workflow(big_shepherd) == [115, 81, 60]
    assert sorted({d for _, d, _ in big_basic.placement}, key=lambda d: int(d[4:])) == [f"emu:{g}" for g in range(256)]
    (big,) = cluster_systems(catalog, 256, ("lego",), hosts=32)
    counts = Counter(m for m, _, _ in big.placement)
    assert counts[BASE] == 256 and all(counts[m] >= 32 for m in SMALL)
    assert "--max-replicas" in big.scheduler_args


def test_scheduler_args_become_the_controllers_config():
    config = scheduler_config(["--admission", "true", "--interval-s", "0.25", "--cfg-split=auto",
                               "--min-replicas", "2", "--actor-option", "time_scale=0.5", "--actor-option", "x=1"])
    assert config.admission is True and config.interval_s == 0.25 and config.cfg_split == "auto"
    assert config.min_replicas == 2 and config.actor_options == ["time_scale=0.5", "x=1"]
    with pytest.raises(ValueError, match="unknown flag --no-such"):
        scheduler_config(["--no-such", "1"])
    with pytest.raises(ValueError, match="needs a value"):
        scheduler_config(["--interval-s"])


def test_a_placement_that_does_not_fit_fails_naming_it(catalog):
    system = SystemSpec("crowded", "micro", ((BASE, "emu:0", "emulated"),) * 4)
    with pytest.raises(ValueError, match="did not start"):
        simulate(system, [], catalog, 1, gpu_memory_gib=50.0)


class _Clock:
    def __init__(self):
        self.now, self.heap = 0.0, []

    def at(self, when, fn, *args):
        self.heap.append((when, fn, args))
        self.heap.sort(key=lambda e: e[0])

    def run(self):
        while self.heap:
            self.now, fn, args = self.heap.pop(0)
            fn(*args)


class _Actor:
    def __init__(self, clock, seconds, done):
        self.clock, self.seconds, self.done = clock, seconds, done

    def compute_s(self, batch):
        return self.seconds

    def finish(self, batch):
        self.done.append((batch, self.clock.now))


@pytest.mark.parametrize("model, expected", [("fifo", {"a": 1.0, "b": 3.0}), ("shared", {"a": 2.0, "b": 3.0})])
def test_a_device_serialises_or_time_slices_its_actors(model, expected):
    clock, done = _Clock(), []
    device = SimDevice(clock, "h", "emu:0", 1 << 30, model)
    device.submit(_Actor(clock, 1.0, done), "a")
    device.submit(_Actor(clock, 2.0, done), "b")
    clock.run()
    assert {batch: pytest.approx(at) for batch, at in done} == expected
    assert device.busy_s == 3.0


def test_fetch_costs_follow_the_measured_table():
    assert fetch_s(100, True) == pytest.approx(57.34e-6)
    assert fetch_s(16 * 2**20, True) == pytest.approx(149.22e-6)
    assert fetch_s(16 * 2**20, False) == pytest.approx(456.69e-6)
    assert fetch_s(24 * 2**20, True) == pytest.approx((149.22 + 243.94) / 2 * 1e-6)
    assert fetch_s(2**30, False) > fetch_s(2**28, False)


def test_the_cost_models_memo_returns_what_it_would_compute(catalog):
    costs = CostModel(catalog)
    for workflow in WORKFLOWS:
        spec = catalog.workflows[workflow]
        params = validate_params(spec, {"prompt": "x", "seed": 1})
        for cfg_split in (False, True):
            first = costs.request(spec, params, cfg_split)
            assert costs.request(spec, {**params, "prompt": "other", "seed": 2}, cfg_split) is first  # memoised
            assert first == CostModel(catalog)._request(spec, params, cfg_split)
        fewer = costs.request(spec, {**params, "steps": 2})
        assert fewer.work_s < costs.request(spec, params).work_s  # steps are part of the key
    # a spec that is not the catalog's own (same name, other models) is priced, not looked up
    spec = catalog.workflows[WORKFLOWS[1]]
    impostor = dataclasses.replace(spec, controlnets=[])
    params = validate_params(spec, {"prompt": "x"})
    assert costs.request(impostor, params).work_s < costs.request(spec, params).work_s
    assert costs.node_s(BASE, "denoise", 2, [1024, 1024]) == costs.node_s(BASE, "denoise", 2, (1024, 1024)) > 0


def test_cli_runs_every_system_and_writes_json(tmp_path, capsys):
    from clients.bench.sim.bench import cli_main

    out = tmp_path / "sim.json"
    assert cli_main(["--systems", "lego,basic", "--rates", "2,3", "--duration-s", "10", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| poisson 2/s | lego |" in printed and "| poisson 3/s | basic |" in printed and "wall time" in printed
    doc = json.loads(out.read_text())
    assert [(r["load"], r["system"]) for r in doc["results"]] == [
        ("poisson 2/s", "lego"), ("poisson 2/s", "basic"), ("poisson 3/s", "lego"), ("poisson 3/s", "basic")]
    assert all(r["summary"]["count"] == r["requests"] > 0 for r in doc["results"])


def test_cli_replays_trace_files(tmp_path, capsys):
    from clients.bench.sim.bench import cli_main

    trace = tmp_path / "generated_trace_n3_rs2.0_st50000_t300_seed666.txt"
    trace.write_text("A 0.5\nB 0\nC 1.0\nA 0.25\n")
    out = tmp_path / "sim.json"
    assert cli_main(["--systems", "shepherd", "--traces", str(tmp_path), "--trace-scale", "2", "--gpus", "16",
                     "--device-model", "shared", "--json", str(out)]) == 0
    assert "| trace x2.0 (300 s) | shepherd | 8 |" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"]
    assert result["window_s"] == 300.0 and result["summary"]["ok"] == 8 and result["stats"]["hosts"] == 2


def test_cli_runs_the_sharing_setting(capsys):
    from clients.bench.sim.bench import cli_main

    assert cli_main(["--setting", "sharing", "--systems", "lego,shepherd", "--rates", "0.5", "--duration-s", "20"]) == 0
    printed = capsys.readouterr().out
    assert "sharing setting: 16 GPUs" in printed and "| gamma 0.5/s cv 2 | lego |" in printed


def test_simulation_object_exposes_the_core(catalog, systems):
    sim = Simulation(systems["basic"], catalog, gpus=8, overheads=NO_OVERHEADS)
    outcomes, stats = sim.run([Arrival(0.5, WORKFLOWS[2], 0)])
    assert outcomes[0].latency_s == pytest.approx(_request_cost(catalog, WORKFLOWS[2]).work_s)
    assert sim.core.counters["requests_completed"] == 1 and stats["sim_s"] == pytest.approx(0.5 + outcomes[0].latency_s, abs=1e-3)


# ---------------------------------------------------------------- the runtime's overheads

def _longest_path_in_nodes(catalog, workflow: str, cfg_split: bool) -> int:
    from broker.catalog import unroll

    spec = catalog.workflows[workflow]
    depth: dict[str, int] = {}
    for plan in unroll(spec, validate_params(spec, {"prompt": "x"}), cfg_split=cfg_split):  # producers first
        depth[plan.key] = 1 + max((depth[i] for i in plan.inputs), default=0)
    return max(depth.values())


def test_a_monolith_pays_the_task_and_request_overheads_once_per_request(catalog, systems):
    overheads = Overheads(task_s=0.05, request_s=0.02)
    plain, _ = _one(systems["basic"], catalog)
    paid, _ = _one(systems["basic"], catalog, overheads=overheads)
    # one task, one result: ignoring either would give the plain time, counting one twice more
    assert paid.latency_s - plain.latency_s == pytest.approx(0.05 + 0.02, abs=1e-9)


def test_micro_serving_pays_the_task_overhead_on_every_batch_of_its_critical_path(catalog, systems):
    task_s = 0.01
    plain, _ = _one(systems["lego"], catalog)
    paid, stats = _one(systems["lego"], catalog, overheads=Overheads(task_s=task_s))
    assert stats["workflows"][WORKFLOWS[0]]["latency_mode"] == 1  # split CFG, as without overheads
    # encode, then each step's branches (in parallel) and their combine, then decode: 10 batches
    batches = _longest_path_in_nodes(catalog, WORKFLOWS[0], cfg_split=True)
    assert batches == 10
    assert paid.latency_s - plain.latency_s == pytest.approx(batches * task_s, abs=1e-9)
    # the overheads are the runtime's, not the GPU's: time_scale does not shrink them
    fast_plain, _ = _one(systems["lego"], catalog, time_scale=0.5)
    fast_paid, _ = _one(systems["lego"], catalog, time_scale=0.5, overheads=Overheads(task_s=task_s))
    assert fast_paid.latency_s - fast_plain.latency_s == pytest.approx(batches * task_s, abs=1e-9)


def test_the_request_overhead_delays_results_not_rejections(catalog, systems):
    outcomes, _ = simulate(systems["lego"], burst_arrivals(64, WORKFLOWS), catalog, 8,
                           overheads=Overheads(request_s=0.5))
    rejected = [o for o in outcomes if o.status == "rejected"]
    assert rejected and all(o.finished_at == 0.0 for o in rejected)  # refused at once, at arrival
    assert min(o.latency_s for o in outcomes if o.status == "ok") > 0.5 + 1.15  # split solo latency + 0.5


def test_fetches_cost_the_h800_table_or_a_measured_bandwidth():
    assert Overheads().transfer_s(16 * 2**20, True) == fetch_s(16 * 2**20, True)
    measured = Overheads(fetch_s=1e-4, fetch_bytes_per_s=1e9)
    assert measured.transfer_s(10**6, True) == pytest.approx(1e-4 + 1e-3)
    assert measured.transfer_s(10**6, False) == measured.transfer_s(10**6, True)
    assert measured.batch_s(3) == 0.0 and Overheads(task_s=0.002, row_s=0.001).batch_s(3) == pytest.approx(0.004)
    for bad in ({"task_s": -1.0}, {"request_s": "1"}, {"fetch_bytes_per_s": 0.0}):
        with pytest.raises(ValueError, match=f"overheads.{next(iter(bad))}"):
            Overheads(**bad)
    # the defaults: the runtime as calibrated, each fetch priced by its path on a GPU host
    assert MEASURED.task_s > 0 and MEASURED.request_s > 0 and MEASURED.fetch_by_path
    # the old emulation's figures stay to reproduce the tables made with them
    assert EMULATION_2026_11_27.task_s == 0.0105 and EMULATION_2026_11_27.fetch_bytes_per_s == 1.42e9


def test_cli_time_scale_compresses_the_arrivals_and_reports_trace_time(capsys):
    from clients.bench.sim.bench import cli_main

    printed = []

    def p50(*flags):
        assert cli_main(["--systems", "basic", "--rates", "0.2", "--duration-s", "30", *flags]) == 0
        printed.append(capsys.readouterr().out)
        row = next(line for line in printed[-1].splitlines() if line.startswith("| poisson"))
        return float(row.split("|")[7])

    none = ("--task-overhead-ms", "0", "--row-overhead-ms", "0", "--request-overhead-ms", "0", "--fetch-gbps", "0")
    # without overheads a faster cluster under compressed arrivals is the same run, in other units
    assert p50(*none) == p50(*none, "--time-scale", "0.5")
    assert 2.0 <= p50(*none) <= 2.11  # the workflows' solo latencies: no queueing at this rate
    # overheads are real seconds: at time_scale 0.5 they weigh double in the trace's time
    paid = ("--task-overhead-ms", "20", "--row-overhead-ms", "0", "--request-overhead-ms", "30", "--fetch-gbps", "0")
    assert p50(*paid, "--time-scale", "0.5") - p50(*none) == pytest.approx(0.1, abs=0.011)
    assert "overheads: task 20 ms, row 0 ms, request 30 ms, fetch H800 table" in printed[-2]
    with pytest.raises(SystemExit):
        cli_main(["--rates", "1", "--task-overhead-ms", "-1"])
    assert "--task-overhead-ms: expected milliseconds >= 0" in capsys.readouterr().err


def test_the_scheduler_plans_on_published_telemetry(catalog):
    # as the scale-up test above: a burst on 2 base replicas; the scheduler sees the burst
    # only once the broker has published it, so a slower publisher delays its first spawn
    ts = 0.5
    placement = [(BASE, "emu:0", "emulated"), (BASE, "emu:1", "emulated")]
    placement += [(m, f"emu:{i}", "emulated") for i, m in enumerate(SMALL)]
    args = ["--admission", "false", "--interval-s", "0.25", "--up-cooldown-s", "0.5", "--queue-wait-s", str(0.5 * ts),
            "--sustain-s", str(1.0 * ts), "--horizon-s", str(4.0 * ts)]
    system = SystemSpec("lego-2", "micro", tuple(placement), scheduler=True, cfg_split="auto", drop_late=False,
                        scheduler_args=tuple(args))

    def first_spawn(**telemetry):
        sim = Simulation(system, catalog, gpus=8, time_scale=ts, load_time_scale=0.0, process_start_s=1.0,
                         overheads=NO_OVERHEADS, **telemetry)
        _, stats = sim.run(burst_arrivals(24, WORKFLOWS[:1], at_s=0.3))
        assert sim.published is not None and sim.published.time <= sim.now
        return next(float(line.split("s ", 1)[0]) for line in stats["decisions"] if " start " in line)

    prompt = first_spawn()
    late = first_spawn(telemetry_interval_s=2.0, telemetry_min_gap_s=2.0)
    # the burst arrives at 0.3 s: seen in the 2 s snapshot, sustained in the 4 s one
    assert late >= 2.0 > prompt
    with pytest.raises(ValueError, match="telemetry_min_gap_s"):
        Simulation(system, catalog, gpus=8, telemetry_min_gap_s=0.0)


def test_calibration_separates_per_batch_from_per_request_overhead():
    from clients.bench.sim.calibrate import fit, probe_arrivals

    # (batches on the path, requests, gap): 14-batch micro-served and 1-batch monolith probes
    rows = [(b, 1.0, 0.004 * b + 0.013 + noise) for b, noise in ((14, 0.001), (14, -0.001), (1, 0.0005), (1, -0.0005))]
    task_s, request_s = fit(rows)
    assert task_s == pytest.approx(0.004, abs=1e-6) and request_s == pytest.approx(0.013, abs=1e-5)
    with pytest.raises(ValueError, match="do not separate"):
        fit([(14, 1.0, 0.07), (14, 1.0, 0.07)])  # one kind of probe cannot tell the two apart
    arrivals, singles = probe_arrivals(2, (8,))
    assert singles == 6 and len(arrivals) == 14 and len({a.index for a in arrivals}) == 14
    assert {a.workflow for a in arrivals[:3]} == set(WORKFLOWS) and len({a.at_s for a in arrivals[singles:]}) == 1


def test_a_simulated_request_moves_its_conditioning_once_per_actor_as_the_runtime_does(catalog, systems):
    """CFG branches on two actors: each fetches the request's conditioning once (the
    first step), later steps only their latents; the VAE gets no conditioning."""
    outcome, stats = _one(systems["lego"], catalog)
    workflow = catalog.workflows[WORKFLOWS[0]]
    cond = sum(2 * m.seq_len * m.embed_dim * 2 for m in (catalog.models[n] for n in workflow.text_encoders))
    steps = validate_params(workflow, {"prompt": "x"})["steps"]
    # each later step would have carried it again: held instead
    assert stats["reused_bytes"] >= (steps - 1) * cond
    # what moved: the encoders' outputs reaching the actors of step 0, then latents
    assert stats["fetched_bytes"] < stats["reused_bytes"]


def test_gpu_host_fetches_price_each_fetch_by_its_path_as_the_virtual_emulation_does():
    from actors.backends.emulated import measured_fetch_s

    for path in ("device", "host", "network"):
        assert MEASURED.transfer_s(8 << 20, True, path) == measured_fetch_s(8 << 20, path)
    assert MEASURED.transfer_s(8 << 20, False) == measured_fetch_s(8 << 20, "network")
    shm = EMULATION_2026_11_27
    assert shm.transfer_s(8 << 20, True, "device") == shm.fetch_s + (8 << 20) / shm.fetch_bytes_per_s


def test_the_cli_prices_fetches_by_path_unless_a_bandwidth_is_given(capsys):
    from clients.bench.sim.bench import cli_main

    def header(*flags):
        assert cli_main(["--systems", "basic", "--bursts", "1", *flags]) == 0
        return capsys.readouterr().out.splitlines()[0]

    assert header().endswith("fetch this runtime on a GPU host, by path")
    assert header("--gpu-host-fetches").endswith("fetch this runtime on a GPU host, by path")
    assert header("--fetch-gbps", "0").endswith("fetch H800 table")
    assert header("--fetch-gbps", "2").endswith("fetch 0 ms + 2 GB/s")
    with pytest.raises(SystemExit):
        cli_main(["--bursts", "1", "--fetch-gbps", "2", "--gpu-host-fetches"])
    assert "--fetch-gbps: cannot be combined with --gpu-host-fetches" in capsys.readouterr().err
