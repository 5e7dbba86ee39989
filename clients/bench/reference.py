"""The on-time reference: how many requests of an arrival list an ideal scheduler could
finish within their SLO on a cluster of G GPUs. Pure, no IO (the caller passes the cost
model); read beside every system by `lego bench simulate` and `lego bench cluster`.

The machine is fluid: its G GPUs are one processor doing G device-seconds of work per
second, shared among requests in any proportion, preempted and resumed for free.
Request j arrives at r_j, must end by d_j = r_j + SLO_j, and needs w_j device-seconds;
it can end no sooner than r_j + c_j. From the profiles (`CostModel.request`):

- w_j is `min_work_s`, every node's share of a full batch: the fewest device-seconds the
  request can ever cost (of the unsplit and the CFG-split unrolling, the smaller). A
  reference must not be beaten by batching, so it takes the optimistic cost; `work_s`
  (each node alone) would be.
- c_j is the critical path on an idle cluster, CFG branches on two GPUs where that is
  shorter (`solo_s` of the CFG-split unrolling, ControlNets where the DAG puts them).
- SLO_j is the workflow's own `slo_s`, else `slo_multiple` x its solo latency as a
  monolith runs it (`CostModel.solo_s`): what the broker judges requests by
  (`LoadTracker.slo_s`). Arrivals whose workflow is unknown or has no profile have no
  SLO, cannot be on time, and count as requests only.

Feasibility. A set of requests is feasible iff each fits alone (r_j + c_j <= d_j) and,
for every interval [r_i, d_k], the work of the requests released at or after r_i and
due by d_k is at most G (d_k - r_i): the demand-bound test, which on one preemptive
processor of speed G is exactly what earliest-deadline-first needs (EDF meets every
deadline of any feasible set). The rate cap a critical path implies (no more than
w_j / c_j devices at a time) is relaxed beyond the test alone: another optimism.

Choosing the most requests that are feasible together is a hard selection problem, so
the reference is the better of two admissions:

(a) online greedy: in arrival order, accept a request if the accepted set stays
    feasible. Releases come in order, so the EDF schedule up to the new arrival does
    not depend on it; the test is the pending work at that instant in deadline order,
    sum(rem_k, d_k <= D) (+ w_j if d_j <= D) <= G (D - r_j) for every pending deadline
    D >= d_j and D = d_j. O(p) per arrival, p the requests pending then (EDF leaves at
    most one partly done, so p <= 1 + G x the longest SLO / the smallest work): O(n p).
(b) offline, Moore-Hodgson style: in deadline order, add each request; the newcomer has
    the latest deadline, so only intervals [x, d_new] with x <= r_new can break, and
    the test is max over release points x <= r_new of G x + W(x) <= G d_new, W(x) the
    set's work released at or after x. When it fails, drop the largest request released
    at or after the most violated x (the newcomer among them), and test again. A lazy
    segment tree over release points keeps G x + W(x) (prefix add, prefix max), another
    the largest kept request per release range: O(n log n).

This is a reference, not a proof of optimality: both admissions are heuristics (a better
selection may exist, and neither is guaranteed monotone in G), and the fluid machine is
stronger than any cluster (no batch to fill, no model to load, no tensor to move, no
per-request rate cap). Read a system's share of it as "how close to an ideal
scheduler", not as a bound no system can pass.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from broker.catalog import ParamError, validate_params
from broker.core.load import LoadTracker
from broker.core.settings import BrokerSettings
from broker.costs.model import CostModel
from clients.bench.loadgen import Arrival, default_params

SLO_MULTIPLE = BrokerSettings().slo_multiple  # the broker's default, which the benchmarks run with
RELATIVE_TOLERANCE = 1e-9  # of the capacity compared against: sums of floats may miss an exact fit


@dataclass(frozen=True)
class Job:
    """One request as the fluid machine sees it (seconds and device-seconds)."""

    index: int  # the arrival's
    release_s: float
    deadline_s: float
    work_s: float
    critical_s: float

    @property
    def fits_alone(self) -> bool:
        return _fits(self.release_s + self.critical_s, self.deadline_s)


@dataclass(frozen=True)
class Reference:
    requests: int  # every arrival
    on_time: int  # the reference: the better of the two admissions
    greedy: int  # (a) online greedy in arrival order
    offline: int  # (b) deadline order, dropping the largest overlapping request
    too_short: int  # requests whose critical path alone exceeds their SLO
    unpriced: int  # requests of a workflow with no profile (or unknown): no SLO

    @property
    def share(self) -> float | None:
        """The reference as a share of the requests."""
        return self.on_time / self.requests if self.requests else None

    def share_of(self, slo_met: int) -> float | None:
        """A system's on-time count as a share of the reference (None: nothing to share)."""
        return slo_met / self.on_time if self.on_time else None

    def beside(self, slo_met: int) -> dict:
        """What a benchmark result carries beside a system's on-time count `slo_met`:
        the reference as a share of the requests, its count, and the system's share of it."""
        return {"on_time_ref": self.share, "on_time_ref_count": self.on_time, "share_of_ref": self.share_of(slo_met)}

    def to_dict(self) -> dict:
        return {"requests": self.requests, "on_time": self.on_time, "share": self.share, "greedy": self.greedy,
                "offline": self.offline, "too_short": self.too_short, "unpriced": self.unpriced}


