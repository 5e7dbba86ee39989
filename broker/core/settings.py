"""The broker core's settings, each declared once: default, meaning, flag, live or not.

Runs in the broker process (and wherever a core runs: the simulator, benchmarks).
`BrokerSettings` is what the core reads; `broker.server.BrokerConfig` extends it with
the server's own fields, `broker.config.add_flags` derives `lego broker`'s flags from
both, and `live_changes` checks an operator's AdminConfigure against the fields marked
`live`. Validation (`__post_init__`) runs on every construction, a live change included.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from broker.config import setting
from broker.core.rules import ADMISSION_BOUNDS
from broker.core.state import QUEUE_ORDERS

AFFINITIES = ("prefer", "avoid")
CFG_SPLITS = ("never", "always", "auto")
SERVINGS = ("micro", "monolith")


@dataclass(frozen=True)
class BrokerSettings:
    heartbeat_interval_s: float = setting(1.0, help="seconds between heartbeats")
    heartbeat_misses: int = setting(5, help="heartbeats missed before a peer is declared dead")
    max_task_attempts: int = setting(3, help="a task re-queued after this many lost attempts fails its request")
    # Tuning rarely touched: config file and LEGO_* environment only, no flag.
    max_request_restarts: int = setting(3, flag=False,
                                        help="whole-request recomputations after lost intermediate tensors")
    max_requests_in_flight: int = setting(100_000, flag=False, help="refuse requests beyond this many in flight")
    latency_window: int = setting(20_000, flag=False, help="latency samples kept for p50/p99")
    # "prefer": step k+1 goes to the actor holding step k's output when it has credit.
    # "avoid": to any other actor when one has credit (forces migration: tests the data plane).
    affinity: str = setting("prefer", choices=AFFINITIES,
                            help="prefer the holder of a task's input; avoid: force steps to migrate")
    # "always": run the two CFG branches of every step as separate tasks (for two
    # actors); "never": one batch-2 call; "auto": per request at arrival, by the
    # parallel-group rule (broker.core.rules.parallel_mode).
    cfg_split: str = setting("never", choices=CFG_SPLITS, live=True,
                             help="CFG branches as separate tasks for two actors (always), or by load (auto)")
    # Admission control: refuse at arrival a request that cannot meet its SLO
    # (broker.core.rules.admission). The SLO is the workflow's slo_s, else this multiple
    # of its solo latency from the profiles; workflows without profiles are not checked.
    admission: bool = setting(False, live=True, help="refuse requests that cannot meet their SLO")
    admission_bound: str = setting("lookahead", choices=ADMISSION_BOUNDS, live=True,
                                   help="lookahead: simulate the actors' queues, learn the misses; "
                                        "max: the paper's lower bound; sum: queue, then solo latency")
    # Real seconds the runtime adds to a request beyond its profile times (dispatch hops,
    # fetches, actor Python, result): added to the solo latency admission estimates. The
    # profiles time model calls alone; a request that just fits its SLO on paper misses it.
    admission_overhead_s: float = setting(0.0, live=True,
                                          help="runtime seconds per request added to the solo latency at admission")
    # Lookahead admission learns its margin only from requests admitted near their SLO; a
    # workflow whose margin grew under a burst can then be refused for good, on idle GPUs
    # (simulated: `sd35l-depth-cfg` refused from 100 s to the end at x2.07, its twin
    # served). After this long (profile seconds) with no such admission, one request that
    # the margin alone refuses is admitted to learn from (0: never). docs/benchmarks.md,
    # issue 14, session 11: memory-bound suite 5695 -> 5764 on time, paper 7935 -> 7944.
    admission_probe_s: float = setting(5.0, live=True,
                                       help="admit a request the learned margin alone refuses when none of its "
                                            "workflow was admitted near its SLO for this long (0: never)")
    slo_multiple: float = setting(2.0, live=True, help="SLO = this x the solo latency, where a workflow sets no slo_s")
    cost_scale: float = setting(1.0, help="profile times x this (an emulated cluster's time_scale)")
    # "micro": requests are unrolled into node tasks; "monolith": each request is one
    # task on a `pipeline/...` actor hosting its whole workflow (the baselines).
    serving: str = setting("micro", choices=SERVINGS, live=True,
                           help="monolith: each request one task on a pipeline/WORKFLOW actor (baselines)")
    # Fail a request with `deadline_exceeded` instead of dispatching work for it once
    # its SLO deadline has passed (the paper's baselines drop such requests).
    drop_late: bool = setting(False, live=True, help="fail requests whose SLO deadline passed instead of running them")
    # With drop_late: also drop a request as soon as it cannot make its deadline any more
    # (now + the profile time of its remaining critical path > deadline), before more
    # work is spent on it; the freed capacity goes to requests that still can.
    drop_hopeless: bool = setting(False, live=True, help="...or can no longer be met (remaining critical path)")
    # Which request's ready tasks a model's actors take first: "fcfs" by arrival; "deadline"
    # the earliest SLO deadline (with per-workflow SLOs the two differ across workflows; the
    # pooled monolith baseline serves its one shared queue so). A request's own tasks keep
    # farthest-from-output first either way.
    queue_order: str = setting("fcfs", choices=QUEUE_ORDERS, live=True,
                               help="ready tasks by request arrival (fcfs) or earliest SLO deadline first (deadline)")
    # Cap a batch at the rows that still lower the time per row (from the profile);
    # off: fill batches up to each actor's max_batch_rows.
    batch_by_profile: bool = setting(True, help="cap batches at the rows the profile says still pay")
    # Tasks at least this long (profile seconds, before cost_scale) go only to actors with
    # nothing in flight; shorter ones may queue a second batch at a busy actor.
    prefetch_below_s: float = setting(0.05, flag=False,
                                      help="shorter tasks may queue a second batch at a busy actor")
    # Send a task with LoRA adapters to an actor that has that adapter set applied
    # already, when one is free: switching costs the actor a weight update (and a disk
    # read when the adapter is not in its host cache).
    adapter_affinity: bool = setting(True, live=True,
                                     help="LoRA: send a set where it is applied; an actor runs its own set's tasks first")
    # ...and an actor with a set applied takes a ready task of that set before the queue's
    # head when that task's request arrived at most this long (profile seconds) after the
    # head's: fewer switches under saturation, at a bounded cost in order.
    adapter_bypass_s: float = setting(2.5, live=True,
                                      help="...when they are at most this much (profile seconds) younger than the head")

    # Every accepted request ends (broker.core.expiry): one still unfinished this long
    # after it was accepted fails `deadline_exceeded`, whatever held it up.
    request_timeout_s: float = setting(600.0, live=True,
                                       help="fail a request still unfinished this long after it was accepted (0: never)")
    # Queued work of a model no live actor serves (its actors died with their agent) fails
    # `no_capacity` after this grace, which leaves time to start a replacement.
    orphan_timeout_s: float = setting(120.0, live=True,
                                      help="fail requests whose queued work no live actor can take for this long (0: never)")

    def __post_init__(self) -> None:
        if self.affinity not in AFFINITIES:
            raise ValueError(f"affinity: expected 'prefer' or 'avoid', got {self.affinity!r}")
        if self.cfg_split not in CFG_SPLITS:
            raise ValueError(f"cfg_split: expected 'never', 'always' or 'auto', got {self.cfg_split!r}")
        if not isinstance(self.admission, bool):
            raise ValueError(f"admission: expected true or false, got {self.admission!r}")
        if self.admission_bound not in ADMISSION_BOUNDS:
            raise ValueError(f"admission_bound: expected one of {ADMISSION_BOUNDS}, got {self.admission_bound!r}")
        if not (isinstance(self.slo_multiple, (int, float)) and self.slo_multiple > 0):
            raise ValueError(f"slo_multiple: expected a number > 0, got {self.slo_multiple!r}")
        if self.serving not in SERVINGS:
            raise ValueError(f"serving: expected 'micro' or 'monolith', got {self.serving!r}")
        if self.queue_order not in QUEUE_ORDERS:
            raise ValueError(f"queue_order: expected 'fcfs' or 'deadline', got {self.queue_order!r}")
        if not isinstance(self.drop_late, bool) or not isinstance(self.drop_hopeless, bool):
            raise ValueError(f"drop_late, drop_hopeless: expected true or false, got {self.drop_late!r}, "
                             f"{self.drop_hopeless!r}")
        if not (isinstance(self.cost_scale, (int, float)) and self.cost_scale > 0):
            raise ValueError(f"cost_scale: expected a number > 0, got {self.cost_scale!r}")
        if self.heartbeat_interval_s <= 0 or self.heartbeat_misses < 1:
            raise ValueError("heartbeat_interval_s must be > 0 and heartbeat_misses >= 1")
        if not isinstance(self.adapter_affinity, bool):
            raise ValueError(f"adapter_affinity: expected true or false, got {self.adapter_affinity!r}")
        if not (isinstance(self.admission_overhead_s, (int, float)) and self.admission_overhead_s >= 0):
            raise ValueError(f"admission_overhead_s: expected seconds >= 0, got {self.admission_overhead_s!r}")
        for name in ("request_timeout_s", "orphan_timeout_s", "admission_probe_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name}: expected seconds >= 0 (0: never), got {value!r}")
        if not (isinstance(self.adapter_bypass_s, (int, float)) and self.adapter_bypass_s >= 0):
            raise ValueError(f"adapter_bypass_s: expected a number of seconds >= 0, got {self.adapter_bypass_s!r}")


class SettingError(ValueError):
    """A live change refused: `field` names the offending setting as the admin reply does."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _live_types() -> dict[str, tuple[type, ...]]:
    """The settings an operator may change while the broker runs, with the types each
    accepts: a number setting takes ints and floats, never a bool (a bool is an int)."""
    hints = typing.get_type_hints(BrokerSettings)
    accepted = {bool: (bool,), str: (str,), int: (int,), float: (int, float)}
    return {f.name: accepted[hints[f.name]] for f in dataclasses.fields(BrokerSettings) if f.metadata["live"]}


LIVE = _live_types()  # setting -> the value types AdminConfigure accepts for it


def live_changes(settings: BrokerSettings, requested: dict) -> BrokerSettings:
    """`settings` with the requested live changes, all or nothing; a refusal raises
    `SettingError` naming the first offending key (`settings.KEY`)."""
    changes = {}
    for key, value in requested.items():
        kinds = LIVE.get(key)
        if kinds is None:
            raise SettingError(f"settings.{key}", f"settings.{key}: not a live setting (live: {sorted(LIVE)})")
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise SettingError(f"settings.{key}", f"settings.{key}: wrong type {type(value).__name__}")
        changes[key] = value
    try:
        return dataclasses.replace(settings, **changes)
    except ValueError as exc:  # its message starts with the setting's name
        raise SettingError(f"settings.{str(exc).partition(':')[0]}", f"settings.{exc}") from None
