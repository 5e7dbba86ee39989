"""The broker's peers on its backend socket: actors and node agents coming, living, going.

Part of the broker's sans-IO core, in the broker process. `Peers` handles the hellos
(an actor joins the actor table and its model's queue is dispatched; a node agent
joins), heartbeats (an actor's carry its transfer telemetry; the broker pings agents),
credits, disconnects and agent events, and on each tick declares silent peers dead
(through `Recovery`) and asks an agent to stop an actor that has drained. It owns no
state of its own: the actor table holds the peers.
"""

from __future__ import annotations

import structlog

from broker import protocol as p
from broker.core.actors import ActorTable
from broker.core.dispatch import Dispatcher
from broker.core.metering import Meters
from broker.core.outbox import Outbox
from broker.core.recovery import Recovery
from broker.core.settings import BrokerSettings
from broker.core.state import BACKEND, ActorState, AgentState
from broker.protocol.errors import ErrorCode

log = structlog.get_logger(__name__)


class Peers:
    def __init__(self, settings: BrokerSettings, broker_id: str, actors: ActorTable, recovery: Recovery,
                 dispatcher: Dispatcher, meters: Meters, out: Outbox):
        self.settings = settings  # replaced by the core when an operator changes a live setting
        self.broker_id = broker_id
        self.actors, self.recovery, self.dispatcher, self.meters, self.out = actors, recovery, dispatcher, meters, out

    def _welcome(self, identity: bytes) -> None:
        s = self.settings
        self.out.send(BACKEND, identity, p.Welcome(self.broker_id, s.heartbeat_interval_s, s.heartbeat_misses))

    def actor_hello(self, identity: bytes, msg: p.ActorHello, payload, now: float) -> None:
        old = self.actors.holder(msg.actor_id)
        if old is not None and old.identity == identity:
            # A retried hello of a session we already welcomed (it crossed our WELCOME).
            self._welcome(identity)
            return
        if old is not None and (old.host, old.pid) != (msg.host, msg.pid):
            # Another process claims a live actor's id (two actors started with one
            # --actor-id, or an impostor): the live one keeps its slot. The claimant's
            # retried hellos get in once the live session goes silent and is declared dead.
            self.meters.counters["hellos_refused"] += 1
            log.warning("actor_hello_refused", actor_id=msg.actor_id, host=msg.host, pid=msg.pid,
                        live_host=old.host, live_pid=old.pid)
            self.out.error(BACKEND, identity, ErrorCode.DUPLICATE_ACTOR,
                           f"actor id {msg.actor_id!r} is live on {old.host} (pid {old.pid}); "
                           "retry when that session ends", "actor_id")
            return
        if old is not None:  # the same process on a new session: what it held is gone
            self.recovery.lose_actor(old, "reconnected with a new session", now)
        if msg.max_batch_rows < 1 or msg.credits < 0:
            self.out.error(BACKEND, identity, ErrorCode.BAD_HEADER, "max_batch_rows must be >= 1 and credits >= 0",
                           "max_batch_rows")
            return
        actor = ActorState(
            actor_id=msg.actor_id, identity=identity, model=msg.model, host=msg.host, device=msg.device,
            backend=msg.backend, data_address=msg.data_address, max_batch_rows=msg.max_batch_rows,
            credits=msg.credits, last_seen=now, pid=msg.pid,
        )
        self.actors.join(actor)
        log.info("actor_joined", actor_id=msg.actor_id, model=msg.model, device=msg.device, host=msg.host,
                 backend=msg.backend)
        self._welcome(identity)
        self.dispatcher.dispatch(msg.model, now)

    def agent_hello(self, identity: bytes, msg: p.AgentHello, payload, now: float) -> None:
        self.actors.agents[identity] = AgentState(msg.agent_id, identity, msg.host, list(msg.devices), now, now)
        log.info("agent_joined", agent_id=msg.agent_id, host=msg.host, devices=len(msg.devices))
        self._welcome(identity)

    def known_actor(self, identity: bytes) -> ActorState | None:
        actor = self.actors.by_identity.get(identity)
        if actor is None:
            # Declared dead (or never said hello): its results were re-queued elsewhere.
            self.out.send(BACKEND, identity, p.Disconnect(reason="unknown actor: send ACTOR_HELLO again"))
        return actor

    def heartbeat(self, identity: bytes, msg: p.Heartbeat, payload, now: float) -> None:
        actor = self.actors.holder(msg.actor_id) if msg.actor_id else self.actors.by_identity.get(identity)
        if actor is not None and msg.session and msg.session.encode() != actor.identity:
            # A ping for a work session we no longer know: that session must start over.
            self.out.send(BACKEND, identity, p.Disconnect(reason=f"session {msg.session} is not current"))
            return
        if actor is not None:
            actor.last_seen = now
            if msg.telemetry is not None:
                self.meters.actor_telemetry(actor.telemetry, msg.telemetry)
                actor.telemetry = msg.telemetry
            if msg.actor_id:  # the pong the actor's heartbeat thread waits for
                self.out.send(BACKEND, identity, p.Heartbeat(sent_at=now))
        elif identity not in self.actors.agents:
            self.out.send(BACKEND, identity, p.Disconnect(reason="unknown peer: send a HELLO first"))

    def disconnect(self, identity: bytes, msg: p.Disconnect, payload, now: float) -> None:
        actor = self.actors.by_identity.get(identity)
        if actor is not None:
            self.recovery.lose_actor(actor, f"disconnected: {msg.reason}", now)
        agent = self.actors.agents.pop(identity, None)
        if agent is not None:
            log.info("agent_left", agent_id=agent.agent_id, reason=msg.reason)

    def credit(self, identity: bytes, msg: p.Credit, payload, now: float) -> None:
        actor = self.known_actor(identity)
        if actor is not None:
            actor.credits += max(0, msg.credits)
            self.dispatcher.dispatch(actor.model, now)

    def agent_event(self, identity: bytes, msg: p.AgentEvent, payload, now: float) -> None:
        agent = self.actors.agents.get(identity)
        if agent is None:
            self.out.send(BACKEND, identity, p.Disconnect(reason="unknown agent: send AGENT_HELLO again"))
            return
        agent.actors[msg.spawn_id] = msg.event
        if msg.devices:
            agent.devices = list(msg.devices)
        log.info("agent_event", agent_id=agent.agent_id, spawn_id=msg.spawn_id, event_name=msg.event,
                 actor_id=msg.actor_id, returncode=msg.returncode, detail=msg.message)
        actor = self.actors.holder(msg.actor_id) if msg.event == "exited" and msg.actor_id else None
        if actor is not None and actor.host == agent.host:
            # Its agent saw the process end: lose it now rather than at its next failed
            # send or missed heartbeats, so no more work goes to it (and a poison task is
            # blamed for the one crash it caused, not for a batch sent to the dead).
            self.recovery.lose_actor(actor, f"its process exited (returncode {msg.returncode})", now)

    def tick(self, now: float) -> None:
        """Heartbeats out, silent peers declared dead, drained actors stopped."""
        expiry = self.settings.heartbeat_interval_s * self.settings.heartbeat_misses
        for actor in list(self.actors.actors.values()):  # actors ping; we answer (see heartbeat)
            if now - actor.last_seen > expiry:
                self.recovery.lose_actor(actor, f"silent for {now - actor.last_seen:.1f}s", now)
            elif actor.stopping and not actor.stop_sent and not actor.in_flight and not actor.held:
                self.stop_drained(actor)
        for identity, agent in list(self.actors.agents.items()):
            if now - agent.last_seen > expiry:
                # Its actors go silent too and are lost in turn; work only they could run
                # fails typed after orphan_timeout_s unless a replacement joins (expiry.py).
                self.meters.counters["agents_lost"] += 1
                log.warning("agent_lost", agent_id=agent.agent_id, host=agent.host)
                del self.actors.agents[identity]
            elif now - agent.last_sent >= self.settings.heartbeat_interval_s:
                agent.last_sent = now
                self.out.send(BACKEND, identity, p.Heartbeat(sent_at=now))

    def stop_drained(self, actor: ActorState) -> None:
        """It runs nothing and holds nothing anyone needs: its agent may stop it."""
        agent = self.actors.agent_on(actor.host)
        if agent is None:
            return  # its agent is gone; retried on a later tick if one comes back
        actor.stop_sent = True
        log.info("actor_stopping", actor_id=actor.actor_id, agent_id=agent.agent_id)
        self.out.send(BACKEND, agent.identity, p.StopActor(actor.actor_id))
