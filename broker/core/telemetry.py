"""What the broker tells the world about itself: the telemetry snapshot and the
workflow listing. Pure functions of the core's state, run in the broker process."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker import protocol as p
from broker.catalog import Catalog
from broker.core.state import DONE, READY

if TYPE_CHECKING:  # the core imports this module
    from broker.core.machine import BrokerCore


def workflow_infos(catalog: Catalog) -> list[p.WorkflowInfo]:
    infos = []
    for wf in catalog.workflows.values():
        inputs = [p.InputInfo(i.name, i.type, i.required, i.default, i.min, i.max,
                              list(i.choices) if i.choices else None, i.description) for i in wf.inputs.values()]
        infos.append(p.WorkflowInfo(wf.name, wf.description, wf.models, inputs, "image"))
    return infos


def snapshot(core: BrokerCore, now: float) -> p.Stats:
    """Per-model queues, load and batching; per-actor state and telemetry; agents;
    per-workflow SLO counts; counters; the live policy settings and the scheduler's plan;
    the operator's replica bounds and paused workflows; recent refusals and failures and
    the cumulative meters (`broker.core.metering`)."""
    actors = core.actors.values()
    load = _model_load(core, now)
    # Models with waiting work but no actor yet matter most to the scheduler.
    models = sorted(set(core.queues) | {a.model for a in actors} | set(core.model_batches) | set(load))
    model_stats = []
    for model in models:
        tasks, batches, mixed = core.model_batches.get(model, (0, 0, 0))
        queue = core.queues.get(model)
        ready_s, pending_s, slack, oldest = load.get(model, (0.0, 0.0, None, 0.0))
        model_stats.append(p.ModelStats(
            model, queue.depth if queue else 0, sum(a.model == model and not a.draining for a in actors),
            tasks, batches, mixed, sorted(core.model_workflows.get(model, ())),
            round(ready_s, 6), round(pending_s, 6), round(core.load.arrival_rate(model, now), 4),
            round(core.load.model_work.get(model, 0.0), 6), None if slack is None else round(slack, 4),
            round(core.load.service_s.get(model, 0.0), 6), round(oldest, 4)))
    actor_stats = [
        p.ActorStats(a.actor_id, a.model, a.host, a.device, _actor_state(a), a.credits,
                     sum(len(v) for v in a.in_flight.values()), a.batches, a.tasks, a.mixed_workflow_batches,
                     a.max_batch_rows_seen, len(a.held), a.telemetry, a.pid, a.backend, a.stopping,
                     a.adapter_switches)
        for a in actors
    ]
    agent_stats = [p.AgentStats(a.agent_id, a.host, a.devices, sorted(a.actors.items())) for a in core.agents.values()]
    counters = dict(core.counters, requests_in_flight=len(core.requests))
    settings = {"admission": core.settings.admission, "slo_multiple": core.settings.slo_multiple,
                "cfg_split": core.settings.cfg_split, "affinity": core.settings.affinity,
                "queued_work_s": round(core.load.queued_min_s, 4), "devices": core._device_count()}
    stats = p.Stats(now, model_stats, actor_stats, agent_stats, counters, core.hop_latency.summary(),
                    workflows=_workflow_stats(core), settings=settings, plan=core.plan,
                    replica_bounds={m: dict(b) for m, b in core.replica_bounds.items()},
                    paused_workflows=sorted(core.paused))
    return core.meters.fill(stats)


def _actor_state(actor) -> str:
    if actor.draining:
        return "draining"
    return "busy" if actor.in_flight else "idle"


def _model_load(core: BrokerCore, now: float) -> dict[str, tuple[float, float, float | None, float]]:
    """model -> (ready device-seconds, pending device-seconds, least slack of queued requests,
    longest wait of a ready task).

    Ready work is counted at full-batch cost (the queue will be taken in batches);
    pending work at cost alone (future steps of few requests run in small batches)."""
    load: dict[str, list] = {}
    for request in core.requests.values():
        for node in request.nodes.values():
            if node.state == DONE:
                continue
            entry = load.setdefault(node.model, [0.0, 0.0, None, 0.0])
            entry[1] += node.cost_s
            if node.state == READY:  # queued tasks will batch: count their full-batch cost
                entry[0] += node.min_cost_s
                entry[3] = max(entry[3], now - node.ready_at)
                if request.deadline is not None:
                    slack = request.deadline - now
                    entry[2] = slack if entry[2] is None else min(entry[2], slack)
    return {model: tuple(entry) for model, entry in load.items()}


def _workflow_stats(core: BrokerCore) -> list[p.WorkflowStats]:
    out = []
    for name in sorted(set(core.load.workflow_stats) | set(core.catalog.workflows)):
        stats = core.load.stats(name)
        workflow = core.catalog.workflows.get(name)
        if workflow is not None:
            stats.slo_s, stats.solo_s = (round(x, 4) for x in core.load.default_slo(workflow, core.settings.slo_multiple))
        stats.paused = name in core.paused
        out.append(stats)
    return out
