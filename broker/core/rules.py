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
"""

from __future__ import annotations

from dataclasses import dataclass

LATENCY, THROUGHPUT = "latency", "throughput"


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

    @property
    def reason(self) -> str:
        verb = "within" if self.admit else "exceeds"
        return f"completion lower bound {self.bound_s:.3f} s {verb} the SLO slack {self.slack_s:.3f} s"


ADMISSION_BOUNDS = ("max", "sum")


def admission(own_solo_s: float, queued_work_s: float, devices: int, slack_s: float, bound: str = "max") -> Admission:
    if devices < 1:
        raise ValueError("devices must be >= 1")
    if bound not in ADMISSION_BOUNDS:
        raise ValueError(f"bound: expected one of {ADMISSION_BOUNDS}, got {bound!r}")
    queue_s = queued_work_s / devices
    estimate = queue_s + own_solo_s if bound == "sum" else max(queue_s, own_solo_s)
    return Admission(estimate <= slack_s, estimate, slack_s)
