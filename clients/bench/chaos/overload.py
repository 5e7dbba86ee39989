"""The `overload` scenario of `lego bench chaos`: the cluster's capacity measured, then
`overload_factor` (5) x it offered with admission on; what the refusals were like (typed,
fast, with `retry_after_s`) and how much of the capacity went to requests that met their
SLO (goodput).

`measure_capacity` (the scenario's `prepare`) runs on the scenario's main thread before
the load starts: through a `Client` of its own, straight to the broker, with admission
off, it keeps `capacity_concurrency` requests in flight and counts those completed after
a warm-up (the capacity, requests/s); it then turns admission on and sets the load's
instants to Poisson arrivals at overload_factor x the capacity. `offer_overload` (its
`inject`) only waits for the load: the overload is the fault. `request_slo_s` reads the
catalog and the profiles as the broker does; `percentile`, `goodput`,
`overload_figures`, `overload_notes` and `overload_table` are pure.
"""

from __future__ import annotations

import math
import os
import time

from broker import protocol as p
from broker.catalog import load_catalog, validate_params
from broker.costs.model import CostModel
from clients.bench.chaos.accounting import COMPLETED, EXAMPLES, REJECTED, WORKFLOW, Observation, Row
from clients.bench.chaos.faults import Rig
from clients.bench.chaos.load import request_params
from clients.bench.loadgen import poisson_arrivals
from clients.client import Client, Job
from clients.errors import LegoError

ADMISSION_CODES = ("slo_unattainable", "overloaded")  # the typed refusals of a broker over capacity
CAPACITY_INDEX = 1_000_000  # the capacity run's prompts and seeds, apart from the load's
POLL_S = 0.005


# ---------------------------------------------------------------- pure


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, q in [0, 100]; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def goodput(observations: list[Observation], slo_s: float, window_s: float) -> tuple[int, float]:
    """(requests completed within slo_s of their submission, those per second of window_s)."""
    met = sum(o.outcome == COMPLETED and o.latency_s is not None and o.latency_s <= slo_s for o in observations)
    return met, met / window_s if window_s > 0 else 0.0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def overload_figures(observations: list[Observation], capacity_per_s: float, slo_s: float, window_s: float,
                     bar: float, broker_slo_met: int | None = None) -> dict:
    """The overload row's figures: offered load, refusals (typed? how fast? retry_after_s?)
    and goodput, absolute and as a share of the measured capacity."""
    rejected = [o for o in observations if o.outcome == REJECTED]
    waits = [o.latency_s for o in rejected if o.latency_s is not None]
    done = [o.latency_s for o in observations if o.outcome == COMPLETED and o.latency_s is not None]
    retries = [o.retry_after_s for o in rejected if o.retry_after_s]
    met, per_s = goodput(observations, slo_s, window_s)
    share = per_s / capacity_per_s if capacity_per_s > 0 else 0.0
    return {
        "capacity_per_s": round(capacity_per_s, 2), "offered_per_s": round(len(observations) / window_s, 2),
        "slo_s": round(slo_s, 3), "rejected": len(rejected),
        "untyped_rejections": sum(o.code not in ADMISSION_CODES for o in rejected),
        "without_retry_after": sum(o.code == "slo_unattainable" and not (o.retry_after_s or 0) > 0 for o in rejected),
        "rejection_p50_ms": _ms(percentile(waits, 50)), "rejection_p99_ms": _ms(percentile(waits, 99)),
        "retry_after_s": [min(retries), max(retries)] if retries else [],
        "completed": sum(o.outcome == COMPLETED for o in observations), "within_slo": met,
        "latency_p50_ms": _ms(percentile(done, 50)), "latency_p99_ms": _ms(percentile(done, 99)),
        "broker_slo_met": broker_slo_met, "goodput_per_s": round(per_s, 2), "goodput_share": round(share, 3),
        "bar": bar, "bar_met": share >= bar,
    }


def overload_notes(figures: dict) -> list[str]:
    """What breaks the promise under overload (typed, actionable refusals), for `Row.notes`.
    Goodput under the bar is reported, not a problem: timings on a busy machine vary."""
    notes = []
    if figures["capacity_per_s"] <= 0:
        notes.append("the capacity run completed nothing")
    elif not figures["rejected"]:
        notes.append(f"nothing rejected at {figures['offered_per_s']:g}/s offered: admission never engaged")
    if figures["untyped_rejections"]:
        notes.append(f"{figures['untyped_rejections']} rejected with a code other than {'/'.join(ADMISSION_CODES)}")
    if figures["without_retry_after"]:
        notes.append(f"{figures['without_retry_after']} slo_unattainable rejections without retry_after_s")
    return notes


