"""The broker core's request and tensor directory: live requests, their DAGs, ready queues.

Plain state with no sockets, in the broker process. Owns every live request and its
node tasks (by task id), one ready queue per model, where each output lives (the
node's `actor_id`) and how many consumers still need it (`refs_left`: at zero the
holder is told to FREE it), and the live CFG requests per base model (the
parallel-group rule reads them). Its operations keep those consistent: a request's
DAG built from its priced plans, (re)armed, a node made ready, done or its output
released, a request delivered, failed or finished. It never dispatches: an operation
that makes work ready returns the models whose queues grew, and the caller dispatches.
"""

from __future__ import annotations

import itertools

import structlog

from broker import protocol as p
from broker.catalog import Catalog, NodePlan, WorkflowSpec
from broker.core.actors import ActorTable
from broker.core.load import LoadTracker
from broker.core.metering import Meters
from broker.core.outbox import CANCELLED, FAILED, FINISHED, Outbox
from broker.core.state import DONE, FRONTEND, READY, WAITING, ActorState, Node, ReadyQueue, Request
from broker.protocol.errors import ErrorCode
from broker.protocol.tasks import TaskKind
from broker.protocol.tensors import check_payload

log = structlog.get_logger(__name__)


class RequestDirectory:
    def __init__(self, catalog: Catalog, actors: ActorTable, load: LoadTracker, meters: Meters, out: Outbox):
        self.catalog, self.actors, self.load, self.meters, self.out = catalog, actors, load, meters, out
        self.requests: dict[str, Request] = {}
        self.tasks: dict[str, Node] = {}  # task_id -> node, for nodes of live requests
        self.queues: dict[str, ReadyQueue] = {}
        self.live_cfg: dict[str, int] = {}  # denoiser -> live CFG requests (for the parallel-group rule)
        self.ops_live = 0  # nodes of the live requests (what lookahead admission would simulate)
        self.changed = False  # ready work changed: the telemetry publisher sends a snapshot soon
        self._seq = itertools.count()  # arrival order of requests, creation order of nodes

    def next_seq(self) -> int:
        return next(self._seq)

    def queue(self, model: str) -> ReadyQueue:
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = ReadyQueue()
        return queue

    # ---------------------------------------------------------------- a request's life

    def add(self, request: Request, workflow: WorkflowSpec, plans: list[NodePlan],
            costs: list[tuple[float, float]]) -> None:
        """Build the request's DAG from its plans and their (alone, full-batch) costs."""
        request.total_steps = sum(1 for plan in plans if plan.kind == TaskKind.DENOISE)
        groups: dict[str, list[Node]] = {}
        for plan, (cost_s, min_cost_s) in zip(plans, costs, strict=True):
            node = Node(request, plan, self.next_seq())
            node.cost_s, node.min_cost_s = cost_s, min_cost_s
            node.share_s = self.load.actor_share_s(node.model, node.kind, node.shape, node.rows, cost_s, min_cost_s)
            request.min_cost_s += node.min_cost_s
            if plan.group:
                groups.setdefault(plan.group, []).append(node)
            node.inputs = [request.nodes[k] for k in plan.inputs]
            for producer in node.inputs:
                producer.consumers.append(node)
            request.nodes[plan.key] = node
            self.tasks[node.task_id] = node
            self.meters.model_workflows.setdefault(node.model, set()).add(workflow.name)
        for members in groups.values():
            for node in members:
                node.siblings = [other for other in members if other is not node]
        for node in reversed(list(request.nodes.values())):  # consumers come after producers
            node.tail_s = node.cost_s + max((c.tail_s for c in node.consumers), default=0.0)
        self.requests[request.request_id] = request
        self.ops_live += len(request.nodes)
        self.meters.counters["requests_submitted"] += 1
        for node in request.nodes.values():
            self.load.queue(node.model, node.min_cost_s)
        if workflow.cfg:
            self.live_cfg[workflow.denoiser] = self.live_cfg.get(workflow.denoiser, 0) + 1

    def start(self, request: Request, now: float) -> set[str]:
        """(Re)arm every node of the request and queue the ones with no inputs; the
        models whose queues grew."""
        models = set()
        for node in request.nodes.values():
            node.deps_left = len(node.inputs)
            node.refs_left = len(node.consumers)
            node.state = WAITING
            node.actor_id = ""
        for node in request.nodes.values():
            if not node.inputs:
                self.make_ready(node, now)
                models.add(node.model)
        return models

    def reset(self, request: Request) -> None:
        """Its intermediate results are gone: count its done work as queued again, take
        its ready nodes off their queues, free what it still holds, make every result in
        flight for it stale. `start` arms it again."""
        for node in request.nodes.values():  # what was done is to be done again
            if node.state == DONE:
                self.load.queue(node.model, node.min_cost_s)
        for node in request.nodes.values():
            if node.state == READY:
                self.queue(node.model).discard(node)
            elif node.state == DONE and node.refs_left > 0:
                self.release(node)
            node.attempt += 1  # results still in flight for the old attempt are dropped
        request.done_nodes = 0

    def make_ready(self, node: Node, now: float) -> None:
        self.changed = True
        node.ready_at = now
        node.state = READY
        self.queue(node.model).push(node)

    def finish(self, request: Request) -> None:
        """Forget the request; free whatever of it is still held anywhere."""
        if request.finished:
            return
        request.finished = True
        self.ops_live -= len(request.nodes)
        for node in request.nodes.values():
            if node.state != DONE:
                self.load.queue(node.model, -node.min_cost_s)
        workflow = self.catalog.workflows.get(request.workflow)
        if workflow is not None and workflow.cfg:
            self.live_cfg[workflow.denoiser] = self.live_cfg.get(workflow.denoiser, 1) - 1
        self.requests.pop(request.request_id, None)
        for node in request.nodes.values():
            self.tasks.pop(node.task_id, None)
            if node.state == READY:
                self.queue(node.model).discard(node)
                node.state = WAITING
            elif node.state == DONE and node.refs_left > 0:
                self.release(node)
        for node in request.nodes.values():
            # Break the DAG's reference cycles so refcounting frees it at once and the
            # cyclic GC (whose pauses show up as tail latency) has little to do.
            node.inputs = node.consumers = node.siblings = ()
        request.left = []

    def fail(self, request: Request, code: ErrorCode, message: str, now: float) -> None:
        counter = "requests_cancelled" if code is ErrorCode.CANCELLED else "requests_failed"
        self.meters.counters[counter] += 1
        if code is not ErrorCode.CANCELLED:
            self.load.stats(request.workflow).failed += 1
        self.meters.failed(now, request.request_id, request.workflow, code.value, message)
        log.warning("request_failed", request_id=request.request_id, code=code.value, reason=message)
        self.out.send(FRONTEND, request.client, p.Failed(request.request_id, code.value, message))
        self.out.ended(request.request_id, CANCELLED if code is ErrorCode.CANCELLED else FAILED)
        self.finish(request)

    def cancel(self, identity: bytes, msg: p.Cancel, payload, now: float) -> None:
        request = self.requests.get(msg.request_id)
        if request is None or request.client != identity:
            self.out.error(FRONTEND, identity, ErrorCode.UNKNOWN_REQUEST, "no such request in flight", "request_id",
                           msg.request_id)
            return
        self.fail(request, ErrorCode.CANCELLED, "cancelled by the client", now)

    # ---------------------------------------------------------------- outputs

    def release(self, node: Node) -> None:
        """The node's output is no longer needed: tell its holder to drop it."""
        node.refs_left = 0
        actor = self.actors.holder(node.actor_id)
        if actor is not None and node.output_id in actor.held:
            actor.held.discard(node.output_id)
            self.out.free(actor.identity, node.output_id)

    def node_done(self, node: Node, actor: ActorState, result: p.TaskResult, payload, now: float,
                  ready_models: set[str]) -> None:
        """Its output exists at `actor`: consumers whose inputs are all there become ready
        (their models added to `ready_models`); the request's output goes to its client."""
        request = node.request
        node.state = DONE
        node.nbytes = result.nbytes
        request.done_nodes += 1
        self.load.queue(node.model, -node.min_cost_s)
        self.load.task_served(node.model, now - node.dispatched_at)
        self.meters.task_done(node.model, node.kind, now - node.dispatched_at)
        self.meters.counters["tasks_done"] += 1
        self.meters.model_batches.setdefault(node.model, [0, 0, 0])[0] += 1
        self.meters.hop_latency.add(now - node.dispatched_at)
        for producer in node.inputs:
            producer.refs_left -= 1
            if producer.refs_left <= 0:
                self.release(producer)
        if node.consumers:
            actor.held.add(node.output_id)
        if request.progress:
            self.out.send(FRONTEND, request.client, p.Progress(
                request.request_id, node.key, node.kind, node.step + 1 if node.step >= 0 else 0,
                request.total_steps, request.done_nodes, len(request.nodes), actor.actor_id))
        if node.return_output:
            self._deliver(request, result, payload, now)
            return
        for consumer in node.consumers:
            consumer.deps_left -= 1
            if consumer.deps_left == 0:
                self.make_ready(consumer, now)
                ready_models.add(consumer.model)

    def _deliver(self, request: Request, result: p.TaskResult, payload: list, now: float) -> None:
        """Forward the final output's frames to the client without reading their bytes."""
        try:
            check_payload(result.tensors, payload)  # sizes only: dtype x shape == frame length
        except p.ProtocolError as err:
            self.fail(request, ErrorCode.TASK_ERROR, f"result of {result.task_id}: {err.message}", now)
            return
        tensors, frames = [], []
        wanted = request.params.get("output", "image")  # the output tensor a request asked for
        for desc in result.tensors:
            if desc.name != wanted and wanted in {d.name for d in result.tensors}:
                continue  # e.g. a final step's bundle also holds conditioning and sampler state
            frames.append(payload[desc.frame])
            tensors.append(p.TensorDesc(desc.name, desc.dtype, desc.shape, len(frames) - 1, desc.where, desc.nbytes))
        self.meters.counters["requests_completed"] += 1
        latency = now - request.submitted_at
        stats = self.load.stats(request.workflow)
        stats.completed += 1
        stats.slo_met += request.deadline is None or now <= request.deadline
        slo = None if request.deadline is None else request.deadline - request.submitted_at
        self.load.request_done(request.workflow, latency, request.predicted_s, slo)
        self.meters.request_done(request.workflow, latency)
        log.info("request_completed", request_id=request.request_id, latency_s=round(latency, 4))
        self.out.send(FRONTEND, request.client, p.Result(request.request_id, tensors, latency, request.restarts + 1),
                      frames)
        self.out.ended(request.request_id, FINISHED)
        self.finish(request)
