"""The one typed view of the cluster that every scheduling policy reads.

Pure data, built from the broker's telemetry message (`from_stats`) by the
scheduler controller, or directly by tests and the simulator. Times are seconds;
work is device-seconds from the profile cost model (`broker.costs.model`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker import protocol as p


@dataclass(frozen=True)
class ModelLoad:
    model: str
    queue_depth: int = 0  # ready tasks waiting for an actor
    ready_s: float = 0.0  # device-seconds of those ready tasks
    pending_s: float = 0.0  # device-seconds of every unfinished task of live requests
    arrival_rate: float = 0.0  # requests per second that need this model (recent)
    work_per_request_s: float = 0.0  # device-seconds one request needs of this model
    min_slack_s: float | None = None  # least time to deadline among requests queued here
    service_s: float = 0.0  # recent mean dispatch-to-done time of one task
    oldest_wait_s: float = 0.0  # the longest a ready task has waited in its queue
    # Share of its actors' busy time spent switching LoRA adapter sets (0 without LoRA):
    # work the profiles do not count, so demand is scaled up by it.
    switch_share: float = 0.0


@dataclass(frozen=True)
class ActorView:
    actor_id: str
    model: str
    host: str
    device: str
    in_flight: int = 0  # tasks running now
    held: int = 0  # outputs it holds for consumers
    draining: bool = False
    busy_ratio: float = 0.0  # recent share of time computing

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and not self.draining


@dataclass(frozen=True)
class DeviceView:
    host: str
    device: str
    kind: str  # cuda | emulated | cpu
    memory_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Snapshot:
    time: float
    models: dict[str, ModelLoad] = field(default_factory=dict)
    actors: tuple[ActorView, ...] = ()
    devices: tuple[DeviceView, ...] = ()

    def load(self, model: str) -> ModelLoad:
        return self.models.get(model) or ModelLoad(model)

    def actors_of(self, model: str) -> list[ActorView]:
        return [a for a in self.actors if a.model == model and not a.draining]

    def replicas(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for actor in self.actors:
            if not actor.draining:
                counts[actor.model] = counts.get(actor.model, 0) + 1
        return counts

    @property
    def accelerators(self) -> list[DeviceView]:
        return [d for d in self.devices if d.kind != "cpu"]


def switch_shares(actors: list) -> dict[str, float]:
    """Per model, of its actors' busy time (since they started), the share spent switching
    LoRA adapter sets, from their heartbeat telemetry (one pass over the actors)."""
    busy: dict[str, float] = {}
    switching: dict[str, float] = {}
    for actor in actors:
        if actor.telemetry is not None:
            busy[actor.model] = busy.get(actor.model, 0.0) + actor.telemetry.busy_s
            switching[actor.model] = switching.get(actor.model, 0.0) + actor.telemetry.adapter_switch_s
    return {m: min(switching[m] / b, 1.0) for m, b in busy.items() if b > 0}


def from_stats(stats: p.Stats, busy_ratios: dict[str, float] | None = None) -> Snapshot:
    """The broker's Stats message as a Snapshot; `busy_ratios` from the controller's
    own differencing of actor busy time between two polls."""
    busy_ratios = busy_ratios or {}
    shares = switch_shares(stats.actors)
    models = {
        m.model: ModelLoad(m.model, m.queue_depth, m.ready_s, m.pending_s, m.arrival_rate,
                           m.work_per_request_s, m.min_slack_s, m.service_s, m.oldest_wait_s,
                           shares.get(m.model, 0.0))
        for m in stats.models
    }
    actors = tuple(
        ActorView(a.actor_id, a.model, a.host, a.device, a.in_flight, a.held_tensors, a.state == "draining",
                  busy_ratios.get(a.actor_id, 0.0))
        for a in stats.actors
    )
    devices = tuple(
        DeviceView(agent.host, d.device, d.kind, d.memory_bytes, d.free_bytes)
        for agent in stats.agents for d in agent.devices
    )
    return Snapshot(stats.time, models, actors, devices)
