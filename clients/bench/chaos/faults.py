"""The fault injectors of `lego bench chaos` and the process handling they need.

Runs in the bench's process, on the scenario's main thread while the load runs. It
owns no socket of its own (the broker is asked for stats and spawns through the rig's
admin `Client`, straight to the broker); it signals processes: only those the local
cluster started (the broker, the node agent, and the agent's children, the actors),
and starts the broker or the agent again as a supervisor would (`restart_process`).
Every SIGSTOP is recorded in `Rig.stopped` so that the scenario can continue it
whatever happens. `fewest_left` and `burst_instant` are pure.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from broker import protocol as p
from broker import rundir
from clients.bench.chaos.accounting import ChaosSettings
from clients.bench.chaos.load import OpenLoop
from clients.bench.chaos.tap import AnswerTap
from clients.client import Client
from clients.errors import LegoError, Timeout
from clients.local import LocalCluster


def signal_pid(pid: int, sig: int) -> bool:
    """Send `sig`; False when the process is already gone."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def child_of(pid: int, parent: int) -> bool:
    """Whether `pid` is a live child of `parent`: a pid from the broker's table is
    signalled only if it is one of the processes this bench started."""
    try:
        return psutil.Process(pid).ppid() == parent
    except psutil.Error:
        return False


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """The pids still alive after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        if alive:
            time.sleep(0.1)
    return alive


def restart_process(cluster: LocalCluster, name: str, args: list[str] | None = None) -> None:
    """Start the cluster's `name` process again, with the same arguments unless given (as
    a supervisor would), its log appended; the cluster then stops the new one."""
    args = list(args or cluster.processes[name].args)
    log = rundir.open_private(cluster.run_dir / "logs" / f"{name}.log")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    try:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()
    rundir.write_private(cluster.run_dir / "pids" / f"{name}.pid", f"{proc.pid}\n")
    cluster.processes[name] = proc


def kill_process(cluster: LocalCluster, name: str) -> None:
    proc = cluster.processes[name]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def wait_stats(admin: Client, ready: Callable[[p.Stats], bool], timeout_s: float, what: str) -> p.Stats:
    """Poll the broker's stats until `ready` (a broker that is down is polled again)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Timeout):  # a broker that is down: poll again
            stats = admin.stats(timeout=2.0)
            if ready(stats):
                return stats
        if time.monotonic() > deadline:
            raise LegoError(f"chaos: timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.2)



def burst_instant(s: ChaosSettings) -> float:
    return s.load_s / 3



@dataclass
class Rig:
    """What a fault injector works on: the cluster, an admin client straight to the
    broker (not through the tap), the tap, the running load, the settings and a seeded rng."""

    cluster: LocalCluster
    admin: Client
    tap: AnswerTap
    load: OpenLoop
    s: ChaosSettings
    rng: random.Random
    notes: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    stopped: set[int] = field(default_factory=set)  # SIGSTOPped pids, continued whatever happens
    figures: dict = field(default_factory=dict)  # what a scenario measured besides the accounting (overload)

    @property
    def agent_pid(self) -> int:
        return self.cluster.processes["agent"].pid

    def our_actors(self, stats: p.Stats) -> list[p.ActorStats]:
        return sorted((a for a in stats.actors if a.pid and not a.stopping and child_of(a.pid, self.agent_pid)),
                      key=lambda a: a.actor_id)

    def spawn(self, model: str, device: str) -> list[str]:
        """Start an actor as an operator would; its spawn ids. A refusal is an anomaly of
        the run, noted."""
        spec = self.cluster.spec
        try:
            reply = self.admin.spawn(model, device, "emulated", max_batch_rows=spec.max_batch_rows,
                                     options=spec.options)
        except LegoError as exc:
            self.notes.append(f"spawn of {model} on {device} refused: {exc}")
            return []
        return list(reply.spawn_ids)

    def event(self, text: str) -> None:
        """Note a fault on the timeline, at seconds after the load started."""
        self.timeline.append(f"{self.load.elapsed_s():.2f} s: {text}")

    def in_flight(self, stats: p.Stats) -> bool:
        return any(a.in_flight for a in stats.actors)

    def all_accepted(self) -> bool:
        """Whether the broker has accepted every request submitted so far (seen on the wire)."""
        _, accepted = self.tap.snapshot()
        return set(self.load.submitted_s) <= accepted


def fewest_left(actors: list[p.ActorStats]) -> list[p.ActorStats]:
    """The actors of the models with the fewest live actors: killing among them leaves a
    model with none soonest (pure)."""
    counts = Counter(a.model for a in actors)
    least = min(counts.values(), default=0)
    return [a for a in actors if counts[a.model] == least]


def kill_actors(rig: Rig, replace: bool) -> int:
    """Every fault_every_s while the load runs, SIGKILL one of the agent's actors at
    random; with `replace`, spawn one of the same model on the same device at once.
    Without, the victim is one of a model with the fewest actors left, so that a model
    runs out within the run and its requests meet orphan_timeout_s."""
    kills = 0
    while not rig.load.wait(rig.s.fault_every_s):
        actors = rig.our_actors(rig.admin.stats())
        if not actors:
            continue
        victim = rig.rng.choice(actors if replace else fewest_left(actors))
        if signal_pid(victim.pid, signal.SIGKILL):
            kills += 1
            rig.event(f"SIGKILL {victim.actor_id}")
            if replace:
                rig.spawn(victim.model, victim.device)
    return kills


def stop_actor(rig: Rig) -> int:
    """SIGSTOP the busiest actor until the broker declares it dead, then SIGCONT it: its
    in-flight work must re-run elsewhere and its late results be dropped."""
    rig.load.wait(rig.s.load_s / 3)
    stats = wait_stats(rig.admin, rig.in_flight, 10 + rig.s.load_s, "work in flight")
    victim = max(rig.our_actors(stats), key=lambda a: (a.in_flight, a.actor_id))
    signal_pid(victim.pid, signal.SIGSTOP)
    rig.stopped.add(victim.pid)
    rig.event(f"SIGSTOP {victim.actor_id} ({victim.in_flight} batches in flight)")
    try:
        wait_stats(rig.admin, lambda st: all(a.actor_id != victim.actor_id for a in st.actors),
                   4 * rig.s.expiry_s + 10, f"the broker to declare {victim.actor_id} dead")
    finally:
        signal_pid(victim.pid, signal.SIGCONT)
        rig.stopped.discard(victim.pid)
        rig.event(f"SIGCONT {victim.actor_id}")
    return 1


def kill_agent(rig: Rig) -> int:
    """SIGKILL the node agent with work in flight; its actors exit with it. A supervisor
    starts the agent again and the operator spawns the same actors once it has joined."""
    rig.load.wait(rig.s.load_s / 3)
    stats = wait_stats(rig.admin, rig.in_flight, 10 + rig.s.load_s, "work in flight")
    actors = rig.our_actors(stats)
    lost_before = stats.counters.get("agents_lost", 0)
    kill_process(rig.cluster, "agent")
    rig.event("SIGKILL the node agent")
    survivors = wait_gone([a.pid for a in actors], 10.0)
    if survivors:  # ours (children of the agent we started): not left behind
        rig.notes.append(f"{len(survivors)} actor(s) outlived their agent by 10 s")
        for pid in survivors:
            signal_pid(pid, signal.SIGKILL)
    restart_process(rig.cluster, "agent")
    rig.event("agent started again")
    wait_stats(rig.admin, lambda st: st.counters.get("agents_lost", 0) > lost_before and len(st.agents) == 1,
               4 * rig.s.expiry_s + 20, "the dead agent to expire and the new one to join")
    for actor in actors:
        rig.spawn(actor.model, actor.device)
    rig.event(f"{len(actors)} actors spawned again")
    return 1


def poll_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise LegoError(f"chaos: timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.01)


def restart_broker(rig: Rig, hang: bool) -> int:
    """SIGKILL the broker with a burst in flight and start it again on the same ports
    and journal, after `broker_down_s` of outage: once the broker has accepted every
    request submitted so far (the journal holds them all), or with `hang`, after it
    was stopped (SIGSTOP) just before the burst, which then waits unread in its socket."""
    burst_at = burst_instant(rig.s)
    broker = rig.cluster.processes["broker"]
    if hang:
        rig.load.wait(max(0.0, burst_at - rig.s.broker_down_s / 2))
        broker.send_signal(signal.SIGSTOP)
        rig.stopped.add(broker.pid)
        rig.event("SIGSTOP the broker")
        poll_until(lambda: rig.load.submitted_through(burst_at), 10 + rig.s.load_s, "the burst to be submitted")
        rig.load.wait(rig.s.broker_down_s / 2)  # the hang goes on while the burst reaches its socket
    else:
        rig.load.wait(burst_at)
        poll_until(lambda: rig.load.submitted_through(burst_at), 10 + rig.s.load_s, "the burst to be submitted")
        wait_stats(rig.admin, lambda st: rig.in_flight(st) and rig.all_accepted(), 10 + rig.s.load_s,
                   "the burst to be accepted")
    kill_process(rig.cluster, "broker")
    rig.stopped.discard(broker.pid)
    rig.event("SIGKILL the broker")
    rig.load.wait(rig.s.broker_down_s)  # the outage itself; the load goes on meanwhile
    restart_process(rig.cluster, "broker")
    rig.event("broker started again")
    wait_stats(rig.admin, lambda st: len(st.actors) >= len(rig.cluster.actor_plan()), 30 + 4 * rig.s.expiry_s,
               "the actors to rejoin the restarted broker")
    return 1


def journal_broker(rig: Rig) -> None:
    """Restart the idle broker with a journal and this run's timeouts as flags (a
    restart forgets live settings), before any load: `lego up` starts none."""
    journal = rig.cluster.run_dir / "journal.db"
    proc = rig.cluster.processes["broker"]
    args = [*proc.args, "--journal", str(journal), "--request-timeout-s", str(rig.s.request_timeout_s),
            "--orphan-timeout-s", str(rig.s.orphan_timeout_s)]
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    restart_process(rig.cluster, "broker", args)
    wait_stats(rig.admin, lambda st: len(st.actors) >= len(rig.cluster.actor_plan()), 30 + 4 * rig.s.expiry_s,
               "the actors to join the journaled broker")

