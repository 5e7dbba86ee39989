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
    assert result["derived"]["fluid_requests_per_s"] > 0
    table = cluster_table(result)
    assert "| lego | 1 |" in table and "share of fluid bound" in table
    chart = attainment_chart(result, tmp_path / "chart.png")
    assert Image.open(chart).size == (900, 560)


@needs_data
def test_the_paper_systems_are_the_four():
    assert [s.name for s in paper_systems(load_catalog(), DATA / "baselines")] == ["lego", "basic", "shepherd", "clockwork"]


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
