"""What the broker tells the world about itself: the telemetry snapshot and the
workflow listing. Pure functions of the core's tables, run in the broker process."""

from __future__ import annotations

from broker import protocol as p
from broker.catalog import Catalog
from broker.core.actors import ActorTable
from broker.core.admin import Operator
from broker.core.directory import RequestDirectory
from broker.core.load import LoadTracker
from broker.core.metering import Meters
from broker.core.settings import BrokerSettings
from broker.core.state import DONE, READY, Request


def workflow_infos(catalog: Catalog, registered=()) -> list[p.WorkflowInfo]:
    """Every workflow of the catalog; those in `registered` were registered at run time."""
    infos = []
    for wf in catalog.workflows.values():
        inputs = [p.InputInfo(i.name, i.type, i.required, i.default, i.min, i.max,
                              list(i.choices) if i.choices else None, i.description) for i in wf.inputs.values()]
        infos.append(p.WorkflowInfo(wf.name, wf.description, wf.models, inputs, "image", wf.name in registered))
    return infos


def snapshot(now: float, catalog: Catalog, settings: BrokerSettings, actors: ActorTable, directory: RequestDirectory,
             load: LoadTracker, meters: Meters, operator: Operator) -> p.Stats:
    """Per-model queues, load and batching; per-actor state and telemetry; agents;
    per-workflow SLO counts; counters; the live policy settings and the scheduler's plan;
    the operator's replica bounds and paused workflows; recent refusals and failures and
    the cumulative meters (`broker.core.metering`)."""
    live = actors.actors.values()
    pending = _model_load(directory.requests.values(), now)
    # Models with waiting work but no actor yet matter most to the scheduler.
    models = sorted(set(directory.queues) | {a.model for a in live} | set(meters.model_batches) | set(pending))
    model_stats = []
    for model in models:
        tasks, batches, mixed = meters.model_batches.get(model, (0, 0, 0))
        queue = directory.queues.get(model)
        ready_s, pending_s, slack, oldest = pending.get(model, (0.0, 0.0, None, 0.0))
        model_stats.append(p.ModelStats(
            model, queue.depth if queue else 0, sum(a.model == model and not a.draining for a in live),
            tasks, batches, mixed, sorted(meters.model_workflows.get(model, ())),
            round(ready_s, 6), round(pending_s, 6), round(load.arrival_rate(model, now), 4),
            round(load.model_work.get(model, 0.0), 6), None if slack is None else round(slack, 4),
            round(load.service_s.get(model, 0.0), 6), round(oldest, 4)))
    actor_stats = [
        p.ActorStats(a.actor_id, a.model, a.host, a.device, _actor_state(a), a.credits,
                     sum(len(v) for v in a.in_flight.values()), a.batches, a.tasks, a.mixed_workflow_batches,
                     a.max_batch_rows_seen, len(a.held), a.telemetry, a.pid, a.backend, a.stopping,
                     a.adapter_switches, a.data_address)
        for a in live
    ]
    agent_stats = [p.AgentStats(a.agent_id, a.host, a.devices, sorted(a.actors.items())) for a in actors.agents.values()]
    counters = dict(meters.counters, requests_in_flight=len(directory.requests))
    shown = {"admission": settings.admission, "slo_multiple": settings.slo_multiple, "cfg_split": settings.cfg_split,
             "affinity": settings.affinity, "queued_work_s": round(load.queued_min_s, 4), "devices": actors.device_count()}
    stats = p.Stats(now, model_stats, actor_stats, agent_stats, counters, meters.hop_latency.summary(),
                    workflows=_workflow_stats(catalog, load, operator, settings.slo_multiple), settings=shown,
                    plan=operator.plan, replica_bounds={m: dict(b) for m, b in operator.replica_bounds.items()},
                    paused_workflows=sorted(operator.paused))
    return meters.fill(stats)


def _actor_state(actor) -> str:
    if actor.draining:
        return "draining"
    return "busy" if actor.in_flight else "idle"


def _model_load(requests: list[Request], now: float) -> dict[str, tuple[float, float, float | None, float]]:
    """model -> (ready device-seconds, pending device-seconds, least slack of queued requests,
    longest wait of a ready task).

    Ready work is counted at full-batch cost (the queue will be taken in batches);
    pending work at cost alone (future steps of few requests run in small batches)."""
    load: dict[str, list] = {}
    for request in requests:
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


def _workflow_stats(catalog: Catalog, load: LoadTracker, operator: Operator, slo_multiple: float) -> list[p.WorkflowStats]:
    out = []
    for name in sorted(set(load.workflow_stats) | set(catalog.workflows)):
        stats = load.stats(name)
        workflow = catalog.workflows.get(name)
        if workflow is not None:
            stats.slo_s, stats.solo_s = (round(x, 4) for x in load.default_slo(workflow, slo_multiple))
        stats.paused = name in operator.paused
        stats.admission_factor = round(load.admission_factor(name), 3)
        out.append(stats)
    return out
