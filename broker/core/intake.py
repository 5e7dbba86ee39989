"""Request intake: a SUBMIT checked, admitted or refused, unrolled into its DAG and started.

Part of the broker's sans-IO core, in the broker process. The checks run cheapest
first (id, workflow, pause, capacity, parameters, payload); admission
(`broker.core.rules.admission`) compares the request's SLO with the queued work
and its own solo latency; in monolith serving the request becomes one task for the
least loaded `pipeline/...` model hosting its workflow, otherwise a DAG whose CFG
branches may form a parallel group (`broker.core.rules.parallel_mode`). `Intake` owns
the parameter generator (seeds); the request enters the directory it is given.
"""

from __future__ import annotations

import random

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
from broker.core.metering import Meters
from broker.core.outbox import Outbox
from broker.core.settings import BrokerSettings
from broker.core.state import FRONTEND, Request
from broker.protocol.errors import ErrorCode
from broker.protocol.tensors import check_payload

log = structlog.get_logger(__name__)


class Intake:
    def __init__(self, settings: BrokerSettings, catalog: Catalog, rng: random.Random, actors: ActorTable,
                 directory: RequestDirectory, dispatcher: Dispatcher, load: LoadTracker, meters: Meters,
                 operator: Operator, out: Outbox):
        self.settings = settings  # replaced by the core when an operator changes a live setting
        self.catalog, self.rng = catalog, rng
        self.actors, self.directory, self.dispatcher, self.load = actors, directory, dispatcher, load
        self.meters, self.operator, self.out = meters, operator, out

    def submit(self, identity: bytes, msg: p.Submit, payload, now: float) -> None:
        def reject(code: ErrorCode, message: str, field_name: str | None = None, retry_after_s: float = 0.0):
            self.meters.counters["requests_rejected"] += 1
            self.meters.rejected(now, msg.request_id, msg.workflow, code.value, message, field_name)
            log.info("request_rejected", request_id=msg.request_id, workflow=msg.workflow, code=code.value,
                     field=field_name, reason=message)
            self.out.send(FRONTEND, identity, p.Rejected(msg.request_id, code.value, message, field_name, retry_after_s))

        if not msg.request_id or len(msg.request_id) > 128 or "/" in msg.request_id:
            return reject(ErrorCode.INVALID_PARAM, "request_id must be 1-128 characters without '/'", "request_id")
        if msg.request_id in self.directory.requests:
            return reject(ErrorCode.DUPLICATE_REQUEST, "a request with this id is in flight", "request_id")
        workflow = self.catalog.workflows.get(msg.workflow)
        if workflow is None:
            return reject(ErrorCode.UNKNOWN_WORKFLOW, f"unknown workflow {msg.workflow!r} (known: {sorted(self.catalog.workflows)})", "workflow")
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
        if self.settings.admission and slo is not None:
            decision = self._admission(workflow, solo, slo)
            if not decision.admit:
                self.load.stats(workflow.name).rejected += 1
                # When the queue sets the bound: once it has drained by that much, it fits.
                retry = max(0.0, decision.bound_s - slo)
                return reject(ErrorCode.SLO_UNATTAINABLE, decision.reason, None, round(retry, 3))
        if self.settings.serving == "monolith":
            pipeline = self._pipeline_for(workflow.name)
            if pipeline is None:
                return reject(ErrorCode.NO_CAPACITY, f"no monolith (pipeline/...) actor hosts {workflow.name!r}", "workflow")
        request = Request(msg.request_id, identity, workflow.name, params, self.directory.next_seq(), now, msg.progress)
        request.tensors, request.frames = list(msg.tensors), list(payload)
        request.deadline = None if slo is None else now + slo
        if self.settings.serving == "monolith":
            plans = unroll_monolith(workflow, params, pipeline)
        else:
            request.latency_mode = self._split_cfg(workflow)
            plans = unroll(workflow, params, cfg_split=request.latency_mode, tensors={t.name for t in msg.tensors})
        node_costs, cost = self.load.price(plans, workflow)  # unrolled once, priced once
        self.directory.add(request, workflow, plans, node_costs)
        self.load.accepted(workflow, cost, now)
        stats = self.load.stats(workflow.name)
        stats.submitted += 1
        stats.latency_mode += request.latency_mode
        steps = sum(1 for n in plans if n.kind == "denoise")
        self.out.send(FRONTEND, identity, p.Accepted(request.request_id, len(plans), steps, params))
        log.info("request_accepted", request_id=request.request_id, workflow=workflow.name, nodes=len(plans))
        self.dispatcher.dispatch_all(self.directory.start(request, now), now)

    def _admission(self, workflow: WorkflowSpec, solo: float | None, slo: float) -> rules.Admission:
        if self.settings.admission_bound == "sum":
            # its wait: the work queued on its workflow's models, over the devices they run on
            devices = {(a.host, a.device) for m in workflow.models
                       for a in self.actors.of_model(m) if not a.draining}
            queued = sum(self.load.queued_by_model.get(m, 0.0) for m in workflow.models)
            devices = max(1, len(devices))
        else:
            queued, devices = self.load.queued_min_s, self.actors.device_count()
        own = (solo or 0.0) + self.settings.admission_overhead_s
        return rules.admission(own, queued, devices, slo, self.settings.admission_bound)

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
