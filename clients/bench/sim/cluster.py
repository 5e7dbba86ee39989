"""The simulated hardware of the discrete-event simulator: node agents, GPUs, actors.

Stands in for `actors/agent.py`, `actors/runtime.py` and the emulated backends
(`actors/backends/emulated.py`, `actors/backends/monolith.py`), in virtual time: it
speaks the same protocol messages to the broker core and times work the same way.

- An agent (one per host) reports N emulated GPUs of a given memory plus the CPU,
  accounts each spawned actor's profiled resident memory (a monolith: its largest
  hosted workflow; with a shared model cache, every hosted model once) as the real
  agent does, refuses what does not fit, and names actors `MODEL@HOST/DEVICE#SPAWN_ID`
  as the real agent does.
- An actor runs one batch at a time in arrival order (the runtime's compute thread):
  it first pays the runtime's per-batch overhead (the dispatch hop and its own
  Python, `Overheads.batch_s`) and fetches the inputs it does not hold
  (`Overheads.transfer_s`), then waits for its GPU, which is free meanwhile.
- A GPU time-slices the batches of the actors on it, each at 1/n speed, as processes
  sharing a real GPU do and as the emulated backend does by default
  (`actors/backends/emulated_gpu.py`); `device_model="fifo"` instead computes one
  batch at a time, first come first served (the emulated `device_sharing=fifo`):
  micro-serving batches take the profile's time for their
  mode, rows and resolution x `time_scale` (a split step's combine task costs 0; it
  still takes its turn on the device); a monolith takes the workflow's whole
  `CostModel.request(...).work_s` per request x `time_scale`, plus the load time of
  the workflow's models (profile load_s x `load_time_scale`) when it is not resident
  (least recently used workflows are evicted beyond the GPU's memory). A system with
  `model_cache="model"` (pooled) holds one copy of every hosted model instead, all
  loaded at its start and accounted so by its agent, and never loads while serving
  (the emulated monolith backend has no such cache yet: it holds a copy per workflow).
- Outputs stay "held" (TaskResult with nbytes of the emulated tensor sizes); a
  returned output (a request's result) carries no tensors.
- A spawned actor says hello after `process_start_s` plus its load time; a stopped
  one says DISCONNECT at once and its agent reports it exited.

Data transfers cost the artifact's measured fetch times or the emulated data plane's
measured bandwidth (`clients.bench.sim.timing.Overheads`).
"""

from __future__ import annotations

import collections
import itertools
from typing import TYPE_CHECKING

from actors.request_constants import RequestConstants
from actors.store import VirtualTensor
from broker import protocol as p
from broker.catalog import PIPELINE_PREFIX, Catalog
from broker.protocol.tasks import KINDS_WITHOUT_CONSTANTS, TaskKind
from clients.bench.sim.timing import CPU_BYTES

if TYPE_CHECKING:  # the simulator imports this module
    from clients.bench.sim.simulator import Simulation


def hosted_models(catalog: Catalog, pipeline: str) -> list[str]:
    """Every model of the workflows a `pipeline/...` model hosts, once each."""
    return list(dict.fromkeys(m for w in catalog.model(pipeline).workflows for m in w.models))


class SimDevice:
    """One emulated GPU. "fifo": one batch computes at a time, first come first served
    (the emulated backend's device lock); "shared": the batches of the actors on it
    compute together, each at 1/n of the speed (processor sharing, as a GPU time-slices
    between processes)."""

    __slots__ = ("sim", "host", "name", "memory_bytes", "free_bytes", "shared", "waiting", "running", "busy_s",
                 "active", "last", "version")

    def __init__(self, sim: Simulation, host: str, name: str, memory_bytes: int, model: str = "fifo"):
        if model not in ("fifo", "shared"):
            raise ValueError(f"device_model: expected 'fifo' or 'shared', got {model!r}")
        self.sim, self.host, self.name = sim, host, name
        self.memory_bytes = self.free_bytes = memory_bytes
        self.shared = model == "shared"
        self.waiting: collections.deque = collections.deque()
        self.running = None
        self.busy_s = 0.0
        self.active: list[list] = []  # shared: [remaining device-seconds, actor, batch]
        self.last, self.version = 0.0, 0

    def submit(self, actor: SimActor, batch: p.Tasks) -> None:
        if self.shared:
            self._advance()
            seconds = actor.compute_s(batch)
            self.busy_s += seconds
            self.active.append([seconds, actor, batch])
            self._reschedule()
            return
        self.waiting.append((actor, batch))
        if self.running is None:
            self._start()

    def _start(self) -> None:
        actor, batch = self.running = self.waiting.popleft()
        seconds = actor.compute_s(batch)
        self.busy_s += seconds
        self.sim.at(self.sim.now + seconds, self._done)

    def _done(self) -> None:
        actor, batch = self.running
        self.running = None
        if self.waiting:  # the next in line gets the device before the finisher's next batch
            self._start()
        actor.finish(batch)

    def _advance(self) -> None:
        if self.active:
            step = (self.sim.now - self.last) / len(self.active)
            for entry in self.active:
                entry[0] -= step
        self.last = self.sim.now

    def _reschedule(self) -> None:
        self.version += 1
        if self.active:
            first = min(entry[0] for entry in self.active)
            self.sim.at(self.sim.now + max(0.0, first) * len(self.active), self._shared_done, self.version)

    def _shared_done(self, version: int) -> None:
        if version != self.version:
            return  # the set of batches changed since: a later event is due
        self._advance()
        done = [entry for entry in self.active if entry[0] <= 1e-9]
        self.active = [entry for entry in self.active if entry[0] > 1e-9]
        self._reschedule()
        for _, actor, batch in done:
            actor.finish(batch)

    def info(self) -> p.DeviceInfo:
        return p.DeviceInfo(self.name, "emulated", "emulated GPU", self.memory_bytes, self.free_bytes)


