"""The load generator: arrival processes, summaries and saved runs (pure), the
open-loop runner against a scripted stand-in client (no processes), and one run
against a localhost cluster of emulated actors."""

from __future__ import annotations

import asyncio
import statistics
from itertools import pairwise
from pathlib import Path

import pytest

from clients.bench.loadgen import (
    PAPER_TENANTS,
    Arrival,
    Outcome,
    TraceError,
    burst_arrivals,
    gamma_arrivals,
    merge_arrivals,
    outcomes_from_jsonl,
    outcomes_to_jsonl,
    percentile,
    poisson_arrivals,
    run_open_loop,
    run_open_loop_sync,
    scale_arrivals,
    slo_from_stats,
    summarize,
    trace_arrivals,
)
from clients.errors import LegoError, RequestFailed, RequestRejected, Timeout

TRACES = Path("/work/shared/data/diflow-ae/traces")
TRACE_RS1 = TRACES / "generated_trace_n3_rs1.0_st50000_t120_seed666.txt"
needs_traces = pytest.mark.skipif(not TRACE_RS1.exists(), reason=f"DiFlow traces not present at {TRACES}")


def _gaps(arrivals: list[Arrival]) -> list[float]:
    times = [0.0] + [a.at_s for a in arrivals]
    return [b - a for a, b in pairwise(times)]


def _is_sorted(arrivals: list[Arrival]) -> bool:
    return all((a.at_s, a.index) <= (b.at_s, b.index) for a, b in pairwise(arrivals))


# ---------------------------------------------------------------- traces


@needs_traces
def test_trace_has_one_arrival_per_line_spanning_the_window():
    lines = [line for line in TRACE_RS1.read_text().splitlines() if line.strip()]
    arrivals = trace_arrivals(TRACE_RS1, PAPER_TENANTS)
    assert len(arrivals) == len(lines)
    assert [a.index for a in arrivals] == list(range(len(lines)))
    assert _is_sorted(arrivals)
    assert 110 <= arrivals[-1].at_s <= 120 + 1e-6
    assert arrivals[0].at_s == pytest.approx(float(lines[0].split()[1]))
    tenants = {line.split()[0] for line in lines}
    assert {a.workflow for a in arrivals} == {PAPER_TENANTS[t] for t in tenants}
    assert any(a.at_s == b.at_s for a, b in pairwise(arrivals)), "the trace's bursts were lost"


@needs_traces
def test_every_shipped_trace_parses_and_higher_rate_scales_have_more_requests():
    counts = {path.name: len(trace_arrivals(path, PAPER_TENANTS)) for path in sorted(TRACES.glob("*_t120_*.txt"))}
    assert counts, "no traces found"
    by_rate = sorted(counts.items(), key=lambda kv: float(kv[0].split("_rs")[1].split("_")[0]))
    assert [n for _, n in by_rate] == sorted(n for _, n in by_rate)


@needs_traces
def test_trace_limit_keeps_a_half_open_prefix():
    full = trace_arrivals(TRACE_RS1, PAPER_TENANTS)
    cut = trace_arrivals(TRACE_RS1, PAPER_TENANTS, limit_s=10.0)
    assert cut == [a for a in full if a.at_s < 10.0]
    assert 0 < len(cut) < len(full)
    assert trace_arrivals(TRACE_RS1, PAPER_TENANTS, limit_s=0.0) == []


