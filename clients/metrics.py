"""The broker's Stats snapshot in the Prometheus text format: `render_metrics(stats)`.

Pure: a snapshot in, the exposition's bytes out, through a collector registered in a
registry of its own (prometheus_client's global registry is never touched), so the
gateway's `/metrics` (or any exporter) renders whatever snapshot it last fetched.
Counters and histograms come from the broker's cumulative meters (`broker.core.metering`),
so they only grow while the broker lives; gauges are the snapshot's current values.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from broker import protocol as p

# The Content-Type of render_metrics' output: the classic text format, which every
# Prometheus version scrapes (every name here is a legacy-valid one, so it is exact).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
PREFIX = "lego_"
ACTOR_STATES = ("idle", "busy", "drained", "stopping")
TRANSFER_PATHS = (("local", "local_bytes"), ("cuda_ipc", "ipc_bytes"), ("shm", "shm_bytes"), ("frames", "frames_bytes"))


def render_metrics(stats: p.Stats) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    return generate_latest(registry)


class StatsCollector:
    """A prometheus_client collector over one snapshot."""

    def __init__(self, stats: p.Stats):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        yield from model_metrics(self.stats)
        yield from workflow_metrics(self.stats)
        yield from actor_metrics(self.stats)
        yield from transfer_metrics(self.stats)
        yield from broker_metrics(self.stats)


def actor_state(actor: p.ActorStats) -> str:
    """idle | busy | drained (an operator's drain: no new work, kept alive) | stopping."""
    if actor.state == "draining":
        return "stopping" if actor.stopping else "drained"
    return actor.state


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=labels)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, labels=labels)


