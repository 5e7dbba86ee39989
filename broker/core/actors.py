"""The broker core's actor table: every live actor and node agent, and its indexes.

Plain data with no IO, in the broker process. Owns the actors (model, host, device,
credits, liveness, what each runs and holds, its LoRA set, drain state) indexed by id,
by model (the dispatch loop's), by device and by connection identity, and the node
agents by identity. The other parts of the core read and change actors through it;
`changed` tells the telemetry publisher that an actor came, went or changed state.
"""

from __future__ import annotations

from broker.core.state import ActorState, AgentState


class ActorTable:
    def __init__(self) -> None:
        self.actors: dict[str, ActorState] = {}
        self.by_model: dict[str, list[ActorState]] = {}  # the dispatch loop's index
        self.by_device: dict[tuple[str, str], list[ActorState]] = {}  # (host, device) -> actors
        self.by_identity: dict[bytes, ActorState] = {}
        self.agents: dict[bytes, AgentState] = {}
        self.changed = False

    # ---------------------------------------------------------------- actors

    def join(self, actor: ActorState) -> None:
        self.actors[actor.actor_id] = actor
        self.by_model.setdefault(actor.model, []).append(actor)
        self.by_device.setdefault((actor.host, actor.device), []).append(actor)
        self.by_identity[actor.identity] = actor
        self.changed = True

    def remove(self, actor: ActorState) -> None:
        self.actors.pop(actor.actor_id, None)
        for index, key in ((self.by_model, actor.model), (self.by_device, (actor.host, actor.device))):
            peers = index.get(key, [])
            if actor in peers:
                peers.remove(actor)
        self.by_identity.pop(actor.identity, None)
        self.changed = True

    def of_model(self, model: str) -> list[ActorState]:
        return self.by_model.get(model, [])

    def replicas(self) -> dict[str, int]:
        """Actors taking new work, per model."""
        return {model: sum(not a.draining for a in actors) for model, actors in self.by_model.items()}

    def holder(self, actor_id: str) -> ActorState | None:
        return self.actors.get(actor_id)

    def device_free(self, actor: ActorState) -> bool:
        """No other actor on its device has work in flight."""
        return not any(other.in_flight for other in self.by_device.get((actor.host, actor.device), ())
                       if other is not actor)

    def device_count(self) -> int:
        """Devices work can spread over: the agents' accelerators, else the actors' devices."""
        accelerators = {(a.host, d.device) for a in self.agents.values() for d in a.devices if d.kind != "cpu"}
        return len(accelerators) or max(1, len({(a.host, a.device) for a in self.actors.values()}))

    # ---------------------------------------------------------------- peers of either kind

    def peer(self, identity: bytes) -> ActorState | AgentState | None:
        return self.by_identity.get(identity) or self.agents.get(identity)

    def agent_on(self, host: str) -> AgentState | None:
        return next((a for a in self.agents.values() if a.host == host), None)
