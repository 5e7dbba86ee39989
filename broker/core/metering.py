"""What the broker counts for operators and metrics: part of its sans-IO core's state.

Plain data with no IO, in the broker process: the core's parts feed it events and
`broker.core.telemetry` puts it in the Stats snapshot. Everything here is cumulative
since the broker started (counters, per-model batching, fixed-bucket histograms), so
that a scraper sees counters that only grow, except `recent` (a bounded ring of the
latest refusals and failures with their reasons, for people) and `hop_latency` (the
latest task latencies, for p50/p99).
"""

from __future__ import annotations

import bisect
from collections import deque

from broker import protocol as p
from broker.core.state import LatencyWindow

RECENT_OUTCOMES = 200
COUNTERS = ("requests_submitted", "requests_completed", "requests_failed", "requests_rejected", "requests_cancelled",
            "requests_restarted", "tasks_dispatched", "tasks_done", "tasks_requeued", "stale_results", "actors_lost",
            "protocol_errors", "adapter_switches", "peers_cut_off", "sends_dropped", "encode_errors", "commands_refused",
            "requests_resumed", "submits_repeated", "requests_expired", "requests_orphaned", "agents_lost",
            "hellos_refused", "tasks_quarantined", "admissions_approximated", "admission_probes")
# Upper bounds in seconds. Task times run from a CLIP call (ms) to a full-size base
# model step (s); requests from a tiny emulated image to a minute-long one.
TASK_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BOUNDS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
LOOP_LAG_BOUNDS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def new_histogram(bounds: tuple[float, ...], **labels: str) -> p.Histogram:
    return p.Histogram(labels, list(bounds), [0] * (len(bounds) + 1))


def observe(hist: p.Histogram, value: float) -> None:
    """Count `value` in the first bucket whose bound is >= it (Prometheus' `le`)."""
    hist.counts[bisect.bisect_left(hist.bounds, value)] += 1
    hist.sum += value
    hist.count += 1


def copy_histogram(hist: p.Histogram) -> p.Histogram:
    return p.Histogram(dict(hist.labels), list(hist.bounds), list(hist.counts), round(hist.sum, 6), hist.count)


# Text a peer chose (a request id, a workflow name, an error message that repeats them)
# is clipped to this before it is kept in `recent`: every STATS answer carries those
# records, and one SUBMIT naming a megabyte-long workflow must not make every later
# answer too large for the clients and the scheduler to read.
RECORD_TEXT_CHARS = 256


def clip(text: str | None, limit: int = RECORD_TEXT_CHARS) -> str | None:
    """`text` cut to `limit` characters (an ellipsis marks the cut); None stays None."""
    return text if text is None or len(text) <= limit else text[:limit - 1] + "\u2026"


class Meters:
    def __init__(self, latency_window: int = 20_000, recent: int = RECENT_OUTCOMES):
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.hop_latency = LatencyWindow(latency_window)  # dispatch-to-done of recent tasks
        self.model_batches: dict[str, list[int]] = {}  # model -> [tasks, batches, mixed-workflow batches]
        self.model_workflows: dict[str, set[str]] = {}  # model -> workflows whose requests used it
        self.recent: deque[p.OutcomeRecord] = deque(maxlen=recent)
        self.rejections: dict[str, int] = {}  # reason (ErrorCode value) -> requests
        self.failures: dict[str, int] = {}
        # (model, task kind: the mode of the call, e.g. denoise or denoise_branch) -> dispatch-to-done
        self.task_latency: dict[tuple[str, str], p.Histogram] = {}
        self.request_latency: dict[str, p.Histogram] = {}  # workflow -> submit-to-result
        self.transfers = p.TransferTotals()
        self.loop_lag = new_histogram(LOOP_LAG_BOUNDS_S)

    # ---------------------------------------------------------------- requests

    def rejected(self, now: float, request_id: str, workflow: str, code: str, message: str,
                 field: str | None = None) -> None:
        self.rejections[code] = self.rejections.get(code, 0) + 1
        self.recent.append(p.OutcomeRecord(now, "rejected", clip(request_id), clip(workflow), code, clip(message),
                                           clip(field)))

    def failed(self, now: float, request_id: str, workflow: str, code: str, message: str) -> None:
        self.failures[code] = self.failures.get(code, 0) + 1
        if code != p.ErrorCode.CANCELLED.value:  # a client's own cancel is no failure to look into
            self.recent.append(p.OutcomeRecord(now, "failed", clip(request_id), clip(workflow), code, clip(message)))

    def request_done(self, workflow: str, latency_s: float) -> None:
        hist = self.request_latency.get(workflow)
        if hist is None:
            hist = self.request_latency[workflow] = new_histogram(REQUEST_BOUNDS_S, workflow=workflow)
        observe(hist, latency_s)

    # ---------------------------------------------------------------- tasks and data

    def task_done(self, model: str, kind: str, seconds: float) -> None:
        hist = self.task_latency.get((model, kind))
        if hist is None:
            hist = self.task_latency[model, kind] = new_histogram(TASK_BOUNDS_S, model=model, mode=kind)
        observe(hist, seconds)

    def batch_sent(self, actor_id: str, batch) -> None:
        """Inputs the actor already holds are used in place: count their bytes as local."""
        local = sum(producer.nbytes for node in batch for producer in node.inputs if producer.actor_id == actor_id)
        self.transfers.local_bytes += local

    def actor_telemetry(self, before: p.ActorTelemetry | None, now: p.ActorTelemetry) -> None:
        """Fold what an actor moved since its previous heartbeat into the totals.

        Actors count from their start; a new session starts from no telemetry, so an
        actor that restarts or reconnects never makes a total go down."""
        def grew(name: str) -> int:
            new, old = getattr(now, name), getattr(before, name) if before is not None else 0
            return new - old if new >= old else new

        t = self.transfers
        fetched, shm, ipc = grew("fetched_bytes"), grew("shm_bytes"), grew("ipc_bytes")
        t.shm_bytes += shm
        t.ipc_bytes += ipc
        t.frames_bytes += max(0, fetched - shm - ipc)
        t.reused_bytes += grew("reused_bytes")
        t.fetches += grew("fetches")
        t.shm_fallbacks += grew("fetch_fallbacks")
        t.ipc_fallbacks += grew("ipc_fallbacks")

    # ---------------------------------------------------------------- the broker itself

    def loop_lagged(self, seconds: float) -> None:
        observe(self.loop_lag, max(0.0, seconds))

    def fill(self, stats: p.Stats) -> p.Stats:
        """Copies into a snapshot (the core goes on counting while it is sent or read)."""
        stats.recent_outcomes = list(self.recent)
        stats.rejections = dict(self.rejections)
        stats.failures = dict(self.failures)
        stats.task_latency = [copy_histogram(h) for h in self.task_latency.values()]
        stats.request_latency = [copy_histogram(h) for h in self.request_latency.values()]
        stats.transfers = p.TransferTotals(**self.transfers.to_wire())
        stats.loop_lag = copy_histogram(self.loop_lag)
        return stats
