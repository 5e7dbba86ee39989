"""Dispatch: which ready tasks go to which actor, in what batch. Part of the broker's
sans-IO core (mixed into `broker.core.machine.BrokerCore`).

The rules, each shaped by a benchmark (docs/architecture.md, "Dispatch rules"): affinity
to the holder of the head task's input unless another actor is idle; idle actors on a
GPU nobody else computes on first; a CFG branch away from its sibling's actor; LoRA
adapter affinity before the free-GPU rule, and an actor's own adapter set first within
`adapter_bypass_s`; long tasks only to idle actors; batches capped where batching stops
paying (profile); requests past (or hopeless for) their deadline dropped.
"""

from __future__ import annotations

from broker import protocol as p
from broker.catalog import PIPELINE_PREFIX
from broker.core.state import BACKEND, DONE, RUNNING, WAITING, ActorState, Node
from broker.protocol.errors import ErrorCode


class DispatchMixin:
    def _pick_actor(self, head: Node, candidates: list[ActorState]) -> ActorState:
        """Affinity first (the holder of the head task's input), then the least loaded.

        Affinity yields when the holder is busy and another actor is idle: moving the
        latent costs one fetch, waiting costs a whole batch (and new replicas would
        otherwise only ever get new requests)."""
        if head.kind == "pipeline":  # a monolith that ran this workflow last has it loaded
            return max(candidates, key=lambda a: (a.last_workflow == head.request.workflow, a.credits))
        holders = {producer.actor_id for producer in head.inputs}
        taken = {s.actor_id for s in head.siblings if s.state in (RUNNING, DONE)}
        if taken:  # a parallel branch: another actor than its sibling's, when one is free
            candidates = [a for a in candidates if a.actor_id not in taken] or candidates
        if self.settings.affinity == "avoid":
            others = [a for a in candidates if a.actor_id not in holders]
            candidates = others or candidates
        else:
            # Idle actors on a GPU nobody else is computing on, then idle ones, then any:
            # a task beside another actor's batch runs time-sliced, at a fraction of its speed.
            idle = [a for a in candidates if not a.in_flight]
            adapters = head.adapters
            if adapters and self.settings.adapter_affinity:
                # Before the free-GPU preference: a switch costs a weight update, sharing the
                # GPU with an encoder's call a few milliseconds.
                idle = [a for a in idle if a.adapters == adapters] or idle
            pool = [a for a in idle if self._device_free(a)] or idle or candidates
            for actor in pool:
                if actor.actor_id in holders:
                    return actor
            candidates = pool
        return max(candidates, key=lambda a: (not a.in_flight, self._device_free(a), a.credits, a.actor_id in holders))

    def _own_set_first(self, queue, head: Node, actor: ActorState) -> Node:
        """The task `actor` should run: when the head would make it switch LoRA sets, the
        oldest ready task of the set it has applied instead, if that request is at most
        `adapter_bypass_s` younger than the head's (bounded unfairness). Under saturation
        an actor frees up alone, so which task it takes is what decides the switches."""
        if not self.settings.adapter_affinity or not actor.adapters:
            return head
        wanted = head.adapters
        if wanted is None or wanted == actor.adapters:
            return head
        mine = queue.head_with(lambda key: key[2] == actor.adapters)
        limit = self.settings.adapter_bypass_s * self.settings.cost_scale
        if mine is not None and mine.request.submitted_at - head.request.submitted_at <= limit:
            return mine
        return head

    def _device_free(self, actor: ActorState) -> bool:
        """No other actor on its device has work in flight."""
        return not any(other.in_flight for other in self.actors_by_device.get((actor.host, actor.device), ())
                       if other is not actor)

    def _dispatch(self, model: str, now: float) -> None:
        queue = self.queues.get(model)
        if queue is None or queue.depth <= 0:
            return
        # A monolith runs one request at a time: the rest wait here, where drop_late sees them.
        # One batch at a time for long tasks too: a second batch queued at a busy
        # actor would be a newer request's step, decided before the older request's next
        # step existed; deciding at each completion lets requests run to completion in
        # arrival order instead of all slowing down together. Short tasks keep a second
        # batch queued, which hides the round trip.
        head = queue.head()
        monolith = model.startswith(PIPELINE_PREFIX)
        one_at_a_time = monolith or (
            head is not None and head.cost_s >= self.settings.prefetch_below_s * self.settings.cost_scale)
        free = [a for a in self.actors_by_model.get(model, ())
                if a.credits > 0 and not a.draining and not (one_at_a_time and a.in_flight)]
        while free:
            head = queue.head()
            if head is None:
                return
            actor = self._pick_actor(head, free)
            head = self._own_set_first(queue, head, actor)
            # No more rows than batching pays for (the profile says), nor the actor takes;
            # a monolith serves one request per call, as a pipeline behind a queue does.
            worth = self.load.batch_rows(model, head.kind, head.shape) if self.settings.batch_by_profile else None
            batch = queue.take_batch(head, 1 if monolith else min(actor.max_batch_rows, worth or actor.max_batch_rows))
            if self.settings.drop_late:
                batch = self._drop_late(batch, now)
                if not batch:
                    continue
            self._send_batch(actor, batch, now)
            if actor.credits <= 0 or one_at_a_time:
                free.remove(actor)

    def _drop_late(self, batch: list[Node], now: float) -> list[Node]:
        """Fail the requests of nodes whose deadline has passed (or, with drop_hopeless,
        can no longer be met); the rest of the batch."""
        kept = []
        for node in batch:
            request = node.request
            finish = now + (node.tail_s if self.settings.drop_hopeless else 0.0)
            if request.deadline is not None and finish > request.deadline:
                if not request.finished:
                    node.state = WAITING  # already out of the queue
                    self._fail_request(request, ErrorCode.DEADLINE_EXCEEDED,
                                       f"{node.key} could start {now - request.deadline:+.3f} s from the deadline, "
                                       f"with {node.tail_s:.3f} s of its critical path left")
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
                holder = self.actors.get(producer.actor_id)
                inputs.append(p.TensorRef(producer.output_id, producer.actor_id, holder.data_address if holder else "",
                                          producer.nbytes, holder.host if holder else ""))
            client_tensors = []
            if node.kind in ("encode_image", "control_image"):  # the client's image rides along, unread
                wanted = node.params.get("tensors", ["image"])  # control images name their inputs
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
            self.counters["adapter_switches"] += 1
        actor.in_flight[batch_id] = [(node, node.attempt) for node in batch]
        rows = sum(n.rows for n in batch)
        mixed = len(workflows) > 1
        actor.batches += 1
        actor.tasks += len(batch)
        actor.mixed_workflow_batches += mixed
        actor.max_batch_rows_seen = max(actor.max_batch_rows_seen, rows)
        stats = self.model_batches.setdefault(actor.model, [0, 0, 0])
        stats[1] += 1
        stats[2] += mixed
        self.counters["tasks_dispatched"] += len(batch)
        self.meters.batch_sent(actor.actor_id, batch)
        self._send(BACKEND, actor.identity, p.Tasks(batch_id, specs), payload)
