"""The broker's dispatch choices as pure functions: which actor, which task, how many rows.

Run in the broker process by `broker.core.dispatch.Dispatcher`, which applies them;
they read the nodes, actors and queue they are given and change nothing, so each rule
is tested alone (tests/test_dispatch_choosers.py). Each rule was shaped by a
benchmark (docs/architecture.md, "Dispatch rules"): affinity to the holder of the
head task's input unless another actor is idle; idle actors on a GPU nobody else
computes on first; a CFG branch away from its sibling's actor; LoRA adapter affinity
before the free-GPU rule, and an actor's own adapter set first within a bounded
bypass; long tasks only to idle actors; batches capped where batching stops paying.
"""

from __future__ import annotations

from collections.abc import Callable

from broker.core.state import DONE, RUNNING, ActorState, Node, ReadyQueue
from broker.protocol.tasks import TaskKind


def pick_actor(head: Node, candidates: list[ActorState], device_free: Callable[[ActorState], bool],
               affinity: str = "prefer", adapter_affinity: bool = True) -> ActorState:
    """Affinity first (the holder of the head task's input), then the least loaded.

    Affinity yields when the holder is busy and another actor is idle: moving the
    latent costs one fetch, waiting costs a whole batch (and new replicas would
    otherwise only ever get new requests). `device_free(actor)`: no other actor on its
    device has work in flight. `affinity="avoid"`: any actor but the holder (forces
    migration, to test the data plane)."""
    if head.kind == TaskKind.PIPELINE:  # a monolith that ran this workflow last has it loaded
        return max(candidates, key=lambda a: (a.last_workflow == head.request.workflow, a.credits))
    holders = {producer.actor_id for producer in head.inputs}
    taken = {s.actor_id for s in head.siblings if s.state in (RUNNING, DONE)}
    if taken:  # a parallel branch: another actor than its sibling's, when one is free
        candidates = [a for a in candidates if a.actor_id not in taken] or candidates
    if affinity == "avoid":
        others = [a for a in candidates if a.actor_id not in holders]
        candidates = others or candidates
    else:
        # Idle actors on a GPU nobody else is computing on, then idle ones, then any:
        # a task beside another actor's batch runs time-sliced, at a fraction of its speed.
        idle = [a for a in candidates if not a.in_flight]
        adapters = head.adapters
        if adapters and adapter_affinity:
            # Before the free-GPU preference: a switch costs a weight update, sharing the
            # GPU with an encoder's call a few milliseconds.
            idle = [a for a in idle if a.adapters == adapters] or idle
        pool = [a for a in idle if device_free(a)] or idle or candidates
        for actor in pool:
            if actor.actor_id in holders:
                return actor
        candidates = pool
    return max(candidates, key=lambda a: (not a.in_flight, device_free(a), a.credits, a.actor_id in holders))


def own_set_first(queue: ReadyQueue, head: Node, actor: ActorState, adapter_affinity: bool, bypass_s: float) -> Node:
    """The task `actor` should run: when the head would make it switch LoRA sets, the
    oldest ready task of the set it has applied instead, if that request is at most
    `bypass_s` younger than the head's (bounded unfairness). Under saturation an actor
    frees up alone, so which task it takes is what decides the switches."""
    if not adapter_affinity or not actor.adapters:
        return head
    wanted = head.adapters
    if wanted is None or wanted == actor.adapters:
        return head
    mine = queue.head_with(lambda key: key[2] == actor.adapters)
    if mine is not None and mine.request.submitted_at - head.request.submitted_at <= bypass_s:
        return mine
    return head


def one_batch_at_a_time(monolith: bool, head: Node | None, prefetch_below_s: float) -> bool:
    """Whether an actor with work in flight gets no second batch of this queue.

    A monolith runs one request at a time: the rest wait in the queue, where drop_late
    sees them. Long tasks too: a second batch queued at a busy actor would be a newer
    request's step, decided before the older request's next step existed; deciding at
    each completion lets requests run to completion in arrival order instead of all
    slowing down together. Short tasks keep a second batch queued, which hides the
    round trip."""
    return monolith or (head is not None and head.cost_s >= prefetch_below_s)


def batch_rows(monolith: bool, actor_rows: int, worth_rows: int | None) -> int:
    """No more rows than batching pays for (`worth_rows`, from the profile; None: no
    limit known) nor the actor takes; a monolith serves one request per call, as a
    pipeline behind a queue does."""
    return 1 if monolith else min(actor_rows, worth_rows or actor_rows)


def past_deadline(node: Node, now: float, hopeless: bool) -> bool:
    """Its request's deadline has passed, or (`hopeless`) the rest of its critical path
    can no longer finish by it."""
    deadline = node.request.deadline
    return deadline is not None and now + (node.tail_s if hopeless else 0.0) > deadline


def running_solo(actor) -> bool:
    """The actor runs a task suspected of killing its actor: nothing else goes to it."""
    return any(node.solo for batch in actor.in_flight.values() for node, _ in batch)
