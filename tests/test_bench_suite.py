"""`lego bench suite` (clients.bench.sim.suite): the generated traces hit the asked
CV and load levels, the summary's ratios on a hand-made result set, and a small suite
end to end through the command line (a few seconds; simulated, no processes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from broker.catalog import load_catalog
from broker.costs.model import CostModel
from clients.bench.cluster import fluid_bound_per_s
from clients.bench.deploy import (
    CONTROLNET_HEADROOM_GIB,
    SPARE_HEADROOM_GIB,
    controlnets_beside_base,
    sized_replicas,
    spare_memory_replicas,
)
from clients.bench.loadgen import burst_arrivals
from clients.bench.sim.bench import setting_systems
from clients.bench.sim.simulator import simulate
from clients.bench.sim.suite import (
    BURSTS,
    SETTINGS,
    cli_main,
    fluid_rate_per_s,
    suite_traces,
    summarize_setting,
)
from clients.bench.systems import sharing_systems


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_equal_mix_fluid_rate_is_the_benchmarks_fluid_bound(setting):
    s = SETTINGS[setting]
    assert fluid_rate_per_s(s.mixes["equal"], s.gpus) == pytest.approx(fluid_bound_per_s(s.workflows) * s.gpus)


def test_the_suite_has_every_mix_cv_load_and_burst():
    traces = suite_traces(SETTINGS["paper"])
    gamma = [t for t in traces if t.cv is not None]
    assert {(t.mix, t.cv, t.load) for t in gamma} == {
        (m, cv, load) for m in ("paper", "equal") for cv in (1.0, 2.0, 4.0) for load in (0.5, 0.7, 0.85)}
    assert all(t.window_s == 180.0 and t.arrivals[-1].at_s <= 180.0 for t in gamma)
    assert [t.burst for t in traces if t.cv is None] == list(BURSTS)
    for t in gamma:
        assert t.rate_per_s == pytest.approx(t.load * fluid_rate_per_s(SETTINGS["paper"].mixes[t.mix], 8))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_traces_reach_their_share_of_the_fluid_bound_and_their_cv(setting):
    # an hour, so the count of even the CV 4 process is within a few percent of its mean
    s = SETTINGS[setting]
    for t in suite_traces(s, duration_s=3600.0, bursts=()):
        fluid = fluid_rate_per_s(s.mixes[t.mix], s.gpus)
        assert len(t.arrivals) / 3600.0 / fluid == pytest.approx(t.load, rel=0.06), t.label
        gaps = np.diff([a.at_s for a in t.arrivals])
        assert gaps.std() / gaps.mean() == pytest.approx(t.cv, rel=0.1), t.label
        shares = {w: sum(a.workflow == w for a in t.arrivals) / len(t.arrivals) for w in s.mixes[t.mix]}
        for w, share in s.mixes[t.mix].items():
            assert shares[w] == pytest.approx(share, abs=0.03), (t.label, w)


def test_the_memory_bound_paper_mix_gives_the_paper_shares_to_its_base_models():
    mix = SETTINGS["memory-bound"].mixes["paper"]
    assert sum(mix.values()) == pytest.approx(1.0)
    assert mix["sd3-canny-cfg"] + mix["sd3-pose-cfg"] == pytest.approx(0.45)
    assert mix["flux-dev-canny"] == mix["flux-dev-depth"] == pytest.approx(0.235 / 2)


def _row(trace, reference, on_time, *, cv=None, load=None, burst=None, requests=None, codes=None):
    requests = requests or reference
    return {"trace": trace, "mix": "paper", "cv": cv, "load": load, "burst": burst, "reference": reference,
            "systems": {n: {"on_time": k, "attainment": k / requests, "share_of_ref": k / reference,
                            "codes": (codes or {}) if n == "lego" else {}} for n, k in on_time.items()}}


def test_summary_ratios_on_a_hand_made_result_set():
    rows = [
        _row("cv 1 50%", 100, {"lego": 100, "pooled": 100, "basic": 95}, cv=1.0, load=0.5),
        _row("cv 1 70%", 100, {"lego": 96, "pooled": 92, "basic": 70}, cv=1.0, load=0.7),
        _row("cv 1 85%", 100, {"lego": 80, "pooled": 91, "basic": 50}, cv=1.0, load=0.85,
             codes={"slo_unattainable": 20}),
        _row("burst 8", 8, {"lego": 8, "pooled": 8, "basic": 8}, burst=8),
        _row("burst 16", 16, {"lego": 13, "pooled": 11, "basic": 8}, burst=16),
    ]
    summary = summarize_setting(rows)
    load = summary["measures"]["highest load >= 90%, paper mix, cv 1"]
    assert load == {"lego": 0.7, "pooled": 0.85, "basic": 0.5}
    assert summary["lego_vs_best_baseline"]["highest load >= 90%, paper mix, cv 1"] == pytest.approx(0.7 / 0.85, abs=1e-3)
    assert summary["measures"]["largest burst >= 90%"] == {"lego": 8, "pooled": 8, "basic": 8}
    assert summary["lego_vs_best_baseline"]["largest burst >= 90%"] == 1.0
    assert summary["measures"]["on-time share of reference, Gamma traces"]["lego"] == pytest.approx(276 / 300)
    assert summary["lego_vs_best_baseline"]["on-time share of reference, Gamma traces"] == pytest.approx(276 / 283, abs=1e-3)
    assert summary["lego_vs_best_baseline"]["on-time share of reference, bursts"] == pytest.approx(21 / 19, abs=1e-3)
    assert [b["trace"] for b in summary["below_bar"]] == ["cv 1 85%", "burst 16"]
    assert summary["below_bar"][0]["codes"] == {"slo_unattainable": 20}
    assert summary["burst_check"] == {"on_time": 13, "of": 16, "needed": 13, "met": True}


def test_no_ratio_where_lego_or_every_baseline_sustains_nothing():
    rows = [_row("cv 4 50%", 10, {"lego": 5, "pooled": 9}, cv=4.0, load=0.5)]
    summary = summarize_setting(rows)
    assert summary["measures"]["highest load >= 90%, paper mix, cv 4"] == {"lego": None, "pooled": 0.5}
    assert summary["lego_vs_best_baseline"]["highest load >= 90%, paper mix, cv 4"] is None
    assert summary["burst_check"] is None


def test_a_small_suite_end_to_end_prints_json_only(capsys):
    assert cli_main(["--settings", "paper", "--systems", "lego,pooled", "--mixes", "paper", "--loads", "0.5",
                     "--cvs", "2", "--bursts", "16", "--duration-s", "15", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # nothing but JSON on standard output
    assert "on time of" in err
    (setting,) = result["settings"]
    assert [r["trace"] for r in setting["rows"]] == ["paper cv 2 50%", "burst 16"]
    burst = setting["rows"][1]
    assert burst["reference"] == 16 and set(burst["systems"]) == {"lego", "pooled"}
    assert setting["summary"]["burst_check"]["on_time"] == burst["systems"]["lego"]["on_time"]
    # seeded: the same suite gives the same on-time counts
    assert cli_main(["--settings", "paper", "--systems", "lego,pooled", "--mixes", "paper", "--loads", "0.5",
                     "--cvs", "2", "--bursts", "16", "--duration-s", "15", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["settings"][0]["rows"]
    assert [{n: s["on_time"] for n, s in r["systems"].items()} for r in again] == \
        [{n: s["on_time"] for n, s in r["systems"].items()} for r in setting["rows"]]


def test_the_tables_name_the_bar_and_the_burst_check(capsys):
    assert cli_main(["--settings", "memory-bound", "--systems", "lego,pooled", "--mixes", "equal", "--loads", "",
                     "--bursts", "16", "--duration-s", "10"]) == 0
    out = capsys.readouterr().out
    assert "memory-bound setting: 16 GPUs of 48 GiB" in out
    assert "| burst 16 | 16 |" in out and "lego / best baseline" in out
    assert "16-request burst: lego" in out


def test_unknown_setting_or_system_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--settings", "nope"])
    with pytest.raises(SystemExit):
        cli_main(["--systems", "lego,nope"])
    assert "unknown" in capsys.readouterr().err


def test_spare_memory_holds_a_small_base_model_on_every_gpu_with_room_and_a_burst_spreads_over_it():
    setting = SETTINGS["memory-bound"]
    catalog = load_catalog()
    costs = CostModel(catalog)

    def lego(gpu_memory_gib):  # sized for the mix, then spare memory (before the ControlNets go beside)
        plain, = sharing_systems(catalog, setting.gpus, 1.0, ("lego",), gpu_memory_gib)
        return spare_memory_replicas(sized_replicas(plain, catalog, setting.gpus, setting.mixes["equal"], 2), catalog,
                                     gpu_memory_gib)

    system = lego(setting.gpu_memory_gib)
    used: dict[str, int] = {}
    for model, device, _ in system.placement:
        used[device] = used.get(device, 0) + costs.resident_bytes(model)
    placed = {m: sum(1 for p in system.placement if p[0] == m) for m in
              ("StableDiffusion3", "StableDiffusion35Large", "Flux1Dev")}
    # the work split gives SD3 Medium 2 of 16 GPUs; spare memory holds it on all but the
    # one GPU whose Flux and two T5 encoders leave no room; the large base models stay as split
    assert placed == {"StableDiffusion3": 15, "StableDiffusion35Large": 8, "Flux1Dev": 6}
    with_sd3 = {device for model, device, _ in system.placement if model == "StableDiffusion3"}
    assert all(used[d] <= (setting.gpu_memory_gib - SPARE_HEADROOM_GIB) * 1024**3 for d in with_sd3)
    assert max(used.values()) <= setting.gpu_memory_gib * 1024**3
    args = list(system.scheduler_args)
    assert args.count("StableDiffusion3=15") == 1 and "StableDiffusion3=2" not in args  # the scheduler keeps them
    # where every base model fits every GPU (80 GiB), nothing is added
    roomy = lego(80.0)
    assert sum(1 for p in roomy.placement if p[0] == "StableDiffusion3") == setting.gpus
    # the 16-request burst (round robin over the six workflows): every one on time (13 before)
    burst = next(t for t in suite_traces(setting) if t.label == "burst 16")
    outcomes, _ = simulate(system, burst.arrivals, catalog, setting.gpus, 2, gpu_memory_gib=setting.gpu_memory_gib,
                           workflows=setting.workflows)
    assert sum(o.slo_met for o in outcomes) == 16


def test_controlnets_go_beside_every_actor_of_their_base_model_that_has_room_and_a_burst_no_longer_queues_on_two():
    setting = SETTINGS["memory-bound"]
    catalog = load_catalog()
    costs = CostModel(catalog)
    capacity = setting.gpu_memory_gib * 1024**3
    mix = setting.mixes["equal"]
    plain, = sharing_systems(catalog, setting.gpus, 1.0, ("lego",), setting.gpu_memory_gib)
    before = spare_memory_replicas(sized_replicas(plain, catalog, setting.gpus, mix, 2), catalog, setting.gpu_memory_gib)
    system, = setting_systems(setting.simulate_setting, catalog, setting.gpus, ("lego",), mix, 1.0, None, 2,
                              setting.gpu_memory_gib)
    assert set(before.placement) < set(system.placement)  # only added to
    on: dict[str, set[str]] = {}
    used: dict[str, int] = {}
    for model, device, _ in system.placement:
        on.setdefault(model, set()).add(device)
        used[device] = used.get(device, 0) + costs.resident_bytes(model)
    assert max(used.values()) <= capacity
    args = list(system.scheduler_args)
    for workflow in (catalog.workflows[w] for w in setting.workflows):
        for controlnet in workflow.controlnets:
            # a GPU of its base model lacks it only where it would not fit with the headroom
            assert all(used[d] + costs.resident_bytes(controlnet) + CONTROLNET_HEADROOM_GIB * 1024**3 > capacity
                       for d in on[workflow.denoiser] - on[controlnet])
            assert args.count(f"{controlnet}={len(on[controlnet])}") == 1  # pinned: the scheduler keeps them
    assert len(on["SD35LargeControlNetCanny"]) == len(on["StableDiffusion35Large"]) == 8  # was 2
    # twelve SD3.5 Large canny requests at once: with two ControlNet actors (one on a FLUX.1-dev
    # GPU) 7 end on time; beside each SD3.5 Large actor, all 12
    burst = burst_arrivals(12, ["sd35l-canny-cfg"])
    on_time = [sum(o.slo_met for o in simulate(s, burst, catalog, setting.gpus, 2, gpu_memory_gib=setting.gpu_memory_gib,
                                               workflows=setting.workflows)[0]) for s in (before, system)]
    assert on_time == [7, 12]
    # a ControlNet whose base model is not placed gets nothing; a second pass adds nothing
    assert controlnets_beside_base(system, catalog, setting.gpu_memory_gib) == system
