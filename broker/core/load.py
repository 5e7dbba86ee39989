"""Load accounting in the broker: what live requests cost, how fast they arrive, SLOs.

Pure state with no IO, owned by `broker.core.machine`. Costs come from the profile cost model
(`broker.costs.model`, times `cost_scale`, which matches an emulated cluster's
`time_scale`); workflows whose models have no profile get no cost, no derived SLO
and no admission check. The one running total kept incrementally is the queued work
per model that admission reads on every arrival (device-seconds, full-batch costs: a
lower bound); everything else is summed when a snapshot is taken. An accepted
request's plans are priced once (`price`); a shape's solo latency is read from the
cost model's memo, the one cache of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from broker import protocol as p
from broker.catalog import Catalog, NodePlan, WorkflowSpec
from broker.costs.model import CostModel

RATE_WINDOW_S = 5.0  # arrival rates and per-request work are averaged over about this long
SERVICE_WEIGHT = 0.1  # weight of the newest task in the per-model service time average
ERROR_WEIGHT = 0.1  # weight of the newest completed request in the admission error average
EDGE_SHARE = 0.5  # a prediction this close to its SLO (or closer) teaches lookahead's margin
MARGIN_DEVIATIONS = 2.0  # lookahead's margin: mean + this x mean deviation of its misses


@dataclass
class Rate:
    """Events per second, exponentially weighted over RATE_WINDOW_S."""

    value: float = 0.0
    at: float = 0.0

    def add(self, now: float) -> None:
        self.value = self.read(now) + 1.0 / RATE_WINDOW_S
        self.at = now

    def read(self, now: float) -> float:
        return self.value * math.exp(-max(0.0, now - self.at) / RATE_WINDOW_S)


def teaches_margin(predicted_s: float, slo_s: float | None) -> bool:
    """Whether a request admitted with this prediction teaches lookahead's margin when it
    ends: one predicted near its SLO (`EDGE_SHARE` of it or more, or with no SLO known)."""
    return slo_s is None or predicted_s >= EDGE_SHARE * slo_s


class LoadTracker:
    def __init__(self, catalog: Catalog, cost_scale: float = 1.0):
        self.catalog = catalog
        self.costs = CostModel(catalog)
        self.cost_scale = cost_scale
        self.queued_by_model: dict[str, float] = {}  # full-batch device-seconds of every unfinished node
        self.rates: dict[str, Rate] = {}  # workflow -> arrivals
        self.model_work: dict[str, float] = {}  # model -> device-seconds per request (averaged)
        self.service_s: dict[str, float] = {}
        self.workflow_stats: dict[str, p.WorkflowStats] = {}
        self._batch_cache: dict[tuple, int | None] = {}
        # workflow -> (mean, mean absolute deviation) of latency / lookahead prediction
        # over its recent requests: what the profiles do not see (the runtime's hops,
        # fetches and Python, devices shared by actors, batching that pays less than
        # modelled), added back at admission.
        self.admission_error: dict[str, tuple[float, float]] = {}
        self.edge_admitted_at: dict[str, float] = {}  # workflow -> its last admission that will teach the margin

    # ---------------------------------------------------------------- per request

    def solo_s(self, workflow: WorkflowSpec, params: dict) -> float | None:
        """Latency alone on an idle cluster as a monolith runs it: one answer per shape,
        memoised by the cost model (the one cache of it)."""
        solo = self.costs.solo_s(workflow, params)
        return None if solo is None else solo * self.cost_scale

    @staticmethod
    def slo_s(workflow: WorkflowSpec, solo_s: float | None, multiple: float) -> float | None:
        """The workflow's own SLO, else `multiple` x its solo latency (None: unknown)."""
        if workflow.slo_s > 0:
            return workflow.slo_s
        return None if solo_s is None else multiple * solo_s

    def stats(self, workflow: str) -> p.WorkflowStats:
        stats = self.workflow_stats.get(workflow)
        if stats is None:
            stats = self.workflow_stats[workflow] = p.WorkflowStats(workflow)
        return stats

    def price(self, plans: list[NodePlan], workflow: WorkflowSpec) -> tuple[list[tuple[float, float]], dict | None]:
        """An accepted request's plans priced once: each node's (alone, full-batch) seconds
        scaled, and its device-seconds per model for `accepted` (None: a model has no profile)."""
        costs, by_model = self.costs.node_costs(plans)
        scale = self.cost_scale
        nodes = [(alone * scale, full * scale) for alone, full in costs]
        return nodes, by_model if self.costs.knows(workflow) else None

    def accepted(self, workflow: WorkflowSpec, by_model: dict[str, float] | None, now: float) -> None:
        self.rates.setdefault(workflow.name, Rate()).add(now)
        if by_model is None:
            return
        for model, seconds in by_model.items():
            old = self.model_work.get(model)
            seconds *= self.cost_scale
            self.model_work[model] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def batch_rows(self, model: str, kind: str, shape: tuple[int, int]) -> int | None:
        """Rows worth batching for one model call (cached; None: no profile)."""
        key = (model, kind, shape)
        if key not in self._batch_cache:
            self._batch_cache[key] = self.costs.batch_rows(model, kind, shape)
        return self._batch_cache[key]

    def actor_share_s(self, model: str, kind: str, shape: tuple[int, int], rows: int, alone_s: float,
                      full_s: float) -> float:
        """Seconds of its actor's time one node takes when it waits for the actor (lookahead
        admission): its share of a full batch where the profile says batching pays beyond
        its own rows (the dispatcher then batches it with others), else its time alone."""
        worth = self.batch_rows(model, kind, shape)
        return full_s if worth is None or worth > rows else alone_s

    @property
    def queued_min_s(self) -> float:
        """Unfinished work of every model (what the paper's admission bound reads)."""
        return sum(self.queued_by_model.values())

    def queue(self, model: str, seconds: float) -> None:
        """Unfinished work changed by `seconds` (negative: done or dropped)."""
        self.queued_by_model[model] = self.queued_by_model.get(model, 0.0) + seconds

    def admission_margin_s(self, workflow: str, predicted_s: float) -> float:
        """Seconds lookahead admission adds to a prediction of `predicted_s`: how much
        longer than predicted this workflow's recent requests ran, as a ratio (the
        misses grow with the work ahead: a GPU time-sliced by co-located actors runs all
        of it slower), its mean plus two mean deviations (a request that just fits on
        average misses half the time); never negative (an early finish earns no credit)."""
        mean, spread = self.admission_error.get(workflow, (1.0, 0.0))
        return max(0.0, (mean + MARGIN_DEVIATIONS * spread - 1.0) * predicted_s)

    def probe_due(self, workflow: str, now: float, every_s: float) -> bool:
        """Whether to admit a request that the learned margin alone refuses: none of this
        workflow's requests has been admitted near its SLO (where a finish teaches the
        margin) for `every_s` seconds, since the last such admission or the first look
        (0: never). Without it a margin grown under a burst would never shrink again."""
        since = self.edge_admitted_at.setdefault(workflow, now)
        return every_s > 0 and now - since >= every_s

    def admission_decided(self, workflow: str, admitted: bool, predicted_s: float, slo_s: float, now: float) -> None:
        """An admission that will teach the margin (`request_done`'s rule) resets `probe_due`'s clock."""
        if admitted and teaches_margin(predicted_s, slo_s):
            self.edge_admitted_at[workflow] = now

    def admission_factor(self, workflow: str) -> float:
        """What the margin stretches a prediction by (for telemetry: 1 + margin / prediction)."""
        return 1.0 + self.admission_margin_s(workflow, 1.0)

    def request_done(self, workflow: str, latency_s: float, predicted_s: float | None,
                     slo_s: float | None = None) -> None:
        """A request admitted with `predicted_s` took `latency_s` (a dropped one: at least
        that). Only a prediction near its SLO (`EDGE_SHARE` of it or more) teaches the
        margin: that is where a miss means a wrong admission. One with slack to spare
        says little (the first requests of a burst, predicted on an idle cluster, share
        the GPUs with the ones after them and all end together)."""
        if predicted_s is None or predicted_s <= 0 or not teaches_margin(predicted_s, slo_s):
            return
        ratio = latency_s / predicted_s
        old = self.admission_error.get(workflow)
        if old is None:
            self.admission_error[workflow] = (ratio, 0.0)
            return
        mean, spread = old
        mean += ERROR_WEIGHT * (ratio - mean)
        spread += ERROR_WEIGHT * (abs(ratio - mean) - spread)
        self.admission_error[workflow] = (mean, spread)

    def task_served(self, model: str, seconds: float) -> None:
        old = self.service_s.get(model)
        self.service_s[model] = seconds if old is None else (1 - SERVICE_WEIGHT) * old + SERVICE_WEIGHT * seconds

    # ---------------------------------------------------------------- per model

    def arrival_rate(self, model: str, now: float) -> float:
        return sum(rate.read(now) for name, rate in self.rates.items()
                   if name in self.catalog.workflows and model in self.catalog.workflows[name].models)

    def default_slo(self, workflow: WorkflowSpec, multiple: float) -> tuple[float, float]:
        """(slo_s, solo_s) of a request with default parameters, 0 where unknown."""
        params = {name: spec.default for name, spec in workflow.inputs.items()}
        solo = self.solo_s(workflow, params)
        slo = self.slo_s(workflow, solo, multiple)
        return slo or 0.0, solo or 0.0
