"""The broker process's IO shell: two ROUTER sockets around `BrokerCore`.

Owns (from one thread): the frontend ROUTER (clients, admin), the backend ROUTER
(actors, node agents) and, when `telemetry_address` is set, a PUB socket on which it
publishes the telemetry snapshot every `telemetry_interval_s` and soon after a change
(at most every `telemetry_min_gap_s`): the scheduler subscribes to it. Decodes each
message, hands it to the core, and sends what the core returns. It never opens tensor
payload frames: the final result's frames are forwarded to the client as they
arrived. A message that breaks the protocol or a handler that raises is answered
with an error and the loop keeps running; every send is non-blocking (a peer whose
queue fills is cut off for `cut_off_s`), and an answer that cannot be encoded is
dropped and counted.

With keys (`key_file` and `authorized_keys`) every socket is a CurveZMQ server, a ZAP
thread (`broker.auth.RoleAuthenticator`) admits each key only on the sockets its role
uses, and each message's command is checked against its sender's role. Without keys it
binds loopback addresses only.

With `journal` set it also owns the request journal (`broker.journal`, SQLite): it
writes the core's journal records in their place among the sends (a request is durable
before its ACCEPTED leaves) and the workflows registered at run time (before the reply
that accepts one); before it reads the first message it registers those again and then
re-runs the requests the journal holds unfinished; it prunes ended ones. A journal it
cannot read or write stops the broker: accepting work it cannot keep would break what a
restart relies on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import signal
import threading
import time
import uuid
from dataclasses import dataclass

import structlog
import zmq

from broker import auth
from broker import protocol as p
from broker.catalog import load_catalog
from broker.config import add_common_arguments, add_flags, load_config, setting
from broker.core.machine import BACKEND, FRONTEND, BrokerCore, BrokerSettings, Record, Send
from broker.core.outbox import ACCEPTED, Registration
from broker.endpoints import is_loopback_endpoint
from broker.journal import Entry, Journal, JournalError
from broker.logs import configure_logging, message_ids
from broker.protocol.constants import DEFAULT_LIMITS
from broker.protocol.errors import ErrorCode

log = structlog.get_logger(__name__)

DRAIN_BATCH = 512  # messages read from one socket before looking at the other
PRUNE_EVERY_S = 60.0  # ended journal entries are deleted at most this often (one DELETE)


@dataclass(frozen=True)
class ServerSettings:
    """The server's own fields (the core never reads them): where it listens and publishes."""

    # env LEGO_FRONTEND_ADDRESS / LEGO_BACKEND_ADDRESS (LEGO_BACKEND is an actor's backend kind)
    frontend_address: str = setting("tcp://127.0.0.1:5555", flag="--frontend",
                                    help="client address to bind (default tcp://127.0.0.1:5555)")
    backend_address: str = setting("tcp://127.0.0.1:5556", flag="--backend",
                                   help="actor/agent address to bind (default tcp://127.0.0.1:5556)")
    catalog: list[str] = setting(default_factory=list, help="extra workflow catalog TOML (repeatable)")
    telemetry_address: str = setting("", flag="--telemetry", help="PUB address for telemetry snapshots (default: none)")
    # Keys on (both set): every socket speaks CurveZMQ and every command is checked
    # against its sender's role (broker/auth.py). Keys off: loopback addresses only.
    key_file: str = setting("", help="the broker's key file (`lego keys new`); with --authorized-keys: keys on")
    authorized_keys: str = setting("", help="ROLE NAME PUBLIC_KEY per line: who may connect, in which role")
    telemetry_interval_s: float = setting(0.5, help="seconds between telemetry snapshots")
    telemetry_min_gap_s: float = setting(0.1, flag=False, help="least seconds between snapshots after a change")
    send_hwm: int = setting(100_000, flag=False, help="messages queued per actor or agent before it is cut off")
    # A client's queue holds results (images): fewer messages than a peer's.
    client_send_hwm: int = setting(10_000, flag=False, help="messages queued per client before it is cut off")
    cut_off_s: float = setting(60.0, flag=False, help="seconds a peer that stopped reading is ignored")
    journal: str = setting("", help="request journal file (SQLite): accepted requests survive a broker restart "
                                    "and are re-run from their seed (default: none)")
    journal_retention_s: float = setting(3600.0, help="seconds an ended request stays in the journal")
    log_format: str = setting("console", flag=False)  # their flags: broker.config.add_common_arguments
    log_level: str = setting("info", flag=False)


@dataclass(frozen=True)
class BrokerConfig(BrokerSettings, ServerSettings):
    """The broker process's one config object: the server's fields, then the core's
    settings (`broker.core.settings`, each declared once); flags, file keys and LEGO_*
    variables all come from these fields."""

    def settings(self) -> BrokerSettings:
        return BrokerSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BrokerSettings)})