def _fits(demand: float, supply: float) -> bool:
    return demand <= supply + RELATIVE_TOLERANCE * max(1.0, abs(supply))


# ---------------------------------------------------------------- requests to jobs


def jobs_of(arrivals: Iterable[Arrival], costs: CostModel, slo_multiple: float = SLO_MULTIPLE,
            params_for: Callable[[Arrival], dict] = default_params) -> tuple[list[Job], int]:
    """(jobs, unpriced): each priced arrival as a Job, and how many could not be priced."""
    jobs, unpriced = [], 0
    for arrival in arrivals:
        job = _job(arrival, costs, slo_multiple, params_for)
        if job is None:
            unpriced += 1
        else:
            jobs.append(job)
    return jobs, unpriced


def _job(arrival: Arrival, costs: CostModel, slo_multiple: float, params_for) -> Job | None:
    workflow = costs.catalog.workflows.get(arrival.workflow)
    if workflow is None:
        return None
    try:
        params = validate_params(workflow, params_for(arrival))
    except ParamError:
        return None  # the broker refuses it: never on time
    plain, split = costs.request(workflow, params), costs.request(workflow, params, cfg_split=True)
    if plain is None or split is None:
        return None
    slo = LoadTracker.slo_s(workflow, plain.solo_s, slo_multiple)
    return Job(arrival.index, arrival.at_s, arrival.at_s + slo, min(plain.min_work_s, split.min_work_s),
               min(plain.solo_s, split.solo_s))


def on_time_reference(arrivals: list[Arrival], gpus: float, costs: CostModel, slo_multiple: float = SLO_MULTIPLE,
                      params_for: Callable[[Arrival], dict] = default_params) -> Reference:
    """The on-time reference of `arrivals` on `gpus` GPUs (see the module docstring)."""
    if not gpus > 0:
        raise ValueError(f"gpus must be > 0, got {gpus!r}")
    jobs, unpriced = jobs_of(arrivals, costs, slo_multiple, params_for)
    greedy, offline = len(online_greedy(jobs, gpus)), len(offline_deadline_order(jobs, gpus))
    return Reference(len(arrivals), max(greedy, offline), greedy, offline,
                     sum(not j.fits_alone for j in jobs), unpriced)


# ---------------------------------------------------------------- (a) online greedy


def online_greedy(jobs: Iterable[Job], gpus: float) -> list[Job]:
    """The jobs accepted in arrival order while the accepted set stays EDF-feasible."""
    capacity = float(gpus)
    pending: list[list] = []  # [deadline, sequence, remaining work], in deadline order
    accepted: list[Job] = []
    now = -math.inf
    for sequence, job in enumerate(sorted(jobs, key=lambda j: (j.release_s, j.index))):
        if not job.fits_alone:
            continue
        if pending:
            _run_edf(pending, capacity * (job.release_s - now))
        now = job.release_s
        if _room_for(job, pending, capacity, now):
            bisect.insort(pending, [job.deadline_s, sequence, job.work_s])
            accepted.append(job)
    return accepted


def _run_edf(pending: list[list], budget: float) -> None:
    """Spend `budget` device-seconds on the pending work, earliest deadline first."""
    while pending and budget > 0:
        head = pending[0]
        done = min(head[2], budget)
        head[2] -= done
        budget -= done
        if head[2] <= RELATIVE_TOLERANCE * done:
            pending.pop(0)


def _room_for(job: Job, pending: list[list], capacity: float, now: float) -> bool:
    """Whether the pending work plus `job` meets every deadline from `now` (EDF order)."""
    work, due = job.work_s, job.deadline_s
    before = 0.0  # pending work due by the deadline being checked
    own_checked = False
    for deadline, _, remaining in pending:
        if deadline > due and not own_checked:
            if not _fits(before + work, capacity * (due - now)):
                return False
            own_checked = True
        before += remaining
        if deadline >= due and not _fits(before + work, capacity * (deadline - now)):
            return False
    return own_checked or _fits(before + work, capacity * (due - now))


