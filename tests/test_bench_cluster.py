"""The cluster benchmark's harness, end to end in its quick mode (a few seconds of a
real trace on 4 emulated GPUs), and its pure parts. The full runs are benchmarks
(`lego bench cluster`), recorded in docs/benchmarks.md, not tests."""

from __future__ import annotations

import pytest
from PIL import Image

from broker.catalog import load_catalog
from clients.bench.cluster import (
    DATA,
    BenchSettings,
    attainment_chart,
    best_at,
    cluster_table,
    run_cluster_bench,
    systems_of,
)
from clients.bench.systems import (
    PAPER_WORKFLOWS,
    baseline_system,
    lego_system,
    paper_systems,
    read_baseline,
)

needs_data = pytest.mark.skipif(not (DATA / "traces").is_dir(), reason="the trace data is not installed")


@needs_data
def test_baseline_placements_follow_the_artifact():
    basic = baseline_system("basic", read_baseline(DATA / "baselines" / "basic.yml"))
    assert sorted(d for _, d, _ in basic.placement) == [f"emu:{i}" for i in range(8)]
    txt2img = [d for m, d, _ in basic.placement if m == "pipeline/flux-schnell-txt2img-cfg"]
    assert sorted(txt2img) == ["emu:0", "emu:1", "emu:4"]  # the static 3/3/2 split
    clockwork = baseline_system("clockwork", read_baseline(DATA / "baselines" / "clockwork.yml"))
    assert len(clockwork.placement) == 8 and all("+" in m for m, _, _ in clockwork.placement)
    assert all(b == "monolith" and m.startswith("pipeline/") for m, _, b in basic.placement)


