"""Open-loop load generation for the cluster benchmark: arrivals, a runner, summaries.

Three layers, kept apart so the first and last can be tested without a cluster:

1. Arrival processes (pure, deterministic for a seed): a replayed production trace
   (the DiFlow artifact's `TENANT GAP_SECONDS` files), Poisson, Gamma (burstier or
   smoother than Poisson by its coefficient of variation), simultaneous bursts, and
   time scaling so a trace can be replayed against an emulated cluster whose model
   times are scaled down by the same factor.
2. The open-loop runner (asyncio): each arrival is submitted at its scheduled
   instant whether or not earlier requests have finished. A closed loop (submit
   after the previous answer) would slow down exactly when the cluster does and hide
   the queueing that SLO attainment is meant to measure (coordinated omission).
3. Summaries (pure): SLO attainment, goodput, latency percentiles, per workflow, and
   JSON Lines so that runs can be saved and compared later.

    arrivals = scale_arrivals(trace_arrivals(path, PAPER_TENANTS, limit_s=10), 0.02)
    outcomes = run_open_loop_sync(cluster.frontend, arrivals, default_params, timeout_s=60)
    print(summarize(outcomes, duration_s=10 * 0.02))
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import numbers
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clients.aio import AsyncClient, AsyncJob
from clients.errors import LegoError, RequestFailed, RequestRejected, Timeout

# The paper's end-to-end setting: tenants A/B/C of the Alibaba-derived traces mapped,
# in that order, to the three true-CFG FLUX.1-schnell workflows.
PAPER_TENANTS = {"A": "flux-schnell-txt2img-cfg", "B": "flux-schnell-canny-cfg", "C": "flux-schnell-depth-cfg"}

STATUSES = ("ok", "rejected", "failed", "timeout")


class TraceError(ValueError):
    """A trace file that cannot be replayed: the message names the file and line."""


@dataclass(frozen=True)
class Arrival:
    """One request to send: when (seconds after the run starts), to which workflow.

    `index` identifies the request across arrivals, outcomes and saved runs (for a
    trace it is the line's position, so a cut trace keeps its original numbering)."""

    at_s: float
    workflow: str
    index: int


# ---------------------------------------------------------------- arrival processes


def _sorted(arrivals: Iterable[Arrival]) -> list[Arrival]:
    """Time order, ties (bursts) in index order, so submission order is reproducible."""
    return sorted(arrivals, key=lambda a: (a.at_s, a.index))


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _non_negative(name: str, value: float) -> float:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _parse_trace_line(line: str, where: str, tenant_workflows: dict[str, str]) -> tuple[str, float]:
    """(workflow, gap) of one `TENANT GAP_SECONDS` line; TraceError saying what is wrong where."""
    fields = line.split()
    if len(fields) != 2:
        raise TraceError(f"{where}: expected 'TENANT GAP_SECONDS', got {line.strip()!r}")
    tenant, gap_text = fields
    try:
        gap = float(gap_text)
    except ValueError:
        raise TraceError(f"{where}: gap {gap_text!r} is not a number") from None
    if not math.isfinite(gap) or gap < 0:
        raise TraceError(f"{where}: gap {gap_text!r} must be a finite number >= 0")
    if tenant not in tenant_workflows:
        raise TraceError(f"{where}: unknown tenant {tenant!r} (mapping: {tenant_workflows})")
    return tenant_workflows[tenant], gap


def trace_arrivals(path: str | Path, tenant_workflows: dict[str, str],
                   limit_s: float | None = None) -> list[Arrival]:
    """Replay a DiFlow trace: each line is one request, its gap counted from the previous
    request (the first from the start), so arrival times are the running sum of gaps;
    zero gaps are the trace's bursts and stay simultaneous.

    The whole file is validated even when `limit_s` keeps only its first seconds, so a
    quick run fails on a bad file just as the full run would. `limit_s` keeps arrivals
    in [0, limit_s): half-open, so consecutive windows never count a request twice."""
    if limit_s is not None:
        _non_negative("limit_s", limit_s)
    path = Path(path)
    arrivals, at = [], 0.0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():  # a trailing or stray blank line carries no request
            continue
        workflow, gap = _parse_trace_line(line, f"{path}:{number}", tenant_workflows)
        at += gap
        arrivals.append(Arrival(at, workflow, len(arrivals)))
    if limit_s is not None:
        arrivals = [a for a in arrivals if a.at_s < limit_s]
    return arrivals


def _workflow_mix(workflows: Sequence[str] | dict[str, float]) -> tuple[list[str], np.ndarray]:
    """Names and probabilities: a list is uniform, a dict gives relative weights."""
    if isinstance(workflows, dict):
        names = list(workflows)
        weights = [float(w) for w in workflows.values()]
    else:
        names = list(workflows)
        weights = [1.0] * len(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"workflows must be a non-empty list of names (or name -> weight), got {workflows!r}")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"workflow weights must be finite, >= 0 and not all 0, got {workflows!r}")
    return names, np.asarray(weights) / sum(weights)