class BrokerServer:
    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None):
        self.config = config
        self.core = BrokerCore(load_catalog(config.catalog), config.settings(), broker_id=f"broker-{uuid.uuid4().hex[:8]}")
        # Before any socket or context: a journal that cannot be read stops the broker here.
        self.journal = Journal(config.journal, config.journal_retention_s) if config.journal else None
        self.core.out.journaling = self.journal is not None
        self._resumed = False
        self._prune_at = 0.0
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.sockets: dict[str, zmq.Socket] = {}
        self.telemetry: zmq.Socket | None = None
        self._published_at = -1e9
        self.stopped = threading.Event()
        # (socket, identity) -> until when a peer that stopped reading is ignored.
        self.cut_off: dict[tuple[str, bytes], float] = {}
        self.key: auth.KeyFile | None = None  # keys on: this broker's CurveZMQ identity
        self.authenticator: auth.RoleAuthenticator | None = None
        self.routing_owners = auth.RoutingOwners()  # keys on: a client routing id stays with its key

    def bind(self) -> None:
        self._secure()
        for name, address in ((FRONTEND, self.config.frontend_address), (BACKEND, self.config.backend_address)):
            sock = self.context.socket(zmq.ROUTER)
            if self.key is not None:
                self.key.as_server(sock, name)
            sock.setsockopt(zmq.LINGER, 0)
            # Sends never block the loop (NOBLOCK, see _apply): at this many queued
            # messages a peer that does not read is cut off instead.
            sock.setsockopt(zmq.SNDHWM, self.config.client_send_hwm if name == FRONTEND else self.config.send_hwm)
            sock.setsockopt(zmq.RCVHWM, self.config.send_hwm)
            sock.setsockopt(zmq.MAXMSGSIZE, DEFAULT_LIMITS.max_frame_bytes)  # a bigger frame: the peer is dropped
            # Fail a send to an identity with no live connection instead of dropping it:
            # on the backend that is how a reset actor connection is noticed at once.
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.bind(address)
            self.sockets[name] = sock
        if self.config.telemetry_address:
            pub = self.context.socket(zmq.PUB)
            if self.key is not None:
                self.key.as_server(pub, auth.TELEMETRY)
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, 16)  # a slow subscriber loses old snapshots, never blocks us
            pub.bind(self.config.telemetry_address)
            self.telemetry = pub
        log.info("broker_listening", frontend=self.config.frontend_address, backend=self.config.backend_address,
                 telemetry=self.config.telemetry_address or None, workflows=sorted(self.core.catalog.workflows))

    def _secure(self) -> None:
        """Keys on: load them and start the ZAP handler. Keys off: refuse any address
        other hosts could reach, naming the settings that turn keys on."""
        c = self.config
        if bool(c.key_file) != bool(c.authorized_keys):
            raise auth.KeyFileError("key_file and authorized_keys: set both (keys on) or neither (loopback only)")
        if not c.key_file:
            for name, address in (("frontend", c.frontend_address), ("backend", c.backend_address),
                                  ("telemetry", c.telemetry_address)):
                if address and not is_loopback_endpoint(address):
                    raise auth.KeyFileError(f"{name} address {address} is reachable from other hosts: without keys "
                                            "the broker binds loopback only; set --key-file and --authorized-keys")
            return
        self.key = auth.load_key_file(c.key_file)
        self.authenticator = auth.RoleAuthenticator(self.context, auth.load_authorized(c.authorized_keys))
        self.authenticator.start()
        log.info("broker_keys_on", key=self.key.user_id, authorized=len(self.authenticator.authorized))

    def resume(self) -> int:
        """Register again the workflows the journal holds, then re-run every request it
        holds unfinished, in the order they were accepted (once, before the first message
        is read); how many requests."""
        if self.journal is None or self._resumed:
            return 0
        self._resumed = True
        self._restore_workflows()
        entries = self.journal.unfinished()
        now = time.monotonic()
        for e in entries:
            if e.user:  # keys on: the client's routing id stays with the key that submitted through it
                self.routing_owners.claim(e.client, e.user)
            try:
                tensors = [p.TensorDesc.from_wire(desc, "tensors") for desc, _ in e.tensors]
                sends = self.core.on_resume(e.request_id, e.client, e.workflow, e.params, tensors,
                                            [raw for _, raw in e.tensors], e.progress, now)
            except Exception:  # a bad entry must not keep every later restart from starting
                log.exception("resume_failed", request_id=e.request_id)
                self.journal.ended(e.request_id, "failed")
                continue
            self._apply(sends)
        if entries:
            log.info("journal_resumed", requests=len(entries), journal=str(self.journal.path))
        return len(entries)

    def _restore_workflows(self) -> None:
        """A registered workflow today's catalog no longer takes (a model gone, a name now a
        catalog file's) is left out, logged; its journaled requests then fail typed."""
        restored = 0
        for name, definition in self.journal.workflows():
            try:
                why = self.core.restore_workflow(name, definition)
            except Exception:  # a bad entry must not keep every later restart from starting
                log.exception("workflow_restore_failed", workflow=name)
                continue
            if why is None:
                restored += 1
            else:
                log.warning("workflow_not_restored", workflow=name, error=why)
        if restored:
            log.info("journal_workflows_restored", workflows=restored, journal=str(self.journal.path))

    def serve_forever(self) -> None:
        self.resume()
        poller = zmq.Poller()
        by_socket = {}
        for name, sock in self.sockets.items():
            poller.register(sock, zmq.POLLIN)
            by_socket[sock] = name
        tick_every_s = self.config.heartbeat_interval_s / 4
        next_tick = time.monotonic()
        while not self.stopped.is_set():
            wait_ms = max(0.0, next_tick - time.monotonic()) * 1000
            for sock, _ in poller.poll(min(wait_ms, 100)):
                self._drain(by_socket[sock], sock)
            now = time.monotonic()
            if now >= next_tick:
                # How late the timer fires: the time messages kept the loop from it.
                self.core.meters.loop_lagged(now - next_tick)
                self._apply(self._guarded(self.core.on_tick, now))
                next_tick = now + tick_every_s
                if self.journal is not None and now >= self._prune_at:
                    self._prune_at = now + min(PRUNE_EVERY_S, self.config.journal_retention_s)
                    self.journal.prune()
            if self.telemetry is not None:
                self._publish(now)

    def _publish(self, now: float) -> None:
        since = now - self._published_at
        due = since >= self.config.telemetry_interval_s
        if not due and not (self.core.telemetry_changed and since >= self.config.telemetry_min_gap_s):
            return
        self.core.telemetry_changed = False
        self._published_at = now
        stats = self._guarded(self.core.snapshot, now)
        frames = self._encoded(stats) if isinstance(stats, p.Stats) else None
        if frames is not None:
            with contextlib.suppress(zmq.Again):  # no room at a slow subscriber: it gets the next one
                self.telemetry.send_multipart(frames, zmq.NOBLOCK)
    def _drain(self, name: str, sock: zmq.Socket) -> None:
        handle = self.core.on_frontend if name == FRONTEND else self.core.on_backend
        for _ in range(DRAIN_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            now = time.monotonic()
            identity = frames[0].bytes
            if self._is_cut_off(name, identity, now):
                continue
            if len(frames) < 2 or frames[1].bytes != b"":
                sends = self.core.on_protocol_error(name, identity, p.ProtocolError(ErrorCode.BAD_FRAMES, "missing empty delimiter frame"))
            else:
                try:
                    msg, payload = p.decode(frames[2:])
                except p.ProtocolError as err:
                    sends = self.core.on_protocol_error(name, identity, err)
                else:
                    user = frames[0].get("User-Id") if self.key is not None else None
                    if not auth.may_send(name, user, msg.COMMAND):
                        sends = self._forbidden(name, identity, user, msg, "keys may not send")
                    elif name == FRONTEND and user is not None and not self.routing_owners.claim(identity, user):
                        sends = self._forbidden(name, identity, user, msg, "key may not use another key's routing id for")
                    else:
                        sends = self._guarded(handle, identity, msg, payload, now, reply_to=(name, identity))
            self._apply(sends)

    def _forbidden(self, name: str, identity: bytes, user: str, msg: p.Message, why: str) -> list[Send]:
        """A command its sender's key may not send: refused, counted, and nothing of it acted on."""
        self.core.counters["commands_refused"] += 1
        log.warning("command_refused", socket=name, peer=user, command=msg.COMMAND.name, **message_ids(msg))
        about = getattr(msg, "call_id", "") or getattr(msg, "request_id", None)
        return [Send(name, identity, p.Error(code=ErrorCode.FORBIDDEN.value, request_id=about or None,
                                             message=f"{auth.role_of(user)} {why} {msg.COMMAND.name}"))]

    def _guarded(self, fn, *args, reply_to: tuple[str, bytes] | None = None) -> list[Send]:
        """A handler that raises is logged and answered; the loop never dies of it."""
        try:
            return fn(*args)
        except Exception as exc:
            about = next((message_ids(a) for a in args if isinstance(a, p.Message)), {})
            log.exception("handler_failed", handler=getattr(fn, "__name__", "?"), **about)
            if reply_to is None:
                return []
            return [Send(reply_to[0], reply_to[1], p.Error(code=ErrorCode.INTERNAL.value, message=f"broker error: {exc}"))]

    def _apply(self, sends: list[Send | Record | Registration]) -> None:
        for send in sends:
            if isinstance(send, Record):  # durable before anything after it leaves
                self._journal(send)
                continue
            if isinstance(send, Registration):
                self.journal.register_workflow(send.name, send.definition)
                continue
            if (send.socket, send.identity) in self.cut_off:
                self.core.counters["sends_dropped"] += 1
                continue
            encoded = self._encoded(send.msg, send.payload)
            if encoded is None:
                continue
            try:
                self.sockets[send.socket].send_multipart([send.identity, b"", *encoded], zmq.NOBLOCK, copy=False)
            except zmq.Again:  # its queue is full: it stopped reading; a blocking send would stop us
                self._cut(send, time.monotonic())
            except zmq.ZMQError as exc:  # a vanished peer must not stop the broker
                log.warning("send_failed", peer=send.identity.hex(), command=send.msg.COMMAND.name, error=str(exc),
                            **message_ids(send.msg))
                if exc.errno == zmq.EHOSTUNREACH:
                    unsent = send.msg.batch_id if isinstance(send.msg, p.Tasks) else None
                    self._apply(self._guarded(self.core.on_unreachable, send.socket, send.identity, time.monotonic(),
                                              unsent))

    def _journal(self, record: Record) -> None:
        """Write one journal record and return once it is committed. JournalError (disk
        full, file gone) leaves the loop and stops the broker; what it had accepted is in
        the journal and re-runs at the next start."""
        if record.status != ACCEPTED:
            self.journal.ended(record.request_id, record.status)
            return
        tensors = [(desc.to_wire(), frame) for desc, frame in record.tensors]
        entry = Entry(record.request_id, record.client, record.workflow, record.params, tensors, record.progress,
                      time.time(), self.routing_owners.owner(record.client) or "")
        try:
            self.journal.accepted(entry)
        except ValueError:  # still open in the journal but not in the core: a bug, not a reason to stop
            log.exception("journal_conflict", request_id=record.request_id)

    def _encoded(self, msg: p.Message, payload=()) -> list | None:
        """A message's frames, or None (logged, counted) if it cannot be encoded: the
        loop goes on without it."""
        try:
            return p.encode(msg, payload)
        except Exception:
            self.core.counters["encode_errors"] += 1
            log.exception("encode_failed", command=msg.COMMAND.name, **message_ids(msg))
            return None

    def _cut(self, send: Send, now: float) -> None:
        """A peer whose queue is full is ignored for `cut_off_s`: what we would send it is
        dropped and what it sends is not read. An actor or agent cut off is lost (its work
        goes elsewhere); a client's requests run on and end, their answers dropped."""
        self.cut_off[(send.socket, send.identity)] = now + self.config.cut_off_s
        self.core.counters["peers_cut_off"] += 1
        log.warning("peer_cut_off", socket=send.socket, peer=send.identity.hex(), queued=self.config.send_hwm,
                    cut_off_s=self.config.cut_off_s)
        if send.socket == BACKEND:
            self._apply(self._guarded(self.core.on_unreachable, send.socket, send.identity, now))

    def _is_cut_off(self, socket: str, identity: bytes, now: float) -> bool:
        until = self.cut_off.get((socket, identity))
        if until is None:
            return False
        if now < until:
            return True
        del self.cut_off[(socket, identity)]
        return False

    def stop(self) -> None:
        self.stopped.set()

    def close(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets.clear()
        if self.telemetry is not None:
            self.telemetry.close(linger=0)
            self.telemetry = None
        if self._own_context:
            self.context.term()
        if self.journal is not None:
            self.journal.close()
            self.journal = None


def run_broker(config: BrokerConfig) -> None:
    server = BrokerServer(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    server.bind()
    # Everything allocated so far lives as long as the process: keep the cyclic GC
    # from re-scanning it on every collection.
    gc.freeze()
    try:
        server.serve_forever()
    finally:
        server.close()
        log.info("broker_stopped", **server.core.counters)


def build_parser() -> argparse.ArgumentParser:
    """`lego broker`'s flags: one per field of BrokerConfig that declares one."""
    parser = argparse.ArgumentParser(prog="lego broker", description="Run the broker.")
    add_flags(parser, BrokerConfig)
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if k != "config"}
    config = load_config(BrokerConfig, "broker", args.config, cli)  # on/off become booleans there
    configure_logging(config.log_format, config.log_level, process="broker")
    try:
        run_broker(config)
    except JournalError as exc:  # unreadable or unwritable: never start (or go on) without it
        log.error("journal_unusable", error=str(exc))
        raise SystemExit(f"lego broker: {exc}") from None


if __name__ == "__main__":
    main()