class SimActor:
    """One actor process: pulls batches, fetches inputs, computes on its device."""

    def __init__(self, sim: Simulation, agent: SimAgent, spawn_id: str, msg: p.SpawnActor, device: SimDevice, need: int):
        self.sim, self.agent, self.spawn_id, self.device, self.need = sim, agent, spawn_id, device, need
        self.model, self.backend, self.max_batch_rows = msg.model, msg.backend, msg.max_batch_rows
        self.host = agent.host
        self.actor_id = f"{msg.model}@{agent.host}/{device.name}#{spawn_id}"
        self.identity = self.actor_id.encode()
        self.pid = next(sim.pids)
        self.queue: collections.deque = collections.deque()
        self.busy = False
        self.alive = False
        self.started_at = 0.0
        self.telemetry = p.ActorTelemetry()
        self.monolith = msg.model.startswith(PIPELINE_PREFIX)
        # The requests whose conditioning this actor holds, kept as the runtime keeps them
        self.constants = RequestConstants(clock=lambda: sim.now)
        self.resident: collections.OrderedDict[str, int] = collections.OrderedDict()  # monolith: workflow -> bytes
        if self.monolith:
            self.workflows = [w.name for w in sim.catalog.model(msg.model).workflows]
            self.shared_models = sim.system.model_cache == "model"  # pooled: every model resident once, from the start

    # ------------------------------------------------------------------ life cycle

    def startup_s(self) -> float:
        timing = self.sim.timing
        if self.monolith and self.shared_models:  # every hosted model, one copy each
            self.resident.update((w, timing.footprint(w)) for w in self.workflows)
            self.sim.loads += 1
            return timing.load_s(hosted_models(self.sim.catalog, self.model))
        if self.monolith:  # the backend's load(): its first workflow becomes resident
            return self._make_resident(self.workflows[0])
        return timing.load_s([self.model])

    def hello(self) -> None:
        self.alive = True
        msg = p.ActorHello(self.actor_id, self.model, self.device.name, self.host, self.pid, self.backend,
                           self.max_batch_rows, f"sim://{self.actor_id}", self.sim.credits, ["raw"], self.need)
        self.sim.backend(self.identity, msg)

    def leave(self, reason: str) -> None:
        if self.alive:
            self.alive = False
            self.queue.clear()
            self.sim.backend(self.identity, p.Disconnect(reason))

    def heartbeat(self) -> None:
        if self.alive:
            self.sim.backend(self.identity, p.Heartbeat(self.sim.now, self.telemetry, self.actor_id, ""))

    # ------------------------------------------------------------------ work

    def receive(self, batch: p.Tasks) -> None:
        if not self.alive:
            return
        self.queue.append(batch)
        if not self.busy:
            self._next()

    def _next(self) -> None:
        if not self.queue:
            return
        batch = self.queue.popleft()
        self.busy, self.started_at = True, self.sim.now
        overheads = self.sim.overheads
        seconds, seen = overheads.batch_s(len(batch.tasks)), set()  # the hop and the actor's Python: GPU free
        for task in batch.tasks:
            for ref in task.inputs:
                if ref.holder != self.actor_id and ref.tensor_id not in seen:
                    seen.add(ref.tensor_id)
                    moved = self._fetched_bytes(task, ref)
                    path = "network" if ref.host != self.host else "device" if ref.device == self.device.name else "host"
                    seconds += overheads.transfer_s(moved, ref.host == self.host, path)
                    self.sim.fetched_bytes += moved
                    self.sim.reused_bytes += ref.nbytes - moved
            self._hold_constants(task)
        if seconds > 0:
            self.sim.at(self.sim.now + seconds, self.device.submit, self, batch)
        else:
            self.device.submit(self, batch)

    def _fetched_bytes(self, task: p.TaskSpec, ref: p.TensorRef) -> int:
        """What the runtime moves for `ref`: a denoise step's bundle without its
        conditioning when this actor holds the request's already or the task reads none
        (the VAE), as actors/fetcher.py does."""
        if "/denoise/" not in ref.tensor_id:  # a step's bundle: ".../denoise/K@attempt"
            return ref.nbytes
        if task.kind in KINDS_WITHOUT_CONSTANTS or self.constants.held(task.request_id):
            return max(0, ref.nbytes - self.sim.timing.constant_bytes(task.workflow))
        return ref.nbytes

    def _hold_constants(self, task: p.TaskSpec) -> None:
        """Steps (and the nets beside them) leave this actor holding the request's conditioning."""
        if task.kind in (TaskKind.DENOISE, TaskKind.DENOISE_BRANCH, TaskKind.CONTROL):
            size = self.sim.timing.constant_bytes(task.workflow)
            self.constants.keep(task.request_id, {"cond/all": VirtualTensor("uint8", (size,), b"")})

    def compute_s(self, batch: p.Tasks) -> float:
        if not self.monolith:
            return self.sim.timing.batch_s(self.model, batch.tasks)
        seconds = 0.0
        for task in batch.tasks:  # one request after another, each with its workflow resident
            seconds += self._make_resident(task.workflow) + self.sim.timing.request_s(task.workflow, task.params.request)
        return seconds

    def _make_resident(self, workflow: str) -> float:
        """Load seconds of `workflow` (0 when resident); evicts the least recently used."""
        if workflow in self.resident:
            self.resident.move_to_end(workflow)
            return 0.0
        timing = self.sim.timing
        need = timing.footprint(workflow)
        while self.resident and sum(self.resident.values()) + need > self.device.memory_bytes:
            self.resident.popitem(last=False)
        self.resident[workflow] = need
        self.sim.loads += 1
        return timing.load_s(self.sim.catalog.workflows[workflow].models)

    def finish(self, batch: p.Tasks) -> None:
        t = self.telemetry
        t.batches += 1
        t.tasks += len(batch.tasks)
        t.rows += sum(task.rows for task in batch.tasks)
        t.busy_s += self.sim.now - self.started_at
        if self.alive:
            results = [p.TaskResult(task.task_id, task.attempt, task.output_id, self.sim.timing.nbytes(task))
                       for task in batch.tasks]
            self.sim.backend(self.identity, p.BatchDone(batch.batch_id, results, self.sim.now - self.started_at, 1))
        self.busy = False
        if self.alive:
            self._next()


