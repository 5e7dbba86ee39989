"""One scheduling round: snapshot in, actions out. Pure; the controller applies them.

Combines the replica targets (`scheduler.scaling`) with placement and conversion
(`scheduler.placement`). A model with a change still in progress (a spawn not yet
joined, a drain not yet finished) is left alone this round, so a slow start is never
mistaken for a missing replica and started twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.catalog import Catalog
from broker.costs.model import CostModel
from scheduler.placement import Spawn, Stop, conversion_victim, device_key, place, scale_down_victim
from scheduler.scaling import ScalingMemory, ScalingSettings, Target, scale_targets
from scheduler.snapshot import Snapshot


@dataclass(frozen=True)
class PlanSettings:
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    headroom_bytes: int = 4 * 1024**3  # activations and workspace beyond the resident weights
    workflows: tuple[str, ...] = ()  # the workflows to serve; empty: every workflow in the catalog


@dataclass(frozen=True)
class Plan:
    actions: list
    targets: list[Target]
    memory: ScalingMemory


def served_models(catalog: Catalog, workflows: tuple[str, ...]) -> list[str]:
    names = workflows or tuple(catalog.workflows)
    models: list[str] = []
    for name in names:
        for model in catalog.workflows[name].models:
            if model not in models:
                models.append(model)
    return models


def neighbours_of(catalog: Catalog, model: str) -> set[str]:
    return {m for wf in catalog.workflows.values() if model in wf.models for m in wf.models} - {model}


def plan_round(snapshot: Snapshot, costs: CostModel, memory: ScalingMemory, settings: PlanSettings,
               in_progress: frozenset[str] = frozenset()) -> Plan:
    catalog = costs.catalog
    models = served_models(catalog, settings.workflows)
    targets, memory = scale_targets(snapshot, models, memory, settings.scaling, in_progress)
    heavy = {m for m in models if catalog.models[m].kind == "denoiser"}
    wanted = {t.model: t.target for t in targets}
    minimums = {m: settings.scaling.bounds(m)[0] for m in models}
    resident = {m: costs.resident_bytes(m) for m in catalog.models}
    reserved: dict[tuple[str, str], int] = {}
    reserved_heavy: dict[tuple[str, str, str], int] = {}
    stopping: set[str] = set()
    actions: list = []
    for t in targets:
        if t.model in in_progress or t.target == t.current:
            continue
        if t.target < t.current:
            victim = scale_down_victim(t.model, snapshot)
            if victim is not None:
                stopping.add(victim.actor_id)
                actions.append(Stop(victim.actor_id, t.model, f"scale {t.current}->{t.target}: {t.reason}"))
            continue
        need = resident[t.model]
        for _ in range(t.target - t.current):
            device = place(t.model, need, snapshot, neighbours_of(catalog, t.model), heavy, reserved,
                           settings.headroom_bytes, reserved_heavy)
            if device is None:
                load = snapshot.load(t.model)
                victim = conversion_victim(t.model, snapshot, wanted, minimums, load.pending_s, costs.load_s(t.model),
                                           need + settings.headroom_bytes, resident, heavy, stopping)
                if victim is not None:  # its memory frees once it stops: placed next round
                    stopping.add(victim.actor_id)
                    actions.append(Stop(victim.actor_id, victim.model,
                                        f"convert {victim.device} to {t.model}: backlog {load.pending_s:.1f} s "
                                        f"outweighs a {costs.load_s(t.model):.1f} s load"))
                break
            reserved[device_key(device)] = reserved.get(device_key(device), 0) + need
            if t.model in heavy:
                key = (*device_key(device), t.model)
                reserved_heavy[key] = reserved_heavy.get(key, 0) + 1
            actions.append(Spawn(t.model, device.host, device.device, f"scale {t.current}->{t.target}: {t.reason}"))
    return Plan(actions, targets, memory)
