"""The LoRA affinity benchmark (`lego bench lora`): its pure parts, and its quick mode
end to end on an emulated cluster (real broker, agent and actor processes). The full
run is a benchmark, recorded in docs/benchmarks.md, not a test."""

from __future__ import annotations

import argparse

import pytest
import tomllib

from broker.catalog import load_catalog, parse_catalog, validate_params
from clients.bench.loadgen import Arrival
from clients.bench.lora import (
    BASE,
    QUICK,
    WORKFLOW,
    LoraBenchSettings,
    adapter_catalog,
    adapter_names,
    consecutive_changes,
    draw_sets,
    lora_table,
    reading,
    record,
    request_params,
    run_lora_bench,
    settings_from_args,
    zipf_weights,
)


def test_the_adapter_catalog_registers_every_adapter_for_sd3():
    names = adapter_names(5)
    catalog = parse_catalog(tomllib.loads(adapter_catalog(names)), load_catalog())
    assert sorted(catalog.adapters) == names
    assert {a.base for a in catalog.adapters.values()} == {BASE} and not any(a.source for a in catalog.adapters.values())
    sets = draw_sets(10, names, 1.1, 0.5, seed=3)
    params = request_params(sets, 28)(Arrival(0.0, WORKFLOW, 4))
    checked = validate_params(catalog.workflows[WORKFLOW], params, None, catalog.adapters)
    assert checked["loras"] == [[name, 1.0] for name in sets[4]] and checked["steps"] == 28


def test_adapter_sets_are_skewed_reproducible_and_ordered():
    names = adapter_names(32)
    weights = zipf_weights(32, 1.1)
    assert weights[0] > weights[1] > weights[-1] and abs(weights.sum() - 1) < 1e-9
    sets = draw_sets(2000, names, 1.1, 0.25, seed=7)
    assert sets == draw_sets(2000, names, 1.1, 0.25, seed=7)
    assert draw_sets(50, names, 1.1, 0.25, seed=7) == sets[:50]  # a longer run extends, never reshuffles
    assert 0.2 < sum(len(s) == 2 for s in sets) / len(sets) < 0.3
    firsts = [s[0] for s in sets if len(s) == 1]
    assert firsts.count(names[0]) > firsts.count(names[5]) > firsts.count(names[31])
    pairs = [s for s in sets if len(s) == 2]
    assert all(names.index(a) < names.index(b) for a, b in pairs)  # one pair is always the same set
    assert consecutive_changes([("a",), ("a",), ("b",), ("a",)]) == 3  # the first set counts as a change


def test_bad_settings_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="rates"):
        LoraBenchSettings(rates=(0.0,))
    with pytest.raises(ValueError, match="residencies"):
        LoraBenchSettings(residencies=(1,))  # a two-adapter request could never be applied
    LoraBenchSettings(residencies=(1,), two_adapter_share=0.0)
    args = argparse.Namespace(quick=False, gpus=None, adapters=None, window_s=None, time_scale=None,
                              rates="2,x", residencies=None)
    with pytest.raises(ValueError, match="--rates"):
        settings_from_args(args)
    args.rates, args.quick = None, True
    assert settings_from_args(args).gpus == QUICK["gpus"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_lora_bench(LoraBenchSettings(**QUICK, run_dir=str(tmp_path_factory.mktemp("lora"))))


@pytest.mark.cluster
def test_quick_mode_runs_both_settings_over_the_same_arrivals(quick, tmp_path):
    (variant,) = quick["variants"]
    on, off = variant["runs"]["on"], variant["runs"]["off"]
    assert on["requests"] == off["requests"] == variant["requests"] > 5
    for run in (on, off):
        assert run["completed"] == run["requests"] and not run["not_completed"]
        for key in ("throughput_wall_per_s", "throughput_h800_per_s", "p50_latency_h800_s", "p99_latency_h800_s",
                    "adapter_switches", "switches_per_request", "denoise_batches"):
            assert run[key] is not None and run[key] > 0, key
        assert run["denoise_batches"] >= run["completed"]  # 28 steps each, at most 4 requests a batch
        assert abs(run["throughput_h800_per_s"] - run["throughput_wall_per_s"] * quick["time_scale"]) < 1e-2
    assert set(variant["ratios"]) == {"throughput_ratio", "switches_ratio", "p99_ratio"}
    for label in ("on", "off"):  # the same arrivals in the simulator, split by model
        sim = variant["simulated"][label]
        assert sim["encoder_switches_per_request"] > 0 and 0 < sim["denoise_batches_switched"] < 1
        # every distinct set is applied to some denoiser at least once (they start plain)
        assert sim["denoiser_switches_per_request"] >= variant["distinct_sets"] / variant["requests"] - 1e-3
    assert quick["switch_costs_assumed_s"] == {"disk": 0.25, "inject": 0.06, "activate": 0.002}
    table = lora_table(quick)
    assert "| 0.5 | 2 | on |" in table and "| 0.5 | 2 | off |" in table and "switches per request on / off" in table
    path = tmp_path / "bench.md"
    record(quick, str(path), "lego bench lora --quick")
    text = path.read_text()
    assert text.startswith("\n### LoRA adapter affinity, emulated (") and "ASSUMED" in text and reading(quick) in text


@pytest.mark.cluster
def test_affinity_cuts_switches_per_request(quick):
    (variant,) = quick["variants"]
    assert variant["runs"]["on"]["switches_per_request"] < variant["runs"]["off"]["switches_per_request"]
    # the simulator replays the same arrivals through the same broker core, without the
    # emulated cluster's timing noise: a chance gap above cannot pass this one
    simulated = variant["simulated"]
    assert simulated["on"]["denoiser_switches_per_request"] < simulated["off"]["denoiser_switches_per_request"]
