"""The discrete-event simulator (`lego bench simulate`): whole clusters in virtual time.

It runs the real broker core (`broker.core.machine.BrokerCore`: admission, unrolling, ready
queues, batching, affinity, parallel CFG groups, drop_late, the admin path) and the
real scheduler (`scheduler.controller.SchedulerController`'s settle/apply logic
around `scheduler.plan.plan_round`) against simulated node agents, GPUs and actors
(`clients.bench.sim.cluster`) that speak the same protocol messages and take the time
the measured profiles give. Nothing is re-implemented: only sockets, processes and
the clock are replaced, so hundreds of GPUs and hours of trace take minutes.

- Clients: each `loadgen.Arrival` is a SUBMIT at its instant (no progress events);
  ACCEPTED/REJECTED/RESULT/FAILED become `loadgen.Outcome`s exactly as the open-loop
  runner makes them (latency from the scheduled instant; SLO from the broker's own
  workflow stats); a request not ended `timeout_s` after submission is cancelled and
  counted a timeout.
- Heartbeats: the broker's heartbeat interval is set beyond any run (no liveness
  expiry, no pings); actors send a heartbeat with their telemetry (busy time) every
  `heartbeat_interval_s` (the emulated cluster's 1 s), which is what the scheduler's
  busy ratios read.
- Telemetry: the scheduler plans on the newest snapshot the broker published, as the
  controller process does (`lego scheduler --telemetry`), not on the broker's state
  at the instant of its round: a snapshot every `telemetry_interval_s`, or
  `telemetry_min_gap_s` after a change (the broker server's rule, `BrokerConfig`);
  the core's tick (drained actors stopped) runs every `heartbeat_interval_s / 4`, as
  the server's loop runs it.
- Start-up: the broker gets the system's serving, drop, admission and CFG settings and
  its `broker_settings` (one AdminConfigure, as an operator would send); the system's
  initial placement joins at time 0, warm (loaded before the trace starts, as a
  benchmark waits for it). Later spawns (the scheduler's) go
  AdminSpawn -> SPAWN_ACTOR -> agent, and join after `process_start_s` plus the
  model's profile load time x `load_time_scale`; stops go AdminStop -> drain ->
  STOP_ACTOR -> DISCONNECT.
- Work: a GPU runs one batch at a time, first come first served, like the emulated
  backend's device lock (`device_model="shared"`: time-slicing instead); monoliths
  are spawned with max_batch_rows 1, so one takes one request at a time as a
  pipeline behind a per-GPU queue does. Data fetches cost the artifact's measured
  fetch times by size, or the emulated data plane's measured bandwidth.
- The runtime's own costs (`clients.bench.sim.timing.Overheads`, real seconds, not scaled
  by time_scale): per dispatched batch (the broker's hop, the actor's Python: the
  actor is busy, its GPU free), per task of a batch, per completed request (submit,
  the image back to the client). Defaults: `MEASURED`, from the emulated runtime.
- Broker and scheduler log calls are silenced while a simulation runs.

A Simulation runs once. `lego bench simulate` (`clients.bench.sim.bench`) runs every
system over traces or Poisson rates on any cluster size:

    outcomes, stats = simulate(system, poisson_arrivals(100, 600, PAPER_MIX, 1), gpus=256, hosts=32)
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import time
from collections.abc import Callable, Iterable, Sequence

from broker import protocol as p
from broker.catalog import Catalog, load_catalog
from broker.core.machine import BrokerCore, BrokerSettings
from broker.core.state import BACKEND
from broker.server import BrokerConfig
from clients.bench.loadgen import Arrival, Outcome, default_params, end_outcome, slo_from_stats
from clients.bench.sim.cluster import SimCluster
from clients.bench.sim.control import AdminLink, VirtualController, quiet_logs, scheduler_config
from clients.bench.sim.timing import MEASURED, Overheads, Timing
from clients.bench.systems import SystemSpec

CLIENT = b"sim-client"  # the frontend identity of every simulated client request
HEARTBEAT_OFF_S = 1e9  # the broker's heartbeat interval in a simulation: never expires, never pings
PROCESS_START_S = 2.0  # an actor process's start (interpreter, imports, device init) before its model loads


class Simulation:
    def __init__(self, system: SystemSpec, catalog: Catalog | None = None, *, gpus: int = 8, hosts: int = 1,
                 gpu_memory_gib: float = 80.0, time_scale: float = 1.0, load_time_scale: float | None = None,
                 process_start_s: float = PROCESS_START_S, max_batch_rows: int = 8, credits: int = 2,
                 timeout_s: float = 600.0, seed: int = 0, params_for: Callable[[Arrival], dict] = default_params,
                 workflows: Sequence[str] = (), device_model: str = "shared", drain_s: float = 0.0,
                 overheads: Overheads = MEASURED, heartbeat_interval_s: float = BrokerConfig.heartbeat_interval_s,
                 telemetry_interval_s: float = BrokerConfig.telemetry_interval_s,
                 telemetry_min_gap_s: float = BrokerConfig.telemetry_min_gap_s):
        self.system, self.catalog = system, catalog or load_catalog()
        self.overheads = overheads
        for name, value in (("heartbeat_interval_s", heartbeat_interval_s), ("telemetry_interval_s", telemetry_interval_s),
                            ("telemetry_min_gap_s", telemetry_min_gap_s)):
            if not value > 0:
                raise ValueError(f"{name}: expected seconds > 0, got {value!r}")
        self.heartbeat_interval_s = heartbeat_interval_s
        self.telemetry_interval_s, self.telemetry_min_gap_s = telemetry_interval_s, telemetry_min_gap_s
        self.published: p.Stats | None = None  # the newest telemetry snapshot the broker published
        self.published_at = float("-inf")
        self.gpus, self.time_scale, self.timeout_s = gpus, time_scale, timeout_s
        self.workflows, self.drain_s = list(workflows), drain_s
        self.process_start_s, self.max_batch_rows, self.credits, self.params_for = process_start_s, max_batch_rows, credits, params_for
        settings = BrokerSettings(heartbeat_interval_s=HEARTBEAT_OFF_S, heartbeat_misses=1, cost_scale=time_scale)
        self.core = BrokerCore(self.catalog, settings, broker_id="sim", seed=seed)
        self.costs = self.core.load.costs  # memoised (broker.costs.model): priced per node of every request
        self.timing = Timing(self.catalog, self.costs, time_scale, time_scale if load_time_scale is None else load_time_scale)
        self.now, self.events, self.loads = 0.0, 0, 0
        self.fetched_bytes = self.reused_bytes = 0  # moved between actors; conditioning held, not moved
        self.pids = itertools.count(1000)
        self.warm_start = False
        self.replies: list = []
        self._heap: list = []
        self._seq = itertools.count()
        self.cluster = SimCluster(self, gpus, hosts, int(gpu_memory_gib * 1024**3), device_model)
        self.controller: VirtualController | None = None
        self.pending: dict[str, Outcome] = {}
        self.timeline: list[tuple[float, dict]] = []

    # ------------------------------------------------------------------ plumbing

    def at(self, when: float, fn: Callable, *args) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), fn, args))

    def backend(self, identity: bytes, msg: p.Message, payload: list | None = None) -> None:
        self._route(self.core.on_backend(identity, msg, payload or [], self.now))

    def frontend(self, identity: bytes, msg: p.Message) -> None:
        self._route(self.core.on_frontend(identity, msg, [], self.now))

    def _route(self, sends) -> None:
        for send in sends:
            if send.socket == BACKEND:
                self.cluster.deliver(send.identity, send.msg)
            elif send.identity == CLIENT:
                self._client(send.msg)
            else:
                self.replies.append(send.msg)

    def _client(self, msg: p.Message) -> None:
        kind = type(msg)
        if kind is p.Accepted:
            outcome = self.pending.get(msg.request_id)
            if outcome is not None:
                outcome.accepted = True
            return
        if kind not in (p.Result, p.Rejected, p.Failed):
            return  # errors about requests that already ended (a cancel crossing its result)
        if kind is p.Result:  # the image on its way to the client: request_s later
            self.at(self.now + self.overheads.request_s, self._result, msg)
            return
        outcome = self.pending.pop(msg.request_id, None)
        if outcome is not None:
            end_outcome(outcome, self.now, "rejected" if kind is p.Rejected else "failed", msg.code, msg.message)

    def _result(self, msg: p.Result) -> None:
        outcome = self.pending.pop(msg.request_id, None)
        if outcome is not None:  # (a client timeout may have ended it meanwhile)
            outcome.server_latency_s = msg.latency_s
            end_outcome(outcome, self.now, "ok")

    # ------------------------------------------------------------------ phases

    def _setup(self) -> None:
        for agent in self.cluster.agents:
            agent.hello()
        s = self.system
        admin = AdminLink(self)
        admin.configure({"serving": s.serving, "drop_late": s.drop_late, "drop_hopeless": s.drop_hopeless,
                         "admission": s.admission, "cfg_split": s.cfg_split, **dict(s.broker_settings)})
        self.warm_start = True
        for model, device, backend in s.placement:
            gpu = int(device.split(":")[1])
            if gpu >= self.gpus:
                raise ValueError(f"system {s.name}: {model} placed on GPU {gpu} of a {self.gpus}-GPU cluster")
            host, local = self.cluster.rank(gpu)
            rows = 1 if backend == "monolith" else self.max_batch_rows  # a monolith: one request at a time
            admin.spawn(model, local, backend, host=host, max_batch_rows=rows)
        self._run_until(lambda: False)  # every start is due at time 0
        self.warm_start = False
        refused = [(agent.host, spawn, state) for agent in self.core.agents.values()
                   for spawn, state in agent.actors.items() if state != "started"]
        if refused or len(self.core.actors) != len(s.placement):
            raise ValueError(f"system {s.name}: its placement did not start: {refused}")
        if s.scheduler:
            config = scheduler_config(s.scheduler_args)
            if not config.workflows:  # as `lego up` passes --workflows: the ones this run serves
                config.workflows = self.workflows or sorted({a.workflow for a in self.arrivals})
            self.controller = VirtualController(config, admin, self.catalog, self.costs)
            self.controller.configure_broker()
            self.at(0.0, self._heartbeats)
            self.at(0.0, self._tick)
            self.at(0.0, self._publish)
            self.at(0.0, self._round, config.interval_s)

    def _heartbeats(self) -> None:
        for actor in self.cluster.actors():
            actor.heartbeat()
        self.at(self.now + self.heartbeat_interval_s, self._heartbeats)

    def _tick(self) -> None:
        self._route(self.core.on_tick(self.now))
        self.at(self.now + self.heartbeat_interval_s / 4, self._tick)

    def _publish(self) -> None:
        """The broker server's publisher (`broker.server.BrokerServer._publish`), looked at
        every telemetry_min_gap_s."""
        since = self.now - self.published_at
        changed = self.core.telemetry_changed and since >= self.telemetry_min_gap_s - 1e-9
        if changed or since >= self.telemetry_interval_s - 1e-9:
            self.core.telemetry_changed = False
            self.published_at, self.published = self.now, self.core.snapshot(self.now)
        self.at(self.now + self.telemetry_min_gap_s, self._publish)

    def _round(self, interval_s: float) -> None:
        """One scheduler round: the newest published snapshot -> plan -> act."""
        stats = self.published or self.core.snapshot(self.now)
        self.controller.step_at(stats, self.now)
        replicas = {m.model: m.actors for m in stats.models if m.actors}
        if not self.timeline or self.timeline[-1][1] != replicas:
            self.timeline.append((self.now, replicas))
        self.at(self.now + interval_s, self._round, interval_s)

    def _arrive(self, position: int) -> None:
        arrival = self.arrivals[position]
        request_id = f"r{position}"
        outcome = Outcome(arrival.index, arrival.workflow, request_id, arrival.at_s, self.now, self.now - arrival.at_s,
                          slo_s=self.slo.get(arrival.workflow))
        self.outcomes.append(outcome)
        self.pending[request_id] = outcome
        self.expiries.append((self.now + self.timeout_s, request_id))
        if len(self.expiries) == 1:
            self.at(self.now + self.timeout_s, self._expire)
        self.frontend(CLIENT, p.Submit(request_id, arrival.workflow, self.params[position], progress=False))
        if position + 1 < len(self.arrivals):
            self.at(self.arrivals[position + 1].at_s, self._arrive, position + 1)
        self.arrived = position + 1

    def _expire(self) -> None:
        while self.expiries and self.expiries[0][0] <= self.now:
            _, request_id = self.expiries.popleft()
            outcome = self.pending.pop(request_id, None)
            if outcome is not None:
                end_outcome(outcome, self.now, "timeout", "client_timeout", f"no answer within {self.timeout_s} s")
                self.frontend(CLIENT, p.Cancel(request_id))
        if self.expiries:
            self.at(self.expiries[0][0], self._expire)

    def _run_until(self, finished: Callable[[], bool]) -> None:
        heap = self._heap
        while heap and not finished():
            self.now, _, fn, args = heapq.heappop(heap)
            self.events += 1
            fn(*args)

    def run(self, arrivals: Iterable[Arrival]) -> tuple[list[Outcome], dict]:
        started = time.perf_counter()
        self.arrivals = sorted(arrivals, key=lambda a: (a.at_s, a.index))
        self.params = [dict(self.params_for(a)) for a in self.arrivals]
        self.outcomes: list[Outcome] = []
        self.expiries: collections.deque = collections.deque()
        self.arrived = 0
        with quiet_logs():
            self._setup()
            self.slo = slo_from_stats(self.core.snapshot(self.now).workflows)
            if self.arrivals:
                self.at(self.arrivals[0].at_s, self._arrive, 0)
            self._run_until(lambda: self.arrived == len(self.arrivals) and not self.pending)
            if self.drain_s > 0:  # the cluster after the load: the scheduler scaling back down
                end = self.now + self.drain_s
                self._run_until(lambda: self._heap[0][0] > end)
                self.now = max(self.now, end)
            stats = self._stats(time.perf_counter() - started)
        return self.outcomes, stats

    def _stats(self, wall_s: float) -> dict:
        snapshot = self.core.snapshot(self.now)
        peak: dict[str, int] = {}
        for _, replicas in self.timeline:
            for model, count in replicas.items():
                peak[model] = max(peak.get(model, 0), count)
        busy = sum(d.busy_s for d in self.cluster.devices())
        return {
            "system": self.system.name, "gpus": self.gpus, "hosts": len(self.cluster.agents),
            "time_scale": self.time_scale, "requests": len(self.arrivals), "wall_s": round(wall_s, 3),
            "sim_s": round(self.now, 3), "events": self.events,
            "window_s": self.arrivals[-1].at_s if self.arrivals else 0.0,
            "utilisation": round(busy / (self.gpus * self.now), 4) if self.now > 0 else 0.0,
            "counters": dict(snapshot.counters), "monolith_loads": self.loads,
            "fetched_bytes": self.fetched_bytes, "reused_bytes": self.reused_bytes,
            "workflows": {w.workflow: dataclasses.asdict(w) for w in snapshot.workflows if w.submitted},
            "replicas": {m.model: m.actors for m in snapshot.models if m.actors},
            "peak_replicas": peak, "timeline": self.timeline,
            "decisions": list(self.controller.decisions) if self.controller else [],
        }


def simulate(system: SystemSpec, arrivals: Iterable[Arrival], catalog: Catalog | None = None, gpus: int = 8,
             hosts: int = 1, time_scale: float = 1.0, **options) -> tuple[list[Outcome], dict]:
    """Run `arrivals` against `system` on a simulated cluster of `gpus` GPUs over `hosts`
    hosts: (one Outcome per arrival, in time order; a dict of run statistics).

    `options`: gpu_memory_gib (80), load_time_scale (= time_scale), process_start_s
    (PROCESS_START_S), max_batch_rows (8), credits (2), timeout_s (600), seed (0),
    params_for (loadgen.default_params), workflows (the scheduler's; default: those of the
    arrivals), device_model ("fifo": the emulated device lock; "shared": time-slicing),
    drain_s (go on this long after the last request ended: the scheduler scaling down),
    overheads (sim_timing.MEASURED; NO_OVERHEADS: the profiles' times alone),
    heartbeat_interval_s, telemetry_interval_s, telemetry_min_gap_s (the broker's)."""
    return Simulation(system, catalog, gpus=gpus, hosts=hosts, time_scale=time_scale, **options).run(arrivals)
