"""The broker core's in-memory state: nodes, requests, actors, ready queues.

Plain data with no IO, in the broker process; the core's parts (`broker.core.machine`
lists them) mutate it in response to events.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from broker.catalog import task_adapters
from broker.protocol.tasks import TaskKind

WAITING, READY, RUNNING, DONE = "waiting", "ready", "running", "done"
FRONTEND, BACKEND = "frontend", "backend"  # the broker's two sockets, as named in Send
QUEUE_ORDERS = ("fcfs", "deadline")  # how a ready queue orders requests (ReadyQueue)


class Node:
    """One node of one request's DAG, live in the broker."""

    __slots__ = (
        "request", "key", "kind", "model", "rows", "shape", "params", "step", "path_len",
        "return_output", "inputs", "consumers", "state", "attempt", "deps_left", "refs_left",
        "actor_id", "output_id", "nbytes", "dispatched_at", "queue_token", "seq", "task_id", "losses", "solo", "siblings",
        "cost_s", "min_cost_s", "share_s", "tail_s", "ready_at", "adapters", "batch_key",
    )

    def __init__(self, request: Request, plan, seq: int):
        self.request = request
        self.key = plan.key
        self.kind = plan.kind
        self.model = plan.model
        self.rows = plan.rows
        self.shape = plan.shape
        self.params = plan.params
        self.step = plan.step
        self.path_len = plan.path_len
        self.return_output = plan.return_output
        self.inputs: list[Node] = []
        self.consumers: list[Node] = []
        self.state = WAITING
        self.attempt = 0  # bumped on every re-dispatch; results of older attempts are stale
        self.losses = 0  # times this node was lost with a dead actor
        self.solo = False  # run alone: it was in a batch that failed as a whole, or whose actor died
        self.siblings: list[Node] = []  # the other nodes of its group (parallel CFG branches)
        self.deps_left = 0
        self.refs_left = 0
        self.actor_id = ""  # running on, then holding the output
        self.output_id = ""
        self.nbytes = 0
        self.dispatched_at = 0.0
        self.queue_token = 0
        self.seq = seq
        self.task_id = f"{request.request_id}/{plan.key}"
        self.cost_s = 0.0  # device-seconds alone, from the profile (0: unknown)
        self.min_cost_s = 0.0  # its share of a full batch: the least it can cost
        self.share_s = 0.0  # its actor's time when batched as the dispatcher would (LoadTracker.actor_share_s)
        self.tail_s = 0.0  # profile time of the longest path from it to the output, itself included
        self.ready_at = 0.0  # when it last became ready (its queue wait starts there)
        # The LoRA set its model call runs with (None: no adapted call), fixed with its params.
        self.adapters = task_adapters(self.kind, self.params)
        # Tasks batch together only when this matches (model is implied by the queue; a
        # monolith serving several workflows never mixes them in one call; only tasks with
        # the same LoRA adapters and weights share a model call).
        last = request.workflow if self.kind == TaskKind.PIPELINE else self.adapters
        # The kind's plain string rather than the enum member: a tuple of plain strings and
        # numbers drops out of the cyclic GC's tracking, and a broker holds one per node.
        self.batch_key = (self.kind.value, self.shape, last)


@dataclass(eq=False)
class Request:
    request_id: str
    client: bytes
    workflow: str
    params: dict
    seq: int
    submitted_at: float
    progress: bool
    nodes: dict[str, Node] = field(default_factory=dict)
    done_nodes: int = 0
    restarts: int = 0
    forgiven: int = 0  # restarts that were a suspected poison's doing: not counted against the limit
    finished: bool = False
    total_steps: int = 0  # denoise nodes, for progress
    # Tensors the client sent (an img2img image): kept, unread, until the request ends,
    # since a restart needs them again.
    tensors: list = field(default_factory=list)
    frames: list = field(default_factory=list)
    deadline: float | None = None  # submitted_at + its SLO, where one is known
    min_cost_s: float = 0.0  # full-batch device-seconds of all its nodes
    latency_mode: bool = False  # its CFG branches run as a parallel group
    # Lookahead admission: the latency it predicted for this request (before its learned
    # margin; None: not predicted), and its nodes left to run, in DAG order, while
    # `left_key` (done nodes, restarts) holds.
    predicted_s: float | None = None
    left_key: tuple = ()
    left: list = field(default_factory=list)

    def ops_left(self, now: float) -> list[tuple[str, float, float, tuple[int, ...]]]:
        """Its work left as lookahead admission reads it (`broker.core.rules.Op`): per node
        not done, in DAG order, its model, seconds alone and of its actor's time (a running
        node: what is left of them), and which of these ops it needs."""
        key = (self.done_nodes, self.restarts)
        if key != self.left_key:
            self.left_key = key
            left = [n for n in self.nodes.values() if n.state != DONE]
            index = {id(n): i for i, n in enumerate(left)}
            self.left = [(n, tuple(index[id(i)] for i in n.inputs if id(i) in index)) for n in left]
        ops = []
        for node, needs in self.left:
            if node.state == DONE:  # done since the key was taken: a node of the same batch
                ops.append((node.model, 0.0, 0.0, needs))
            elif node.state == RUNNING:
                done = min(max(0.0, now - node.dispatched_at), node.cost_s)
                ops.append((node.model, node.cost_s - done, max(0.0, node.share_s - done), needs))
            else:
                ops.append((node.model, node.cost_s, node.share_s, needs))
        return ops