def _renewal_times(rng: np.random.Generator, shape: float, scale: float, duration_s: float) -> list[float]:
    """Arrival instants in [0, duration_s) of a renewal process with Gamma(shape, scale)
    gaps. Gaps are drawn in chunks sized from the inputs only, so the stream (and hence
    the result) depends on nothing but the seed and the arguments."""
    times: list[float] = []
    at = 0.0
    chunk = int(duration_s / (shape * scale) * 1.2) + 16
    while True:
        for gap in rng.gamma(shape, scale, chunk):
            at += float(gap)
            if at >= duration_s:
                return times
            times.append(at)


def gamma_arrivals(rate_per_s: float, cv: float, duration_s: float,
                   workflows: Sequence[str] | dict[str, float], seed: int) -> list[Arrival]:
    """Arrivals whose gaps are Gamma with mean 1/rate and coefficient of variation `cv`
    (shape 1/cv^2): cv > 1 is burstier than Poisson, cv < 1 smoother, cv = 1 is Poisson.

    The gap stream and the workflow choice use separate generators spawned from the
    seed, so changing the mix does not move the arrival instants (and vice versa)."""
    rate = _positive("rate_per_s", rate_per_s)
    cv = _positive("cv", cv)
    duration_s = _non_negative("duration_s", duration_s)
    names, probabilities = _workflow_mix(workflows)
    if not isinstance(seed, numbers.Integral):  # None would silently seed from the OS
        raise ValueError(f"seed must be an integer, got {seed!r}")
    times_seed, mix_seed = np.random.SeedSequence(seed).spawn(2)
    shape = 1.0 / (cv * cv)
    times = _renewal_times(np.random.default_rng(times_seed), shape, 1.0 / (rate * shape), duration_s)
    choice = np.random.default_rng(mix_seed).choice(len(names), size=len(times), p=probabilities)
    return [Arrival(at, names[int(k)], i) for i, (at, k) in enumerate(zip(times, choice, strict=True))]


def poisson_arrivals(rate_per_s: float, duration_s: float,
                     workflows: Sequence[str] | dict[str, float], seed: int) -> list[Arrival]:
    """Poisson arrivals (exponential gaps): the Gamma process with cv = 1, so the two
    give the same arrivals for the same seed."""
    return gamma_arrivals(rate_per_s, 1.0, duration_s, workflows, seed)


def burst_arrivals(n: int, workflows: Sequence[str], at_s: float = 0.0) -> list[Arrival]:
    """n requests at the same instant, round robin over the workflows: the worst case
    an admission controller or scheduler has to absorb at once."""
    if not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    at_s = _non_negative("at_s", at_s)
    names, _ = _workflow_mix(list(workflows))
    return [Arrival(at_s, names[i % len(names)], i) for i in range(int(n))]


def scale_arrivals(arrivals: Iterable[Arrival], factor: float) -> list[Arrival]:
    """Every arrival instant multiplied by `factor` (< 1 compresses). Replaying a trace
    against an emulated cluster run with time_scale s, use factor s: load relative to
    capacity then matches the unscaled trace on real hardware."""
    factor = _positive("factor", factor)
    return _sorted(dataclasses.replace(a, at_s=a.at_s * factor) for a in arrivals)


def merge_arrivals(*streams: Iterable[Arrival]) -> list[Arrival]:
    """Several streams as one (e.g. a burst on top of a Poisson background), re-indexed
    0..n-1 in time order so indices stay unique."""
    merged = _sorted(a for stream in streams for a in stream)
    return [dataclasses.replace(a, index=i) for i, a in enumerate(merged)]


def default_params(arrival: Arrival) -> dict:
    """Distinct prompt and seed per request, everything else the workflow's defaults."""
    return {"prompt": f"load generator request {arrival.index}", "seed": arrival.index}


