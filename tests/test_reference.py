"""The on-time reference (`clients.bench.reference`): hand-made job sets whose answer is
worked out in the comments, the paper's FLUX.1-schnell workflows on 8 GPUs, and the two
admissions checked against a direct demand-bound test and a brute-force optimum."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from broker.catalog import load_catalog, validate_params
from broker.costs.model import CostModel
from clients.bench.cluster import DATA
from clients.bench.loadgen import Arrival, burst_arrivals, trace_arrivals
from clients.bench.reference import (
    Job,
    Reference,
    offline_deadline_order,
    on_time_reference,
    online_greedy,
)
from clients.bench.systems import PAPER_TENANTS

TRACES = DATA / "traces"
FLUX = list(PAPER_TENANTS.values())  # txt2img, canny, depth: round robin in a burst


@pytest.fixture(scope="module")
def costs():
    return CostModel(load_catalog())


def _jobs(*specs: tuple[float, float, float]) -> list[Job]:
    """(release, deadline, work) each, critical path 0."""
    return [Job(i, r, d, w, 0.0) for i, (r, d, w) in enumerate(specs)]


def _count(jobs: list[Job], gpus: float) -> tuple[int, int]:
    return len(online_greedy(jobs, gpus)), len(offline_deadline_order(jobs, gpus))


def _feasible(jobs: list[Job], gpus: float) -> bool:
    """The demand-bound test written out: every job fits alone, and every interval
    [r_i, d_k] holds the work released in it and due by its end."""
    if not all(j.fits_alone for j in jobs):
        return False
    for start, end in itertools.product({j.release_s for j in jobs}, {j.deadline_s for j in jobs}):
        inside = sum(j.work_s for j in jobs if j.release_s >= start and j.deadline_s <= end)
        if end >= start and inside > gpus * (end - start) + 1e-9:
            return False
    return True


def _interleaved(arrivals: list[Arrival], copies: int) -> list[Arrival]:
    """`copies` of a trace, each shifted by a fraction of a second: the same bursts, x copies the load."""
    shifted = [dataclasses.replace(a, at_s=a.at_s + k / copies) for k in range(copies) for a in arrivals]
    return [dataclasses.replace(a, index=i) for i, a in enumerate(sorted(shifted, key=lambda a: a.at_s))]


def _request(costs: CostModel, workflow: str):
    spec = costs.catalog.workflows[workflow]
    return spec, validate_params(spec, {"prompt": "x", "seed": 0})


# ---------------------------------------------------------------- hand-made job sets


def test_a_burst_that_exactly_fills_the_cluster_is_all_on_time_and_one_more_is_not():
    # 2 GPUs x 2 s = 4 device-seconds: four 1-second requests fill it exactly
    assert _count(_jobs(*[(0.0, 2.0, 1.0)] * 4), 2) == (4, 4)
    assert _count(_jobs(*[(0.0, 2.0, 1.0)] * 5), 2) == (4, 4)


def test_two_arrivals_whose_deadlines_conflict_keep_one():
    # 1 GPU: 1.5 + 1 device-seconds due by t=2, only 2 available from t=0
    assert _count(_jobs((0.0, 2.0, 1.5), (0.5, 2.0, 1.0)), 1) == (1, 1)
    # the same two with the second due at 2.5 both fit: EDF runs the first, then the second
    assert _count(_jobs((0.0, 2.0, 1.5), (0.5, 2.5, 1.0)), 1) == (2, 2)


def test_a_request_whose_critical_path_exceeds_its_slo_is_never_on_time():
    tight = Job(0, 0.0, 1.0, 0.1, 1.5)  # needs 1.5 s even alone, has 1 s
    assert not tight.fits_alone
    assert _count([tight, Job(1, 0.0, 1.0, 0.1, 0.5)], 8) == (1, 1)


def test_the_offline_admission_wins_where_an_early_long_request_blocks_two_short_ones():
    # 1 GPU. A (0 -> 10, 9.5 s) first; B and C (1 -> 4, 1.5 s each) arrive after it.
    # Greedy keeps A, then at t=1 A has 8.5 s left: 8.5 + 1.5 > 9 s to t=10, so B and C are refused.
    # Deadline order takes B and C (3 s by t=4), then A: 12.5 s in [0, 10] -> A, the largest, is dropped.
    jobs = _jobs((0.0, 10.0, 9.5), (1.0, 4.0, 1.5), (1.0, 4.0, 1.5))
    assert _count(jobs, 1) == (1, 2)


def test_the_greedy_admission_wins_where_dropping_the_largest_is_not_enough():
    # 1 GPU. B (0 -> 6, 4 s), A (1 -> 3, 1.5 s), C and D (4.5 -> 6.5, 1 s and 1.5 s).
    # Greedy: B; A fits (1.5 by 3, 3 + 1.5 by 6); at 4.5 B has 1 s left, C fits (1 + 1 by 6.5), D does not.
    # Deadline order A, B, C, then D overfills [0, 6.5] (8 s) and [4.5, 6.5] (2.5 s): it drops B
    # (largest from 0), then still [4.5, 6.5] overflows and it drops D: A and C only.
    jobs = _jobs((1.0, 3.0, 1.5), (0.0, 6.0, 4.0), (4.5, 6.5, 1.0), (4.5, 6.5, 1.5))
    assert _count(jobs, 1) == (3, 2)


def test_both_admissions_keep_feasible_sets_and_never_beat_the_optimum():
    rng = random.Random(7)
    for _ in range(300):
        jobs = [Job(i, r, r + rng.choice((1.0, 2.0, 3.0, 4.0, 6.0)), rng.choice((0.5, 1.0, 1.5, 2.0, 3.0, 4.0)),
                    rng.choice((0.2, 0.5, 1.0, 5.0)))
                for i, r in enumerate(rng.choice((0.0, 0.0, 1.0, 2.0, 3.0, 4.5)) for _ in range(rng.randint(1, 7)))]
        gpus = rng.choice((1, 2))
        kept = [online_greedy(jobs, gpus), offline_deadline_order(jobs, gpus)]
        assert all(_feasible(k, gpus) for k in kept), (jobs, gpus)
        best = max(len(s) for n in range(len(jobs) + 1) for s in itertools.combinations(jobs, n) if _feasible(list(s), gpus))
        assert max(map(len, kept)) <= best


# ---------------------------------------------------------------- the paper's workflows


def test_a_burst_of_16_flux_requests_on_8_gpus_is_all_on_time(costs):
    # 6 txt2img (1.88 device-s, SLO 4.04 s) + 10 ControlNet (1.955, SLO 4.20): 30.8 device-s,
    # inside the 8 x 4.04 = 32.3 and 8 x 4.20 = 33.6 the deadlines allow
    ref = on_time_reference(burst_arrivals(16, FLUX), 8, costs)
    assert (ref.requests, ref.on_time, ref.greedy, ref.offline) == (16, 16, 16, 16)
    assert ref.share_of(9) == pytest.approx(9 / 16)


def test_a_burst_of_24_keeps_what_8_gpus_finish_by_the_latest_deadline(costs):
    works = {w: costs.request(*_request(costs, w)).min_work_s for w in FLUX}
    capacity = 8 * 2 * costs.solo_s(*_request(costs, FLUX[1]))  # by the ControlNet workflows' deadline
    # the 17 first (6 txt2img, 11 ControlNet) fit; no 18 do (8 txt2img + 10 ControlNet is the least work)
    assert 6 * works[FLUX[0]] + 11 * works[FLUX[1]] <= capacity < 8 * works[FLUX[0]] + 10 * works[FLUX[1]]
    ref = on_time_reference(burst_arrivals(24, FLUX), 8, costs)
    assert ref.on_time == 17 and ref.share == pytest.approx(17 / 24)


def test_the_critical_path_counts_cfg_split(costs):
    # SLO 0.6 x solo: txt2img's split critical path (1.19 s) fits its 1.21 s; canny's (1.27) misses 1.26
    ref = on_time_reference(burst_arrivals(3, FLUX), 8, costs, slo_multiple=0.6)
    assert (ref.on_time, ref.too_short) == (1, 2)
    assert on_time_reference(burst_arrivals(3, FLUX), 8, costs, slo_multiple=0.5).on_time == 0


def test_unknown_workflows_count_as_requests_never_on_time(costs):
    ref = on_time_reference([Arrival(0.0, "no-such-workflow", 0), Arrival(0.0, FLUX[0], 1)], 8, costs)
    assert ref == Reference(requests=2, on_time=1, greedy=1, offline=1, too_short=0, unpriced=1)
    assert ref.beside(1) == {"on_time_ref": 0.5, "on_time_ref_count": 1, "share_of_ref": 1.0}
    with pytest.raises(ValueError, match="gpus"):
        on_time_reference([], 0, costs)


@pytest.mark.skipif(not TRACES.is_dir(), reason="the trace data is not installed")
def test_the_paper_trace_at_x1_is_all_on_time(costs):
    arrivals = trace_arrivals(TRACES / "generated_trace_n3_rs1.0_st50000_t120_seed666.txt", PAPER_TENANTS)
    ref = on_time_reference(arrivals, 8, costs)
    assert ref.on_time == ref.requests == len(arrivals) > 0


@pytest.mark.skipif(not TRACES.is_dir(), reason="the trace data is not installed")
def test_more_gpus_never_lower_the_reference(costs):
    x8 = trace_arrivals(TRACES / "generated_trace_n3_rs8.0_st50000_t120_seed666.txt", PAPER_TENANTS)
    for arrivals in (x8, _interleaved(x8, 4), burst_arrivals(48, FLUX)):
        counts = [on_time_reference(arrivals, gpus, costs).on_time for gpus in (1, 2, 4, 6, 8, 12, 16, 32)]
        assert counts == sorted(counts), counts
        assert counts[-1] > counts[0]


def test_ten_thousand_requests_are_priced_and_admitted(costs):
    # a burst far beyond 256 GPUs: what they can do by the latest deadline bounds the count
    ref = on_time_reference(burst_arrivals(10_000, FLUX), 256, costs)
    smallest = costs.request(*_request(costs, FLUX[0])).min_work_s
    assert 0 < ref.on_time <= 256 * 2 * costs.solo_s(*_request(costs, FLUX[1])) / smallest


# ---------------------------------------------------------------- beside every system


def test_simulate_prints_the_reference_beside_every_system_of_an_operators_trace(tmp_path, capsys):
    import json

    from clients.bench.sim.bench import cli_main

    (tmp_path / "monday.txt").write_text("web 0\napi 0\nweb 0\napi 0\nweb 5\n")  # 4 at once, one later
    out = tmp_path / "sim.json"
    assert cli_main(["--systems", "lego,basic", "--traces", str(tmp_path / "monday.txt"), "--gpus", "2",
                     "--tenants", "web=flux-schnell-txt2img-cfg,api=flux-schnell-canny-cfg", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| SLO attainment | on-time ref | share of ref |" in printed and "| monday | basic | 5 |" in printed
    doc = json.loads(out.read_text())
    assert doc["tenants"] == {"web": "flux-schnell-txt2img-cfg", "api": "flux-schnell-canny-cfg"}
    for result in doc["results"]:
        # 2 GPUs hold 4 requests of ~1.9 device-s within ~4.1 s: 4 at once, then the late one
        assert result["on_time_ref_count"] == result["reference"]["on_time"] == 5
        assert result["share_of_ref"] == pytest.approx(result["summary"]["slo_met"] / 5)
    with pytest.raises(SystemExit):
        cli_main(["--traces", str(tmp_path), "--tenants", "web=nope"])
    assert "unknown workflow 'nope'" in capsys.readouterr().err
