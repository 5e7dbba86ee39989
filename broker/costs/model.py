"""What work costs, in device-seconds, from the measured profiles: a pure cost model.

Imported by the broker (per-node costs for pending-work telemetry and admission) and
by the scheduler (replica targets, placement). A model's cost comes from the profile
its catalog entry names (`broker/costs/h800/*.json`, measured on H800s); models without
a profile (real diffusers models built locally) have no known cost, and everything
derived from them says so with `None` rather than guessing.

Two costs per node: `latency_s`, the node run alone (batch of its own rows), and
`throughput_s`, its share of a full batch (per-row time at the model's largest
profiled batch, times its rows): the cheapest the node can ever be, which is what a
lower bound needs.

Costs are pure functions of their arguments, so node and request costs are memoised:
the broker prices every node of every request at arrival, the same few shapes over and
over (and the simulator does so millions of times).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from broker.catalog import Catalog, NodePlan, WorkflowSpec, unroll
from broker.costs.profiles import PROFILE_MODE, Profile, ProfileError, load_profile
from broker.protocol.tasks import TaskKind

THROUGHPUT_BATCH = 8  # the largest batch every profile measures
BATCH_MIN_GAIN = 0.1  # doubling a batch must save this share of the time per row
MAX_BATCH_ROWS = 64
# What a request's cost depends on besides its workflow (unroll: steps, shape, img2img
# strength, whether it decodes); prompts, seeds and guidance change no cost.
REQUEST_COST_PARAMS = ("steps", "height", "width", "strength", "output")
MEMO_ENTRIES = 4096  # per memo; beyond it starts afresh (clients may vary params without end)


@dataclass(frozen=True)
class RequestCost:
    work_s: float  # device-seconds of all its nodes, each run alone
    min_work_s: float  # device-seconds if every node ran in a full batch
    solo_s: float  # critical path on an idle cluster (CFG branches in parallel if split)
    by_model: dict[str, float]  # model -> device-seconds (alone)


@dataclass(frozen=True)
class PricedPlans:
    nodes: list[tuple[float, float]]  # per plan, in order: (alone, in a full batch) seconds
    request: RequestCost


class CostModel:
    def __init__(self, catalog: Catalog, profiles: dict[str, Profile] | None = None):
        self.catalog = catalog
        self.profiles = profiles if profiles is not None else _load_profiles(catalog)
        self._nodes: dict[tuple, float] = {}
        self._requests: dict[tuple, RequestCost | None] = {}

    def profile(self, model: str) -> Profile | None:
        return self.profiles.get(model)

    def knows(self, workflow: WorkflowSpec) -> bool:
        return all(m in self.profiles for m in workflow.models)

    def node_s(self, model: str, kind: str, rows: int, shape: tuple[int, int], batch_rows: int = 0) -> float:
        """Seconds of one node of `rows` rows; in a batch of `batch_rows` rows, its share."""
        key = (model, kind, rows, tuple(shape), batch_rows)
        seconds = self._nodes.get(key)
        if seconds is None:
            seconds = _remember(self._nodes, key, self._node_s(model, kind, rows, shape, batch_rows))
        return seconds

    def _node_s(self, model: str, kind: str, rows: int, shape: tuple[int, int], batch_rows: int) -> float:
        profile = self.profiles.get(model)
        if profile is None or rows <= 0:
            return 0.0
        mode = PROFILE_MODE[kind]
        batch = max(batch_rows, rows)
        return profile.exec_time(mode, batch, *shape) * rows / batch

    def plan_costs(self, plan: NodePlan) -> tuple[float, float]:
        """(alone, in a full batch) seconds of one node; a split step's combine is free;
        a monolith's one node is its whole workflow, run in order (no batching)."""
        if not plan.params.calls_model:
            return 0.0, 0.0
        if plan.kind == TaskKind.PIPELINE:
            workflow = self.catalog.workflows[plan.params.workflow]
            cost = self.request(workflow, plan.params.request)
            return (cost.work_s, cost.work_s) if cost else (0.0, 0.0)
        alone = self.node_s(plan.model, plan.kind, plan.rows, plan.shape)
        full = self.node_s(plan.model, plan.kind, plan.rows, plan.shape, THROUGHPUT_BATCH)
        return alone, min(alone, full)

    def request(self, workflow: WorkflowSpec, params: dict, cfg_split: bool = False) -> RequestCost | None:
        """The request's costs (None: a model without a profile). Memoised for this
        catalog's own workflows; the result is shared: read it, never change it."""
        if self.catalog.workflows.get(workflow.name) is not workflow:  # a spec from elsewhere: no key covers it
            return self._request(workflow, params, cfg_split)
        key = (workflow.name, cfg_split, *(params.get(k) for k in REQUEST_COST_PARAMS))
        if key in self._requests:
            return self._requests[key]
        return _remember(self._requests, key, self._request(workflow, params, cfg_split))

    def _request(self, workflow: WorkflowSpec, params: dict, cfg_split: bool) -> RequestCost | None:
        if not self.knows(workflow):
            return None
        plans = unroll(workflow, params, cfg_split=cfg_split)
        return self.plans(plans)

    def plans(self, plans: list[NodePlan]) -> RequestCost:
        return self.price(plans).request

    def node_costs(self, plans: list[NodePlan]) -> tuple[list[tuple[float, float]], dict[str, float]]:
        """Each node's (alone, in a full batch) seconds and the device-seconds per model:
        what an accepted request's load needs, in one pass (no critical path: the
        request's solo latency comes from `request`, memoised per shape)."""
        nodes = []
        by_model: dict[str, float] = {}
        plan_costs = self.plan_costs
        for plan in plans:
            alone, full = plan_costs(plan)
            nodes.append((alone, full))
            by_model[plan.model] = by_model.get(plan.model, 0.0) + alone
        return nodes, by_model

    def price(self, plans: list[NodePlan]) -> PricedPlans:
        """Every node's costs and the request's, in one pass over its unrolled plans."""
        nodes = []
        finish: dict[str, float] = {}
        work = min_work = 0.0
        by_model: dict[str, float] = {}
        for plan in plans:  # producers come first
            alone, full = self.plan_costs(plan)
            nodes.append((alone, full))
            work += alone
            min_work += full
            by_model[plan.model] = by_model.get(plan.model, 0.0) + alone
            finish[plan.key] = max((finish[i] for i in plan.inputs), default=0.0) + alone
        return PricedPlans(nodes, RequestCost(work, min_work, max(finish.values(), default=0.0), by_model))

    def solo_s(self, workflow: WorkflowSpec, params: dict) -> float | None:
        """Latency alone on an idle cluster, as a monolith runs it (CFG as one batch-2 call):
        the baseline an SLO multiple is taken of."""
        cost = self.request(workflow, params, cfg_split=False)
        return None if cost is None else cost.solo_s

    def batch_rows(self, model: str, kind: str, shape: tuple[int, int], min_gain: float = BATCH_MIN_GAIN) -> int | None:
        """The most rows worth batching for this model, kind and shape: doubling a batch
        must cut the time per row by at least `min_gain`, or it only makes every task in
        it wait for the others (FLUX at 1024 px costs the same per row at any batch, so
        it batches nothing beyond one task; CLIP is nearly free per row up to 32).
        None: no profile, no limit known."""
        profile = self.profiles.get(model)
        if profile is None:
            return None
        mode, rows = PROFILE_MODE[kind], 1
        while rows < MAX_BATCH_ROWS:
            now, doubled = profile.exec_time(mode, rows, *shape) / rows, profile.exec_time(mode, 2 * rows, *shape) / (2 * rows)
            if doubled > now * (1 - min_gain):
                break
            rows *= 2
        return rows

    def load_s(self, model: str) -> float:
        profile = self.profiles.get(model)
        return profile.load_s if profile else 0.0

    def resident_bytes(self, model: str) -> int:
        profile = self.profiles.get(model)
        return profile.resident_bytes if profile else 0


def _remember(memo: dict, key: tuple, value):
    if len(memo) >= MEMO_ENTRIES:
        memo.clear()
    memo[key] = value
    return value


def _load_profiles(catalog: Catalog) -> dict[str, Profile]:
    profiles = {}
    for name, spec in catalog.models.items():
        if not spec.profile:
            continue
        try:
            profiles[name] = _cached_profile(spec.profile)
        except ProfileError:
            continue  # a catalog may name a profile this install lacks: cost unknown
    return profiles


@cache
def _cached_profile(name: str) -> Profile:
    return load_profile(name)
