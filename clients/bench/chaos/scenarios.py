"""The scenarios of `lego bench chaos` and their runs, and the `lego bench chaos` command.

Runs in the bench's process and owns the processes of each scenario: a fresh
`LocalCluster` (broker, node agent, emulated actors) per scenario, stopped with it,
and, for its duration, an admin `Client` to the broker, the `AnswerTap` and the load's
`Client` connected through it. `Scenario.instants` is pure; `run_cli` prints the
table (or --json), appends it with --record, and exits 1 on any problem.
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from broker import protocol as p
from broker.catalog import load_catalog
from clients.bench import records
from clients.bench.chaos.accounting import (
    QUICK,
    REQUEST,
    WORKFLOW,
    ChaosSettings,
    Observation,
    Row,
    chaos_table,
    problems,
    rows_of,
    tally,
)
from clients.bench.chaos.faults import (
    Rig,
    burst_instant,
    journal_broker,
    kill_actors,
    kill_agent,
    restart_broker,
    signal_pid,
    stop_actor,
)
from clients.bench.chaos.load import OpenLoop, collect
from clients.bench.chaos.overload import (
    measure_capacity,
    offer_overload,
    overload_notes,
    overload_result,
    overload_table,
)
from clients.bench.chaos.poison import (
    POISON_PROMPT,
    poison_notes,
    poison_result,
    poison_table,
    prepare_poison,
    replace_crashed,
)
from clients.bench.chaos.tap import AnswerTap
from clients.bench.loadgen import poisson_arrivals
from clients.client import Client
from clients.local import LocalCluster, LocalClusterSpec


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: str  # what is done, for the docs and --json
    inject: Callable[[Rig], int]  # runs while the load does; returns the faults injected
    orphan_timeout_s: Callable[[ChaosSettings], float] = lambda s: s.orphan_timeout_s
    prepare: Callable[[Rig], None] | None = None  # before the load starts
    burst: int = 0  # requests at once at burst_instant, on top of the Poisson arrivals
    admission: bool = False  # the broker's --admission
    actor_options: dict = field(default_factory=dict)  # every actor's, replacements included (fault options)
    # after the load: figures besides the accounting, from the final stats, kept in the
    # Row's field `figures_in` (overload, poison); `verdict` says what in them breaks a promise
    figures: Callable[[Rig, list[Observation], p.Stats], dict] | None = None
    figures_in: str = "overload"
    verdict: Callable[[dict], list[str]] = overload_notes

    def instants(self, s: ChaosSettings, seed: int) -> list[float]:
        """When each request is submitted, seconds after the load starts (pure)."""
        poisson = [a.at_s for a in poisson_arrivals(s.rate_per_s, s.load_s, [WORKFLOW], seed)]
        return sorted(poisson + [burst_instant(s)] * self.burst)



SCENARIOS = {s.name: s for s in (
    Scenario("actor-kill", "SIGKILL a random actor every fault_every_s; a replacement spawned at once",
             lambda rig: kill_actors(rig, replace=True)),
    Scenario("actor-kill-unreplaced", "SIGKILL a random actor every fault_every_s; nothing replaces them",
             lambda rig: kill_actors(rig, replace=False), orphan_timeout_s=lambda s: s.unreplaced_orphan_timeout_s),
    Scenario("actor-stop", "SIGSTOP the busiest actor past heartbeat expiry, then SIGCONT", stop_actor),
    Scenario("agent-kill", "SIGKILL the node agent with work in flight; agent restarted, actors respawned",
             kill_agent),
    Scenario("broker-restart", "SIGKILL the journaled broker once a burst is accepted; restarted on the same "
             "ports and journal", lambda rig: restart_broker(rig, hang=False), prepare=journal_broker, burst=16),
    Scenario("broker-hang-kill", "SIGSTOP the journaled broker, a burst arrives, SIGKILL; restarted on the same "
             "ports and journal", lambda rig: restart_broker(rig, hang=True), prepare=journal_broker, burst=16),
    Scenario("overload", "the capacity measured (closed loop, admission off), then overload_factor x it offered, "
             "admission on", offer_overload, prepare=measure_capacity, admission=True, figures=overload_result),
    Scenario("poison", "poison_requests of the load's requests carry a prompt that crashes every actor that encodes "
             "it; each actor that exits is replaced at once", replace_crashed, prepare=prepare_poison,
             actor_options={"crash_on_prompt": POISON_PROMPT}, figures=poison_result, figures_in="poison",
             verdict=poison_notes),
)}



def cluster_spec(s: ChaosSettings, run_dir: str, admission: bool = False,
                 actor_options: dict | None = None) -> LocalClusterSpec:
    return LocalClusterSpec(admission=admission,
        workflows=[WORKFLOW], replicas=dict.fromkeys(load_catalog().workflows[WORKFLOW].models, s.replicas),
        options={"time_scale": s.time_scale, **(actor_options or {})}, emulate_gpus=2, gpu_memory_gib=1000.0,  # spawns never short of memory
        run_dir=run_dir, log_level=s.log_level, heartbeat_interval_s=s.heartbeat_interval_s,
        heartbeat_misses=s.heartbeat_misses)


def run_scenario(scenario: Scenario, s: ChaosSettings, run_dir: str, index: int) -> Row:
    """One fresh cluster, one fault under load; the row of its accounting."""
    instants = scenario.instants(s, s.seed + index)
    spec = cluster_spec(s, run_dir, scenario.admission, scenario.actor_options)
    with LocalCluster(spec) as cluster, Client(cluster.frontend, admin_timeout_s=5.0) as admin, \
            AnswerTap(cluster.frontend) as tap, Client(tap.address) as client:
        admin.configure({"request_timeout_s": s.request_timeout_s, "orphan_timeout_s": scenario.orphan_timeout_s(s)})
        client.generate(WORKFLOW, prompt="warm up", seed=0, timeout=60, **REQUEST)
        rig = Rig(cluster, admin, tap, OpenLoop(client, instants), s, random.Random(s.seed + index))
        if scenario.prepare:
            scenario.prepare(rig)
        rig.load.start()
        try:
            faults = scenario.inject(rig)
        finally:
            for pid in rig.stopped:
                signal_pid(pid, signal.SIGCONT)
        rig.load.join()
        observations = collect(rig.load, tap, s.answer_bound_s)
        wall_s = time.monotonic() - rig.load.started_at
        stats = admin.stats()
    row = tally(scenario.name, observations, faults, wall_s, stats.counters, rig.notes, rig.timeline)
    if scenario.figures:
        figures = scenario.figures(rig, observations, stats)
        setattr(row, scenario.figures_in, figures)
        row.notes += scenario.verdict(figures)
    return row


def scenarios_of(s: ChaosSettings) -> list[Scenario]:
    unknown = [name for name in s.scenarios if name not in SCENARIOS]
    if unknown:
        raise ValueError(f"scenarios: unknown {unknown} (known: {list(SCENARIOS)})")
    return [SCENARIOS[name] for name in (s.scenarios or SCENARIOS)]


def run_chaos_bench(s: ChaosSettings, progress: Callable[[str], None] = lambda line: None) -> dict:
    """Every scenario in turn; the rows with where and when they ran."""
    chosen = scenarios_of(s)
    root = s.run_dir or tempfile.mkdtemp(prefix="lego-chaos-")
    started = time.monotonic()
    rows = []
    for index, scenario in enumerate(chosen):
        rows.append(run_scenario(scenario, s, f"{root}/{scenario.name}", index))
        row = rows[-1]
        extra = f", goodput {row.overload['goodput_share']:.0%} of capacity" if row.overload else ""
        if row.poison:
            extra += (f", {row.poison['poison_quarantined']}/{row.poison['poison_submitted']} poison quarantined, "
                      f"{row.poison['crashes']} actor crashes")
        progress(f"  {scenario.name}: {row.completed}/{row.submitted} completed, "
                 f"lost {row.lost}, duplicated {row.duplicated}{extra} ({row.wall_s:g} s)")
    return {"date": records.utc_now(), "machine": records.machine(), "settings": dataclasses.asdict(s),
            "run_dir": root, "wall_s": round(time.monotonic() - started, 1),
            "scenarios": {sc.name: sc.fault for sc in chosen}, "rows": [dataclasses.asdict(r) for r in rows]}



def tables(rows: list[Row]) -> str:
    """The accounting's table, and the overload and poison figures' below it where a row has them."""
    extras = [table for table in (overload_table(rows), poison_table(rows)) if table]
    return "\n\n".join([chaos_table(rows), *extras])


def record(result: dict, path: str, command: str) -> None:
    """Append the run to `path` (docs/reliability.md, docs/benchmarks.md) as its own section."""
    s = result["settings"]
    overload = (f" overload: {s['overload_factor']:g}x the capacity measured with {s['capacity_concurrency']} in "
                f"flight, admission bound {s['admission_bound']}, admission_overhead_s {s['admission_overhead_s']:g}."
                if "overload" in result["scenarios"] else "")
    poison = f" poison: {s['poison_requests']} poison requests." if "poison" in result["scenarios"] else ""
    with open(path, "a") as out:
        out.write(f"\n### Fault injection, emulated cluster ({result['date']})\n\n"
                  f"Machine: {result['machine']}. Command: `{command}`; took {result['wall_s']} s. "
                  f"{WORKFLOW}, {s['replicas']} emulated actors per model, Poisson arrivals at "
                  f"{s['rate_per_s']:g}/s for {s['load_s']:g} s per scenario.{overload}{poison}\n\n{tables(rows_of(result))}\n")


# ---------------------------------------------------------------- `lego bench chaos`


def settings_from_args(args) -> ChaosSettings:
    """Settings from the CLI's flags (those not given keep their defaults; --quick first)."""
    given = dict(QUICK) if args.quick else {}
    for name in ("rate_per_s", "load_s", "time_scale", "seed", "run_dir", "admission_bound",
                 "admission_overhead_s"):
        if getattr(args, name, None) is not None:
            given[name] = getattr(args, name)
    if args.scenarios:
        given["scenarios"] = tuple(x.strip() for x in args.scenarios.split(",") if x.strip())
    settings = ChaosSettings(**given)
    scenarios_of(settings)
    return settings


def run_cli(args, command: str) -> int:
    """Exit 1 when any request was lost, left unanswered or answered twice (a CI check)."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"lego bench chaos: {exc}", file=sys.stderr)
        return 2
    result = run_chaos_bench(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    rows = rows_of(result)
    print(json.dumps(result, indent=2) if args.json else tables(rows))
    if args.record:
        record(result, args.record, command.strip())
    found = problems(rows)
    for line in found:
        print(f"lego bench chaos: {line} (logs in {result['run_dir']})", file=sys.stderr)
    return 1 if found else 0
