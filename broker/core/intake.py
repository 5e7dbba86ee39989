"""Request intake: a SUBMIT checked, admitted or refused, unrolled into its DAG and started.

Part of the broker's sans-IO core, in the broker process. The checks run cheapest
first (id, workflow, pause, capacity, parameters, payload); admission
(`broker.core.rules.admission`) compares the request's SLO with the queued work
and its own solo latency; in monolith serving the request becomes one task for the
least loaded `pipeline/...` model hosting its workflow, otherwise a DAG whose CFG
branches may form a parallel group (`broker.core.rules.parallel_mode`). `Intake` owns
the parameter generator (seeds); the request enters the directory it is given.
A client's SUBMIT that repeats one of its requests in flight is that request again
(ACCEPTED once more), and `resume` re-admits a request a previous broker journaled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import structlog

from broker import protocol as p
from broker.catalog import (
    PIPELINE_PREFIX,
    Catalog,
    ParamError,
    WorkflowSpec,
    check_image,
    unroll,
    unroll_monolith,
    validate_params,
)
from broker.core import rules
from broker.core.actors import ActorTable
from broker.core.admin import Operator
from broker.core.directory import RequestDirectory
from broker.core.dispatch import Dispatcher
from broker.core.load import LoadTracker
from broker.core.metering import Meters, clip
from broker.core.outbox import FAILED, Outbox
from broker.core.settings import BrokerSettings
from broker.core.state import FRONTEND, Request
from broker.protocol.errors import ErrorCode
from broker.protocol.tensors import check_payload

log = structlog.get_logger(__name__)

MAX_LOOKAHEAD_OPS = 10_000  # live nodes above which lookahead admission falls back to `sum` (~30 ms)


@dataclass(frozen=True)
class Plan:
    """A request's DAG, priced once: its node plans, each node's (alone, full-batch)
    seconds, its device-seconds per model (None: a model has no profile), and whether
    its CFG branches run as a parallel group."""

    plans: list
    node_costs: list[tuple[float, float]]
    by_model: dict | None
    latency_mode: bool



class Intake:
    def __init__(self, settings: BrokerSettings, catalog: Catalog, rng: random.Random, actors: ActorTable,
                 directory: RequestDirectory, dispatcher: Dispatcher, load: LoadTracker, meters: Meters,
                 operator: Operator, out: Outbox):
        self.settings = settings  # replaced by the core when an operator changes a live setting
        self.catalog, self.rng = catalog, rng
        self.actors, self.directory, self.dispatcher, self.load = actors, directory, dispatcher, load
        self.meters, self.operator, self.out = meters, operator, out
        # Monolith serving after a restart: journaled requests waiting for a pipeline actor
        # to come back, as (parked at, resume's arguments); see retry_parked.
        self.parked: list[tuple[float, tuple]] = []

    def submit(self, identity: bytes, msg: p.Submit, payload, now: float) -> None:
        def reject(code: ErrorCode, message: str, field_name: str | None = None, retry_after_s: float = 0.0):
            self.meters.counters["requests_rejected"] += 1
            self.meters.rejected(now, msg.request_id, msg.workflow, code.value, message, field_name)
            log.info("request_rejected", request_id=msg.request_id, workflow=msg.workflow, code=code.value,
                     field=field_name, reason=message)
            self.out.send(FRONTEND, identity, p.Rejected(msg.request_id, code.value, message, field_name, retry_after_s))

        if not msg.request_id or len(msg.request_id) > 128 or "/" in msg.request_id:
            return reject(ErrorCode.INVALID_PARAM, "request_id must be 1-128 characters without '/'", "request_id")
        existing = self.directory.requests.get(msg.request_id)
        if existing is not None:
            if self._same_submission(existing, identity, msg):
                # The same client sending the same request again (a retry after a lost
                # answer or a broker restart): the job it has, not a second one.
                self.meters.counters["submits_repeated"] += 1
                self.out.send(FRONTEND, identity, p.Accepted(existing.request_id, len(existing.nodes),
                                                             existing.total_steps, existing.params))
                return None
            return reject(ErrorCode.DUPLICATE_REQUEST, "a request with this id is in flight", "request_id")
        workflow = self.catalog.workflows.get(msg.workflow)
        if workflow is None:
            return reject(ErrorCode.UNKNOWN_WORKFLOW, f"unknown workflow {clip(msg.workflow, 128)!r} (known: {sorted(self.catalog.workflows)})", "workflow")
        if workflow.name in self.operator.paused:
            return reject(ErrorCode.PAUSED, f"workflow {workflow.name!r} is paused by an operator", "workflow")
        if len(self.directory.requests) >= self.settings.max_requests_in_flight:
            return reject(ErrorCode.OVERLOADED, f"{len(self.directory.requests)} requests in flight")
        try:
            params = validate_params(workflow, msg.params, self.rng, self.catalog.adapters)
            check_image(workflow, params, msg.tensors)
        except ParamError as exc:
            return reject(ErrorCode.INVALID_PARAM, str(exc), f"params.{exc.field}")
        try:
            check_payload(msg.tensors, payload)
        except p.ProtocolError as err:
            return reject(ErrorCode.INVALID_PARAM, err.message, "params.image")
        # The shape's solo latency (memoised by the cost model: only a shape's first
        # request unrolls for it) gives the SLO and admission's own-latency bound.
        solo = self.load.solo_s(workflow, params)
        slo = self.load.slo_s(workflow, solo, self.settings.slo_multiple)
        if self.settings.serving == "monolith":
            pipeline = self._pipeline_for(workflow.name)
            if pipeline is None:
                return reject(ErrorCode.NO_CAPACITY, f"no monolith (pipeline/...) actor hosts {workflow.name!r}", "workflow")
        else:
            pipeline = None
        plan = decision = None
        if self.settings.admission and slo is not None:
            if self.settings.admission_bound == "lookahead":  # it needs the DAG; the others refuse before unrolling
                plan = self._plan(workflow, params, {t.name for t in msg.tensors}, pipeline)
            decision = self._admission(workflow, solo, slo, plan, now)
            if not decision.admit:
                self.load.stats(workflow.name).rejected += 1
                # When the queue sets the bound: once it has drained by that much, it fits.
                # (at least a millisecond: a refusal always says when to come back)
                retry = max(0.001, decision.bound_s - slo)
                return reject(ErrorCode.SLO_UNATTAINABLE, decision.reason, None, round(retry, 3))
        request = Request(msg.request_id, identity, workflow.name, params, self.directory.next_seq(), now, msg.progress)
        request.tensors, request.frames = list(msg.tensors), list(payload)
        request.predicted_s = decision.predicted_s if decision is not None else None
        if plan is None:
            plan = self._plan(workflow, params, {t.name for t in msg.tensors}, pipeline)
        self._admit(request, workflow, slo, plan, now)
        self.out.accepted(request)  # durable before the client hears ACCEPTED
        self.out.send(FRONTEND, identity, p.Accepted(request.request_id, len(request.nodes), request.total_steps, params))
        log.info("request_accepted", request_id=request.request_id, workflow=workflow.name, nodes=len(request.nodes))
        self.dispatcher.dispatch_all(self.directory.start(request, now), now)

    def resume(self, request_id: str, client: bytes, workflow_name: str, params: dict, tensors: list, frames: list,
               progress: bool, now: float) -> None:
        """Run again, from its start, a request a previous broker accepted and never ended
        (read back from its journal): same id, same client, the params it validated (its
        seed), so the answer is the one the first run would have given. No admission (it
        was admitted once) and no ACCEPTED (the client had it; a retried SUBMIT gets it
        again); a request this broker can no longer run fails typed."""
        def fail(code: ErrorCode, message: str):
            self._fail_journaled(request_id, client, workflow_name, code, message, now)

        workflow = self.catalog.workflows.get(workflow_name)
        if workflow is None:
            return fail(ErrorCode.UNKNOWN_WORKFLOW, f"workflow {workflow_name!r} is gone from the catalog after a broker restart")
        if request_id in self.directory.requests:
            return None  # journaled twice: the first one runs
        try:  # the seed is in `params`: validating again draws nothing, and checks them against today's catalog
            params = validate_params(workflow, params, self.rng, self.catalog.adapters)
            check_image(workflow, params, tensors)
            check_payload(tensors, frames)
        except (ParamError, p.ProtocolError) as exc:
            return fail(ErrorCode.INVALID_PARAM, f"journaled request no longer valid after a broker restart: {exc}")
        pipeline = None
        if self.settings.serving == "monolith":
            pipeline = self._pipeline_for(workflow.name)
            if pipeline is None:  # at a restart, before its actors are back: which pipeline runs it is theirs to say
                self.parked.append((now, (request_id, client, workflow_name, params, tensors, frames, progress)))
                return None
        solo = self.load.solo_s(workflow, params)
        request = Request(request_id, client, workflow.name, params, self.directory.next_seq(), now, progress)
        request.tensors, request.frames = list(tensors), list(frames)
        plan = self._plan(workflow, params, {t.name for t in tensors}, pipeline)
        self._admit(request, workflow, self.load.slo_s(workflow, solo, self.settings.slo_multiple), plan, now)
        self.meters.counters["requests_resumed"] += 1
        log.info("request_resumed", request_id=request_id, workflow=workflow.name, nodes=len(request.nodes))
        self.dispatcher.dispatch_all(self.directory.start(request, now), now)

    def retry_parked(self, now: float) -> None:
        """Resume the parked requests a monolith actor now serves; fail typed the ones none
        has served for orphan_timeout_s (as expiry.py does for queued work)."""
        if not self.parked:
            return
        parked, self.parked = self.parked, []
        grace = self.settings.orphan_timeout_s
        for parked_at, args in parked:
            request_id, client, workflow_name = args[:3]
            if self._pipeline_for(workflow_name) is not None:
                self.resume(*args, now)
            elif grace <= 0 or now - parked_at < grace:
                self.parked.append((parked_at, args))
            else:
                self._fail_journaled(request_id, client, workflow_name, ErrorCode.NO_CAPACITY,
                                     f"no monolith (pipeline/...) actor hosts {workflow_name!r} {now - parked_at:.0f} s "
                                     f"after a broker restart (orphan_timeout_s = {grace:g})", now)

    def _fail_journaled(self, request_id: str, client: bytes, workflow_name: str, code: ErrorCode, message: str,
                        now: float) -> None:
        """A journaled request this broker cannot run: its client hears a typed failure."""
        self.meters.counters["requests_failed"] += 1
        self.meters.failed(now, request_id, workflow_name, code.value, message)
        log.warning("request_failed", request_id=request_id, code=code.value, reason=message)
        self.out.send(FRONTEND, client, p.Failed(request_id, code.value, message))
        self.out.ended(request_id, FAILED)

    def _plan(self, workflow: WorkflowSpec, params: dict, tensor_names: set[str], pipeline: str | None) -> Plan:
        """A request's DAG (one task on `pipeline` in monolith serving), priced."""
        if pipeline is not None:
            latency_mode, plans = False, unroll_monolith(workflow, params, pipeline)
        else:
            latency_mode = self._split_cfg(workflow)
            plans = unroll(workflow, params, cfg_split=latency_mode, tensors=tensor_names)
        node_costs, by_model = self.load.price(plans, workflow)
        return Plan(plans, node_costs, by_model, latency_mode)

    def _admit(self, request: Request, workflow: WorkflowSpec, slo: float | None, plan: Plan, now: float) -> None:
        """Enter the request, with its priced DAG, in the directory."""
        request.deadline = None if slo is None else now + slo
        request.latency_mode = plan.latency_mode
        self.directory.add(request, workflow, plan.plans, plan.node_costs)
        self.load.accepted(workflow, plan.by_model, now)
        stats = self.load.stats(workflow.name)
        stats.submitted += 1
        stats.latency_mode += request.latency_mode

    def _same_submission(self, request: Request, identity: bytes, msg: p.Submit) -> bool:
        """A SUBMIT that repeats `request`: same client, workflow, tensors, and params that
        validate (with the seed it drew, unless the retry names one) to the ones it runs with."""
        if identity != request.client or msg.workflow != request.workflow:
            return False
        if [(t.name, t.dtype, list(t.shape)) for t in msg.tensors] != [(t.name, t.dtype, list(t.shape)) for t in request.tensors]:
            return False
        params = dict(msg.params) if isinstance(msg.params, dict) else {}
        if params.get("seed") is None:
            params["seed"] = request.params.get("seed")
        try:
            return validate_params(self.catalog.workflows[request.workflow], params, None, self.catalog.adapters) == request.params
        except (ParamError, KeyError):
            return False

    def _admission(self, workflow: WorkflowSpec, solo: float | None, slo: float, plan: Plan | None,
                   now: float) -> rules.Admission:
        bound = self.settings.admission_bound
        if bound == "lookahead" and self.directory.ops_live > MAX_LOOKAHEAD_OPS:
            # Its event simulation costs about 3 us per live node: past this many it would
            # hold the broker's loop for tens of ms per arrival. Queue, then solo instead.
            self.meters.counters["admissions_approximated"] += 1
            bound = "sum"
        if bound == "lookahead":
            ahead = (request.ops_left(now) for request in self.directory.requests.values())
            def share_s(node, alone: float, full: float) -> float:
                return self.load.actor_share_s(node.model, node.kind, node.shape, node.rows, alone, full)

            mine = rules.plan_ops(plan.plans, plan.node_costs, share_s)
            finish = rules.lookahead_finish(ahead, mine, self.actors.replicas())
            predicted = finish + self.settings.admission_overhead_s
            estimate = predicted + self.load.admission_margin_s(workflow.name, predicted)
            admit = estimate <= slo
            if not admit and predicted <= slo and self.load.probe_due(
                    workflow.name, now, self.settings.admission_probe_s * self.settings.cost_scale):
                admit = True  # refused by the learned margin alone, which nothing has taught for a while
                self.meters.counters["admission_probes"] += 1
            self.load.admission_decided(workflow.name, admit, predicted, slo, now)
            return rules.Admission(admit, estimate, slo, predicted)
        if bound == "sum":
            # its wait: the work queued on its workflow's models, over the devices they run on
            devices = {(a.host, a.device) for m in workflow.models for a in self.actors.of_model(m) if not a.draining}
            queued = sum(self.load.queued_by_model.get(m, 0.0) for m in workflow.models)
        else:
            queued, devices = self.load.queued_min_s, range(self.actors.device_count())
        own = (solo or 0.0) + self.settings.admission_overhead_s
        return rules.admission(own, queued, max(1, len(devices)), slo, bound)

    def _split_cfg(self, workflow: WorkflowSpec) -> bool:
        """Run this request's CFG branches as a parallel group (on two actors)?"""
        mode = self.settings.cfg_split
        if not workflow.cfg or mode == "never":
            return False
        if mode == "always":
            return True
        idle = sum(1 for a in self.actors.of_model(workflow.denoiser) if not a.in_flight and not a.draining)
        needed = rules.cfg_actors_needed(self.directory.live_cfg.get(workflow.denoiser, 0) + 1)
        return rules.parallel_mode(needed, idle) == rules.LATENCY

    def _pipeline_for(self, workflow: str) -> str | None:
        """The monolith model serving `workflow` with the shortest queue per actor."""
        best, best_load = None, None
        for model, actors in self.actors.by_model.items():
            if not actors or not model.startswith(PIPELINE_PREFIX):
                continue
            spec = self.catalog.model(model)
            if spec is None or not spec.serves(workflow):
                continue
            queue = self.directory.queues.get(model)
            load = (queue.depth if queue else 0) / len(actors)
            if best_load is None or load < best_load:
                best, best_load = model, load
        return best
