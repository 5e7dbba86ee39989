"""The scheduler actor (`lego scheduler`): polls telemetry, plans, acts.

Runs in its own process as a peer of the broker (one `BrokerLink`: a DEALER that the
controller's thread owns) and, when the broker publishes telemetry, a subscriber of it (a SUB
socket owned by the main thread; without one it polls GetStats). Every `interval_s`
it takes the newest telemetry snapshot, runs one pure planning round (`scheduler.plan.plan_round`), and applies the actions:
spawns through the broker's node agents, drain-then-stop of surplus or converted
actors. At start it sets the broker's live policy (admission, SLO multiple, parallel
CFG groups). Every decision is logged with its reason and posted back to the broker
with the current targets, so `lego status` shows the plan. Replica bounds an operator
set at the broker (`lego admin scale`) override the --model-min/--model-max flags.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import signal
import threading
import time
from dataclasses import dataclass, field

import structlog
import zmq

from broker import auth
from broker import protocol as p
from broker.catalog import load_catalog
from broker.config import add_common_arguments, load_config, parse_options
from broker.costs.model import CostModel
from broker.logs import configure_logging
from scheduler.link import BrokerLink, LinkError
from scheduler.placement import Spawn, Stop
from scheduler.plan import PlanSettings, plan_round, served_models
from scheduler.scaling import ScalingMemory, ScalingSettings
from scheduler.snapshot import from_stats

log = structlog.get_logger(__name__)


@dataclass
class SchedulerConfig:
    broker: str = "tcp://127.0.0.1:5555"  # the broker's frontend
    telemetry: str = ""  # the broker's telemetry PUB address; empty: poll the frontend
    catalog: list[str] = field(default_factory=list)
    workflows: list[str] = field(default_factory=list)  # to serve; empty: every catalog workflow
    interval_s: float = 0.5
    backend: str = "emulated"  # of the actors it starts
    actor_options: list[str] = field(default_factory=list)  # KEY=VALUE for the actors it starts
    max_batch_rows: int = 8
    admission: bool = True
    admission_bound: str = "lookahead"  # the broker's: lookahead | max (the paper's lower bound) | sum (queue, then solo)
    admission_overhead_s: float = 0.0  # the broker's: runtime seconds per request beyond the profiles
    slo_multiple: float = 2.0
    cfg_split: str = "auto"
    horizon_s: float = 4.0
    queue_wait_s: float = 0.5  # ready work per replica that marks a model as the bottleneck...
    sustain_s: float = 1.0  # ...when it stays so this long
    up_cooldown_s: float = 1.0
    down_cooldown_s: float = 10.0
    min_replicas: int = 1
    max_replicas: int = 64
    model_min: list[str] = field(default_factory=list)  # MODEL=N: per-model minimum replicas
    model_max: list[str] = field(default_factory=list)  # MODEL=N: per-model maximum replicas
    headroom_gib: float = 4.0
    change_timeout_s: float = 60.0  # a spawn or drain not settled by then is given up on
    key_file: str = ""  # keys on: the scheduler's key (role scheduler; env LEGO_KEY_FILE)
    log_format: str = "console"
    log_level: str = "info"


def with_operator_bounds(scaling: ScalingSettings, operator: dict) -> ScalingSettings:
    """`scaling` with the broker's operator bounds (model -> {"min", "max"}, None: unset)
    laid over the flags' per-model bounds. Where an operator's bound contradicts a flag's
    (min 5 against a flag's max 3), the operator's wins and the other bound moves to it."""
    if not operator:
        return scaling
    lows, highs = dict(scaling.per_model_min), dict(scaling.per_model_max)
    for model, bounds in operator.items():
        low, high = bounds.get("min"), bounds.get("max")
        if low is not None:
            lows[model] = low
        if high is not None:
            highs[model] = high
        low_now, high_now = lows.get(model, scaling.min_replicas), highs.get(model, scaling.max_replicas)
        if low_now > high_now:
            if high is None:
                highs[model] = low_now
            else:
                lows[model] = high_now
    return dataclasses.replace(scaling, per_model_min=lows, per_model_max=highs)


@dataclass
class Change:
    model: str
    since: float
    kind: str  # spawn | stop
    key: str  # spawn id or actor id


class SchedulerController:
    def __init__(self, config: SchedulerConfig, client=None):
        self.config = config
        self.catalog = load_catalog(config.catalog)
        for name in config.workflows:
            if name not in self.catalog.workflows:
                raise ValueError(f"workflows: unknown workflow {name!r}")
        self.costs = CostModel(self.catalog)
        per_model_min = {k: int(v) for k, v in parse_options(config.model_min).items()}
        per_model_max = {k: int(v) for k, v in parse_options(config.model_max).items()}
        for name in [*per_model_min, *per_model_max]:
            if name not in self.catalog.models:
                raise ValueError(f"model_min/model_max: unknown model {name!r}")
        self.settings = PlanSettings(
            ScalingSettings(config.horizon_s, queue_wait_s=config.queue_wait_s,
                            sustain_s=config.sustain_s, up_cooldown_s=config.up_cooldown_s, down_cooldown_s=config.down_cooldown_s,
                            min_replicas=config.min_replicas, max_replicas=config.max_replicas,
                            per_model_min=per_model_min, per_model_max=per_model_max),
            int(config.headroom_gib * 1024**3), tuple(config.workflows))
        self.options = parse_options(config.actor_options)
        self.key = auth.load_key_file(config.key_file) if config.key_file else None
        self.client = client or BrokerLink(config.broker, key=self.key)
        self.memory = ScalingMemory()
        self.changes: list[Change] = []
        self.decisions: collections.deque = collections.deque(maxlen=50)
        self._busy: dict[str, tuple[float, float]] = {}  # actor -> (busy_s, at)
        self.stopping = threading.Event()

    def configure_broker(self) -> None:
        c = self.config
        self.client.configure({"admission": c.admission, "admission_bound": c.admission_bound,
                               "admission_overhead_s": c.admission_overhead_s,
                               "slo_multiple": c.slo_multiple, "cfg_split": c.cfg_split})

    def step(self, stats: p.Stats | None = None, now: float | None = None) -> list:
        """One round. `now`: the clock of the round (the simulator passes virtual time)."""
        stats = stats or self.client.stats()
        now = time.monotonic() if now is None else now
        snapshot = from_stats(stats, self._busy_ratios(stats, now))
        self._settle(stats, now)
        in_progress = frozenset(change.model for change in self.changes)
        settings = dataclasses.replace(self.settings, scaling=with_operator_bounds(self.settings.scaling,
                                                                                   stats.replica_bounds))
        plan = plan_round(snapshot, self.costs, self.memory, settings, in_progress)
        self.memory = plan.memory
        for action in plan.actions:
            self._apply(action, now)
        self.client.configure(plan={
            "targets": {t.model: t.target for t in plan.targets},
            "bounds": {t.model: list(settings.scaling.bounds(t.model)) for t in plan.targets},  # in effect
            "replicas": snapshot.replicas(),
            "in_progress": sorted(f"{c.kind} {c.model} ({c.key})" for c in self.changes),
            "decisions": list(self.decisions),
        })
        return plan.actions

    def _stamp(self, now: float) -> str:
        """How a decision's time reads in the plan: wall-clock time of day here."""
        return time.strftime("%H:%M:%S")

    def _busy_ratios(self, stats: p.Stats, now: float) -> dict[str, float]:
        ratios = {}
        for actor in stats.actors:
            busy = actor.telemetry.busy_s if actor.telemetry else 0.0
            before = self._busy.get(actor.actor_id)
            if before is not None and now > before[1]:
                ratios[actor.actor_id] = min(1.0, max(0.0, (busy - before[0]) / (now - before[1])))
            self._busy[actor.actor_id] = (busy, now)
        return ratios

    def _settle(self, stats: p.Stats, now: float) -> None:
        """Forget changes that took effect (joined, refused, exited, gone) or timed out."""
        actor_ids = {a.actor_id for a in stats.actors}
        agent_states = {spawn: state for agent in stats.agents for spawn, state in agent.actors}
        kept = []
        for change in self.changes:
            if change.kind == "spawn":
                done = any(a.endswith(f"#{change.key}") for a in actor_ids) or agent_states.get(change.key) in ("refused", "exited")
            else:
                done = change.key not in actor_ids
            if not done and now - change.since > self.config.change_timeout_s:
                log.warning("scheduler_change_timed_out", kind=change.kind, model=change.model, key=change.key)
                done = True
            if not done:
                kept.append(change)
        self.changes = kept

    def _apply(self, action, now: float) -> None:
        try:
            if isinstance(action, Spawn):
                reply = self.client.spawn(action.model, action.device, self.config.backend, host=action.host,
                                          max_batch_rows=self.config.max_batch_rows, options=self.options or None)
                self.changes += [Change(action.model, now, "spawn", s) for s in reply.spawn_ids]
                line = f"start {action.model} on {action.host}/{action.device}: {action.reason}"
            elif isinstance(action, Stop):
                self.client.stop_actor(action.actor_id)
                self.changes.append(Change(action.model, now, "stop", action.actor_id))
                line = f"stop {action.actor_id}: {action.reason}"
            else:
                raise TypeError(f"unknown action {action!r}")
        except LinkError as exc:
            line = f"FAILED {action}: {exc}"
            log.warning("scheduler_action_failed", action=str(action), error=str(exc), model=action.model,
                        actor_id=getattr(action, "actor_id", None))
        else:
            log.info("scheduler_decision", decision=line, model=action.model, actor_id=getattr(action, "actor_id", None))
        self.decisions.append(f"{self._stamp(now)} {line}")

    def run(self) -> None:
        models = served_models(self.catalog, self.settings.workflows)
        log.info("scheduler_started", broker=self.config.broker, telemetry=self.config.telemetry or None,
                 models=models, interval_s=self.config.interval_s)
        subscriber = TelemetrySubscriber(self.config.telemetry, self.key) if self.config.telemetry else None
        configured = False
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                try:
                    if not configured:
                        self.configure_broker()
                        configured = True
                    # A snapshot older than a few rounds means the publisher is gone: poll.
                    stats = subscriber.latest(max_age_s=3 * self.config.interval_s) if subscriber else None
                    self.step(stats)
                except LinkError as exc:  # broker unreachable or restarting: try again next round
                    configured = False
                    log.warning("scheduler_round_failed", error=str(exc))
                self.stopping.wait(max(0.0, self.config.interval_s - (time.monotonic() - started)))
        finally:
            if subscriber is not None:
                subscriber.close()
            self.client.close()

    def stop(self) -> None:
        self.stopping.set()


class TelemetrySubscriber:
    """The broker's published snapshots; keeps only the newest (they supersede each other)."""

    def __init__(self, address: str, key: auth.KeyFile | None = None):
        self._zmq = zmq
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        if key is not None:
            key.as_client(self.socket)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 16)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(address)
        self._newest: p.Stats | None = None
        self._received_at = 0.0

    def latest(self, max_age_s: float) -> p.Stats | None:
        while True:
            try:
                frames = self.socket.recv_multipart(self._zmq.NOBLOCK)
            except self._zmq.Again:
                break
            try:
                msg, _ = p.decode(frames)
            except p.ProtocolError as err:
                log.warning("telemetry_undecodable", error=err.message)
                continue
            if isinstance(msg, p.Stats):
                self._newest, self._received_at = msg, time.monotonic()
        if self._newest is None or time.monotonic() - self._received_at > max_age_s:
            return None
        return self._newest

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lego scheduler", description="Run the scheduler actor.")
    parser.add_argument("--broker", help="broker frontend address (env LEGO_BROKER)")
    parser.add_argument("--telemetry", help="the broker's telemetry PUB address (default: poll the broker)")
    parser.add_argument("--catalog", action="append")
    parser.add_argument("--workflows", type=lambda s: [w for w in s.split(",") if w], help="comma-separated")
    parser.add_argument("--interval-s", type=float)
    parser.add_argument("--backend")
    parser.add_argument("--actor-option", dest="actor_options", action="append", help="KEY=VALUE for started actors")
    parser.add_argument("--max-batch-rows", type=int)
    parser.add_argument("--admission", type=lambda s: s.lower() in ("1", "true", "on", "yes"))
    parser.add_argument("--admission-bound", choices=("max", "sum", "lookahead"))  # broker.core.rules.ADMISSION_BOUNDS
    parser.add_argument("--admission-overhead-s", type=float)
    parser.add_argument("--slo-multiple", type=float)
    parser.add_argument("--cfg-split", choices=("never", "always", "auto"))
    parser.add_argument("--horizon-s", type=float)
    parser.add_argument("--queue-wait-s", type=float)
    parser.add_argument("--sustain-s", type=float)
    parser.add_argument("--up-cooldown-s", type=float)
    parser.add_argument("--down-cooldown-s", type=float)
    parser.add_argument("--min-replicas", type=int)
    parser.add_argument("--max-replicas", type=int)
    parser.add_argument("--model-min", action="append", metavar="MODEL=N", help="a model's minimum replicas")
    parser.add_argument("--model-max", action="append", metavar="MODEL=N", help="a model's maximum replicas")
    parser.add_argument("--headroom-gib", type=float)
    parser.add_argument("--key-file", help="keys on: the scheduler's key file (env LEGO_KEY_FILE)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    config = load_config(SchedulerConfig, "scheduler", args.config, cli)
    configure_logging(config.log_format, config.log_level, process="scheduler")
    controller = SchedulerController(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: controller.stop())
    controller.run()


if __name__ == "__main__":
    main()
