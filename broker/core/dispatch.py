"""Dispatch: ready tasks to actors with credit, in batches. Part of the broker's sans-IO core.

Runs in the broker process. `Dispatcher` applies the pure choices of
`broker.core.choosers` (which actor, which task, how many rows) to one model's ready
queue: it takes batches off the queue, fails the requests that drop_late gives up on,
and queues one TASKS message per batch (task specs carry references to their inputs'
holders, never tensor bytes; a client's image rides along unread). It owns only the
batch id sequence; the queues, actors and requests are the tables it is given.
"""

from __future__ import annotations

import itertools

from broker import protocol as p
from broker.catalog import PIPELINE_PREFIX
from broker.core import choosers
from broker.core.actors import ActorTable
from broker.core.directory import RequestDirectory
from broker.core.load import LoadTracker
from broker.core.metering import Meters
from broker.core.outbox import Outbox
from broker.core.settings import BrokerSettings
from broker.core.state import BACKEND, RUNNING, WAITING, ActorState, Node
from broker.protocol.errors import ErrorCode
from broker.protocol.tasks import TaskKind


class Dispatcher:
    def __init__(self, settings: BrokerSettings, actors: ActorTable, directory: RequestDirectory, load: LoadTracker,
                 meters: Meters, out: Outbox):
        self.settings = settings  # replaced by the core when an operator changes a live setting
        self.actors, self.directory, self.load, self.meters, self.out = actors, directory, load, meters, out
        self._batch_ids = itertools.count(1)

    def dispatch_all(self, models, now: float) -> None:
        # In name order: a set of names iterates in string-hash order, which differs per
        # process, and the first model dispatched may take the device another wanted; the
        # same state must dispatch the same way everywhere (the simulator reproduces runs).
        for model in sorted(models):
            self.dispatch(model, now)

    def dispatch(self, model: str, now: float) -> None:
        """Hand the model's ready tasks to its actors with credit, until either runs out."""
        queue = self.directory.queues.get(model)
        if queue is None or queue.depth <= 0:
            return
        s = self.settings
        if queue.order != s.queue_order:  # a queue made before the setting was read, or an operator's change
            queue.reorder(s.queue_order)
        monolith = model.startswith(PIPELINE_PREFIX)
        one_at_a_time = choosers.one_batch_at_a_time(monolith, queue.head(), s.prefetch_below_s * s.cost_scale)
        free = [a for a in self.actors.of_model(model)
                if a.credits > 0 and not a.draining and not (one_at_a_time and a.in_flight)
                and not choosers.running_solo(a)]
        while free:
            head = queue.head()
            if head is None:
                return
            # A task suspected of killing its actor runs on an actor with nothing else in
            # flight, and nothing joins it there: if it kills that one too, it alone is lost.
            candidates = [a for a in free if not a.in_flight] if head.solo else free
            if not candidates:
                return
            actor = choosers.pick_actor(head, candidates, self.actors.device_free, s.affinity, s.adapter_affinity)
            head = choosers.own_set_first(queue, head, actor, s.adapter_affinity, s.adapter_bypass_s * s.cost_scale)
            worth = self.load.batch_rows(model, head.kind, head.shape) if s.batch_by_profile else None
            batch = queue.take_batch(head, choosers.batch_rows(monolith, actor.max_batch_rows, worth))
            if s.drop_late:
                batch = self._drop_late(batch, now)
                if not batch:
                    continue
            self._send_batch(actor, batch, now)
            if actor.credits <= 0 or one_at_a_time or batch[0].solo:
                free.remove(actor)

    def _drop_late(self, batch: list[Node], now: float) -> list[Node]:
        """Fail the requests of nodes whose deadline has passed (or, with drop_hopeless,
        can no longer be met); the rest of the batch."""
        kept = []
        for node in batch:
            request = node.request
            if choosers.past_deadline(node, now, self.settings.drop_hopeless):
                if not request.finished:
                    node.state = WAITING  # already out of the queue
                    # it would finish no sooner than this: what admission's estimate missed by
                    self.load.request_done(request.workflow, now + node.tail_s - request.submitted_at,
                                           request.predicted_s, request.deadline - request.submitted_at)
                    self.directory.fail(request, ErrorCode.DEADLINE_EXCEEDED,
                                        f"{node.key} could start {now - request.deadline:+.3f} s from the deadline, "
                                        f"with {node.tail_s:.3f} s of its critical path left", now)
            else:
                kept.append(node)
        return kept

    def _send_batch(self, actor: ActorState, batch: list[Node], now: float) -> None:
        batch_id = next(self._batch_ids)
        specs, payload = [], []
        workflows = set()
        for node in batch:
            node.state = RUNNING
            node.actor_id = actor.actor_id
            node.dispatched_at = now
            node.output_id = f"{node.task_id}@{node.attempt}"
            workflows.add(node.request.workflow)
            actor.last_workflow = node.request.workflow
            inputs = []
            for producer in node.inputs:
                holder = self.actors.holder(producer.actor_id)
                inputs.append(p.TensorRef(producer.output_id, producer.actor_id, holder.data_address if holder else "",
                                          producer.nbytes, holder.host if holder else "",
                                          holder.device if holder else ""))
            client_tensors = []
            if node.kind in (TaskKind.ENCODE_IMAGE, TaskKind.CONTROL_IMAGE):  # the client's image rides along, unread
                wanted = node.params.request_tensors()  # control images name their inputs
                for desc in (d for d in node.request.tensors if d.name in wanted):
                    payload.append(node.request.frames[desc.frame])
                    client_tensors.append(p.TensorDesc(desc.name, desc.dtype, desc.shape, len(payload) - 1, desc.where, desc.nbytes))
            specs.append(p.TaskSpec(
                task_id=node.task_id, request_id=node.request.request_id, attempt=node.attempt,
                node=node.key, kind=node.kind, model=node.model, workflow=node.request.workflow,
                rows=node.rows, shape=list(node.shape), params=node.params, inputs=inputs,
                output_id=node.output_id, return_output=node.return_output, tensors=client_tensors,
            ))
        actor.credits -= 1
        adapters = batch[0].adapters  # one set per batch (batch_key)
        if adapters is not None and adapters != actor.adapters:
            actor.adapters = adapters  # the actor switches before it runs this batch
            actor.adapter_switches += 1
            self.meters.counters["adapter_switches"] += 1
        actor.in_flight[batch_id] = [(node, node.attempt) for node in batch]
        rows = sum(n.rows for n in batch)
        mixed = len(workflows) > 1
        actor.batches += 1
        actor.tasks += len(batch)
        actor.mixed_workflow_batches += mixed
        actor.max_batch_rows_seen = max(actor.max_batch_rows_seen, rows)
        stats = self.meters.model_batches.setdefault(actor.model, [0, 0, 0])
        stats[1] += 1
        stats[2] += mixed
        self.meters.counters["tasks_dispatched"] += len(batch)
        self.meters.batch_sent(actor.actor_id, batch)
        self.out.send(BACKEND, actor.identity, p.Tasks(batch_id, specs), payload)
