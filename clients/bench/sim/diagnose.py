"""`python -m clients.bench.sim.diagnose`: which decision loses the requests that micro-serving
misses against the on-time reference, on the acceptance suite's traces, simulated.

Runs in the caller's process (no sockets). For each chosen trace of `lego bench suite`:

- each system as shipped (its own admission);
- each system handed exactly the reference's admitted set (the better of its two
  admissions, `clients.bench.reference`), with admission and hopeless-dropping off and
  the other requests never sent. If a system then finishes fewer than the reference,
  no admission rule can close its gap: the requests are lost in execution (the fluid
  machine's relaxations: no per-request parallelism cap, every node at its full-batch
  cost, nothing moved or loaded), not by refusing them;
- micro-serving with one decision changed at a time: CFG split never, the `sum`
  admission bound instead of `lookahead`, no hopeless-dropping;
- as shipped, how far its lookahead admission's estimates ran short: the factor its
  learned margin stretches them by at the end of the run (`admission_factor`, the
  largest over the workflows; 1.0: its requests near the SLO finished when predicted).
  A system whose estimates run long has to refuse by a wide margin and so refuses
  requests it would have served on time;
- with `--clairvoyant`, each system's own execution under an admission that knows how
  every run ends (`clairvoyant`): replay the trace with admission and hopeless-dropping
  off, refuse the earliest-arriving request that ended late (of simultaneous ones, the
  last sent), replay without it, until every request sent ends on time; started once
  from every request and once from those its own admission accepted, the better kept.
  The count is the best admission found with hindsight, not a proven optimum (refusing
  the most late, or the newest of a congested window, found fewer on the traces tried).
  A trace where even this stays below the reference loses the difference in execution:
  no admission rule can win it back. It costs one simulation per refused request
  (minutes per trace for micro-serving).

Prints a markdown table (one row per trace); `--json` prints the rows as JSON instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence

from broker.catalog import load_catalog
from broker.costs.model import CostModel
from clients.bench.loadgen import Arrival, Outcome, summarize
from clients.bench.reference import jobs_of, offline_deadline_order, online_greedy
from clients.bench.sim.bench import DATA, setting_systems
from clients.bench.sim.simulator import simulate
from clients.bench.sim.suite import SETTINGS, suite_traces
from clients.bench.sim.timing import MEASURED
from clients.bench.systems import SystemSpec, hosts_for

DEFAULT_TRACES = ("paper cv 1 85%", "paper cv 2 85%", "paper cv 4 50%", "paper cv 4 85%", "burst 16", "burst 24")


def with_scheduler_args(system: SystemSpec, **values: str) -> SystemSpec:
    """The system with these `lego scheduler` flags set (the scheduler applies them to the broker)."""
    args = list(system.scheduler_args)
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return dataclasses.replace(system, scheduler_args=tuple(args))


def without_admission(system: SystemSpec) -> SystemSpec:
    """Every request sent is served: no admission, no hopeless-dropping (late ones still end late)."""
    plain = dataclasses.replace(system, admission=False, drop_hopeless=False)
    return with_scheduler_args(plain, admission="false") if system.scheduler else plain


def clairvoyant_admission(arrivals: Sequence[Arrival],
                          serve: Callable[[list[Arrival]], list[Outcome]]) -> list[Arrival]:
    """The requests a clairvoyant admission would send: every one of them ends on time
    when `serve` (admission off) runs them. Greedy with hindsight: refuse the
    earliest-arriving request that ended late (of simultaneous ones, the last sent, as an
    arrival-order admission would), serve the rest again, until none ends late. A request
    refused earlier is never reconsidered: the result is a good admission, not the best."""
    sent = list(arrivals)
    for _ in range(len(sent) + 1):
        late = [o for o in serve(sent) if not o.slo_met]
        if not late:
            return sent
        refused = min(late, key=lambda o: (o.scheduled_at, -o.index)).index
        sent = [a for a in sent if a.index != refused]
    raise AssertionError("clairvoyant_admission: a request ended late with nothing sent")


LEGO_VARIANTS = {
    "cfg split never": lambda s: dataclasses.replace(with_scheduler_args(s, cfg_split="never"), cfg_split="never"),
    "bound sum": lambda s: with_scheduler_args(s, admission_bound="sum"),
    "no hopeless drop": lambda s: dataclasses.replace(s, drop_hopeless=False),
}


def diagnose(setting_name: str, labels: tuple[str, ...], names: tuple[str, ...] = ("lego", "pooled"),
             clairvoyant: bool = False, progress: Callable[[str], None] | None = None) -> list[dict]:
    setting = SETTINGS[setting_name]
    catalog = load_catalog()
    costs = CostModel(catalog)
    traces = [t for t in suite_traces(setting) if t.label in labels]
    unknown = set(labels) - {t.label for t in traces}
    if unknown:
        raise ValueError(f"traces: not in the {setting_name} suite: {sorted(unknown)}")
    hosts = hosts_for(setting.gpus)

    def serve(system: SystemSpec, arrivals) -> tuple[list, dict]:
        return simulate(system, arrivals, catalog, setting.gpus, hosts, 1.0, gpu_memory_gib=setting.gpu_memory_gib,
                        seed=0, workflows=setting.workflows, overheads=MEASURED)

    def run(system: SystemSpec, arrivals, window_s: float) -> tuple[int, float, set[int]]:
        """(requests on time, the largest admission factor of a workflow at the end, the
        indexes of the requests it admitted)."""
        outcomes, stats = serve(system, arrivals)
        met = summarize(outcomes, window_s).get("slo_met", 0) if outcomes else 0
        factors = [w.get("admission_factor", 1.0) for w in stats.get("workflows", {}).values()]
        return met, max(factors, default=1.0), {o.index for o in outcomes if o.accepted}

    def on_time(system: SystemSpec, arrivals, window_s: float) -> int:
        return run(system, arrivals, window_s)[0]

    rows = []
    for trace in traces:
        baselines = DATA / "baselines" if trace.mix == "paper" and setting.simulate_setting == "paper" else None
        systems = setting_systems(setting.simulate_setting, catalog, setting.gpus, names, setting.mixes[trace.mix], 1.0,
                                  baselines, hosts, setting.gpu_memory_gib)
        jobs, _ = jobs_of(trace.arrivals, costs)
        greedy, offline = online_greedy(jobs, setting.gpus), offline_deadline_order(jobs, setting.gpus)
        admitted = {j.index for j in max(greedy, offline, key=len)}
        oracle_set = [a for a in trace.arrivals if a.index in admitted]
        row = {"trace": trace.label, "requests": len(trace.arrivals), "reference": len(admitted), "systems": {}}
        for system in systems:
            shipped, factor, admitted_as_shipped = run(system, trace.arrivals, trace.window_s)
            row["systems"][system.name] = {
                "as shipped": shipped, "estimates ran long x": round(factor, 2),
                "given the reference's set": on_time(without_admission(system), oracle_set, trace.window_s)}
            if system.name == "lego":
                for label, change in LEGO_VARIANTS.items():
                    row["systems"]["lego"][label] = on_time(change(system), trace.arrivals, trace.window_s)
            if clairvoyant:  # the better of two starts: every request, and those it admitted itself
                plain = without_admission(system)
                starts = (trace.arrivals, [a for a in trace.arrivals if a.index in admitted_as_shipped])
                row["systems"][system.name]["clairvoyant"] = max(
                    len(clairvoyant_admission(start, lambda sent, s=plain: serve(s, sent)[0])) for start in starts)
            if progress:
                progress(f"{trace.label} {system.name}: {row['systems'][system.name]}")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    columns = [(name, label) for name, results in rows[0]["systems"].items() for label in results]
    head = " | ".join(f"{name}: {label}" for name, label in columns)
    lines = [f"| trace | requests | on-time ref | {head} |", "| --- " * (3 + len(columns)) + "|"]
    for r in rows:
        cells = " | ".join(str(r["systems"][name][label]) for name, label in columns)
        lines.append(f"| {r['trace']} | {r['requests']} | {r['reference']} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.bench.sim.diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="paper", choices=sorted(SETTINGS))
    parser.add_argument("--traces", default=",".join(DEFAULT_TRACES), help="suite trace labels, comma-separated")
    parser.add_argument("--systems", default="lego,pooled", help="comma-separated")
    parser.add_argument("--clairvoyant", action="store_true",
                        help="also each system under an admission that knows how every run ends (slow)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    labels = tuple(t.strip() for t in args.traces.split(",") if t.strip())
    rows = diagnose(args.setting, labels, tuple(n for n in args.systems.split(",") if n), args.clairvoyant,
                    lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