# ---------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    """What happened to one arrival. Times are seconds since the run started.

    `finished_at` is when the request ended, whatever the end (result, failure or
    rejection; None on a client-side timeout), and `latency_s` is measured from the
    *scheduled* instant, so time the load generator spent behind schedule counts
    against the request as it would for a real user. `slo_met` needs status "ok" and
    latency_s <= slo_s; a request whose workflow has no objective (slo_s None) never
    meets one. `code` is the broker's error code (e.g. slo_unattainable,
    deadline_exceeded, unknown_workflow), "client_timeout" or "client_error"."""

    index: int
    workflow: str
    request_id: str
    scheduled_at: float
    submitted_at: float
    lag_s: float  # submitted_at - scheduled_at: how far the runner fell behind
    accepted: bool = False
    first_progress_at: float | None = None  # first progress event: a proxy for "started"
    finished_at: float | None = None
    latency_s: float | None = None
    server_latency_s: float | None = None  # the broker's own measure, for ok requests
    slo_s: float | None = None
    slo_met: bool = False
    status: str = "timeout"
    code: str | None = None
    message: str = ""


def end_outcome(outcome: Outcome, now: float, status: str, code: str | None = None, message: str = "") -> Outcome:
    """Record how a request ended; latency and SLO follow from the times."""
    outcome.status, outcome.code, outcome.message = status, code, message
    if status != "timeout":
        outcome.finished_at = now
        outcome.latency_s = now - outcome.scheduled_at
    outcome.slo_met = (status == "ok" and outcome.slo_s is not None
                       and outcome.latency_s is not None and outcome.latency_s <= outcome.slo_s)
    return outcome


def _end_with_error(outcome: Outcome, now: float, exc: BaseException) -> Outcome:
    """Map a client exception to a status: rejected before any work, failed after
    acceptance, timed out on this side, or a client error (e.g. the client closed)."""
    if isinstance(exc, RequestRejected):
        return end_outcome(outcome, now, "rejected", exc.code, exc.message)
    if isinstance(exc, RequestFailed):
        return end_outcome(outcome, now, "failed", exc.code, exc.message)
    if isinstance(exc, (Timeout, asyncio.TimeoutError)):
        return end_outcome(outcome, now, "timeout", "client_timeout", str(exc))
    return end_outcome(outcome, now, "failed", "client_error", str(exc))


# ---------------------------------------------------------------- the open-loop runner


async def _sleep_until(clock: Callable[[], float], at_s: float) -> None:
    """Sleep to `at_s`; loop because the event loop may wake a timer a hair early, and
    an arrival must never be submitted before its scheduled instant."""
    while (delay := at_s - clock()) > 0:
        await asyncio.sleep(delay)


async def _watch_progress(job: AsyncJob, outcome: Outcome, clock: Callable[[], float]) -> None:
    """Drain progress events until the request ends, noting when the first came."""
    async for _event in job.progress():
        if outcome.first_progress_at is None:
            outcome.first_progress_at = clock()


async def _follow(job: AsyncJob, outcome: Outcome, clock: Callable[[], float], timeout_s: float,
                  cancel_on_timeout: bool) -> Outcome:
    """Wait for one submitted request to end, within timeout_s of its submission."""
    deadline = outcome.submitted_at + timeout_s
    try:
        await job.wait_accepted(max(0.0, deadline - clock()))
        outcome.accepted = True
        await asyncio.wait_for(_watch_progress(job, outcome, clock), max(0.0, deadline - clock()))
        result = await job.result()  # already settled: progress ends only after the outcome
    except (LegoError, asyncio.TimeoutError) as exc:
        _end_with_error(outcome, clock(), exc)
        if outcome.status == "timeout" and cancel_on_timeout:
            with contextlib.suppress(LegoError):  # the client closed meanwhile: nothing left to cancel
                job.cancel()
        return outcome
    outcome.server_latency_s = result.latency_s
    return end_outcome(outcome, clock(), "ok")


async def run_open_loop(client: AsyncClient, arrivals: Iterable[Arrival], params_for: Callable[[Arrival], dict],
                        slo_s: dict[str, float], timeout_s: float, *,
                        cancel_on_timeout: bool = True) -> list[Outcome]:
    """Submit each arrival at its scheduled instant, never waiting for earlier requests,
    and return one Outcome per arrival (in arrival order), whatever became of it.

    Parameters come from `params_for` before the clock starts: the dispatcher's work
    per arrival is then only a send, and a bug in params_for fails before any load is
    generated. If the dispatcher falls behind (a burst, a busy machine), it submits at
    once and the lag is recorded. A request not ended within timeout_s of its
    submission is a "timeout" and, with cancel_on_timeout, cancelled so that abandoned
    work stops competing with the requests still being measured."""
    _positive("timeout_s", timeout_s)
    ordered = _sorted(arrivals)
    params = [dict(params_for(a)) for a in ordered]
    loop = asyncio.get_running_loop()
    start = loop.time()

    def clock() -> float:
        return loop.time() - start

    results: list[Outcome | asyncio.Task] = []
    try:
        for arrival, kwargs in zip(ordered, params, strict=True):
            await _sleep_until(clock, arrival.at_s)
            now = clock()
            outcome = Outcome(arrival.index, arrival.workflow, uuid.uuid4().hex, arrival.at_s, now,
                              now - arrival.at_s, slo_s=slo_s.get(arrival.workflow))
            try:  # wait_accepted=False: the answer is awaited by the request's own task
                job = await client.submit(arrival.workflow, request_id=outcome.request_id, progress=True,
                                          wait_accepted=False, **kwargs)
            except LegoError as exc:  # refused before sending (a parameter that cannot travel, closed client)
                results.append(_end_with_error(outcome, clock(), exc))
                continue
            results.append(asyncio.create_task(_follow(job, outcome, clock, timeout_s, cancel_on_timeout)))
        return [r if isinstance(r, Outcome) else await r for r in results]
    finally:
        for r in results:  # only on an error or cancellation are any still running
            if isinstance(r, asyncio.Task) and not r.done():
                r.cancel()


def slo_from_stats(workflows: Iterable[Any]) -> dict[str, float]:
    """Workflow -> objective from the broker's Stats.workflows (entries with no known
    objective, slo_s 0, are left out)."""
    return {w.workflow: w.slo_s for w in workflows if w.slo_s > 0}


def run_open_loop_sync(address: str | None, arrivals: Iterable[Arrival], params_for: Callable[[Arrival], dict],
                       slo_s: dict[str, float] | None = None, timeout_s: float = 600.0, *,
                       cancel_on_timeout: bool = True) -> list[Outcome]:
    """run_open_loop with its own AsyncClient and event loop, for scripts and tests.
    With slo_s None the objectives are the broker's own (its Stats), so the run is
    judged by the same standard as the broker's admission control."""

    async def main() -> list[Outcome]:
        client = AsyncClient(address)
        try:
            slo = slo_s if slo_s is not None else slo_from_stats((await client.stats()).workflows)
            return await run_open_loop(client, arrivals, params_for, slo, timeout_s,
                                       cancel_on_timeout=cancel_on_timeout)
        finally:
            await client.close()

    return asyncio.run(main())


