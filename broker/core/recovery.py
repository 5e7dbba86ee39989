"""Recovery of lost work: part of the broker's sans-IO core, in the broker process.

Rules: a dead actor's in-flight tasks are re-queued with their attempt bumped (their
late results are then stale and dropped); a request that lost an intermediate tensor
only that actor held is recomputed from its inputs (seeded, so the result is the
same); a task lost `max_task_attempts` times, or a request restarted more than
`max_request_restarts` times, fails with `attempts_exhausted`. `Recovery` owns no
state: it operates on the actor table and the request directory it is given, and
dispatches what it made ready.
"""

from __future__ import annotations

import structlog

from broker import protocol as p
from broker.core.actors import ActorTable
from broker.core.directory import RequestDirectory
from broker.core.dispatch import Dispatcher
from broker.core.metering import Meters
from broker.core.outbox import Outbox
from broker.core.settings import BrokerSettings
from broker.core.state import BACKEND, DONE, RUNNING, ActorState, Node, Request
from broker.protocol.errors import ErrorCode

log = structlog.get_logger(__name__)

POISON_LOSSES = 2  # a task whose actor died twice, the second time running it alone, fails: quarantined


class Recovery:
    def __init__(self, settings: BrokerSettings, actors: ActorTable, directory: RequestDirectory,
                 dispatcher: Dispatcher, meters: Meters, out: Outbox):
        self.settings = settings  # replaced by the core when an operator changes a live setting
        self.actors, self.directory, self.dispatcher, self.meters, self.out = actors, directory, dispatcher, meters, out

    def lose_actor(self, actor: ActorState, reason: str, now: float, innocent: tuple[int, ...] = ()) -> None:
        """Re-queue what the actor was running; recompute what only it held. The batches
        in `innocent` never reached it (their send failed)."""
        self.meters.counters["actors_lost"] += 1
        log.warning("actor_lost", actor_id=actor.actor_id, model=actor.model, reason=reason,
                    in_flight=sum(len(v) for v in actor.in_flight.values()), held=len(actor.held))
        self.actors.remove(actor)
        self.out.send(BACKEND, actor.identity, p.Disconnect(reason=f"declared dead: {reason}"))
        lost_held = {}
        for request in list(self.directory.requests.values()):
            for node in request.nodes.values():
                if node.state == DONE and node.refs_left > 0 and node.actor_id == actor.actor_id:
                    lost_held.setdefault(request.request_id, request)
        # Alone on the actor, not only in its batch: a task beside another batch in flight
        # (an actor with credits to spare) may be the poison's neighbour, not the poison.
        reached = {batch_id: batch for batch_id, batch in actor.in_flight.items() if batch_id not in innocent}
        alone = sum(len(batch) for batch in reached.values()) == 1
        # It died running a task already suspected of killing actors: the requests that
        # only lose what it held are that task's victims, and a poison request must not
        # use up their restarts (max_request_restarts) one crash after another.
        suspect_ran = any(node.solo and node.losses for batch in reached.values() for node, _ in batch)
        touched = set()
        for batch_id, batch in actor.in_flight.items():
            for node, attempt in batch:
                request = node.request
                if request.finished or node.attempt != attempt or node.state != RUNNING:
                    continue
                if request.request_id in lost_held:
                    continue  # recomputed from scratch below
                if any(self.actors.holder(prod.actor_id) is None for prod in node.inputs):
                    lost_held[request.request_id] = request
                    continue
                if batch_id not in reached:  # its send failed: it is as it was, a new attempt
                    self.requeue(node, reason, now, blame=False)
                    touched.add(node.model)
                    continue
                # Whatever it was beside, it runs alone next: if it is the poison, only its
                # own run dies again, and that second loss alone quarantines it.
                node.solo = True
                # Only a task sent to an actor that was alive then can have killed it: one
                # sent to an actor already silent (its host or agent died a moment ago, and
                # the broker had not noticed yet) is innocent of that loss.
                alive_then = node.dispatched_at - actor.last_seen <= 1.5 * self.settings.heartbeat_interval_s
                self.requeue(node, reason, now, alone=alone and alive_then)
                touched.add(node.model)
        actor.in_flight.clear()
        for request in lost_held.values():
            if not request.finished:
                self.restart(request, reason, now, counted=not suspect_ran)
        self.dispatcher.dispatch_all(touched, now)

    def requeue(self, node: Node, reason: str, now: float, alone: bool = False, blame: bool = True) -> None:
        """Run the node again (a new attempt), unless it was lost too often.

        A task that crashes its actor every time (a poison input) must not take actor
        after actor down, nor its batch-mates with it: once lost, it runs alone
        (`lose_actor` marks it solo); lost a second time while alone on its actor
        (`alone`), it is the likely cause and its request fails, two crashes after its
        first. A task that never reached the actor (`blame` false) counts no loss."""
        node.attempt += 1
        node.losses += blame
        if alone and node.losses >= POISON_LOSSES:
            self.meters.counters["tasks_quarantined"] += 1
            self.directory.fail(node.request, ErrorCode.ATTEMPTS_EXHAUSTED,
                                f"{node.key}'s actor died {node.losses} times, the last time running it alone "
                                f"(last: {reason}): quarantined as the likely cause", now)
            return
        if node.losses >= self.settings.max_task_attempts:
            self.directory.fail(node.request, ErrorCode.ATTEMPTS_EXHAUSTED,
                                f"{node.key} lost {node.losses} times (last: {reason})", now)
            return
        self.meters.counters["tasks_requeued"] += 1
        log.info("task_requeued", request_id=node.request.request_id, task_id=node.task_id, attempt=node.attempt)
        self.directory.make_ready(node, now)

    def restart(self, request: Request, reason: str, now: float, counted: bool = True) -> None:
        """An intermediate tensor is gone: recompute the request (seeded, so same result).
        A restart not `counted` (the loss was a suspected poison's doing) does not bring
        it nearer to max_request_restarts."""
        request.restarts += 1
        request.forgiven += not counted
        if request.restarts - request.forgiven > self.settings.max_request_restarts:
            self.directory.fail(request, ErrorCode.ATTEMPTS_EXHAUSTED,
                                f"intermediate results lost {request.restarts} times (last: {reason})", now)
            return
        self.meters.counters["requests_restarted"] += 1
        log.warning("request_restarted", request_id=request.request_id, restarts=request.restarts, reason=reason)
        self.directory.reset(request)
        self.dispatcher.dispatch_all(self.directory.start(request, now), now)
