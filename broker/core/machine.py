"""The broker's sans-IO core: `on_*(event) -> list[Send]`, no sockets, no clock.

Runs inside the broker process; `broker.server` owns the sockets and feeds it.
Everything the broker decides lives here: request admission and unrolling, ready
queues, credit-based dispatch with batching and affinity, the tensor directory
(holders and reference counts, FREE when consumed), progress and results, cancel,
heartbeats and the recovery of work from dead actors.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

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
from broker.core import rules, telemetry
from broker.core.admin import AdminMixin
from broker.core.dispatch import DispatchMixin
from broker.core.load import LoadTracker
from broker.core.metering import Meters
from broker.core.recovery import RecoveryMixin
from broker.core.state import (
    BACKEND,
    DONE,
    FRONTEND,
    READY,
    RUNNING,
    WAITING,
    ActorState,
    AgentState,
    LatencyWindow,
    Node,
    ReadyQueue,
    Request,
)
from broker.protocol.errors import ErrorCode
from broker.protocol.tensors import check_payload

log = structlog.get_logger(__name__)



@dataclass(frozen=True)
class BrokerSettings:
    heartbeat_interval_s: float = 1.0
    heartbeat_misses: int = 5
    max_task_attempts: int = 3  # a task re-queued after this many lost attempts fails its request
    max_request_restarts: int = 3  # whole-request recomputations after lost intermediate tensors
    max_requests_in_flight: int = 100_000
    latency_window: int = 20_000
    # "prefer": step k+1 goes to the actor holding step k's output when it has credit.
    # "avoid": to any other actor when one has credit (forces migration: tests the data plane).
    affinity: str = "prefer"
    # "always": run the two CFG branches of every step as separate tasks (for two
    # actors); "never": one batch-2 call; "auto": per request at arrival, by the
    # parallel-group rule (broker.core.rules.parallel_mode).
    cfg_split: str = "never"
    # Admission control: refuse at arrival a request that cannot meet its SLO
    # (broker.core.rules.admission). The SLO is the workflow's slo_s, else this multiple
    # of its solo latency from the profiles; workflows without profiles are not checked.
    admission: bool = False
    admission_bound: str = "max"  # "max" (the paper's lower bound) | "sum" (queue, then solo): rules.admission
    # Real seconds the runtime adds to a request beyond its profile times (dispatch hops,
    # fetches, actor Python, result): added to the solo latency admission estimates. The
    # profiles time model calls alone; a request that just fits its SLO on paper misses it.
    admission_overhead_s: float = 0.0
    slo_multiple: float = 2.0
    cost_scale: float = 1.0  # profile times x this (an emulated cluster's time_scale)
    # "micro": requests are unrolled into node tasks; "monolith": each request is one
    # task on a `pipeline/...` actor hosting its whole workflow (the baselines).
    serving: str = "micro"
    # Fail a request with `deadline_exceeded` instead of dispatching work for it once
    # its SLO deadline has passed (the paper's baselines drop such requests).
    drop_late: bool = False
    # With drop_late: also drop a request as soon as it cannot make its deadline any more
    # (now + the profile time of its remaining critical path > deadline), before more
    # work is spent on it; the freed capacity goes to requests that still can.
    drop_hopeless: bool = False
    # Cap a batch at the rows that still lower the time per row (from the profile);
    # off: fill batches up to each actor's max_batch_rows.
    batch_by_profile: bool = True
    # Tasks at least this long (profile seconds, before cost_scale) go only to actors with
    # nothing in flight; shorter ones may queue a second batch at a busy actor.
    prefetch_below_s: float = 0.05
    # Send a task with LoRA adapters to an actor that has that adapter set applied
    # already, when one is free: switching costs the actor a weight update (and a disk
    # read when the adapter is not in its host cache).
    adapter_affinity: bool = True
    # ...and an actor with a set applied takes a ready task of that set before the queue's
    # head when that task's request arrived at most this long (profile seconds) after the
    # head's: fewer switches under saturation, at a bounded cost in order.
    adapter_bypass_s: float = 2.5

    def __post_init__(self) -> None:
        if self.affinity not in ("prefer", "avoid"):
            raise ValueError(f"affinity: expected 'prefer' or 'avoid', got {self.affinity!r}")
        if self.cfg_split not in ("never", "always", "auto"):
            raise ValueError(f"cfg_split: expected 'never', 'always' or 'auto', got {self.cfg_split!r}")
        if not isinstance(self.admission, bool):
            raise ValueError(f"admission: expected true or false, got {self.admission!r}")
        if self.admission_bound not in rules.ADMISSION_BOUNDS:
            raise ValueError(f"admission_bound: expected one of {rules.ADMISSION_BOUNDS}, got {self.admission_bound!r}")
        if not (isinstance(self.slo_multiple, (int, float)) and self.slo_multiple > 0):
            raise ValueError(f"slo_multiple: expected a number > 0, got {self.slo_multiple!r}")
        if self.serving not in ("micro", "monolith"):
            raise ValueError(f"serving: expected 'micro' or 'monolith', got {self.serving!r}")
        if not isinstance(self.drop_late, bool) or not isinstance(self.drop_hopeless, bool):
            raise ValueError(f"drop_late, drop_hopeless: expected true or false, got {self.drop_late!r}, "
                             f"{self.drop_hopeless!r}")
        if not (isinstance(self.cost_scale, (int, float)) and self.cost_scale > 0):
            raise ValueError(f"cost_scale: expected a number > 0, got {self.cost_scale!r}")
        if self.heartbeat_interval_s <= 0 or self.heartbeat_misses < 1:
            raise ValueError("heartbeat_interval_s must be > 0 and heartbeat_misses >= 1")
        if not isinstance(self.adapter_affinity, bool):
            raise ValueError(f"adapter_affinity: expected true or false, got {self.adapter_affinity!r}")
        if not (isinstance(self.admission_overhead_s, (int, float)) and self.admission_overhead_s >= 0):
            raise ValueError(f"admission_overhead_s: expected seconds >= 0, got {self.admission_overhead_s!r}")
        if not (isinstance(self.adapter_bypass_s, (int, float)) and self.adapter_bypass_s >= 0):
            raise ValueError(f"adapter_bypass_s: expected a number of seconds >= 0, got {self.adapter_bypass_s!r}")


@dataclass
class Send:
    """An instruction for the IO shell: send `msg` (+ raw payload frames) to a peer."""

    socket: str
    identity: bytes
    msg: p.Message
    payload: list = field(default_factory=list)


class BrokerCore(DispatchMixin, RecoveryMixin, AdminMixin):
    def __init__(self, catalog: Catalog, settings: BrokerSettings = BrokerSettings(), broker_id: str = "broker", seed: int | None = None):
        self.catalog = catalog
        self.settings = settings
        self.broker_id = broker_id
        self.rng = random.Random(seed)
        self.requests: dict[str, Request] = {}
        self.tasks: dict[str, Node] = {}  # task_id -> node, for nodes of live requests
        self.actors: dict[str, ActorState] = {}
        self.actors_by_model: dict[str, list[ActorState]] = {}  # the dispatch loop's index
        self.actors_by_device: dict[tuple[str, str], list[ActorState]] = {}  # (host, device) -> actors
        self.actor_by_identity: dict[bytes, ActorState] = {}
        self.agents: dict[bytes, AgentState] = {}
        self.queues: dict[str, ReadyQueue] = {}
        self.model_batches: dict[str, list[int]] = {}  # model -> [tasks, batches, mixed]
        self.model_workflows: dict[str, set[str]] = {}
        self.hop_latency = LatencyWindow(settings.latency_window)
        self.load = LoadTracker(catalog, settings.cost_scale)
        self.live_cfg: dict[str, int] = {}  # denoiser -> live CFG requests (for the parallel-group rule)
        self.plan: dict | None = None  # the scheduler's last posted plan
        self.replica_bounds: dict[str, dict] = {}  # model -> {"min", "max"}: an operator's, for the scheduler
        self.paused: set[str] = set()  # workflows whose admission an operator paused
        self.meters = Meters()  # cumulative counts for metrics, recent refusals and failures
        # Something a telemetry subscriber cares about changed (queues, requests, actors);
        # the IO shell publishes a snapshot soon after and clears it.
        self.telemetry_changed = False
        self.now = 0.0  # of the event being handled: when a node became ready
        self.counters = dict.fromkeys(
            ("requests_submitted", "requests_completed", "requests_failed", "requests_rejected",
             "requests_cancelled", "requests_restarted", "tasks_dispatched", "tasks_done",
             "tasks_requeued", "stale_results", "actors_lost", "protocol_errors", "adapter_switches"), 0)
        self._seq = itertools.count()
        self._batch_ids = itertools.count(1)
        self._spawn_ids = itertools.count(1)
        self._out: list[Send] = []
        self._frees: dict[bytes, list[str]] = {}  # holder identity -> output ids, one FREE each flush
        self._backend_handlers = {
            p.ActorHello: self._actor_hello,
            p.AgentHello: self._agent_hello,
            p.Heartbeat: self._peer_heartbeat,
            p.Credit: self._credit,
            p.BatchDone: self._batch_done,
            p.BatchFailed: self._batch_failed,
            p.AgentEvent: self._agent_event,
            p.Disconnect: self._peer_disconnect,
        }
        self._frontend_handlers = {
            p.Submit: self._submit,
            p.Cancel: self._cancel,
            p.ListWorkflows: self._list_workflows,
            p.GetStats: self._get_stats,
            p.AdminSpawn: self._admin_spawn,
            p.AdminStop: self._admin_stop,
            p.AdminConfigure: self._admin_configure,
            p.AdminDrain: self._admin_drain,
            p.AdminReplicas: self._admin_replicas,
            p.AdminPause: self._admin_pause,
        }

    # ------------------------------------------------------------------ entry points

    def on_backend(self, identity: bytes, msg: p.Message, payload: list, now: float) -> list[Send]:
        self.now = now
        handler = self._backend_handlers.get(type(msg))
        if handler is None:
            self._error(BACKEND, identity, ErrorCode.UNKNOWN_COMMAND, f"{msg.COMMAND.name} is not a backend command")
        else:
            peer = self.actor_by_identity.get(identity) or self.agents.get(identity)
            if peer is not None:
                peer.last_seen = now
            handler(identity, msg, payload, now)
        return self._flush()

    def on_frontend(self, identity: bytes, msg: p.Message, payload: list, now: float) -> list[Send]:
        self.now = now
        handler = self._frontend_handlers.get(type(msg))
        if handler is None:
            self._error(FRONTEND, identity, ErrorCode.UNKNOWN_COMMAND, f"{msg.COMMAND.name} is not a client command")
        else:
            handler(identity, msg, payload, now)
        return self._flush()

    def on_protocol_error(self, socket: str, identity: bytes, err: p.ProtocolError) -> list[Send]:
        """A message that could not be decoded: answer with a typed error, keep going."""
        self.counters["protocol_errors"] += 1
        log.warning("protocol_error", socket=socket, peer=identity.hex(), code=err.code.value, error=err.message)
        self._error(socket, identity, err.code, err.message, err.field)
        return self._flush()

    def on_unreachable(self, socket: str, identity: bytes, now: float) -> list[Send]:
        """A send found no connected peer of that identity: an actor there is gone."""
        self.now = now
        actor = self.actor_by_identity.get(identity) if socket == BACKEND else None
        if actor is not None:
            self._lose_actor(actor, "unreachable: its connection is gone", now)
        return self._flush()

    def on_tick(self, now: float) -> list[Send]:
        """Heartbeats out, silent peers declared dead. Call about 4x per interval."""
        self.now = now
        expiry = self.settings.heartbeat_interval_s * self.settings.heartbeat_misses
        for actor in list(self.actors.values()):  # actors ping; we answer (see _peer_heartbeat)
            if now - actor.last_seen > expiry:
                self._lose_actor(actor, f"silent for {now - actor.last_seen:.1f}s", now)
            elif actor.stopping and not actor.stop_sent and not actor.in_flight and not actor.held:
                self._stop_drained(actor)
        for identity, agent in list(self.agents.items()):
            if now - agent.last_seen > expiry:
                log.warning("agent_lost", agent_id=agent.agent_id, host=agent.host)
                del self.agents[identity]
            elif now - agent.last_sent >= self.settings.heartbeat_interval_s:
                agent.last_sent = now
                self._send(BACKEND, identity, p.Heartbeat(sent_at=now))
        return self._flush()

    # ------------------------------------------------------------------ helpers

    def _send(self, socket: str, identity: bytes, msg: p.Message, payload: list | None = None) -> None:
        self._out.append(Send(socket, identity, msg, payload or []))

    def _flush(self) -> list[Send]:
        for identity, tensor_ids in self._frees.items():
            self._out.append(Send(BACKEND, identity, p.Free(tensor_ids)))
        self._frees.clear()
        out, self._out = self._out, []
        return out

    def _error(self, socket, identity, code: ErrorCode, message: str, field: str | None = None, request_id=None):
        self._send(socket, identity, p.Error(code=code.value, message=message, field=field, request_id=request_id))

    def _queue(self, model: str) -> ReadyQueue:
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = ReadyQueue()
        return queue

    # ------------------------------------------------------------------ peers

    def _welcome(self, identity: bytes) -> None:
        s = self.settings
        self._send(BACKEND, identity, p.Welcome(self.broker_id, s.heartbeat_interval_s, s.heartbeat_misses))

    def _actor_hello(self, identity: bytes, msg: p.ActorHello, payload, now: float) -> None:
        old = self.actors.get(msg.actor_id)
        if old is not None and old.identity == identity:
            # A retried hello of a session we already welcomed (it crossed our WELCOME).
            self._welcome(identity)
            return
        if old is not None:  # the same actor on a new session: what it held is gone
            self._lose_actor(old, "reconnected with a new session", now)
        if msg.max_batch_rows < 1 or msg.credits < 0:
            self._error(BACKEND, identity, ErrorCode.BAD_HEADER, "max_batch_rows must be >= 1 and credits >= 0", "max_batch_rows")
            return
        actor = ActorState(
            actor_id=msg.actor_id, identity=identity, model=msg.model, host=msg.host, device=msg.device,
            backend=msg.backend, data_address=msg.data_address, max_batch_rows=msg.max_batch_rows,
            credits=msg.credits, last_seen=now, pid=msg.pid,
        )
        self.actors[msg.actor_id] = actor
        self.actors_by_model.setdefault(actor.model, []).append(actor)
        self.actors_by_device.setdefault((actor.host, actor.device), []).append(actor)
        self.actor_by_identity[identity] = actor
        self.telemetry_changed = True
        log.info("actor_joined", actor_id=msg.actor_id, model=msg.model, device=msg.device, host=msg.host, backend=msg.backend)
        self._welcome(identity)
        self._dispatch(msg.model, now)

    def _agent_hello(self, identity: bytes, msg: p.AgentHello, payload, now: float) -> None:
        self.agents[identity] = AgentState(msg.agent_id, identity, msg.host, list(msg.devices), now, now)
        log.info("agent_joined", agent_id=msg.agent_id, host=msg.host, devices=len(msg.devices))
        self._welcome(identity)

    def _known_actor(self, identity: bytes) -> ActorState | None:
        actor = self.actor_by_identity.get(identity)
        if actor is None:
            # Declared dead (or never said hello): its results were re-queued elsewhere.
            self._send(BACKEND, identity, p.Disconnect(reason="unknown actor: send ACTOR_HELLO again"))
        return actor

    def _peer_heartbeat(self, identity: bytes, msg: p.Heartbeat, payload, now: float) -> None:
        actor = self.actors.get(msg.actor_id) if msg.actor_id else self.actor_by_identity.get(identity)
        if actor is not None and msg.session and msg.session.encode() != actor.identity:
            # A ping for a work session we no longer know: that session must start over.
            self._send(BACKEND, identity, p.Disconnect(reason=f"session {msg.session} is not current"))
            return
        if actor is not None:
            actor.last_seen = now
            if msg.telemetry is not None:
                self.meters.actor_telemetry(actor.telemetry, msg.telemetry)
                actor.telemetry = msg.telemetry
            if msg.actor_id:  # the pong the actor's heartbeat thread waits for
                self._send(BACKEND, identity, p.Heartbeat(sent_at=now))
        elif identity not in self.agents:
            self._send(BACKEND, identity, p.Disconnect(reason="unknown peer: send a HELLO first"))

    def _peer_disconnect(self, identity: bytes, msg: p.Disconnect, payload, now: float) -> None:
        actor = self.actor_by_identity.get(identity)
        if actor is not None:
            self._lose_actor(actor, f"disconnected: {msg.reason}", now)
        agent = self.agents.pop(identity, None)
        if agent is not None:
            log.info("agent_left", agent_id=agent.agent_id, reason=msg.reason)

    def _credit(self, identity: bytes, msg: p.Credit, payload, now: float) -> None:
        actor = self._known_actor(identity)
        if actor is not None:
            actor.credits += max(0, msg.credits)
            self._dispatch(actor.model, now)

    # ------------------------------------------------------------------ requests

    def _submit(self, identity: bytes, msg: p.Submit, payload, now: float) -> None:
        def reject(code: ErrorCode, message: str, field_name: str | None = None, retry_after_s: float = 0.0):
            self.counters["requests_rejected"] += 1
            self.meters.rejected(now, msg.request_id, msg.workflow, code.value, message, field_name)
            log.info("request_rejected", request_id=msg.request_id, workflow=msg.workflow, code=code.value,
                     field=field_name, reason=message)
            self._send(FRONTEND, identity, p.Rejected(msg.request_id, code.value, message, field_name, retry_after_s))

        if not msg.request_id or len(msg.request_id) > 128 or "/" in msg.request_id:
            return reject(ErrorCode.INVALID_PARAM, "request_id must be 1-128 characters without '/'", "request_id")
        if msg.request_id in self.requests:
            return reject(ErrorCode.DUPLICATE_REQUEST, "a request with this id is in flight", "request_id")
        workflow = self.catalog.workflows.get(msg.workflow)
        if workflow is None:
            return reject(ErrorCode.UNKNOWN_WORKFLOW, f"unknown workflow {msg.workflow!r} (known: {sorted(self.catalog.workflows)})", "workflow")
        if workflow.name in self.paused:
            return reject(ErrorCode.PAUSED, f"workflow {workflow.name!r} is paused by an operator", "workflow")
        if len(self.requests) >= self.settings.max_requests_in_flight:
            return reject(ErrorCode.OVERLOADED, f"{len(self.requests)} requests in flight")
        try:
            params = validate_params(workflow, msg.params, self.rng, self.catalog.adapters)
            check_image(workflow, params, msg.tensors)
        except ParamError as exc:
            return reject(ErrorCode.INVALID_PARAM, str(exc), f"params.{exc.field}")
        try:
            check_payload(msg.tensors, payload)
        except p.ProtocolError as err:
            return reject(ErrorCode.INVALID_PARAM, err.message, "params.image")
        slo = self.load.slo_s(workflow, params, self.settings.slo_multiple)
        if self.settings.admission and slo is not None:
            if self.settings.admission_bound == "sum":
                # its wait: the work queued on its workflow's models, over the devices they run on
                devices = {(a.host, a.device) for m in workflow.models
                           for a in self.actors_by_model.get(m, ()) if not a.draining}
                queued = sum(self.load.queued_by_model.get(m, 0.0) for m in workflow.models)
                devices = max(1, len(devices))
            else:
                queued, devices = self.load.queued_min_s, self._device_count()
            solo = (self.load.solo_s(workflow, params) or 0.0) + self.settings.admission_overhead_s
            decision = rules.admission(solo, queued, devices, slo, self.settings.admission_bound)
            if not decision.admit:
                self.load.stats(workflow.name).rejected += 1
                # When the queue sets the bound: once it has drained by that much, it fits.
                retry = max(0.0, decision.bound_s - slo)
                return reject(ErrorCode.SLO_UNATTAINABLE, decision.reason, None, round(retry, 3))
        if self.settings.serving == "monolith":
            pipeline = self._pipeline_for(workflow.name)
            if pipeline is None:
                return reject(ErrorCode.NO_CAPACITY, f"no monolith (pipeline/...) actor hosts {workflow.name!r}", "workflow")
        request = Request(msg.request_id, identity, workflow.name, params, next(self._seq), now, msg.progress)
        request.tensors, request.frames = list(msg.tensors), list(payload)
        request.deadline = None if slo is None else now + slo
        if self.settings.serving == "monolith":
            plans = unroll_monolith(workflow, params, pipeline)
        else:
            request.latency_mode = self._split_cfg(workflow)
            plans = unroll(workflow, params, cfg_split=request.latency_mode, tensors={t.name for t in msg.tensors})
        request.total_steps = sum(1 for plan in plans if plan.kind == "denoise")
        groups: dict[str, list[Node]] = {}
        for plan in plans:
            node = Node(request, plan, next(self._seq))
            node.cost_s, node.min_cost_s = self.load.plan_costs(plan)
            request.min_cost_s += node.min_cost_s
            if plan.group:
                groups.setdefault(plan.group, []).append(node)
            node.inputs = [request.nodes[k] for k in plan.inputs]
            for producer in node.inputs:
                producer.consumers.append(node)
            request.nodes[plan.key] = node
            self.tasks[node.task_id] = node
            self.model_workflows.setdefault(node.model, set()).add(workflow.name)
        for members in groups.values():
            for node in members:
                node.siblings = [other for other in members if other is not node]
        for node in reversed(list(request.nodes.values())):  # consumers come after producers
            node.tail_s = node.cost_s + max((c.tail_s for c in node.consumers), default=0.0)
        self.requests[request.request_id] = request
        self.counters["requests_submitted"] += 1
        for node in request.nodes.values():
            self.load.queue(node.model, node.min_cost_s)
        self.load.accepted(workflow, self.load.request_cost(plans, workflow), now)
        stats = self.load.stats(workflow.name)
        stats.submitted += 1
        stats.latency_mode += request.latency_mode
        if workflow.cfg:
            self.live_cfg[workflow.denoiser] = self.live_cfg.get(workflow.denoiser, 0) + 1
        steps = sum(1 for n in plans if n.kind == "denoise")
        self._send(FRONTEND, identity, p.Accepted(request.request_id, len(plans), steps, params))
        log.info("request_accepted", request_id=request.request_id, workflow=workflow.name, nodes=len(plans))
        self._start_request(request, now)

    def _split_cfg(self, workflow: WorkflowSpec) -> bool:
        """Run this request's CFG branches as a parallel group (on two actors)?"""
        mode = self.settings.cfg_split
        if not workflow.cfg or mode == "never":
            return False
        if mode == "always":
            return True
        idle = sum(1 for a in self.actors_by_model.get(workflow.denoiser, ()) if not a.in_flight and not a.draining)
        needed = rules.cfg_actors_needed(self.live_cfg.get(workflow.denoiser, 0) + 1)
        return rules.parallel_mode(needed, idle) == rules.LATENCY

    def _pipeline_for(self, workflow: str) -> str | None:
        """The monolith model serving `workflow` with the shortest queue per actor."""
        best, best_load = None, None
        for model, actors in self.actors_by_model.items():
            if not actors or not model.startswith(PIPELINE_PREFIX):
                continue
            spec = self.catalog.model(model)
            if spec is None or not spec.serves(workflow):
                continue
            queue = self.queues.get(model)
            load = (queue.depth if queue else 0) / len(actors)
            if best_load is None or load < best_load:
                best, best_load = model, load
        return best

    def _device_count(self) -> int:
        """Devices work can spread over: the agents' accelerators, else the actors' devices."""
        accelerators = {(a.host, d.device) for a in self.agents.values() for d in a.devices if d.kind != "cpu"}
        return len(accelerators) or max(1, len({(a.host, a.device) for a in self.actors.values()}))

    def _start_request(self, request: Request, now: float) -> None:
        """(Re)arm every node of the request and queue the ones with no inputs."""
        models = set()
        for node in request.nodes.values():
            node.deps_left = len(node.inputs)
            node.refs_left = len(node.consumers)
            node.state = WAITING
            node.actor_id = ""
        for node in request.nodes.values():
            if not node.inputs:
                self._make_ready(node)
                models.add(node.model)
        for model in models:
            self._dispatch(model, now)

    def _make_ready(self, node: Node) -> None:
        self.telemetry_changed = True
        node.ready_at = self.now
        node.state = READY
        self._queue(node.model).push(node)

    def _finish_request(self, request: Request) -> None:
        """Forget the request; free whatever of it is still held anywhere."""
        if request.finished:
            return
        request.finished = True
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
                self._queue(node.model).discard(node)
                node.state = WAITING
            elif node.state == DONE and node.refs_left > 0:
                self._free(node)
        for node in request.nodes.values():
            # Break the DAG's reference cycles so refcounting frees it at once and the
            # cyclic GC (whose pauses show up as tail latency) has little to do.
            node.inputs = node.consumers = node.siblings = ()

    def _fail_request(self, request: Request, code: ErrorCode, message: str) -> None:
        counter = "requests_cancelled" if code is ErrorCode.CANCELLED else "requests_failed"
        self.counters[counter] += 1
        if code is not ErrorCode.CANCELLED:
            self.load.stats(request.workflow).failed += 1
        self.meters.failed(self.now, request.request_id, request.workflow, code.value, message)
        log.warning("request_failed", request_id=request.request_id, code=code.value, reason=message)
        self._send(FRONTEND, request.client, p.Failed(request.request_id, code.value, message))
        self._finish_request(request)

    def _cancel(self, identity: bytes, msg: p.Cancel, payload, now: float) -> None:
        request = self.requests.get(msg.request_id)
        if request is None or request.client != identity:
            self._error(FRONTEND, identity, ErrorCode.UNKNOWN_REQUEST, "no such request in flight", "request_id", msg.request_id)
            return
        self._fail_request(request, ErrorCode.CANCELLED, "cancelled by the client")

    def _free(self, node: Node) -> None:
        """The node's output is no longer needed: tell its holder to drop it."""
        node.refs_left = 0
        actor = self.actors.get(node.actor_id)
        if actor is not None and node.output_id in actor.held:
            actor.held.discard(node.output_id)
            self._frees.setdefault(actor.identity, []).append(node.output_id)

    # ------------------------------------------------------------------ results

    def _batch_done(self, identity: bytes, msg: p.BatchDone, payload, now: float) -> None:
        actor = self._known_actor(identity)
        if actor is None:
            return
        entries = actor.in_flight.pop(msg.batch_id, None)
        if entries is None:  # a repeated or invented batch: it returns no credit
            log.warning("unknown_batch", actor_id=actor.actor_id, batch_id=msg.batch_id)
            return
        actor.credits += max(0, msg.credits)
        expected = {(n.task_id, attempt): n for n, attempt in entries}
        ready_models = set()
        for result in msg.results:
            node = expected.pop((result.task_id, result.attempt), None)
            if node is None or node.request.finished or node.state != RUNNING or node.attempt != result.attempt:
                self._drop_stale(actor, result)
                continue
            self._node_done(node, actor, result, payload, now, ready_models)
        missing = set(msg.missing)
        for key in [k for k in expected if k[0] in missing]:
            node = expected.pop(key)
            if not node.request.finished and node.state == RUNNING and node.actor_id == actor.actor_id:
                # Its input is gone (holder lost or freed it): recompute the request's lineage.
                self._restart_request(node.request, f"{node.key}: {msg.missing_reason}", now)
        for node in expected.values():  # the actor's answer left these out: run them again
            if not node.request.finished and node.state == RUNNING and node.actor_id == actor.actor_id:
                self._requeue(node, f"missing from {actor.actor_id}'s answer to batch {msg.batch_id}")
                ready_models.add(node.model)
        for model in ready_models:
            self._dispatch(model, now)
        self._dispatch(actor.model, now)

    def _drop_stale(self, actor: ActorState, result: p.TaskResult) -> None:
        self.counters["stale_results"] += 1
        if not result.tensors:  # kept in the actor's store: release it
            self._frees.setdefault(actor.identity, []).append(result.output_id)

    def _node_done(self, node: Node, actor: ActorState, result: p.TaskResult, payload, now, ready_models) -> None:
        request = node.request
        node.state = DONE
        node.nbytes = result.nbytes
        request.done_nodes += 1
        self.load.queue(node.model, -node.min_cost_s)
        self.load.task_served(node.model, now - node.dispatched_at)
        self.meters.task_done(node.model, node.kind, now - node.dispatched_at)
        self.counters["tasks_done"] += 1
        self.model_batches.setdefault(node.model, [0, 0, 0])[0] += 1
        self.hop_latency.add(now - node.dispatched_at)
        for producer in node.inputs:
            producer.refs_left -= 1
            if producer.refs_left <= 0:
                self._free(producer)
        if node.consumers:
            actor.held.add(node.output_id)
        if request.progress:
            self._send(FRONTEND, request.client, p.Progress(
                request.request_id, node.key, node.kind, node.step + 1 if node.step >= 0 else 0,
                request.total_steps, request.done_nodes, len(request.nodes), actor.actor_id))
        if node.return_output:
            self._deliver(request, result, payload, now)
            return
        for consumer in node.consumers:
            consumer.deps_left -= 1
            if consumer.deps_left == 0:
                self._make_ready(consumer)
                ready_models.add(consumer.model)

    def _deliver(self, request: Request, result: p.TaskResult, payload: list, now: float) -> None:
        """Forward the final output's frames to the client without reading their bytes."""
        try:
            check_payload(result.tensors, payload)  # sizes only: dtype x shape == frame length
        except p.ProtocolError as err:
            self._fail_request(request, ErrorCode.TASK_ERROR, f"result of {result.task_id}: {err.message}")
            return
        tensors, frames = [], []
        wanted = request.params.get("output", "image")  # the output tensor a request asked for
        for desc in result.tensors:
            if desc.name != wanted and wanted in {d.name for d in result.tensors}:
                continue  # e.g. a final step's bundle also holds conditioning and sampler state
            frames.append(payload[desc.frame])
            tensors.append(p.TensorDesc(desc.name, desc.dtype, desc.shape, len(frames) - 1, desc.where, desc.nbytes))
        self.counters["requests_completed"] += 1
        latency = now - request.submitted_at
        stats = self.load.stats(request.workflow)
        stats.completed += 1
        stats.slo_met += request.deadline is None or now <= request.deadline
        self.meters.request_done(request.workflow, latency)
        log.info("request_completed", request_id=request.request_id, latency_s=round(latency, 4))
        self._send(FRONTEND, request.client, p.Result(request.request_id, tensors, latency, request.restarts + 1), frames)
        self._finish_request(request)

    def _batch_failed(self, identity: bytes, msg: p.BatchFailed, payload, now: float) -> None:
        actor = self._known_actor(identity)
        if actor is None:
            return
        entries = actor.in_flight.pop(msg.batch_id, None)
        if entries is None:  # a repeated or invented batch: it returns no credit
            log.warning("unknown_batch", actor_id=actor.actor_id, batch_id=msg.batch_id)
            return
        actor.credits += max(0, msg.credits)
        for node, attempt in entries:
            if node.request.finished or node.attempt != attempt or node.state != RUNNING:
                continue
            if msg.code == ErrorCode.INPUT_UNAVAILABLE.value:
                # The holder of an input vanished: recompute the request's lineage.
                self._restart_request(node.request, f"{node.key}: {msg.message}", now)
            elif len(entries) > 1:
                # Which task broke the batch is unknown (one bad input, or memory for the
                # whole batch): run each again on its own before failing anyone.
                node.solo = True
                self._requeue(node, f"batch {msg.batch_id} failed: {msg.code}: {msg.message}")
            else:
                # Alone, a model error is deterministic for these inputs: retrying would fail again.
                self._fail_request(node.request, ErrorCode.TASK_ERROR, f"{node.key} failed on {actor.actor_id}: {msg.code}: {msg.message}")
        self._dispatch(actor.model, now)

    def _list_workflows(self, identity: bytes, msg, payload, now: float) -> None:
        self._send(FRONTEND, identity, p.Workflows(telemetry.workflow_infos(self.catalog), msg.call_id))

    def _get_stats(self, identity: bytes, msg, payload, now: float) -> None:
        stats = self.snapshot(now)
        stats.call_id = msg.call_id
        self._send(FRONTEND, identity, stats)

    def snapshot(self, now: float) -> p.Stats:
        return telemetry.snapshot(self, now)