def _histograms(name: str, doc: str, labels: list[str], hists: list[p.Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(PREFIX + name, doc, labels=labels)
    for hist in hists:
        buckets, total = [], 0
        for bound, count in zip([*hist.bounds, float("inf")], hist.counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        family.add_metric([str(hist.labels.get(label, "")) for label in labels], buckets, hist.sum)
    return family


def model_metrics(stats: p.Stats) -> Iterator[Metric]:
    depth = _gauge("queue_depth", "Ready tasks waiting for an actor of the model.", ["model"])
    ready = _gauge("ready_device_seconds", "Profile device-seconds of the model's ready tasks (full-batch cost).",
                   ["model"])
    pending = _gauge("pending_device_seconds", "Profile device-seconds of every unfinished task of live requests "
                     "on the model.", ["model"])
    rate = _gauge("model_arrival_rate", "Requests per second that need the model (exponentially weighted).", ["model"])
    done = _counter("tasks_done", "Tasks the model's actors completed.", ["model"])
    bounds = _gauge("replica_bound", "Replica bounds an operator set for the scheduler.", ["model", "bound"])
    for m in stats.models:
        depth.add_metric([m.model], m.queue_depth)
        ready.add_metric([m.model], m.ready_s)
        pending.add_metric([m.model], m.pending_s)
        rate.add_metric([m.model], m.arrival_rate)
        done.add_metric([m.model], m.tasks_done)
    for model, bound in sorted(stats.replica_bounds.items()):
        for which in ("min", "max"):
            if bound.get(which) is not None:
                bounds.add_metric([model, which], bound[which])
    yield from (depth, ready, pending, rate, done, bounds)
    yield _histograms("task_latency_seconds", "Dispatch-to-done time of a task, by model and mode (the task's kind: "
                      "encode, denoise, denoise_branch, control, decode, pipeline).", ["model", "mode"], stats.task_latency)


def workflow_metrics(stats: p.Stats) -> Iterator[Metric]:
    labels = ["workflow"]
    submitted = _counter("requests_submitted", "Requests accepted.", labels)
    completed = _counter("requests_completed", "Requests that returned a result.", labels)
    attained = _counter("slo_attained", "Requests completed within their SLO (or with none known).", labels)
    missed = _counter("slo_missed", "Accepted requests that missed their SLO: completed late, or failed.", labels)
    rejected = _counter("requests_rejected_by_admission", "Requests admission control refused (slo_unattainable).",
                        labels)
    paused = _gauge("workflow_paused", "1 while an operator has paused the workflow's admission.", labels)
    slo = _gauge("workflow_slo_seconds", "The SLO of a request with default parameters (0: none known).", labels)
    for w in stats.workflows:
        submitted.add_metric([w.workflow], w.submitted)
        completed.add_metric([w.workflow], w.completed)
        attained.add_metric([w.workflow], w.slo_met)
        missed.add_metric([w.workflow], w.completed - w.slo_met + w.failed)
        rejected.add_metric([w.workflow], w.rejected)
        paused.add_metric([w.workflow], 1 if w.paused else 0)
        slo.add_metric([w.workflow], w.slo_s)
    yield from (submitted, completed, attained, missed, rejected, paused, slo)
    yield _histograms("request_latency_seconds", "Submit-to-result time of a completed request, by workflow.",
                      labels, stats.request_latency)
    for name, doc, counts in (("rejections", "Requests refused at submission, by reason.", stats.rejections),
                              ("failures", "Accepted requests that did not complete, by reason.", stats.failures)):
        family = _counter(name, doc, ["reason"])
        for reason, count in sorted(counts.items()):
            family.add_metric([reason], count)
        yield family


def actor_metrics(stats: p.Stats) -> Iterator[Metric]:
    counts: dict[tuple[str, str], int] = {}
    for actor in stats.actors:  # every state of a model present, zeros included: series never vanish
        for state in ACTOR_STATES:
            counts.setdefault((actor.model, state), 0)
        counts[actor.model, actor_state(actor)] += 1
    actors = _gauge("actors", "Actors by model and state (drained: by an operator, kept alive).", ["model", "state"])
    for (model, state), n in sorted(counts.items()):
        actors.add_metric([model, state], n)
    yield actors
    total = _gauge("device_memory_bytes", "Memory of each device a node agent reports.", ["host", "device"])
    free = _gauge("device_free_bytes", "Free memory of each device a node agent reports.", ["host", "device"])
    for agent in stats.agents:
        for device in agent.devices:
            total.add_metric([agent.host, device.device], device.memory_bytes)
            free.add_metric([agent.host, device.device], device.free_bytes)
    yield from (total, free)


def transfer_metrics(stats: p.Stats) -> Iterator[Metric]:
    t = stats.transfers or p.TransferTotals()
    moved = _counter("transfer_bytes", "Bytes of task inputs by the path they took: local (held by the actor "
                     "that ran the task), cuda_ipc, shm (same host), frames (over the holder's data socket).", ["path"])
    for path, attr in TRANSFER_PATHS:
        moved.add_metric([path], getattr(t, attr))
    fallbacks = _counter("transfer_fallbacks", "Transfers whose first path failed and went another way.", ["path"])
    fallbacks.add_metric(["cuda_ipc"], t.ipc_fallbacks)
    fallbacks.add_metric(["shm"], t.shm_fallbacks)
    fetches = _counter("fetches", "Inputs actors fetched from a peer.", [])
    fetches.add_metric([], t.fetches)
    yield from (moved, fallbacks, fetches)


def broker_metrics(stats: p.Stats) -> Iterator[Metric]:
    in_flight = _gauge("requests_in_flight", "Requests the broker holds now.", [])
    in_flight.add_metric([], stats.counters.get("requests_in_flight", 0))
    events = _counter("broker_events", "The broker's event counters (requests_submitted, tasks_requeued, "
                      "actors_lost, ...).", ["event"])
    for name, value in sorted(stats.counters.items()):
        if name != "requests_in_flight":
            events.add_metric([name], value)
    yield from (in_flight, events)
    if stats.loop_lag is not None:
        yield _histograms("broker_loop_lag_seconds", "How late the broker loop's timer fired: time messages kept "
                          "the loop busy past it.", [], [stats.loop_lag])
