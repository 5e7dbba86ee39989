"""The broker's sans-IO core: `on_*(event) -> list[Send]`, no sockets, no clock.

Runs inside the broker process; `broker.server` owns the sockets and feeds it (the
simulator and the overhead benchmark feed it too). `BrokerCore` owns nothing but its
parts and the two handler tables that route each message to one of them:

- tables: the actor table (`actors`: actors, agents, credits, liveness), the request
  and tensor directory (`directory`: requests, DAGs, ready queues, holders and
  reference counts), load accounting (`load`), meters (`metering`), the operator's
  state (in `admin`), and the event's outbox (`outbox`);
- parts that act on the tables they are given: intake (admission and unrolling),
  dispatch (applying the pure `choosers`), results, recovery, peers and admin;
- `telemetry`: the Stats snapshot, a pure function of the tables.

An event's sends leave together when its handler returns, and not at all if it raises.
A broker with a request journal turns on `out.journaling`: the sends then carry the
journal's `Record`s in order, and the shell writes them (the core opens no file);
`on_resume` re-runs what a journal read at start holds unfinished.
"""

from __future__ import annotations

import random

import structlog

from broker import protocol as p
from broker.catalog import Catalog
from broker.core import telemetry
from broker.core.actors import ActorTable
from broker.core.admin import Admin
from broker.core.directory import RequestDirectory
from broker.core.dispatch import Dispatcher
from broker.core.expiry import Expiry
from broker.core.intake import Intake
from broker.core.load import LoadTracker
from broker.core.metering import Meters
from broker.core.outbox import Outbox, Record, Send
from broker.core.peers import Peers
from broker.core.recovery import Recovery
from broker.core.results import Results
from broker.core.settings import BrokerSettings
from broker.core.state import BACKEND, FRONTEND, ActorState
from broker.protocol.errors import ErrorCode

log = structlog.get_logger(__name__)

__all__ = ["BACKEND", "FRONTEND", "BrokerCore", "BrokerSettings", "Record", "Send"]

DEFAULT_SETTINGS = BrokerSettings()