def test_a_malformed_baseline_file_is_refused_naming_the_line(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("baseline_name: x\npipelines:\n  a:\n    - rank: one\n")
    with pytest.raises(ValueError, match=r"bad.yml:4"):
        read_baseline(bad)


def test_lego_places_a_base_model_on_every_gpu_and_the_rest_once():
    system = lego_system(load_catalog(), list(PAPER_WORKFLOWS.values()), gpus=8)
    base = [d for m, d, _ in system.placement if m == "Flux1Schnell"]
    assert sorted(base) == [f"emu:{i}" for i in range(8)]
    others = [m for m, _, _ in system.placement if m != "Flux1Schnell"]
    assert sorted(others) == sorted(set(others))  # one each: the scheduler scales from here
    assert system.scheduler and system.admission and system.serving == "micro"


def test_best_at_takes_the_largest_passing_key():
    assert best_at({0.5: 1.0, 1: 0.95, 2: 0.91, 3: 0.5}) == 2
    assert best_at({1: 0.2}) is None


@needs_data
@pytest.mark.cluster
def test_quick_mode_runs_every_system_end_to_end(tmp_path):
    settings = BenchSettings(gpus=4, rates=(1.0,), bursts=(2,), trace_limit_s=4.0, time_scale=0.2,
                             run_dir=str(tmp_path))
    result = run_cluster_bench(settings)
    assert set(result["systems"]) == {"lego", "basic", "shepherd", "clockwork"}
    for name, runs in result["systems"].items():
        run = runs["rates"][1.0]
        assert run["count"] >= 1 and run["count"] == run["ok"] + run["rejected"] + run["failed"] + run["timeout"]
        assert 0.0 <= run["slo_attainment"] <= 1.0 and runs["bursts"][2] is not None, name
        assert run["on_time_ref_count"] == result["reference"]["rates"][1.0]["on_time"] >= 1, name
    assert result["derived"]["fluid_requests_per_s"] > 0
    table = cluster_table(result)
    assert "| lego | 1 |" in table and "share of fluid bound" in table and "| on-time ref |" in table
    chart = attainment_chart(result, tmp_path / "chart.png")
    assert Image.open(chart).size == (900, 560)


@needs_data
def test_the_paper_systems_are_lego_and_the_four_baselines():
    assert [s.name for s in paper_systems(load_catalog(), DATA / "baselines")] == ["lego", "basic", "shepherd", "clockwork",
                                                                                   "pooled"]


def test_pooled_is_refused_on_emulated_processes_naming_why():
    with pytest.raises(ValueError, match="pooled cannot run on emulated processes yet: .*one copy of each model per workflow"):
        systems_of(BenchSettings(systems=("lego", "pooled")))


def test_latent_resolution_profiles_price_image_pixels():
    from broker.costs.profiles import load_profile

    # measured at 128 x 128 latents = 1024 px images; a 1024 px step costs the measured time
    sd3 = load_profile("StableDiffusion3")
    assert sd3.exec_time("default", 1, 1024, 1024) == sd3.points["default"][0][3]
    assert sd3.exec_time("default", 1, 512, 512) < sd3.exec_time("default", 1, 1024, 1024) / 3


def test_the_sharing_setting_workflows_share_encoders_across_sd3_and_sd35():
    catalog = load_catalog()
    names = ["sd3-canny-cfg", "sd3-pose-cfg", "sd35l-canny-cfg", "sd35l-depth-cfg", "flux-dev-canny", "flux-dev-depth"]
    users = {}
    for name in names:
        for model in catalog.workflows[name].models:
            users.setdefault(model, set()).add(name)
    assert len(users["T5_SD3"]) == 4 and len(users["Flux1Dev"]) == 2 and len(users["StableDiffusion3"]) == 2


# ---------------------------------------------------------------- the on-time reference, traces, tenants


def test_tenant_mappings_are_parsed_and_checked():
    from clients.bench.cluster import parse_tenants

    assert parse_tenants("A=flux-schnell-txt2img-cfg, B=sd3-canny-cfg,") == {
        "A": "flux-schnell-txt2img-cfg", "B": "sd3-canny-cfg"}
    for bad, message in (("A", "TENANT=WORKFLOW"), ("A=sd3-canny-cfg,A=sd3-pose-cfg", "mapped twice"), ("", "TENANT=WORKFLOW"),
                         ("A=nope", "unknown workflow 'nope'")):
        with pytest.raises(ValueError, match=message):
            parse_tenants(bad, load_catalog().workflows)


def test_an_operators_traces_sweep_at_their_offered_rate(tmp_path):
    from clients.bench.cluster import rate_loads, systems_of, workflow_mix

    (tmp_path / "day10.txt").write_text("X 0\nY 0.5\nX 0.5\n")  # 3 requests over 1 s
    (tmp_path / "day2.txt").write_text("X 0\nX 1\n")  # 2 over 1 s
    s = BenchSettings(traces=tmp_path, tenants={"X": "sd3-canny-cfg", "Y": "sd3-pose-cfg"}, gpus=4)
    loads = rate_loads(s)
    assert [(load.key, load.label, len(load.arrivals)) for load in loads] == [(2.0, "day2", 2), (3.0, "day10", 3)]
    assert s.workflows == ["sd3-canny-cfg", "sd3-pose-cfg"] and s.sweep == "offered req/s"
    systems = systems_of(s, workflow_mix(loads, s.workflows))
    assert [x.name for x in systems] == ["lego", "basic", "shepherd", "clockwork"]
    assert {m for x in systems if x.name == "shepherd" for m, _, _ in x.placement} == {
        "pipeline/sd3-canny-cfg", "pipeline/sd3-pose-cfg"}
    (tmp_path / "copy.txt").write_text("X 0\nY 1\n")  # the same rate as day2: the sweep cannot key both
    with pytest.raises(ValueError, match="both offer 2 requests/s"):
        rate_loads(s)
    with pytest.raises(ValueError, match="serves no"):
        rate_loads(BenchSettings(setting="sharing", traces=tmp_path, tenants={"X": "flux-schnell-txt2img-cfg"}))
    sharing = rate_loads(BenchSettings(setting="sharing", rates=(0.5,), trace_limit_s=10.0))  # no tenants in Gamma arrivals
    assert [(load.key, load.label) for load in sharing] == [(0.5, "0.5")]


def _fake_run(attainment: float, count: int, rate: float) -> dict:
    met = round(attainment * count)
    return {"count": count, "ok": met, "rejected": count - met, "failed": 0, "timeout": 0, "slo_met": met,
            "slo_attainment": attainment, "goodput_per_s": met / 120, "p50_latency_s": 0.5, "p99_latency_s": 1.0,
            "codes": {}, "utilisation": 0.5, "requests_per_s": rate, "load": f"{rate:g}"}


def test_the_tables_json_and_chart_carry_the_on_time_reference(tmp_path):
    import json

    from clients.bench.cluster import burst_shares, derive
    from clients.bench.reference import Reference

    rate_refs = {1.0: Reference(100, 100, 100, 100, 0, 0), 2.0: Reference(200, 180, 170, 180, 0, 0)}
    burst_refs = {8: Reference(8, 8, 8, 8, 0, 0), 24: Reference(24, 17, 17, 17, 0, 0)}
    result = {"setting": "paper", "workflows": list(PAPER_WORKFLOWS.values()), "gpus": 8, "time_scale": 1.0,
              "traces": None, "sweep": "rate scale",
              "reference": {"rates": {k: {**r.to_dict(), "requests_per_s": k} for k, r in rate_refs.items()},
                            "bursts": {n: r.to_dict() for n, r in burst_refs.items()}},
              "systems": {}}
    for name, attainments in (("lego", (1.0, 0.9)), ("basic", (0.95, 0.45))):
        rates = {}
        for (key, ref), attainment in zip(rate_refs.items(), attainments, strict=True):
            rates[key] = _fake_run(attainment, ref.requests, key)
            rates[key].update(ref.beside(rates[key]["slo_met"]))
        bursts = {8: 1.0, 24: 0.5}
        result["systems"][name] = {"rates": rates, "bursts": bursts, "bursts_share_of_ref": burst_shares(bursts, burst_refs)}
    result["derived"] = derive(result, 8)
    assert result["systems"]["lego"]["rates"][2.0]["share_of_ref"] == pytest.approx(1.0)  # 180 of 180
    assert result["systems"]["basic"]["bursts_share_of_ref"][24] == pytest.approx(12 / 17)
    assert result["derived"]["systems"]["basic"]["share_of_ref"] == pytest.approx((95 + 90) / 280, abs=1e-3)
    assert result["derived"]["reference"]["sustainable_rate_scale"] == 2.0
    assert result["derived"]["reference"]["burst_tolerance"] == 8
    table = cluster_table(result)
    assert "| SLO attainment | on-time ref | share of ref |" in table
    assert "| lego | 2 | 2.0 | 0.900 | 90.0% | 100.0% |" in table
    assert "| on-time ref | 2 (2.000) | 8 |" in table
    assert "| 24 | 17 of 24 (71%) | 50.0% (71%) | 50.0% (71%) |" in table
    assert json.loads(json.dumps(result, default=str))["systems"]["lego"]["rates"]["2.0"]["on_time_ref_count"] == 180
    chart = attainment_chart(result, tmp_path / "chart.png")
    assert Image.open(chart).size == (900, 560)


def test_the_emulated_cluster_runs_the_lego_the_simulator_runs():
    """`lego bench cluster` and `lego bench simulate` deploy lego alike (clients.bench.deploy):
    same placement, same scheduler pins, so their results compare system for system."""
    from clients.bench.sim.bench import setting_systems

    catalog = load_catalog()
    mix = {"flux-schnell-txt2img-cfg": 2.0, "flux-schnell-canny-cfg": 1.0, "flux-schnell-depth-cfg": 1.0}
    paper = BenchSettings(systems=("lego",))
    emulated, = systems_of(paper, mix)
    simulated, = setting_systems("paper", catalog, 8, ("lego",), mix, paper.time_scale, None, 1)
    assert emulated == simulated
    assert sum(m == "Flux1DevControlNetCanny" for m, _, _ in emulated.placement) == 8  # beside every base actor
    sharing = BenchSettings(setting="sharing", systems=("lego",), gpus=16)
    emulated, = systems_of(sharing, dict.fromkeys(sharing.workflows, 1.0))
    simulated, = setting_systems("sharing", catalog, 16, ("lego",), dict.fromkeys(sharing.workflows, 1.0),
                                 sharing.time_scale, None, 2)
    assert sorted(emulated.placement) == sorted(simulated.placement)
    assert set(emulated.scheduler_args) == set(simulated.scheduler_args)
