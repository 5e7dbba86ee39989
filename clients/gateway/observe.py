"""The gateway's own metrics (a registry of its own, not prometheus_client's global one)
and the short history of cluster figures the admin console draws."""

from __future__ import annotations

import collections

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("lego_gateway_http_requests", "HTTP requests answered, by route, method and status",
                                     ["route", "method", "status"], registry=r)
        self.http_seconds = Histogram("lego_gateway_http_request_seconds",
                                      "Time from a request's arrival to the end of its answer, by route",
                                      ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.runs = Counter("lego_gateway_runs", "Runs that ended, by workflow and final state",
                            ["workflow", "state"], registry=r)
        self.run_seconds = Histogram("lego_gateway_run_seconds",
                                     "Submit to result of succeeded runs, as the gateway saw it, by workflow",
                                     ["workflow"], buckets=LATENCY_BUCKETS, registry=r)
        self.runs_in_flight = Gauge("lego_gateway_runs_in_flight", "Runs submitted and not ended", registry=r)
        self.broker_up = Gauge("lego_gateway_broker_up", "1 when the broker answered the gateway's last stats call",
                               registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class History:
    """Samples of per-model queues and per-workflow counters over a sliding window.

    Compact on purpose (the console fetches all of it every refresh): per model
    [queue_depth, pending_s, actors], per workflow [completed, slo_met, rejected, failed].
    """

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.samples: collections.deque[dict] = collections.deque()

    def add(self, stats, now: float) -> None:
        self.samples.append({
            "t": round(now, 3),
            "models": {m.model: [m.queue_depth, round(m.pending_s, 3), m.actors] for m in stats.models},
            "workflows": {w.workflow: [w.completed, w.slo_met, w.rejected, w.failed] for w in stats.workflows},
        })
        while self.samples and now - self.samples[0]["t"] > self.window_s:
            self.samples.popleft()

    def to_json(self) -> list[dict]:
        return list(self.samples)