# ---------------------------------------------------------------- (b) offline, deadline order


def offline_deadline_order(jobs: Iterable[Job], gpus: float) -> list[Job]:
    """Jobs added in deadline order; on a violated interval the largest job in it is dropped."""
    capacity = float(gpus)
    by_release = sorted((j for j in jobs if j.fits_alone), key=lambda j: (j.release_s, j.index))
    if not by_release:
        return []
    starts = [j.release_s for j in by_release]
    points = sorted(set(starts))
    load = _PrefixAddMax([capacity * x for x in points])  # G x + W(x) per release point x
    largest = _RangeMax(len(by_release))  # (work, deadline, slot) of each kept job
    kept = [False] * len(by_release)
    for slot in sorted(range(len(by_release)), key=lambda s: (by_release[s].deadline_s, s)):
        job = by_release[slot]
        last_point = bisect.bisect_left(points, job.release_s)
        load.add(last_point, job.work_s)
        largest.set(slot, (job.work_s, job.deadline_s, slot))
        kept[slot] = True
        while True:
            worst, point = load.max(last_point)
            if _fits(worst, capacity * job.deadline_s):
                break
            _, _, victim = largest.max_from(bisect.bisect_left(starts, points[point]))
            load.add(bisect.bisect_left(points, by_release[victim].release_s), -by_release[victim].work_s)
            largest.clear(victim)
            kept[victim] = False
    return [j for j, k in zip(by_release, kept, strict=True) if k]


class _PrefixAddMax:
    """A fixed array with two operations in O(log n): add a constant to items 0..last,
    and the largest of items 0..last with its position (a segment tree whose nodes keep
    the max of their range and what was added to all of it)."""

    def __init__(self, values: list[float]):
        self.n = len(values)
        self.best = [0.0] * (4 * self.n)
        self.at = [0] * (4 * self.n)
        self.added = [0.0] * (4 * self.n)
        self._build(1, 0, self.n - 1, values)

    def _build(self, node: int, lo: int, hi: int, values: list[float]) -> None:
        if lo == hi:
            self.best[node], self.at[node] = values[lo], lo
            return
        mid = (lo + hi) // 2
        self._build(2 * node, lo, mid, values)
        self._build(2 * node + 1, mid + 1, hi, values)
        self._pull(node)

    def _pull(self, node: int) -> None:
        left, right = 2 * node, 2 * node + 1
        child = left if self.best[left] >= self.best[right] else right
        self.best[node], self.at[node] = self.best[child] + self.added[node], self.at[child]

    def add(self, last: int, delta: float) -> None:
        self._add(1, 0, self.n - 1, last, delta)

    def _add(self, node: int, lo: int, hi: int, last: int, delta: float) -> None:
        if hi <= last:
            self.best[node] += delta
            self.added[node] += delta
            return
        mid = (lo + hi) // 2
        self._add(2 * node, lo, mid, last, delta)
        if last > mid:
            self._add(2 * node + 1, mid + 1, hi, last, delta)
        self._pull(node)

    def max(self, last: int) -> tuple[float, int]:
        return self._max(1, 0, self.n - 1, last)

    def _max(self, node: int, lo: int, hi: int, last: int) -> tuple[float, int]:
        if hi <= last:
            return self.best[node], self.at[node]
        mid = (lo + hi) // 2
        best, at = self._max(2 * node, lo, mid, last)
        if last > mid:
            right = self._max(2 * node + 1, mid + 1, hi, last)
            if right[0] > best:
                best, at = right
        return best + self.added[node], at


class _RangeMax:
    """Slots holding comparable keys (or nothing); the largest key from a slot on."""

    EMPTY = (-math.inf,)

    def __init__(self, n: int):
        self.size = 1 << max(0, (n - 1).bit_length())
        self.tree: list[tuple] = [self.EMPTY] * (2 * self.size)

    def set(self, slot: int, key: tuple) -> None:
        node = slot + self.size
        self.tree[node] = key
        while node > 1:
            node //= 2
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])

    def clear(self, slot: int) -> None:
        self.set(slot, self.EMPTY)

    def max_from(self, first: int) -> tuple:
        lo, hi = first + self.size, 2 * self.size  # half-open [lo, hi) over the leaves
        best = self.EMPTY
        while lo < hi:
            if lo & 1:
                best = max(best, self.tree[lo])
                lo += 1
            if hi & 1:
                hi -= 1
                best = max(best, self.tree[hi])
            lo //= 2
            hi //= 2
        return best
