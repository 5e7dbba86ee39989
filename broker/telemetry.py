"""What the broker tells the world about itself: the telemetry snapshot and the
workflow listing. Pure functions of the core's state, run in the broker process."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker import protocol as p
from broker.workflows import Catalog

if TYPE_CHECKING:  # the core imports this module
    from broker.core import BrokerCore


def workflow_infos(catalog: Catalog) -> list[p.WorkflowInfo]:
    infos = []
    for wf in catalog.workflows.values():
        inputs = [p.InputInfo(i.name, i.type, i.required, i.default, i.min, i.max,
                              list(i.choices) if i.choices else None, i.description) for i in wf.inputs.values()]
        infos.append(p.WorkflowInfo(wf.name, wf.description, wf.models, inputs, "image"))
    return infos


def snapshot(core: BrokerCore, now: float) -> p.Stats:
    """Per-model queues and batching, per-actor state and telemetry, agents, counters."""
    actors = core.actors.values()
    models = sorted(set(core.queues) | {a.model for a in actors} | set(core.model_batches))
    model_stats = []
    for model in models:
        tasks, batches, mixed = core.model_batches.get(model, (0, 0, 0))
        queue = core.queues.get(model)
        model_stats.append(p.ModelStats(
            model, queue.depth if queue else 0, sum(a.model == model for a in actors),
            tasks, batches, mixed, sorted(core.model_workflows.get(model, ()))))
    actor_stats = [
        p.ActorStats(a.actor_id, a.model, a.host, a.device, "busy" if a.in_flight else "idle", a.credits,
                     sum(len(v) for v in a.in_flight.values()), a.batches, a.tasks, a.mixed_workflow_batches,
                     a.max_batch_rows_seen, len(a.held), a.telemetry, a.pid, a.backend)
        for a in actors
    ]
    agent_stats = [p.AgentStats(a.agent_id, a.host, a.devices, sorted(a.actors.items())) for a in core.agents.values()]
    counters = dict(core.counters, requests_in_flight=len(core.requests))
    return p.Stats(now, model_stats, actor_stats, agent_stats, counters, core.hop_latency.summary())
