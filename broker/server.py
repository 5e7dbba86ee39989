"""The broker process's IO shell: two ROUTER sockets around `BrokerCore`.

Owns (from one thread): the frontend ROUTER (clients, admin), the backend ROUTER
(actors, node agents) and, when `telemetry_address` is set, a PUB socket on which it
publishes the telemetry snapshot every `telemetry_interval_s` and soon after a change
(at most every `telemetry_min_gap_s`): the scheduler subscribes to it. Decodes each
message, hands it to the core, and sends what the core returns. It never opens tensor
payload frames: the final result's frames are forwarded to the client as they
arrived. A message that breaks the protocol or a handler that raises is answered
with an error and the loop keeps running.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

import structlog
import zmq

from broker import protocol as p
from broker.catalog import load_catalog
from broker.core.machine import BACKEND, FRONTEND, BrokerCore, BrokerSettings, Send
from broker.logs import message_ids
from broker.protocol.constants import DEFAULT_LIMITS
from broker.protocol.errors import ErrorCode

log = structlog.get_logger(__name__)

DRAIN_BATCH = 512  # messages read from one socket before looking at the other


@dataclass
class BrokerConfig:
    # env LEGO_FRONTEND_ADDRESS / LEGO_BACKEND_ADDRESS (LEGO_BACKEND is an actor's backend kind)
    frontend_address: str = "tcp://127.0.0.1:5555"
    backend_address: str = "tcp://127.0.0.1:5556"
    catalog: list[str] = field(default_factory=list)
    telemetry_address: str = ""  # PUB address for telemetry snapshots; empty: none
    telemetry_interval_s: float = 0.5
    telemetry_min_gap_s: float = 0.1
    heartbeat_interval_s: float = 1.0
    heartbeat_misses: int = 5
    max_task_attempts: int = 3
    max_request_restarts: int = 3
    max_requests_in_flight: int = 100_000
    affinity: str = "prefer"  # or "avoid": force steps to migrate (testing the data plane)
    cfg_split: str = "never"  # "always": CFG branches as separate tasks, for two actors; "auto": by load
    admission: bool = False  # refuse requests that cannot meet their SLO (the scheduler turns it on)
    admission_bound: str = "max"  # max (the paper's lower bound) | sum (queue, then solo latency)
    admission_overhead_s: float = 0.0  # runtime seconds per request added to the solo latency at admission
    slo_multiple: float = 2.0  # SLO = this x the solo latency, where a workflow sets no slo_s
    cost_scale: float = 1.0  # profile times x this: the emulated actors' time_scale
    serving: str = "micro"  # or "monolith": each request one task on a pipeline/WORKFLOW actor (baselines)
    drop_late: bool = False  # fail requests whose SLO deadline passed instead of running them
    drop_hopeless: bool = False  # ...or can no longer be met (remaining critical path)
    batch_by_profile: bool = True  # cap batches at the rows the profile says still pay
    adapter_affinity: bool = True  # LoRA: send a set where it is applied; an actor runs its own set's tasks first
    adapter_bypass_s: float = 2.5  # ...when they are at most this much (profile seconds) younger than the head
    send_hwm: int = 100_000
    log_format: str = "console"
    log_level: str = "info"

    def settings(self) -> BrokerSettings:
        return BrokerSettings(
            heartbeat_interval_s=self.heartbeat_interval_s,
            heartbeat_misses=self.heartbeat_misses,
            max_task_attempts=self.max_task_attempts,
            max_request_restarts=self.max_request_restarts,
            max_requests_in_flight=self.max_requests_in_flight,
            affinity=self.affinity,
            cfg_split=self.cfg_split,
            admission=self.admission,
            admission_bound=self.admission_bound,
            admission_overhead_s=self.admission_overhead_s,
            slo_multiple=self.slo_multiple,
            cost_scale=self.cost_scale,
            serving=self.serving,
            drop_late=self.drop_late,
            drop_hopeless=self.drop_hopeless,
            batch_by_profile=self.batch_by_profile,
            adapter_affinity=self.adapter_affinity,
            adapter_bypass_s=self.adapter_bypass_s,
        )


class BrokerServer:
    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None):
        self.config = config
        self.core = BrokerCore(load_catalog(config.catalog), config.settings(), broker_id=f"broker-{uuid.uuid4().hex[:8]}")
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.sockets: dict[str, zmq.Socket] = {}
        self.telemetry: zmq.Socket | None = None
        self._published_at = -1e9
        self.stopped = threading.Event()

    def bind(self) -> None:
        for name, address in ((FRONTEND, self.config.frontend_address), (BACKEND, self.config.backend_address)):
            sock = self.context.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, self.config.send_hwm)
            sock.setsockopt(zmq.RCVHWM, self.config.send_hwm)
            sock.setsockopt(zmq.MAXMSGSIZE, DEFAULT_LIMITS.max_payload_bytes)
            # Fail a send to an identity with no live connection instead of dropping it:
            # on the backend that is how a reset actor connection is noticed at once.
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.bind(address)
            self.sockets[name] = sock
        if self.config.telemetry_address:
            pub = self.context.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, 16)  # a slow subscriber loses old snapshots, never blocks us
            pub.bind(self.config.telemetry_address)
            self.telemetry = pub
        log.info("broker_listening", frontend=self.config.frontend_address, backend=self.config.backend_address,
                 telemetry=self.config.telemetry_address or None, workflows=sorted(self.core.catalog.workflows))

    def serve_forever(self) -> None:
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
        if isinstance(stats, p.Stats):
            with contextlib.suppress(zmq.Again):  # no room at a slow subscriber: it gets the next one
                self.telemetry.send_multipart(p.encode(stats), zmq.NOBLOCK)
    def _drain(self, name: str, sock: zmq.Socket) -> None:
        handle = self.core.on_frontend if name == FRONTEND else self.core.on_backend
        for _ in range(DRAIN_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            now = time.monotonic()
            identity = frames[0].bytes
            if len(frames) < 2 or frames[1].bytes != b"":
                sends = self.core.on_protocol_error(name, identity, p.ProtocolError(ErrorCode.BAD_FRAMES, "missing empty delimiter frame"))
            else:
                try:
                    msg, payload = p.decode(frames[2:])
                except p.ProtocolError as err:
                    sends = self.core.on_protocol_error(name, identity, err)
                else:
                    sends = self._guarded(handle, identity, msg, payload, now, reply_to=(name, identity))
            self._apply(sends)

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

    def _apply(self, sends: list[Send]) -> None:
        for send in sends:
            frames = [send.identity, b"", *p.encode(send.msg, send.payload)]
            try:
                self.sockets[send.socket].send_multipart(frames, copy=False)
            except zmq.ZMQError as exc:  # a vanished peer must not stop the broker
                log.warning("send_failed", peer=send.identity.hex(), command=send.msg.COMMAND.name, error=str(exc),
                            **message_ids(send.msg))
                if exc.errno == zmq.EHOSTUNREACH:
                    self._apply(self._guarded(self.core.on_unreachable, send.socket, send.identity, time.monotonic()))

    def stop(self) -> None:
        self.stopped.set()

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets.clear()
        if self.telemetry is not None:
            self.telemetry.close(linger=0)
            self.telemetry = None
        if self._own_context:
            self.context.term()


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


def main(argv: list[str] | None = None) -> None:
    import argparse

    from broker.config import add_common_arguments, load_config
    from broker.logs import configure_logging

    parser = argparse.ArgumentParser(prog="lego broker", description="Run the broker.")
    parser.add_argument("--frontend", dest="frontend_address", help="client address to bind (default tcp://127.0.0.1:5555)")
    parser.add_argument("--backend", dest="backend_address", help="actor/agent address to bind (default tcp://127.0.0.1:5556)")
    parser.add_argument("--catalog", action="append", help="extra workflow catalog TOML (repeatable)")
    parser.add_argument("--telemetry", dest="telemetry_address", help="PUB address for telemetry snapshots (default: none)")
    parser.add_argument("--telemetry-interval-s", type=float)
    parser.add_argument("--heartbeat-interval-s", type=float)
    parser.add_argument("--heartbeat-misses", type=int)
    parser.add_argument("--max-task-attempts", type=int)
    parser.add_argument("--affinity", choices=("prefer", "avoid"))
    parser.add_argument("--cfg-split", choices=("never", "always", "auto"))
    parser.add_argument("--admission", choices=("on", "off"))
    parser.add_argument("--admission-bound", choices=("max", "sum"))
    parser.add_argument("--admission-overhead-s", type=float)
    parser.add_argument("--slo-multiple", type=float)
    parser.add_argument("--cost-scale", type=float)
    parser.add_argument("--serving", choices=("micro", "monolith"))
    parser.add_argument("--drop-late", choices=("on", "off"))
    parser.add_argument("--drop-hopeless", choices=("on", "off"))
    parser.add_argument("--batch-by-profile", choices=("on", "off"))
    parser.add_argument("--adapter-affinity", choices=("on", "off"))
    parser.add_argument("--adapter-bypass-s", type=float)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if k != "config"}
    for flag in ("admission", "drop_late", "drop_hopeless", "batch_by_profile", "adapter_affinity"):
        if cli.get(flag) is not None:
            cli[flag] = cli[flag] == "on"
    config = load_config(BrokerConfig, "broker", args.config, cli)
    configure_logging(config.log_format, config.log_level, process="broker")
    run_broker(config)


if __name__ == "__main__":
    main()
