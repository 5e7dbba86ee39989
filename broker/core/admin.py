"""Node agents and the admin commands: part of the broker's sans-IO core.

Mixed into `broker.core.machine.BrokerCore`. Admin commands come from the frontend (the CLI,
the gateway's console, the scheduler controller) and are answered with ADMIN_REPLY
under the caller's call_id (a refusal names the offending field): spawn actors
through a node agent, drain-and-stop an actor, drain or undrain one (it stays alive),
set a model's replica bounds for the scheduler, pause or resume a workflow's
admission, set the live policy knobs and post the scheduler's plan.
"""

from __future__ import annotations

import dataclasses

import structlog

from broker import protocol as p
from broker.core.state import BACKEND, FRONTEND, ActorState

log = structlog.get_logger("broker.core.machine")

MAX_REPLICAS = 4096
CONFIGURABLE = {"admission": bool, "admission_bound": str, "slo_multiple": (int, float), "cfg_split": str, "serving": str, "drop_late": bool,
                "drop_hopeless": bool, "adapter_affinity": bool, "adapter_bypass_s": (int, float),
                "admission_overhead_s": (int, float)}


class AdminMixin:
    def _reply(self, identity: bytes, call_id: str, message: str, field: str | None = None) -> None:
        """Answer an admin call: a refusal when `field` names what was wrong."""
        self._send(FRONTEND, identity, p.AdminReply(field is None, message, call_id=call_id, field=field))

    def _agent_event(self, identity: bytes, msg: p.AgentEvent, payload, now: float) -> None:
        agent = self.agents.get(identity)
        if agent is None:
            self._send(BACKEND, identity, p.Disconnect(reason="unknown agent: send AGENT_HELLO again"))
            return
        agent.actors[msg.spawn_id] = msg.event
        if msg.devices:
            agent.devices = list(msg.devices)
        log.info("agent_event", agent_id=agent.agent_id, spawn_id=msg.spawn_id, event_name=msg.event,
                 actor_id=msg.actor_id, returncode=msg.returncode, detail=msg.message)

    def _admin_spawn(self, identity: bytes, msg: p.AdminSpawn, payload, now: float) -> None:
        def refuse(reason: str) -> None:  # the reason starts with the field: "count: ..."
            self._reply(identity, msg.call_id, reason, reason.partition(":")[0])

        if self.catalog.model(msg.model) is None:
            return refuse(f"model: unknown model {msg.model!r} (a declared model, or pipeline/WORKFLOW[+WORKFLOW...])")
        agents = [a for a in self.agents.values() if not msg.host or a.host == msg.host]
        if not agents:
            return refuse(f"host: no node agent on {msg.host or 'any host'}")
        if not 1 <= msg.count <= 1024:
            return refuse("count: must be 1..1024")
        if not 1 <= msg.max_batch_rows <= 4096:
            return refuse("max_batch_rows: must be 1..4096")
        for key, value in (msg.options or {}).items():
            if not isinstance(value, (str, int, float)) or isinstance(value, bool) or "=" in str(key):
                return refuse(f"options.{key}: must be a string or a number")
        agent = agents[0]
        spawn_ids = []
        for _ in range(msg.count):
            # Unique across broker restarts: the agent (and its actors) may outlive us.
            spawn_id = f"{self.broker_id}-{next(self._spawn_ids)}"
            spawn_ids.append(spawn_id)
            agent.actors[spawn_id] = "requested"
            self._send(BACKEND, agent.identity, p.SpawnActor(spawn_id, msg.model, msg.device, msg.backend, msg.max_batch_rows, msg.options))
        self._send(FRONTEND, identity, p.AdminReply(True, f"asked {agent.agent_id} for {msg.count} actor(s)", spawn_ids,
                                                    msg.call_id))


    def _admin_stop(self, identity: bytes, msg: p.AdminStop, payload, now: float) -> None:
        actor = self.actors.get(msg.actor_id)
        if actor is None:
            return self._reply(identity, msg.call_id, f"actor_id: no actor {msg.actor_id!r}", "actor_id")
        if not any(a.host == actor.host for a in self.agents.values()):
            return self._reply(identity, msg.call_id, f"actor_id: no node agent on {actor.host} can stop it", "actor_id")
        actor.draining = actor.stopping = True
        self.telemetry_changed = True
        log.info("actor_draining", actor_id=actor.actor_id, in_flight=len(actor.in_flight), held=len(actor.held))
        self._reply(identity, msg.call_id, f"draining {actor.actor_id}, then stopping it")
        if not actor.in_flight and not actor.held:
            self._stop_drained(actor)

    def _admin_drain(self, identity: bytes, msg: p.AdminDrain, payload, now: float) -> None:
        """No new work for the actor (what it runs finishes, what it holds stays served),
        or work again; it stays alive either way."""
        actor = self.actors.get(msg.actor_id)
        if actor is None:
            return self._reply(identity, msg.call_id, f"actor_id: no actor {msg.actor_id!r}", "actor_id")
        if actor.stopping:
            return self._reply(identity, msg.call_id, f"actor_id: {actor.actor_id} is being stopped", "actor_id")
        actor.draining = msg.drained
        self.telemetry_changed = True
        log.info("actor_drained" if msg.drained else "actor_undrained", actor_id=actor.actor_id,
                 in_flight=len(actor.in_flight))
        self._reply(identity, msg.call_id, f"{'drained' if msg.drained else 'undrained'} {actor.actor_id}")
        if not msg.drained:
            self._dispatch(actor.model, now)

    def _admin_replicas(self, identity: bytes, msg: p.AdminReplicas, payload, now: float) -> None:
        if self.catalog.model(msg.model) is None:
            return self._reply(identity, msg.call_id, f"model: unknown model {msg.model!r}", "model")
        for name, value in (("min", msg.min), ("max", msg.max)):
            if value is not None and not 0 <= value <= MAX_REPLICAS:
                return self._reply(identity, msg.call_id, f"{name}: must be 0..{MAX_REPLICAS}, got {value}", name)
        if msg.min is not None and msg.max is not None and msg.min > msg.max:
            return self._reply(identity, msg.call_id, f"min: {msg.min} is above max {msg.max}", "min")
        if msg.min is None and msg.max is None:
            self.replica_bounds.pop(msg.model, None)
        else:
            self.replica_bounds[msg.model] = {"min": msg.min, "max": msg.max}
        self.telemetry_changed = True
        log.info("replica_bounds_set", model=msg.model, min=msg.min, max=msg.max)
        self._reply(identity, msg.call_id, f"{msg.model} replicas: min {msg.min}, max {msg.max}")

    def _admin_pause(self, identity: bytes, msg: p.AdminPause, payload, now: float) -> None:
        """A paused workflow's new requests are rejected (`paused`); accepted ones run on."""
        if msg.workflow not in self.catalog.workflows:
            return self._reply(identity, msg.call_id, f"workflow: unknown workflow {msg.workflow!r}", "workflow")
        if msg.paused:
            self.paused.add(msg.workflow)
        else:
            self.paused.discard(msg.workflow)
        self.telemetry_changed = True
        log.info("workflow_paused" if msg.paused else "workflow_resumed", workflow=msg.workflow)
        self._reply(identity, msg.call_id, f"{'paused' if msg.paused else 'resumed'} {msg.workflow}")

    def _stop_drained(self, actor: ActorState) -> None:
        """It runs nothing and holds nothing anyone needs: its agent may stop it."""
        agent = next((a for a in self.agents.values() if a.host == actor.host), None)
        if agent is None:
            return  # its agent is gone; retried on a later tick if one comes back
        actor.stop_sent = True
        log.info("actor_stopping", actor_id=actor.actor_id, agent_id=agent.agent_id)
        self._send(BACKEND, agent.identity, p.StopActor(actor.actor_id))

    def _admin_configure(self, identity: bytes, msg: p.AdminConfigure, payload, now: float) -> None:
        changes = {}
        for key, value in (msg.settings or {}).items():
            kind = CONFIGURABLE.get(key)
            if kind is None:
                return self._reply(identity, msg.call_id, f"settings.{key}: not a live setting "
                                   f"(live: {sorted(CONFIGURABLE)})", f"settings.{key}")
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                return self._reply(identity, msg.call_id, f"settings.{key}: wrong type {type(value).__name__}",
                                   f"settings.{key}")
            changes[key] = value
        try:
            settings = dataclasses.replace(self.settings, **changes)
        except ValueError as exc:  # its message starts with the setting's name
            return self._reply(identity, msg.call_id, f"settings.{exc}", f"settings.{str(exc).partition(':')[0]}")
        if changes:
            log.info("settings_changed", **changes)
        self.settings = settings
        if msg.plan is not None:
            self.plan = msg.plan
        self._reply(identity, msg.call_id, "configured")
