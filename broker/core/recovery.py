"""Recovery of work from dead actors: part of the broker's sans-IO core.

Mixed into `broker.core.machine.BrokerCore` (same state, same `_send`); kept apart so the core
module stays readable. Rules: a dead actor's in-flight tasks are re-queued with their
attempt bumped (their late results are then stale and dropped); a request that lost
an intermediate tensor only that actor held is recomputed from its inputs (seeded, so
the result is the same); a task lost `max_task_attempts` times, or a request restarted
more than `max_request_restarts` times, fails with `attempts_exhausted`.
"""

from __future__ import annotations

import structlog

from broker import protocol as p
from broker.core.state import BACKEND, DONE, READY, RUNNING, ActorState, Node, Request
from broker.protocol.errors import ErrorCode

log = structlog.get_logger("broker.core.machine")


class RecoveryMixin:
    def _lose_actor(self, actor: ActorState, reason: str, now: float) -> None:
        """Re-queue what the actor was running; recompute what only it held."""
        self.counters["actors_lost"] += 1
        self.telemetry_changed = True
        log.warning("actor_lost", actor_id=actor.actor_id, model=actor.model, reason=reason,
                    in_flight=sum(len(v) for v in actor.in_flight.values()), held=len(actor.held))
        self.actors.pop(actor.actor_id, None)
        for index, key in ((self.actors_by_model, actor.model), (self.actors_by_device, (actor.host, actor.device))):
            peers = index.get(key, [])
            if actor in peers:
                peers.remove(actor)
        self.actor_by_identity.pop(actor.identity, None)
        self._send(BACKEND, actor.identity, p.Disconnect(reason=f"declared dead: {reason}"))
        lost_held = {}
        for request in list(self.requests.values()):
            for node in request.nodes.values():
                if node.state == DONE and node.refs_left > 0 and node.actor_id == actor.actor_id:
                    lost_held.setdefault(request.request_id, request)
        touched = set()
        for batch in actor.in_flight.values():
            for node, attempt in batch:
                request = node.request
                if request.finished or node.attempt != attempt or node.state != RUNNING:
                    continue
                if request.request_id in lost_held:
                    continue  # recomputed from scratch below
                if any(self.actors.get(prod.actor_id) is None for prod in node.inputs):
                    lost_held[request.request_id] = request
                    continue
                self._requeue(node, reason)
                touched.add(node.model)
        actor.in_flight.clear()
        for request in lost_held.values():
            if not request.finished:
                self._restart_request(request, reason, now)
        for model in touched:
            self._dispatch(model, now)

    def _requeue(self, node: Node, reason: str) -> None:
        node.attempt += 1
        node.losses += 1
        if node.losses >= self.settings.max_task_attempts:
            self._fail_request(node.request, ErrorCode.ATTEMPTS_EXHAUSTED,
                               f"{node.key} lost {node.losses} times (last: {reason})")
            return
        self.counters["tasks_requeued"] += 1
        log.info("task_requeued", request_id=node.request.request_id, task_id=node.task_id, attempt=node.attempt)
        self._make_ready(node)

    def _restart_request(self, request: Request, reason: str, now: float) -> None:
        """An intermediate tensor is gone: recompute the request (seeded, so same result)."""
        request.restarts += 1
        if request.restarts > self.settings.max_request_restarts:
            self._fail_request(request, ErrorCode.ATTEMPTS_EXHAUSTED,
                               f"intermediate results lost {request.restarts} times (last: {reason})")
            return
        for node in request.nodes.values():  # what was done is to be done again
            if node.state == DONE:
                self.load.queue(node.model, node.min_cost_s)
        self.counters["requests_restarted"] += 1
        log.warning("request_restarted", request_id=request.request_id, restarts=request.restarts, reason=reason)
        for node in request.nodes.values():
            if node.state == READY:
                self._queue(node.model).discard(node)
            elif node.state == DONE and node.refs_left > 0:
                self._free(node)
            node.attempt += 1  # results still in flight for the old attempt are dropped
        request.done_nodes = 0
        self._start_request(request, now)
