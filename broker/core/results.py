"""What actors send back about their batches: part of the broker's sans-IO core.

Runs in the broker process. `Results` handles BATCH_DONE and BATCH_FAILED: credits
returned, finished nodes recorded in the request directory (outputs located, inputs
released, consumers made ready, the final output forwarded to the client), stale
answers of earlier attempts dropped (and their stored outputs freed), lost inputs
recomputed and failed batches re-run or failed through `Recovery`, then the models
with new ready work dispatched. It owns no state.
"""

from __future__ import annotations

import structlog

from broker import protocol as p
from broker.core.directory import RequestDirectory
from broker.core.dispatch import Dispatcher
from broker.core.metering import Meters
from broker.core.outbox import Outbox
from broker.core.peers import Peers
from broker.core.recovery import Recovery
from broker.core.state import RUNNING, ActorState
from broker.protocol.errors import ErrorCode

log = structlog.get_logger(__name__)


class Results:
    def __init__(self, peers: Peers, directory: RequestDirectory, recovery: Recovery, dispatcher: Dispatcher,
                 meters: Meters, out: Outbox):
        self.peers, self.directory, self.recovery, self.dispatcher = peers, directory, recovery, dispatcher
        self.meters, self.out = meters, out

    def _answered(self, identity: bytes, msg: p.BatchDone | p.BatchFailed) -> tuple[ActorState, list] | None:
        """The actor and the (node, attempt) entries of the batch it answered, its credits
        back; None for an unknown actor or a repeated or invented batch (no credit)."""
        actor = self.peers.known_actor(identity)
        if actor is None:
            return None
        entries = actor.in_flight.pop(msg.batch_id, None)
        if entries is None:
            log.warning("unknown_batch", actor_id=actor.actor_id, batch_id=msg.batch_id)
            return None
        actor.credits += max(0, msg.credits)
        return actor, entries

    def batch_done(self, identity: bytes, msg: p.BatchDone, payload, now: float) -> None:
        answered = self._answered(identity, msg)
        if answered is None:
            return
        actor, entries = answered
        expected = {(n.task_id, attempt): n for n, attempt in entries}
        ready_models = set()
        for result in msg.results:
            node = expected.pop((result.task_id, result.attempt), None)
            if node is None or node.request.finished or node.state != RUNNING or node.attempt != result.attempt:
                self._drop_stale(actor, result)
                continue
            self.directory.node_done(node, actor, result, payload, now, ready_models)
        missing = set(msg.missing)
        for key in [k for k in expected if k[0] in missing]:
            node = expected.pop(key)
            if not node.request.finished and node.state == RUNNING and node.actor_id == actor.actor_id:
                # Its input is gone (holder lost or freed it): recompute the request's lineage.
                self.recovery.restart(node.request, f"{node.key}: {msg.missing_reason}", now)
        for node in expected.values():  # the actor's answer left these out: run them again
            if not node.request.finished and node.state == RUNNING and node.actor_id == actor.actor_id:
                self.recovery.requeue(node, f"missing from {actor.actor_id}'s answer to batch {msg.batch_id}", now)
                ready_models.add(node.model)
        self.dispatcher.dispatch_all(ready_models, now)
        self.dispatcher.dispatch(actor.model, now)

    def _drop_stale(self, actor: ActorState, result: p.TaskResult) -> None:
        self.meters.counters["stale_results"] += 1
        if not result.tensors:  # kept in the actor's store: release it
            self.out.free(actor.identity, result.output_id)

    def batch_failed(self, identity: bytes, msg: p.BatchFailed, payload, now: float) -> None:
        answered = self._answered(identity, msg)
        if answered is None:
            return
        actor, entries = answered
        for node, attempt in entries:
            if node.request.finished or node.attempt != attempt or node.state != RUNNING:
                continue
            if msg.code == ErrorCode.INPUT_UNAVAILABLE.value:
                # The holder of an input vanished: recompute the request's lineage.
                self.recovery.restart(node.request, f"{node.key}: {msg.message}", now)
            elif len(entries) > 1:
                # Which task broke the batch is unknown (one bad input, or memory for the
                # whole batch): run each again on its own before failing anyone.
                node.solo = True
                self.recovery.requeue(node, f"batch {msg.batch_id} failed: {msg.code}: {msg.message}", now)
            else:
                # Alone, a model error is deterministic for these inputs: retrying would fail again.
                self.directory.fail(node.request, ErrorCode.TASK_ERROR,
                                    f"{node.key} failed on {actor.actor_id}: {msg.code}: {msg.message}", now)
        self.dispatcher.dispatch(actor.model, now)