def test_trace_parser_times_are_cumulative_gaps(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("A 1.5\nB 0.0\n\nC 0.25\n")
    arrivals = trace_arrivals(path, {"A": "wa", "B": "wb", "C": "wc"})
    assert arrivals == [Arrival(1.5, "wa", 0), Arrival(1.5, "wb", 1), Arrival(1.75, "wc", 2)]


@pytest.mark.parametrize("line, words", [
    ("A", ["expected 'TENANT GAP_SECONDS'"]),
    ("A 1 2", ["expected 'TENANT GAP_SECONDS'"]),
    ("A soon", ["'soon' is not a number"]),
    ("A -1", ["'-1'", ">= 0"]),
    ("A nan", ["'nan'"]),
    ("D 0.5", ["unknown tenant 'D'", "'A': 'wa'"]),
])
def test_trace_parser_names_the_file_line_and_problem(tmp_path, line, words):
    path = tmp_path / "bad.txt"
    path.write_text(f"A 0.1\nA 0.2\n{line}\nA 0.3\n")
    with pytest.raises(TraceError) as info:
        trace_arrivals(path, {"A": "wa"}, limit_s=0.15)  # validated beyond the cut too
    message = str(info.value)
    assert f"{path}:3" in message
    for word in words:
        assert word in message


# ---------------------------------------------------------------- synthetic processes


def test_poisson_counts_order_and_determinism():
    arrivals = poisson_arrivals(20.0, 50.0, ["w1", "w2"], seed=7)
    assert 800 <= len(arrivals) <= 1200  # mean 1000, sd ~32
    assert _is_sorted(arrivals)
    assert all(0 <= a.at_s < 50.0 for a in arrivals)
    assert [a.index for a in arrivals] == list(range(len(arrivals)))
    assert arrivals == poisson_arrivals(20.0, 50.0, ["w1", "w2"], seed=7)
    assert arrivals != poisson_arrivals(20.0, 50.0, ["w1", "w2"], seed=8)
    assert poisson_arrivals(20.0, 50.0, ["w1", "w2"], seed=7) == gamma_arrivals(20.0, 1.0, 50.0, ["w1", "w2"], seed=7)


def test_workflow_weights_shape_the_mix_without_moving_the_instants():
    uniform = poisson_arrivals(50.0, 100.0, ["a", "b"], seed=3)
    weighted = poisson_arrivals(50.0, 100.0, {"a": 3.0, "b": 1.0}, seed=3)
    assert [a.at_s for a in uniform] == [a.at_s for a in weighted]
    share = sum(a.workflow == "a" for a in weighted) / len(weighted)
    assert 0.72 <= share <= 0.78
    assert {a.workflow for a in poisson_arrivals(50.0, 10.0, {"a": 1.0, "b": 0.0}, seed=1)} == {"a"}


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_gamma_gaps_have_the_asked_mean_rate_and_cv(cv):
    rate = 5.0
    for seed in (1, 2):
        gaps = _gaps(gamma_arrivals(rate, cv, 4000.0, ["w"], seed=seed))
        assert len(gaps) > 15_000
        mean = statistics.fmean(gaps)
        assert mean == pytest.approx(1 / rate, rel=0.05)
        assert statistics.stdev(gaps) / mean == pytest.approx(cv, rel=0.10)


@pytest.mark.parametrize("kwargs, word", [
    ({"rate_per_s": 0.0}, "rate_per_s"),
    ({"rate_per_s": -1.0}, "rate_per_s"),
    ({"cv": 0.0}, "cv"),
    ({"cv": float("inf")}, "cv"),
    ({"duration_s": -1.0}, "duration_s"),
    ({"workflows": []}, "workflows"),
    ({"workflows": {"a": 0.0}}, "weights"),
    ({"seed": None}, "seed"),
])
def test_gamma_rejects_bad_arguments(kwargs, word):
    args = {"rate_per_s": 1.0, "cv": 1.0, "duration_s": 10.0, "workflows": ["w"], "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=word):
        gamma_arrivals(**args)


def test_zero_duration_gives_no_arrivals():
    assert poisson_arrivals(10.0, 0.0, ["w"], seed=0) == []


def test_burst_is_simultaneous_round_robin():
    burst = burst_arrivals(5, ["a", "b"], at_s=2.0)
    assert burst == [Arrival(2.0, w, i) for i, w in enumerate("ababa")]
    assert burst_arrivals(0, ["a"]) == []
    with pytest.raises(ValueError):
        burst_arrivals(-1, ["a"])


def test_scale_compresses_time_and_keeps_identity():
    arrivals = poisson_arrivals(5.0, 20.0, ["a", "b"], seed=4)
    scaled = scale_arrivals(arrivals, 0.02)
    assert [(a.workflow, a.index) for a in scaled] == [(a.workflow, a.index) for a in arrivals]
    assert [a.at_s for a in scaled] == pytest.approx([a.at_s * 0.02 for a in arrivals])
    with pytest.raises(ValueError, match="factor"):
        scale_arrivals(arrivals, 0.0)


def test_merge_orders_by_time_and_reindexes():
    merged = merge_arrivals(burst_arrivals(2, ["b"], at_s=1.0), [Arrival(0.5, "a", 0), Arrival(3.0, "a", 1)])
    assert [(a.at_s, a.workflow, a.index) for a in merged] == [(0.5, "a", 0), (1.0, "b", 1), (1.0, "b", 2), (3.0, "a", 3)]


# ---------------------------------------------------------------- summaries and saved runs


def _outcome(index: int, workflow: str = "w", status: str = "ok", latency: float | None = 1.0,
             slo: float | None = 2.0, code: str | None = None, lag: float = 0.0) -> Outcome:
    met = status == "ok" and slo is not None and latency is not None and latency <= slo
    finished = None if latency is None else float(index) + latency
    return Outcome(index, workflow, f"r{index}", float(index), float(index) + lag, lag, accepted=status != "rejected",
                   finished_at=finished, latency_s=latency, slo_s=slo, slo_met=met, status=status, code=code)


def test_summary_counts_misses_and_latency_at_the_slo_is_met():
    outcomes = [
        _outcome(0, latency=2.0, slo=2.0),  # exactly at the objective: met
        _outcome(1, latency=1.0),
        _outcome(2, latency=3.0),  # late: a miss, but completed
        _outcome(3, status="rejected", latency=0.01, code="slo_unattainable"),
        _outcome(4, workflow="v", status="failed", latency=5.0, code="deadline_exceeded"),
        _outcome(5, workflow="v", status="timeout", latency=None, code="client_timeout", lag=0.25),
    ]
    assert outcomes[0].slo_met
    summary = summarize(outcomes, duration_s=4.0)
    assert summary["count"] == 6
    assert (summary["ok"], summary["rejected"], summary["failed"], summary["timeout"]) == (3, 1, 1, 1)
    assert summary["slo_met"] == 2
    assert summary["slo_attainment"] == pytest.approx(2 / 6)
    assert summary["goodput_per_s"] == pytest.approx(0.5)
    assert summary["p50_latency_s"] == pytest.approx(2.0)  # ok ones only: 1, 2, 3
    assert summary["p99_latency_s"] == pytest.approx(2.98)
    assert summary["max_lag_s"] == 0.25
    assert summary["codes"] == {"client_timeout": 1, "deadline_exceeded": 1, "slo_unattainable": 1}
    w, v = summary["workflows"]["w"], summary["workflows"]["v"]
    assert (w["count"], w["slo_met"], w["slo_attainment"]) == (4, 2, 0.5)
    assert (v["count"], v["slo_met"], v["slo_attainment"], v["p50_latency_s"]) == (2, 0, 0.0, None)


def test_summary_of_nothing_and_bad_duration():
    summary = summarize([], duration_s=1.0)
    assert summary["count"] == 0 and summary["slo_attainment"] is None and summary["workflows"] == {}
    with pytest.raises(ValueError, match="duration_s"):
        summarize([], duration_s=0.0)


def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None


def test_outcomes_round_trip_through_jsonl():
    outcomes = [_outcome(0), _outcome(1, status="timeout", latency=None, code="client_timeout"),
                _outcome(2, status="rejected", slo=None, code="unknown_workflow")]
    text = outcomes_to_jsonl(outcomes)
    assert len(text.splitlines()) == 3
    assert outcomes_from_jsonl(text + "\n") == outcomes
    with pytest.raises(ValueError, match="line 2"):
        outcomes_from_jsonl(text.splitlines()[0] + "\n{\"index\": 1}\n")
    with pytest.raises(ValueError, match="status"):
        outcomes_from_jsonl(text.replace('"status": "ok"', '"status": "lost"'))


def test_slo_from_stats_skips_workflows_without_an_objective():
    class WS:
        def __init__(self, workflow, slo_s):
            self.workflow, self.slo_s = workflow, slo_s

    assert slo_from_stats([WS("a", 4.0), WS("b", 0.0)]) == {"a": 4.0}


# ---------------------------------------------------------------- the runner, scripted client


class _FakeJob:
    """Plays one scripted request: the workflow name says how it ends."""

    def __init__(self, request_id: str, workflow: str, release: asyncio.Event):
        self.request_id, self.workflow, self.release = request_id, workflow, release
        self.cancelled = False

    async def wait_accepted(self, timeout):
        if self.workflow == "reject":
            raise RequestRejected(self.request_id, "slo_unattainable", "too busy", retry_after_s=1.0)
        if self.workflow == "silent":
            await asyncio.sleep(timeout)
            raise Timeout("no answer")

    async def progress(self):
        if self.workflow == "hang":
            await asyncio.sleep(3600)
        if self.workflow == "blocker":
            await self.release.wait()
        if self.workflow == "releaser":
            self.release.set()
        await asyncio.sleep(0.01)
        yield "step"
        await asyncio.sleep(0.02)
        yield "step"

    async def result(self, timeout=None):
        if self.workflow == "fail":
            raise RequestFailed(self.request_id, "deadline_exceeded", "too late")

        class R:
            latency_s = 0.03

        return R()

    def cancel(self):
        self.cancelled = True


class _FakeClient:
    def __init__(self):
        self.jobs: list[_FakeJob] = []
        self.submitted: list[tuple[str, dict]] = []
        self.release: asyncio.Event | None = None  # made inside the running loop

    async def submit(self, workflow, *, request_id=None, progress=True, wait_accepted=True, **params):
        if workflow == "closed":
            raise LegoError("client is closed")
        self.submitted.append((workflow, params))
        self.release = self.release or asyncio.Event()
        job = _FakeJob(request_id, workflow, self.release)
        self.jobs.append(job)
        return job


def test_runner_gives_every_arrival_an_outcome_whatever_its_end():
    names = ["ok", "reject", "fail", "hang", "silent", "closed", "ok"]
    arrivals = [Arrival(0.02 * i, w, i) for i, w in enumerate(names)] + [Arrival(0.02, "ok", 7)]  # a burst at 0.02
    client = _FakeClient()
    outcomes = asyncio.run(run_open_loop(client, arrivals, lambda a: {"seed": a.index},
                                         {"ok": 10.0, "fail": 10.0}, timeout_s=1.0))
    by_index = {o.index: o for o in outcomes}
    assert sorted(by_index) == list(range(8))
    assert [o.index for o in outcomes] == [0, 1, 7, 2, 3, 4, 5, 6]  # arrival order, ties by index
    expect = {0: ("ok", None), 1: ("rejected", "slo_unattainable"), 2: ("failed", "deadline_exceeded"),
              3: ("timeout", "client_timeout"), 4: ("timeout", "client_timeout"), 5: ("failed", "client_error"),
              6: ("ok", None), 7: ("ok", None)}
    assert {i: (o.status, o.code) for i, o in by_index.items()} == expect
    for o in outcomes:
        assert o.submitted_at >= o.scheduled_at
        assert o.lag_s == pytest.approx(o.submitted_at - o.scheduled_at)
    for i in (0, 6, 7):
        ok = by_index[i]
        assert ok.accepted and ok.slo_met and ok.server_latency_s == 0.03
        assert ok.submitted_at <= ok.first_progress_at <= ok.finished_at
        assert ok.latency_s == pytest.approx(ok.finished_at - ok.scheduled_at)
    assert not by_index[1].accepted and not by_index[1].slo_met and by_index[1].latency_s >= 0
    assert by_index[2].accepted and by_index[2].first_progress_at is not None and not by_index[2].slo_met
    assert by_index[3].accepted and by_index[3].finished_at is None and by_index[3].latency_s is None
    assert not by_index[4].accepted
    assert [j.cancelled for j in client.jobs if j.workflow in ("hang", "silent")] == [True, True]
    assert by_index[1].slo_s is None  # no objective given for it
    assert [p for _, p in client.submitted][:2] == [{"seed": 0}, {"seed": 1}]


def test_runner_does_not_wait_for_completions():
    """Open loop: the first request ends only once the last one has run, which a runner
    that waited for completions before submitting more would never reach."""
    arrivals = [Arrival(0.0, "blocker", 0)] + [Arrival(0.02 * i, "ok", i) for i in range(1, 4)]
    arrivals.append(Arrival(0.1, "releaser", 4))
    outcomes = asyncio.run(run_open_loop(_FakeClient(), arrivals, lambda a: {}, {}, timeout_s=10.0))
    assert [o.status for o in outcomes] == ["ok"] * 5
    assert outcomes[0].finished_at >= max(o.first_progress_at for o in outcomes[1:])


def test_params_for_errors_surface_before_any_submission():
    client = _FakeClient()

    def broken(arrival):
        raise KeyError("prompt")

    with pytest.raises(KeyError):
        asyncio.run(run_open_loop(client, [Arrival(0.0, "ok", 0)], broken, {}, timeout_s=1.0))
    assert client.submitted == []


# ---------------------------------------------------------------- the runner, real cluster


@pytest.mark.cluster
def test_open_loop_against_an_emulated_cluster(tmp_path):
    from clients.local import LocalCluster, LocalClusterSpec

    workflow = "flux-schnell-txt2img"
    spec = LocalClusterSpec(workflows=[workflow], options={"time_scale": 0.02}, run_dir=str(tmp_path),
                            log_level="warning")
    background = poisson_arrivals(10.0, 2.0, [workflow], seed=11)
    arrivals = merge_arrivals(background, [Arrival(1.0, "no-such-workflow", 0)])

    def params_for(arrival: Arrival) -> dict:
        return {"prompt": f"load {arrival.index}", "seed": arrival.index, "steps": 2, "width": 256, "height": 256}

    with LocalCluster(spec) as cluster:
        outcomes = run_open_loop_sync(cluster.frontend, arrivals, params_for, timeout_s=60.0)

    assert 10 <= len(background) <= 35
    assert sorted(o.index for o in outcomes) == [a.index for a in arrivals]
    bogus = [o for o in outcomes if o.workflow == "no-such-workflow"]
    assert len(bogus) == 1 and bogus[0].status == "rejected" and bogus[0].code == "unknown_workflow"
    assert not bogus[0].accepted and not bogus[0].slo_met
    real = [o for o in outcomes if o.workflow == workflow]
    assert len(real) == len(background)
    for o in real:
        assert o.status == "ok", (o.status, o.code, o.message)
        assert o.accepted and o.latency_s > 0 and o.server_latency_s > 0
        assert o.submitted_at >= o.scheduled_at - 1e-3
        assert o.first_progress_at is not None and o.submitted_at <= o.first_progress_at <= o.finished_at
        assert o.slo_s and o.slo_s > 0  # the broker's own objective, fetched from its stats
    summary = summarize(outcomes, duration_s=2.0)
    assert summary["count"] == len(arrivals) and summary["ok"] == len(real) and summary["rejected"] == 1