@dataclass(eq=False)
class ActorState:
    actor_id: str
    identity: bytes
    model: str
    host: str
    device: str
    backend: str
    data_address: str
    max_batch_rows: int
    credits: int
    last_seen: float
    pid: int = 0
    in_flight: dict[int, list[tuple[Node, int]]] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)  # output ids of DONE nodes still referenced
    batches: int = 0
    tasks: int = 0
    mixed_workflow_batches: int = 0
    max_batch_rows_seen: int = 0
    telemetry: object = None
    adapters: tuple = ()  # the LoRA set its last adapted batch ran with: applied there now
    adapter_switches: int = 0
    last_workflow: str = ""  # of its last task (a multi-workflow monolith has it loaded)
    draining: bool = False  # no new work (an operator's drain, or on its way out)
    stopping: bool = False  # draining to stop: its agent stops it once it holds nothing
    stop_sent: bool = False


@dataclass(eq=False)
class AgentState:
    agent_id: str
    identity: bytes
    host: str
    devices: list
    last_seen: float
    last_sent: float = 0.0
    actors: dict[str, str] = field(default_factory=dict)  # spawn_id -> state


class ReadyQueue:
    """One model's ready tasks: by request, then farthest-from-output first.

    Requests go first come first served (`order="fcfs"`) or earliest SLO deadline first
    (`"deadline"`, a request without one last): with a per-workflow SLO the two differ
    across workflows. Tasks are kept in one heap per batch key so that a batch can be
    filled from compatible tasks only. Entries are invalidated lazily: an entry is live
    while its node is READY and carries the token it was queued with.
    """

    def __init__(self, order: str = "fcfs") -> None:
        if order not in QUEUE_ORDERS:
            raise ValueError(f"queue_order: expected one of {QUEUE_ORDERS}, got {order!r}")
        self.order = order
        self.heaps: dict[tuple, list] = {}
        self.depth = 0
        self._counter = itertools.count()

    def _rank(self, node: Node) -> float:
        if self.order == "deadline":
            deadline = node.request.deadline
            return math.inf if deadline is None else deadline
        return 0.0  # fcfs: the request's arrival (seq, next in the entry) decides

    def push(self, node: Node) -> None:
        node.queue_token = next(self._counter)
        entry = (self._rank(node), node.request.seq, -node.path_len, node.seq, node.queue_token, node)
        heapq.heappush(self.heaps.setdefault(node.batch_key, []), entry)
        self.depth += 1

    def reorder(self, order: str) -> None:
        """Queue by `order` from now on, the tasks waiting included (a live change of the
        setting, or a queue made before its dispatcher read it)."""
        if order not in QUEUE_ORDERS:
            raise ValueError(f"queue_order: expected one of {QUEUE_ORDERS}, got {order!r}")
        if order == self.order:
            return
        self.order = order
        for heap in self.heaps.values():
            heap[:] = [(self._rank(entry[-1]), *entry[1:]) for entry in heap]
            heapq.heapify(heap)

    @staticmethod
    def _live(entry) -> bool:
        node = entry[-1]
        return node.state == READY and node.queue_token == entry[-2]

    def _clean(self, key: tuple) -> list:
        heap = self.heaps[key]
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        if not heap:
            del self.heaps[key]
        return heap

    def head(self) -> Node | None:
        best = None
        for key in list(self.heaps):
            heap = self._clean(key)
            if heap and (best is None or heap[0] < best):
                best = heap[0]
        return best[-1] if best else None

    def head_with(self, wanted) -> Node | None:
        """The first live task among the heaps whose batch key `wanted` accepts."""
        best = None
        for key in [k for k in self.heaps if wanted(k)]:
            heap = self._clean(key)
            if heap and (best is None or heap[0] < best):
                best = heap[0]
        return best[-1] if best else None

    def take_batch(self, first: Node, max_rows: int) -> list[Node]:
        """`first` (the head) plus compatible tasks in queue order, up to `max_rows` rows."""
        heap = self._clean(first.batch_key)
        batch, rows = [], 0
        while heap:
            node = heap[0][-1]
            if batch and (rows + node.rows > max_rows or node.solo or batch[0].solo
                          or any(sibling in batch for sibling in node.siblings)):
                break  # siblings are meant for different actors
            heapq.heappop(heap)
            batch.append(node)
            rows += node.rows
            self.depth -= 1
            node.state = RUNNING  # leaves the queue; the caller fills in the rest
            while heap and not self._live(heap[0]):
                heapq.heappop(heap)
        if not heap:
            self.heaps.pop(first.batch_key, None)
        return batch

    def discard(self, node: Node) -> None:
        """A queued node left READY for another reason (cancel, restart)."""
        self.depth -= 1


class LatencyWindow:
    """The most recent samples of one latency, for p50/p99 in telemetry."""

    def __init__(self, size: int) -> None:
        self.samples: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self.samples.append(value)

    def summary(self) -> dict:
        if not self.samples:
            return {"count": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
        ordered = sorted(self.samples)
        n = len(ordered)
        return {
            "count": n,
            "p50": ordered[(n - 1) // 2],
            "p99": ordered[min(n - 1, int(0.99 * (n - 1) + 0.5))],
            "max": ordered[-1],
        }
