"""The admin commands: part of the broker's sans-IO core, in the broker process.

Admin commands come from the frontend (the CLI, the gateway's console, the scheduler
controller) and are answered with ADMIN_REPLY under the caller's call_id (a refusal
names the offending field): spawn actors through a node agent, drain-and-stop an
actor, drain or undrain one (it stays alive), set a model's replica bounds for the
scheduler, pause or resume a workflow's admission, set the live policy knobs
(`broker.core.settings.live_changes`), post the scheduler's plan and register a
workflow (`broker.core.registry`: it joins the catalog, journaled before the reply
accepts it). `Admin` owns the operator's state (`Operator`: the plan, replica bounds,
paused workflows), the registered workflows' definitions and the spawn id sequence;
it changes actors through the actor table it is given.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import msgpack
import structlog

from broker import protocol as p
from broker.actor_options import MAX_SPAWN_COUNT, check_options
from broker.catalog import Catalog
from broker.core.actors import ActorTable
from broker.core.dispatch import Dispatcher
from broker.core.outbox import Outbox
from broker.core.peers import Peers
from broker.core.registry import RegistrationError, parse_registration
from broker.core.settings import BrokerSettings, SettingError, live_changes
from broker.core.state import BACKEND, FRONTEND

log = structlog.get_logger(__name__)

MAX_PLAN_BYTES = 512 * 1024  # a scheduler's plan for hundreds of GPUs is tens of KiB

MAX_REPLICAS = 4096


@dataclass
class Operator:
    """What operators and the scheduler told the broker, for admission and telemetry."""

    plan: dict | None = None  # the scheduler's last posted plan
    replica_bounds: dict[str, dict] = field(default_factory=dict)  # model -> {"min", "max"}: for the scheduler
    paused: set[str] = field(default_factory=set)  # workflows whose admission an operator paused
    changed: bool = False  # the telemetry publisher sends a snapshot soon


class Admin:
    def __init__(self, catalog: Catalog, broker_id: str, actors: ActorTable, peers: Peers, dispatcher: Dispatcher,
                 out: Outbox):
        self.catalog, self.broker_id = catalog, broker_id
        self.actors, self.peers, self.dispatcher, self.out = actors, peers, dispatcher, out
        self.operator = Operator()
        self.registered: dict[str, dict] = {}  # workflows registered at run time: name -> definition
        self._spawn_ids = itertools.count(1)

    def _reply(self, identity: bytes, call_id: str, message: str, field: str | None = None) -> None:
        """Answer an admin call: a refusal when `field` names what was wrong."""
        self.out.send(FRONTEND, identity, p.AdminReply(field is None, message, call_id=call_id, field=field))

    def spawn(self, identity: bytes, msg: p.AdminSpawn, payload, now: float) -> None:
        def refuse(reason: str) -> None:  # the reason starts with the field: "count: ..."
            self._reply(identity, msg.call_id, reason, reason.partition(":")[0])

        if self.catalog.model(msg.model) is None:
            return refuse(f"model: unknown model {msg.model!r} (a declared model, or pipeline/WORKFLOW[+WORKFLOW...])")
        agents = [a for a in self.actors.agents.values() if not msg.host or a.host == msg.host]
        if not agents:
            return refuse(f"host: no node agent on {msg.host or 'any host'}")
        if not 1 <= msg.count <= MAX_SPAWN_COUNT:
            return refuse(f"count: must be 1..{MAX_SPAWN_COUNT}")
        if not 1 <= msg.max_batch_rows <= 4096:
            return refuse("max_batch_rows: must be 1..4096")
        for key, value in (msg.options or {}).items():
            if not isinstance(value, (str, int, float)) or isinstance(value, bool) or "=" in str(key):
                return refuse(f"options.{key}: must be a string or a number")
        try:  # only the options the backend declares, each in range: no paths, no unknown keys
            check_options(msg.backend, msg.options)
        except ValueError as exc:
            return refuse(str(exc))
        agent = agents[0]
        spawn_ids = []
        for _ in range(msg.count):
            # Unique across broker restarts: the agent (and its actors) may outlive us.
            spawn_id = f"{self.broker_id}-{next(self._spawn_ids)}"
            spawn_ids.append(spawn_id)
            agent.actors[spawn_id] = "requested"
            self.out.send(BACKEND, agent.identity, p.SpawnActor(spawn_id, msg.model, msg.device, msg.backend,
                                                                       msg.max_batch_rows, msg.options))
        self.out.send(FRONTEND, identity, p.AdminReply(True, f"asked {agent.agent_id} for {msg.count} actor(s)",
                                                       spawn_ids, msg.call_id))

    def stop(self, identity: bytes, msg: p.AdminStop, payload, now: float) -> None:
        actor = self.actors.holder(msg.actor_id)
        if actor is None:
            return self._reply(identity, msg.call_id, f"actor_id: no actor {msg.actor_id!r}", "actor_id")
        if self.actors.agent_on(actor.host) is None:
            return self._reply(identity, msg.call_id, f"actor_id: no node agent on {actor.host} can stop it", "actor_id")
        actor.draining = actor.stopping = True
        self.actors.changed = True
        log.info("actor_draining", actor_id=actor.actor_id, in_flight=len(actor.in_flight), held=len(actor.held))
        self._reply(identity, msg.call_id, f"draining {actor.actor_id}, then stopping it")
        if not actor.in_flight and not actor.held:
            self.peers.stop_drained(actor)

    def drain(self, identity: bytes, msg: p.AdminDrain, payload, now: float) -> None:
        """No new work for the actor (what it runs finishes, what it holds stays served),
        or work again; it stays alive either way."""
        actor = self.actors.holder(msg.actor_id)
        if actor is None:
            return self._reply(identity, msg.call_id, f"actor_id: no actor {msg.actor_id!r}", "actor_id")
        if actor.stopping:
            return self._reply(identity, msg.call_id, f"actor_id: {actor.actor_id} is being stopped", "actor_id")
        actor.draining = msg.drained
        self.actors.changed = True
        log.info("actor_drained" if msg.drained else "actor_undrained", actor_id=actor.actor_id,
                 in_flight=len(actor.in_flight))
        self._reply(identity, msg.call_id, f"{'drained' if msg.drained else 'undrained'} {actor.actor_id}")
        if not msg.drained:
            self.dispatcher.dispatch(actor.model, now)

    def replicas(self, identity: bytes, msg: p.AdminReplicas, payload, now: float) -> None:
        if self.catalog.model(msg.model) is None:
            return self._reply(identity, msg.call_id, f"model: unknown model {msg.model!r}", "model")
        for name, value in (("min", msg.min), ("max", msg.max)):
            if value is not None and not 0 <= value <= MAX_REPLICAS:
                return self._reply(identity, msg.call_id, f"{name}: must be 0..{MAX_REPLICAS}, got {value}", name)
        if msg.min is not None and msg.max is not None and msg.min > msg.max:
            return self._reply(identity, msg.call_id, f"min: {msg.min} is above max {msg.max}", "min")
        if msg.min is None and msg.max is None:
            self.operator.replica_bounds.pop(msg.model, None)
        else:
            self.operator.replica_bounds[msg.model] = {"min": msg.min, "max": msg.max}
        self.operator.changed = True
        log.info("replica_bounds_set", model=msg.model, min=msg.min, max=msg.max)
        self._reply(identity, msg.call_id, f"{msg.model} replicas: min {msg.min}, max {msg.max}")

    def pause(self, identity: bytes, msg: p.AdminPause, payload, now: float) -> None:
        """A paused workflow's new requests are rejected (`paused`); accepted ones run on."""
        if msg.workflow not in self.catalog.workflows:
            return self._reply(identity, msg.call_id, f"workflow: unknown workflow {msg.workflow!r}", "workflow")
        if msg.paused:
            self.operator.paused.add(msg.workflow)
        else:
            self.operator.paused.discard(msg.workflow)
        self.operator.changed = True
        log.info("workflow_paused" if msg.paused else "workflow_resumed", workflow=msg.workflow)
        self._reply(identity, msg.call_id, f"{'paused' if msg.paused else 'resumed'} {msg.workflow}")

    def register(self, identity: bytes, msg: p.AdminRegister, payload, now: float) -> None:
        """Add a workflow to the catalog: journaled (when the broker keeps a journal) before
        the reply that accepts it; an identical one registered again is accepted, unchanged."""
        try:
            spec = parse_registration(self.catalog, msg.name, msg.definition, len(self.registered))
        except RegistrationError as exc:
            log.info("workflow_register_refused", workflow=msg.name[:128], field=exc.field, error=exc.message[:256])
            return self._reply(identity, msg.call_id, str(exc), exc.field)
        if spec is None:
            return self._reply(identity, msg.call_id, f"{msg.name} is registered already")
        self.out.registered(msg.name, msg.definition)
        self._add(spec, msg.definition)
        self._reply(identity, msg.call_id, f"registered {msg.name} (models {', '.join(spec.models)})")

    def restore(self, name: str, definition: dict) -> str | None:
        """Register again a workflow a previous broker journaled (at start, before its
        journaled requests run); why not, when the catalog no longer takes it."""
        try:
            spec = parse_registration(self.catalog, name, definition, len(self.registered))
        except RegistrationError as exc:
            return str(exc)
        if spec is not None:
            self._add(spec, definition)
        return None

    def _add(self, spec, definition: dict) -> None:
        self.catalog.workflows[spec.name] = spec
        self.registered[spec.name] = definition
        self.operator.changed = True
        log.info("workflow_registered", workflow=spec.name, models=spec.models)

    def configure(self, identity: bytes, msg: p.AdminConfigure, settings: BrokerSettings) -> BrokerSettings:
        """The settings after the call's live changes (all or nothing: `settings` itself
        when refused); stores the scheduler's plan when the call carries one and is accepted."""
        if msg.plan is not None and len(msgpack.packb(msg.plan)) > MAX_PLAN_BYTES:
            # Every STATS answer carries the plan: one near the protocol's limit would make
            # them all too large to read, for every client and the scheduler itself.
            self._reply(identity, msg.call_id, f"plan: over {MAX_PLAN_BYTES} bytes encoded", "plan")
            return settings
        try:
            changed = live_changes(settings, msg.settings or {})
        except SettingError as exc:
            self._reply(identity, msg.call_id, str(exc), exc.field)
            return settings
        if msg.settings:
            log.info("settings_changed", **msg.settings)
        if msg.plan is not None:
            self.operator.plan = msg.plan
        self._reply(identity, msg.call_id, "configured")
        return changed