def overload_table(rows: list[Row]) -> str:
    """The overload scenario's own table ('' when no row has its figures)."""
    head = ("| scenario | capacity req/s | offered req/s | SLO s | rejected | rejection p50 / p99 ms | "
            "retry_after_s | completed | latency p50 / p99 ms | within SLO | goodput req/s | goodput / capacity |\n"
            "|---|---:|---:|---:|---|---|---|---:|---|---:|---:|---|")
    lines = []
    for r in rows:
        f = r.overload
        if not f:
            continue
        codes = ", ".join(f"{code}: {n}" for code, n in r.rejected.items()) or "-"
        retry = "-" if not f["retry_after_s"] else f"{f['retry_after_s'][0]:g}-{f['retry_after_s'][1]:g}"
        verdict = "met" if f["bar_met"] else "**missed**"
        lines.append(f"| {r.scenario} | {f['capacity_per_s']:g} | {f['offered_per_s']:g} | {f['slo_s']:g} | {codes} | "
                     f"{f['rejection_p50_ms']} / {f['rejection_p99_ms']} | {retry} | {f['completed']} | "
                     f"{f['latency_p50_ms']} / {f['latency_p99_ms']} | {f['within_slo']} | {f['goodput_per_s']:g} | {f['goodput_share']:.0%} "
                     f"(bar {f['bar']:.0%}: {verdict}) |")
    return "\n".join([head, *lines]) if lines else ""


# ---------------------------------------------------------------- the cluster


def request_slo_s(slo_multiple: float, time_scale: float) -> float:
    """The SLO the broker sets the bench's request (broker.core.load.slo_s): the workflow's
    own, else slo_multiple x its solo latency from the profiles x the cost scale (the
    local cluster's time_scale)."""
    catalog = load_catalog()
    workflow = catalog.workflows[WORKFLOW]
    if workflow.slo_s > 0:
        return workflow.slo_s
    params = validate_params(workflow, request_params(0), None, catalog.adapters)
    return slo_multiple * (CostModel(catalog).solo_s(workflow, params) or 0.0) * time_scale


def closed_loop(client: Client, concurrency: int, warm_s: float, measure_s: float) -> tuple[int, list[str]]:
    """Keep `concurrency` requests in flight for warm_s + measure_s; (those completed in
    the last measure_s, the errors of any that failed). Waits for the last ones to end."""
    started = time.monotonic()
    opens, ends = started + warm_s, started + warm_s + measure_s
    submitted = 0

    def submit() -> Job:
        nonlocal submitted
        submitted += 1
        return client.submit(WORKFLOW, request_id=f"capacity-{submitted}-{os.urandom(4).hex()}", progress=False,
                             wait_accepted=False, **request_params(CAPACITY_INDEX + submitted))

    jobs = [submit() for _ in range(concurrency)]
    completed, errors = 0, []
    while time.monotonic() < ends:
        time.sleep(POLL_S)
        for i, job in enumerate(jobs):
            if not job.done():
                continue
            now = time.monotonic()
            try:
                job.result(timeout=0)
                completed += opens <= now <= ends
            except LegoError as exc:
                errors.append(str(exc))
            jobs[i] = submit()
    for job in jobs:
        try:
            job.result(timeout=60)
        except LegoError as exc:
            errors.append(str(exc))
    return completed, errors


def measure_capacity(rig: Rig) -> None:
    """Capacity first (admission off, no fault), then admission on and the load's instants
    at overload_factor x the capacity."""
    s = rig.s
    rig.admin.configure({"admission": False})
    with Client(rig.cluster.frontend) as client:
        completed, errors = closed_loop(client, s.capacity_concurrency, s.capacity_warm_s, s.capacity_s)
    if errors:  # no fault yet: nothing may fail
        rig.notes.append(f"{len(errors)} failed in the capacity run, e.g. {'; '.join(errors[:EXAMPLES])}")
    capacity = completed / s.capacity_s
    rate = s.overload_factor * capacity
    rig.load.instants = ([a.at_s for a in poisson_arrivals(rate, s.load_s, [WORKFLOW], rig.rng.randrange(1 << 31))]
                         if rate > 0 else [])
    rig.admin.configure({"admission": True, "admission_bound": s.admission_bound,
                         "admission_overhead_s": s.admission_overhead_s})
    stats = rig.admin.stats()
    rig.figures.update(capacity_per_s=capacity, rate_per_s=rate, slo_met_before=slo_met(stats),
                       slo_s=request_slo_s(stats.settings["slo_multiple"], s.time_scale))


def offer_overload(rig: Rig) -> int:
    """The overload is the fault: wait while the load offers it."""
    f = rig.figures
    rig.event(f"{len(rig.load.instants)} requests at {f['rate_per_s']:.2f}/s, {rig.s.overload_factor:g}x the "
              f"capacity {f['capacity_per_s']:.2f}/s, admission on ({rig.s.admission_bound})")
    rig.load.wait(rig.s.load_s + 60)
    return 1


def slo_met(stats: p.Stats) -> int:
    return sum(w.slo_met for w in stats.workflows if w.workflow == WORKFLOW)


def overload_result(rig: Rig, observations: list[Observation], stats: p.Stats) -> dict:
    """The row's figures, after the load: the broker's own count of deadlines met beside."""
    f = rig.figures
    return overload_figures(observations, f["capacity_per_s"], f["slo_s"], rig.s.load_s, rig.s.goodput_bar,
                            slo_met(stats) - f["slo_met_before"])