class SimAgent:
    """The node agent of one host: spawns and stops simulated actors."""

    def __init__(self, sim: Simulation, host: str, gpus: int, gpu_memory_bytes: int, device_model: str = "shared"):
        self.sim, self.host = sim, host
        self.agent_id = f"agent@{host}"
        self.identity = self.agent_id.encode()
        self.devices = {f"emu:{i}": SimDevice(sim, host, f"emu:{i}", gpu_memory_bytes, device_model) for i in range(gpus)}
        self.actors: dict[str, SimActor] = {}

    def device_infos(self) -> list[p.DeviceInfo]:
        cpu = p.DeviceInfo("cpu", "cpu", "simulated host", CPU_BYTES, CPU_BYTES)
        return [d.info() for d in self.devices.values()] + [cpu]

    def hello(self) -> None:
        self.sim.backend(self.identity, p.AgentHello(self.agent_id, self.host, next(self.sim.pids), self.device_infos()))

    def _event(self, spawn_id: str, event: str, actor: SimActor | None = None, message: str = "") -> None:
        self.sim.backend(self.identity, p.AgentEvent(spawn_id, event, actor.actor_id if actor else "",
                                                     actor.pid if actor else 0, 0 if event == "exited" else None,
                                                     message, self.device_infos()))

    def _memory_needed(self, msg: p.SpawnActor) -> int:
        spec = self.sim.catalog.model(msg.model)
        if msg.backend == "monolith" and self.sim.system.model_cache == "model":
            return sum(self.sim.costs.resident_bytes(m) for m in hosted_models(self.sim.catalog, msg.model))
        if msg.backend == "monolith":
            return max(self.sim.timing.footprint(w.name) for w in spec.workflows)
        return self.sim.costs.resident_bytes(msg.model)

    def spawn(self, msg: p.SpawnActor) -> None:
        device = self.devices.get(msg.device)
        spec = self.sim.catalog.model(msg.model)
        if device is None:
            return self._event(msg.spawn_id, "refused", message=f"device: no device {msg.device!r} on {self.host}")
        if spec is None:
            return self._event(msg.spawn_id, "refused", message=f"model: unknown model {msg.model!r}")
        monolith = msg.model.startswith(PIPELINE_PREFIX)
        if (msg.backend == "monolith") != monolith or msg.backend not in ("emulated", "monolith"):
            return self._event(msg.spawn_id, "refused", message=f"backend: {msg.backend!r} cannot serve {msg.model!r}")
        models = [m for w in spec.workflows for m in w.models] if monolith else [msg.model]
        if any(self.sim.costs.profile(m) is None for m in models):
            return self._event(msg.spawn_id, "refused", message=f"options: {msg.model} has a model without a profile")
        need = self._memory_needed(msg)
        if need > device.free_bytes:
            return self._event(msg.spawn_id, "refused",
                               message=f"device: {msg.device} has {device.free_bytes} bytes free, {msg.model} needs {need}")
        device.free_bytes -= need
        actor = SimActor(self.sim, self, msg.spawn_id, msg, device, need)
        self.actors[actor.actor_id] = actor
        self.sim.cluster.by_actor[actor.identity] = actor
        self._event(msg.spawn_id, "started", actor)
        delay = 0.0 if self.sim.warm_start else self.sim.process_start_s
        self.sim.at(self.sim.now + delay + actor.startup_s(), actor.hello)

    def stop(self, actor_id: str) -> None:
        actor = self.actors.pop(actor_id, None)
        if actor is None:
            return
        self.sim.cluster.by_actor.pop(actor.identity, None)
        actor.leave("actor shutting down")
        actor.device.free_bytes += actor.need
        self._event(actor.spawn_id, "exited", actor)


