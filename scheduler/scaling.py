"""Per-model replica targets from demand: a pure function of a snapshot and memory.

Demand of a model, in devices: (arrival rate x work per request + backlog / horizon)
/ target utilisation, where the backlog is the device-seconds of unfinished work that
live requests still need from it. Rules, each there to stop a failure seen in
practice:

- Scale up only a bottleneck: a model whose ready queue holds more than
  `queue_wait_s` of work per replica, continuously for `sustain_s`. A burst piles
  future work on every model of a workflow (each request will need the VAE once),
  but only the base model's queue stays deep; the VAE sees short spikes when many
  base-model replicas finish together, which one batch clears.
- Up at once (after `up_cooldown_s`), to the full demand: a burst is served by the
  replicas that exist while it lasts.
- Down one replica at a time, only after demand has stayed below the smaller count
  with margin `hysteresis` for `down_cooldown_s`, and never sooner than
  `down_cooldown_s` after a scale-up: oscillating load does not flap.
- Targets stay within [min, max] per model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from scheduler.snapshot import ModelLoad, Snapshot


@dataclass(frozen=True)
class ScalingSettings:
    horizon_s: float = 4.0  # drain a backlog within this (about an SLO)
    target_utilization: float = 0.85
    queue_wait_s: float = 0.5  # ready work per replica beyond which a model is a bottleneck...
    sustain_s: float = 1.0  # ...when it stays beyond it this long
    up_cooldown_s: float = 1.0
    down_cooldown_s: float = 10.0
    hysteresis: float = 0.3
    min_replicas: int = 1
    max_replicas: int = 64
    per_model_min: dict[str, int] = field(default_factory=dict)
    per_model_max: dict[str, int] = field(default_factory=dict)

    def bounds(self, model: str) -> tuple[int, int]:
        return self.per_model_min.get(model, self.min_replicas), self.per_model_max.get(model, self.max_replicas)


@dataclass(frozen=True)
class ScalingMemory:
    """What the policy remembers between ticks (returned, never mutated)."""

    last_up: dict[str, float] = field(default_factory=dict)
    low_since: dict[str, float] = field(default_factory=dict)
    hot_since: dict[str, float] = field(default_factory=dict)  # queue deep since


@dataclass(frozen=True)
class Target:
    model: str
    current: int
    target: int
    reason: str


MAX_SWITCH_SHARE = 0.8  # cap on the LoRA switching share counted (keeps the scale-up finite)


def demand_devices(load: ModelLoad, settings: ScalingSettings) -> float:
    """Devices the model needs: its work rate and pending work over the horizon, at the
    target utilisation, grown by the share of actor time that LoRA switches take (work
    that the profile-priced figures leave out)."""
    rate_s = load.arrival_rate * load.work_per_request_s
    switching = 1.0 - min(load.switch_share, MAX_SWITCH_SHARE)
    return (rate_s + load.pending_s / settings.horizon_s) / settings.target_utilization / switching


def is_bottleneck(load: ModelLoad, replicas: int, settings: ScalingSettings) -> bool:
    """Its queue holds more work per replica than `queue_wait_s`. (Not how long its
    oldest task waited: after a burst that only says the burst arrived at once.)"""
    return load.queue_depth > 0 and load.ready_s / max(replicas, 1) > settings.queue_wait_s


def scale_targets(snapshot: Snapshot, models: list[str], memory: ScalingMemory,
                  settings: ScalingSettings, in_progress: frozenset[str] = frozenset()) -> tuple[list[Target], ScalingMemory]:
    """Targets per model; a model with a change `in_progress` keeps its count and its
    timers (its replicas are about to change: judging it now would be premature)."""
    now = snapshot.time
    replicas = snapshot.replicas()
    last_up, low_since, hot_since = dict(memory.last_up), dict(memory.low_since), dict(memory.hot_since)
    targets = []
    for model in models:
        load = snapshot.load(model)
        current = replicas.get(model, 0)
        if model in in_progress:
            targets.append(Target(model, current, current, "change in progress"))
            continue
        low, high = settings.bounds(model)
        demand = demand_devices(load, settings)
        need = min(max(math.ceil(demand - 1e-9), low), high)
        target, why = current, f"demand {demand:.2f} devices"
        if is_bottleneck(load, current, settings):
            hot_since.setdefault(model, now)
        else:
            hot_since.pop(model, None)
        sustained = model in hot_since and now - hot_since[model] >= settings.sustain_s
        if current < low:
            target, why = low, f"below its minimum of {low}"
            low_since.pop(model, None)
        elif sustained and need > current:
            low_since.pop(model, None)
            if now - last_up.get(model, -math.inf) >= settings.up_cooldown_s:
                target = need
                why = (f"bottleneck: {load.queue_depth} queued ({load.ready_s:.2f} s ready, oldest waiting "
                       f"{load.oldest_wait_s:.2f} s), demand {demand:.2f} devices")
        elif current > low and demand <= (current - 1) * (1 - settings.hysteresis):
            since = low_since.setdefault(model, now)
            cooled = now - since >= settings.down_cooldown_s and now - last_up.get(model, -math.inf) >= settings.down_cooldown_s
            if cooled:
                target, why = current - 1, f"demand {demand:.2f} devices for {now - since:.1f} s"
                low_since[model] = now  # the next step down waits a full cooldown again
        else:
            low_since.pop(model, None)
        target = min(max(target, low), high) if current >= low else target
        if target > current:
            last_up[model] = now
        targets.append(Target(model, current, target, why))
    return targets, replace(memory, last_up=last_up, low_since=low_since, hot_since=hot_since)
