"""Two per-request rules the broker applies at arrival: pure functions, no state.

- Parallel groups: a CFG request runs its two branches on two actors (latency mode)
  only when the actors that the ready work would need in latency mode are no more
  than the idle ones; otherwise one batch-2 call per step (throughput mode). This is
  the paper's rule; with no idle capacity, splitting only adds a hop and halves
  batching.
- Admission: a request is refused at once when an estimate of its completion time
  exceeds its SLO slack. `max` (the paper's rule): the larger of the queued work spread
  over every device and the request's own solo latency, a true lower bound, so a
  refused request could not have met its deadline. `sum`: the queued work spread over
  the devices, then its solo latency (first come, first served: it starts when the
  work ahead of it is done). `max` admits requests that queueing then makes miss; under
  overload they take capacity from requests that could have met their deadline (the
  simulator: 21% vs 64% attainment at rate scale 8 on the paper's setting).
  `sum` in turn spreads the work ahead over the devices as if one request could use
  them all, and then adds a whole solo latency: a burst that fills every device once
  is refused past the first device's worth, although each device would finish its
  second request within the SLO, and it ignores the models beside the base one (one
  VAE actor decoding a whole burst). `lookahead` (`lookahead_finish`): the requests
  ahead, in the order they are served (first come, first served), run node by node on
  the actors of each model, and the new request after them; its estimate is when its
  last node would be done, plus how much longer than that such estimates have run lately
  (`LoadTracker.admission_margin_s`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

LATENCY, THROUGHPUT = "latency", "throughput"
# A node for lookahead admission: its model, seconds alone, seconds of its share of a
# full batch, and the indices of the ops before it whose outputs it needs.
Op = tuple[str, float, float, tuple[int, ...]]


def parallel_mode(needed_in_latency_mode: int, idle_actors: int) -> str:
    return LATENCY if needed_in_latency_mode <= idle_actors else THROUGHPUT


def cfg_actors_needed(live_cfg_requests: int, branches: int = 2) -> int:
    """Actors the base model's ready work needs in latency mode: every live CFG request
    (the arriving one included) has one step ready at a time, `branches` actors wide."""
    return branches * live_cfg_requests


@dataclass(frozen=True)
class Admission:
    admit: bool
    bound_s: float
    slack_s: float
    predicted_s: float | None = None  # lookahead: its latency estimate before the learned margin

    @property
    def reason(self) -> str:
        verb = "within" if self.admit else "exceeds"
        return f"completion estimate {self.bound_s:.3f} s {verb} the SLO slack {self.slack_s:.3f} s"


ADMISSION_BOUNDS = ("max", "sum", "lookahead")


def lookahead_finish(ahead: Iterable[Sequence[Op]], own: Sequence[Op], replicas: Mapping[str, int]) -> float:
    """Seconds from now until a new request's last node is done, on a small event
    simulation of how the broker serves the live requests: each model's actors take its
    ready nodes first come, first served by request (the new one last), a node is ready
    once the nodes it needs are done. An op is (model, seconds alone, seconds of the
    actor's time in a full batch, the indices of the earlier ops it needs): the node is
    done after its time alone, its actor takes the next node after the node's share of
    a full batch (the next one joins its batch). A model with no actor counts as one
    (the scheduler starts one for queued work; expiry.py fails the request if none
    comes)."""
    jobs = [*ahead, own]
    mine = len(jobs) - 1
    consumers: list[list[list[int]]] = []
    deps_left: list[list[int]] = []
    idle: dict[str, int] = {}
    ready: dict[str, list[tuple[int, int]]] = {}  # model -> heap of (job, op)
    for j, ops in enumerate(jobs):
        consumers.append([[] for _ in ops])
        deps_left.append([len(op[3]) for op in ops])
        for i, (model, _, _, needs) in enumerate(ops):
            idle.setdefault(model, max(1, replicas.get(model, 0)))
            for k in needs:
                consumers[j][k].append(i)
            if not needs:
                heapq.heappush(ready.setdefault(model, []), (j, i))
    own_left = len(own)
    if not own_left:
        return 0.0
    # (time, kind, job, op, model); kind 0: a node done, 1: its actor free. At the same
    # instant a node's successors are ready before its actor picks its next node, as in
    # the broker (the result arrives, then the actor's credit is spent).
    events: list[tuple[float, int, int, int, str]] = []

    def start(model: str, now: float) -> None:
        queue = ready.get(model)
        while queue and idle[model] > 0:
            j, i = heapq.heappop(queue)
            _, alone_s, share_s, _ = jobs[j][i]
            idle[model] -= 1
            heapq.heappush(events, (now + share_s, 1, j, i, model))
            heapq.heappush(events, (now + max(alone_s, share_s), 0, j, i, model))

    for model in list(ready):
        start(model, 0.0)
    while events:
        now, kind, j, i, model = heapq.heappop(events)
        if kind == 1:
            idle[model] += 1
            start(model, now)
            continue
        if j == mine:
            own_left -= 1
            if own_left == 0:
                return now
        for c in consumers[j][i]:
            deps_left[j][c] -= 1
            if deps_left[j][c] == 0:
                other = jobs[j][c][0]
                heapq.heappush(ready.setdefault(other, []), (j, c))
                start(other, now)
    raise AssertionError("lookahead_finish: ops left that no event reaches (a cycle in `needs`)")


def plan_ops(plans: Sequence, node_costs: Sequence[tuple[float, float]], share_s: Callable) -> list[Op]:
    """A new request's ops for `lookahead_finish`, from its node plans, their (alone,
    full-batch) costs, and `share_s(plan, alone, full)`: its actor's time."""
    index = {plan.key: i for i, plan in enumerate(plans)}
    return [(plan.model, alone, share_s(plan, alone, full), tuple(index[k] for k in plan.inputs))
            for plan, (alone, full) in zip(plans, node_costs, strict=True)]


def admission(own_solo_s: float, queued_work_s: float, devices: int, slack_s: float, bound: str = "max") -> Admission:
    if devices < 1:
        raise ValueError("devices must be >= 1")
    if bound not in ("max", "sum"):  # lookahead: lookahead_finish
        raise ValueError(f"bound: expected 'max' or 'sum', got {bound!r}")
    queue_s = queued_work_s / devices
    estimate = queue_s + own_solo_s if bound == "sum" else max(queue_s, own_solo_s)
    return Admission(estimate <= slack_s, estimate, slack_s)