class BrokerCore:
    def __init__(self, catalog: Catalog, settings: BrokerSettings = DEFAULT_SETTINGS, broker_id: str = "broker",
                 seed: int | None = None):
        self.catalog = catalog
        self.broker_id = broker_id
        self.out = Outbox()
        self.actor_table = ActorTable()
        self.meters = Meters(settings.latency_window)  # cumulative counts for metrics, recent refusals and failures
        self.load = LoadTracker(catalog, settings.cost_scale)
        self.directory = RequestDirectory(catalog, self.actor_table, self.load, self.meters, self.out)
        self.dispatcher = Dispatcher(settings, self.actor_table, self.directory, self.load, self.meters, self.out)
        self.recovery = Recovery(settings, self.actor_table, self.directory, self.dispatcher, self.meters, self.out)
        self.peers = Peers(settings, broker_id, self.actor_table, self.recovery, self.dispatcher, self.meters, self.out)
        self.results = Results(self.peers, self.directory, self.recovery, self.dispatcher, self.meters, self.out)
        self.expiry = Expiry(settings, self.actor_table, self.directory, self.meters)
        self.admin = Admin(catalog, broker_id, self.actor_table, self.peers, self.dispatcher, self.out)
        self.intake = Intake(settings, catalog, random.Random(seed), self.actor_table, self.directory, self.dispatcher,
                             self.load, self.meters, self.admin.operator, self.out)
        self.settings = settings
        self._backend_handlers = {
            p.ActorHello: self.peers.actor_hello,
            p.AgentHello: self.peers.agent_hello,
            p.Heartbeat: self.peers.heartbeat,
            p.Credit: self.peers.credit,
            p.BatchDone: self.results.batch_done,
            p.BatchFailed: self.results.batch_failed,
            p.AgentEvent: self.peers.agent_event,
            p.Disconnect: self.peers.disconnect,
        }
        self._frontend_handlers = {
            p.Submit: self.intake.submit,
            p.Cancel: self.directory.cancel,
            p.ListWorkflows: self._list_workflows,
            p.GetStats: self._get_stats,
            p.AdminSpawn: self.admin.spawn,
            p.AdminStop: self.admin.stop,
            p.AdminConfigure: self._configure,
            p.AdminDrain: self.admin.drain,
            p.AdminReplicas: self.admin.replicas,
            p.AdminPause: self.admin.pause,
            p.AdminRegister: self.admin.register,
        }

    # ------------------------------------------------------------------ entry points

    def on_backend(self, identity: bytes, msg: p.Message, payload: list, now: float) -> list[Send]:
        handler = self._backend_handlers.get(type(msg))
        if handler is None:
            self.out.error(BACKEND, identity, ErrorCode.UNKNOWN_COMMAND, f"{msg.COMMAND.name} is not a backend command")
            return self.out.flush()
        peer = self.actor_table.peer(identity)
        if peer is not None:
            peer.last_seen = now
        return self._run(handler, identity, msg, payload, now)

    def on_frontend(self, identity: bytes, msg: p.Message, payload: list, now: float) -> list[Send]:
        handler = self._frontend_handlers.get(type(msg))
        if handler is None:
            self.out.error(FRONTEND, identity, ErrorCode.UNKNOWN_COMMAND, f"{msg.COMMAND.name} is not a client command")
            return self.out.flush()
        return self._run(handler, identity, msg, payload, now)

    def on_protocol_error(self, socket: str, identity: bytes, err: p.ProtocolError) -> list[Send]:
        """A message that could not be decoded: answer with a typed error, keep going."""
        self.meters.counters["protocol_errors"] += 1
        log.warning("protocol_error", socket=socket, peer=identity.hex(), code=err.code.value, error=err.message)
        self.out.error(socket, identity, err.code, err.message, err.field)
        return self.out.flush()

    def on_unreachable(self, socket: str, identity: bytes, now: float, unsent_batch: int | None = None) -> list[Send]:
        """A send found no connected peer of that identity: an actor there is gone. The
        batch whose send failed (`unsent_batch`) never reached it, so cannot have killed it."""
        actor = self.actor_table.by_identity.get(identity) if socket == BACKEND else None
        if actor is None:
            return self.out.flush()
        innocent = (unsent_batch,) if unsent_batch is not None else ()
        return self._run(self.recovery.lose_actor, actor, "unreachable: its connection is gone", now, innocent)

    def on_resume(self, request_id: str, client: bytes, workflow: str, params: dict, tensors: list, frames: list,
                  progress: bool, now: float) -> list[Send | Record]:
        """A request a previous broker accepted and never ended (from the journal, which
        the IO shell reads at start): run it again from its start for the same client."""
        return self._run(self.intake.resume, request_id, client, workflow, params, tensors, frames, progress, now)

    def restore_workflow(self, name: str, definition: dict) -> str | None:
        """A workflow a previous broker registered at run time (from the journal, which the
        IO shell reads at start, before `on_resume`): registered again; why not, if refused."""
        return self.admin.restore(name, definition)

    def on_tick(self, now: float) -> list[Send]:
        """Heartbeats out, silent peers declared dead, requests that can no longer end
        failed typed. Call about 4x per heartbeat interval."""
        return self._run(self._tick, now)

    def _tick(self, now: float) -> None:
        self.peers.tick(now)
        self.intake.retry_parked(now)
        self.expiry.tick(now)

    def snapshot(self, now: float) -> p.Stats:
        return telemetry.snapshot(now, self.catalog, self.settings, self.actor_table, self.directory, self.load,
                                  self.meters, self.admin.operator)

    def _run(self, handler, *args) -> list[Send]:
        """One event: its sends leave together, or not at all if its handler raises
        (the IO shell logs the error and answers the sender; nothing half-built leaves
        then or with the next event)."""
        try:
            handler(*args)
        except BaseException:
            self.out.discard()
            raise
        return self.out.flush()

    # ------------------------------------------------------------------ the core's own handlers

    def _list_workflows(self, identity: bytes, msg, payload, now: float) -> None:
        self.out.send(FRONTEND, identity, p.Workflows(telemetry.workflow_infos(self.catalog, self.admin.registered),
                                                      msg.call_id))

    def _get_stats(self, identity: bytes, msg, payload, now: float) -> None:
        stats = self.snapshot(now)
        stats.call_id = msg.call_id
        self.out.send(FRONTEND, identity, stats)

    def _configure(self, identity: bytes, msg: p.AdminConfigure, payload, now: float) -> None:
        self.settings = self.admin.configure(identity, msg, self.settings)

    # ------------------------------------------------------------------ settings and views

    @property
    def settings(self) -> BrokerSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: BrokerSettings) -> None:
        """The parts that read settings see an operator's live change at their next event."""
        self._settings = settings
        for part in (self.dispatcher, self.recovery, self.peers, self.intake, self.expiry):
            part.settings = settings

    @property
    def telemetry_changed(self) -> bool:
        """Something a telemetry subscriber cares about changed (queues, requests, actors,
        the operator's state); the IO shell publishes a snapshot soon after and clears it."""
        return self.actor_table.changed or self.directory.changed or self.admin.operator.changed

    @telemetry_changed.setter
    def telemetry_changed(self, changed: bool) -> None:
        self.actor_table.changed = self.directory.changed = self.admin.operator.changed = changed

    # Read views of the tables, for the IO shell, benchmarks and tests.
    requests = property(lambda self: self.directory.requests)
    tasks = property(lambda self: self.directory.tasks)
    queues = property(lambda self: self.directory.queues)
    live_cfg = property(lambda self: self.directory.live_cfg)
    actors = property(lambda self: self.actor_table.actors)
    actor_by_identity = property(lambda self: self.actor_table.by_identity)
    agents = property(lambda self: self.actor_table.agents)
    counters = property(lambda self: self.meters.counters)
    replica_bounds = property(lambda self: self.admin.operator.replica_bounds)
    paused = property(lambda self: self.admin.operator.paused)

    @property
    def plan(self) -> dict | None:
        return self.admin.operator.plan

    @plan.setter
    def plan(self, plan: dict | None) -> None:
        self.admin.operator.plan = plan

    @property
    def actors_by_device(self) -> dict[tuple[str, str], list[ActorState]]:
        return self.actor_table.by_device

    @actors_by_device.setter
    def actors_by_device(self, index: dict[tuple[str, str], list[ActorState]]) -> None:
        self.actor_table.by_device = index

    def _device_count(self) -> int:
        return self.actor_table.device_count()