class SimCluster:
    """Every host's agent; routes the broker's backend messages to agents and actors."""

    def __init__(self, sim: Simulation, gpus: int, hosts: int, gpu_memory_bytes: int, device_model: str = "shared"):
        if gpus < 1 or hosts < 1 or hosts > gpus:
            raise ValueError(f"gpus ({gpus}) must be >= hosts ({hosts}) >= 1")
        per_host = -(-gpus // hosts)
        self.per_host = per_host
        self.agents: list[SimAgent] = []
        for h in range(hosts):
            count = min(per_host, gpus - h * per_host)
            if count > 0:
                self.agents.append(SimAgent(sim, f"host-{h}", count, gpu_memory_bytes, device_model))
        self.by_identity = {a.identity: a for a in self.agents}
        self.by_actor: dict[bytes, SimActor] = {}  # actors started and not yet stopped

    def rank(self, gpu: int) -> tuple[str, str]:
        """(host, device) of the cluster-wide GPU number `gpu`."""
        return f"host-{gpu // self.per_host}", f"emu:{gpu % self.per_host}"

    def actors(self) -> list[SimActor]:
        return list(self.by_actor.values())

    def devices(self):
        return itertools.chain.from_iterable(a.devices.values() for a in self.agents)

    def deliver(self, identity: bytes, msg: p.Message) -> None:
        kind = type(msg)
        if kind is p.Tasks:
            self.actor(identity).receive(msg)
        elif kind is p.SpawnActor:
            self.by_identity[identity].spawn(msg)
        elif kind is p.StopActor:
            agent = self.by_identity[identity]
            if msg.actor_id in agent.actors:
                agent.sim.at(agent.sim.now, agent.stop, msg.actor_id)
        elif kind is p.Disconnect:
            actor = self.actor(identity, missing_ok=True)
            if actor is not None and actor.alive:  # declared dead by the broker: it stops
                actor.agent.sim.at(actor.agent.sim.now, actor.agent.stop, actor.actor_id)
        elif kind is p.Error:
            raise RuntimeError(f"the broker answered {identity!r} with an error: {msg.code}: {msg.message}")
        # Welcome, Heartbeat (pongs) and Free need no answer here

    def actor(self, identity: bytes, missing_ok: bool = False) -> SimActor | None:
        actor = self.by_actor.get(identity)
        if actor is None and not missing_ok:
            raise RuntimeError(f"the broker sent work to {identity!r}, which is not running")
        return actor