# ---------------------------------------------------------------- summaries


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks
    (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _summary(outcomes: list[Outcome], duration_s: float) -> dict:
    statuses = Counter(o.status for o in outcomes)
    latencies = [o.latency_s for o in outcomes if o.status == "ok" and o.latency_s is not None]
    met = sum(o.slo_met for o in outcomes)
    lags = [o.lag_s for o in outcomes]
    return {
        "count": len(outcomes),
        **{status: statuses.get(status, 0) for status in STATUSES},
        "slo_met": met,
        "slo_attainment": met / len(outcomes) if outcomes else None,
        "goodput_per_s": met / duration_s,
        "p50_latency_s": percentile(latencies, 50),
        "p99_latency_s": percentile(latencies, 99),
        "max_lag_s": max(lags) if lags else None,
        "codes": dict(sorted(Counter(o.code for o in outcomes if o.code).items())),
    }


def summarize(outcomes: Iterable[Outcome], duration_s: float) -> dict:
    """Totals and a per-workflow breakdown. Attainment is over every submitted request:
    rejected, failed and timed-out ones count as misses, as in the paper. Goodput is
    SLO-met requests per second over `duration_s` (the arrival window, chosen by the
    caller so runs of different lengths compare). Latency percentiles are over
    completed ("ok") requests only; max_lag_s shows whether the generator kept up."""
    duration_s = _positive("duration_s", duration_s)
    outcomes = list(outcomes)
    summary = _summary(outcomes, duration_s)
    by_workflow: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_workflow.setdefault(o.workflow, []).append(o)
    summary["workflows"] = {wf: _summary(group, duration_s) for wf, group in sorted(by_workflow.items())}
    return summary


def outcomes_to_jsonl(outcomes: Iterable[Outcome]) -> str:
    """One JSON object per line, fields in declaration order, so a run can be saved."""
    return "".join(json.dumps(dataclasses.asdict(o)) + "\n" for o in outcomes)


def outcomes_from_jsonl(text: str) -> list[Outcome]:
    """Outcomes saved by outcomes_to_jsonl; ValueError naming the line of a bad one."""
    outcomes = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            outcome = Outcome(**json.loads(line))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"line {number}: not a saved outcome: {exc}") from None
        if outcome.status not in STATUSES:
            raise ValueError(f"line {number}: status {outcome.status!r} is not one of {STATUSES}")
        outcomes.append(outcome)
    return outcomes
