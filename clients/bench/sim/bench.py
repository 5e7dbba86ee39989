"""`lego bench simulate`: every system over traces or arrival rates, simulated.

The systems are `clients.bench.systems`'s: on 8 GPUs with the artifact's placement files
they are exactly the emulated benchmark's (`lego bench cluster`). On any other
cluster size they are generated the same way (`cluster_systems`):

- lego: `lego_system`'s 8-GPU placement on every host: a base-model actor on every
  GPU, one actor of every other model per host (more where the model's share of the
  device time asks for more: full-batch profile costs, weighted by the workflow mix),
  spread over the host's GPUs, and each ControlNet beside every actor of its base model
  where it fits (`clients.bench.deploy.lego_cluster`, which `lego bench cluster` runs
  too); the scheduler runs with the emulated benchmark's settings and may use every GPU
  (`--max-replicas`).
- basic: GPUs split evenly between the workflows (the artifact's 3/3/2 on 8);
- shepherd: GPUs split in proportion to the workflow mix (the artifact's 4/2/2 on 8
  for the paper's traces);
- clockwork: every GPU hosts every workflow, loading them on demand;
- pooled: every GPU one process holding every model once, one deadline-ordered queue,
  lego's admission and drop rules; where the models do not fit `--gpu-memory-gib`, the
  workflows split into groups that fit (`clients.bench.systems.pooled_system`).

`--setting sharing` runs `clients.bench.systems.sharing_systems` instead (six ControlNet
workflows over SD3, SD3.5 Large and FLUX.1-dev, 16 GPUs by default) under Gamma
arrivals, as `lego bench cluster --setting sharing` does; where the base models do not
all fit one GPU, a small one also gets an actor on every GPU with room to spare, and
ControlNets go beside their base models as above (`clients.bench.deploy.lego_sharing`).

`--traces FILE|DIR` replays trace files (`TENANT GAP_SECONDS` lines), tenants mapped to
workflows by `--tenants A=workflow,...` (default: A/B/C -> the paper's three), so an
operator can plan capacity from their own logs; the systems then serve the mapped
workflows (the artifact's placement files only where they are the paper's).

Each (system, load) is one fresh simulation; the table shows SLO attainment, the
on-time reference (how many of the load's requests an ideal fluid EDF scheduler
finishes within their SLO on the same GPUs, `clients.bench.reference`) and the
system's share of it, p50/p99 latency (completed requests), goodput (SLO-met
requests/s over the arrival window) and the wall time the simulation took.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from broker.catalog import Catalog, load_catalog
from broker.core.rules import ADMISSION_BOUNDS
from broker.costs.model import CostModel
from clients.bench.cluster import (
    parse_tenants,
    tenant_workflows,
    trace_files,
    trace_label,
    trace_window_s,
)
from clients.bench.deploy import lego_cluster, lego_sharing
from clients.bench.loadgen import (
    PAPER_TENANTS,
    Arrival,
    burst_arrivals,
    gamma_arrivals,
    scale_arrivals,
    summarize,
    trace_arrivals,
)
from clients.bench.reference import on_time_reference
from clients.bench.sim.simulator import PROCESS_START_S, simulate
from clients.bench.sim.timing import MEASURED, Overheads
from clients.bench.systems import (
    BASELINES,
    PAPER_WORKFLOWS,
    SHARING_WORKFLOWS,
    SystemSpec,
    baseline_system,
    hosts_for,
    pooled_system,
    read_baseline,
    shared_gpus_system,
    sharing_systems,
    static_split_system,
)

# The workflow mix of the paper's traces (tenants A/B/C: 45% / 31.5% / 23.5% of requests).
PAPER_MIX = {"flux-schnell-txt2img-cfg": 0.45, "flux-schnell-canny-cfg": 0.315, "flux-schnell-depth-cfg": 0.235}
DATA = Path(__file__).resolve().parent.parent.parent / "data"  # clients/data: traces/ and baselines/ from the artifact


def cluster_systems(catalog: Catalog, gpus: int, names: tuple[str, ...] = ("lego", *BASELINES),
                    mix: dict[str, float] | None = None, time_scale: float = 1.0,
                    baselines_dir: Path | None = None, hosts: int = 1, gpu_memory_gib: float = 80.0) -> list[SystemSpec]:
    """The paper setting's systems on `gpus` GPUs (see the module docstring); with
    `baselines_dir` and 8 GPUs, the baselines are the artifact's placement files."""
    mix = mix or PAPER_MIX
    workflows = list(mix)
    systems = []
    for name in names:
        artifact = Path(baselines_dir) / f"{name}.yml" if baselines_dir is not None else None
        if name == "lego":
            systems.append(lego_cluster(catalog, gpus, mix, time_scale, hosts, gpu_memory_gib))
        elif name in BASELINES and gpus == 8 and artifact is not None and artifact.exists():
            systems.append(baseline_system(name, read_baseline(artifact)))
        elif name in ("basic", "shepherd"):
            systems.append(static_split_system(name, workflows, gpus, mix if name == "shepherd" else None))
        elif name == "clockwork":
            systems.append(shared_gpus_system(name, workflows, gpus))
        elif name == "pooled":
            systems.append(pooled_system(catalog, workflows, gpus, mix, gpu_memory_gib))
        else:
            raise ValueError(f"systems: unknown system {name!r} (known: lego, {', '.join(BASELINES)})")
    return systems


def setting_systems(setting: str, catalog: Catalog, gpus: int, names: tuple[str, ...], mix: dict[str, float],
                    time_scale: float, baselines_dir: Path | None, hosts: int, gpu_memory_gib: float = 80.0) -> list[SystemSpec]:
    if setting == "paper":
        return cluster_systems(catalog, gpus, names, mix, time_scale, baselines_dir, hosts, gpu_memory_gib)
    systems = sharing_systems(catalog, gpus, time_scale, names, gpu_memory_gib)
    systems = [lego_sharing(s, catalog, gpus, mix, gpu_memory_gib) if s.name == "lego" else s for s in systems]
    # the scheduler may use every GPU (its default cap is 64 replicas per model)
    return [dataclasses.replace(s, scheduler_args=(*s.scheduler_args, "--max-replicas", str(max(64, gpus))))
            if s.scheduler else s for s in systems]


def _loads(args, workflows: list[str]) -> list[tuple[str, list[Arrival], float]]:
    """(label, arrivals, window_s) of every load asked for."""
    loads = []
    if args.traces:
        for file in trace_files(args.traces):
            arrivals = trace_arrivals(file, args.tenants, args.time_limit_s)
            window = trace_window_s(file, arrivals, args.time_limit_s)
            if args.trace_scale != 1.0:  # replicate the trace (shifted copies) for a bigger cluster
                arrivals = _replicate(arrivals, args.trace_scale)
            loads.append((trace_label(file), arrivals, window))
    for rate in args.rates or ():
        duration = args.time_limit_s or args.duration_s
        mix = {w: PAPER_MIX.get(w, 1.0) for w in workflows}  # the sharing setting: an equal mix
        arrivals = gamma_arrivals(rate, args.cv, duration, mix, args.seed)
        label = f"poisson {rate:g}/s" if args.cv == 1.0 else f"gamma {rate:g}/s cv {args.cv:g}"
        loads.append((label, arrivals, duration))
    for n in args.bursts or ():
        loads.append((f"burst {n}", burst_arrivals(n, workflows), 1.0))
    return loads


def with_admission_bound(system: SystemSpec, bound: str) -> SystemSpec:
    """The system with its scheduler setting the broker's admission bound to `bound`."""
    if not system.scheduler:
        return system
    args = list(system.scheduler_args)
    if "--admission-bound" in args:
        args[args.index("--admission-bound") + 1] = bound
    else:
        args += ["--admission-bound", bound]
    return dataclasses.replace(system, scheduler_args=tuple(args))


def _replicate(arrivals: list[Arrival], factor: float) -> list[Arrival]:
    """`factor` (an integer >= 1) copies of a trace interleaved, each shifted by a fraction of a
    mean gap, so the load scales with the cluster while its burst structure stays."""
    copies = int(factor)
    if copies != factor or copies < 1:
        raise ValueError(f"--trace-scale must be a whole number >= 1, got {factor}")
    gap = (arrivals[-1].at_s / len(arrivals)) if arrivals else 0.0
    out = [dataclasses.replace(a, at_s=a.at_s + k * gap / copies) for k in range(copies) for a in arrivals]
    out.sort(key=lambda a: (a.at_s, a.index))
    return [dataclasses.replace(a, index=i) for i, a in enumerate(out)]


def run_matrix(systems: list[SystemSpec], loads, catalog: Catalog, gpus: int, hosts: int, time_scale: float = 1.0,
               progress=None, **options) -> list[dict]:
    """Every (load, system), each a fresh simulation. With `time_scale` s != 1 the cluster
    runs as `lego bench cluster`'s emulated one does: profile times x s and the arrivals
    compressed alike, so only the runtime's overheads (real seconds) change in weight;
    latencies and goodput come back in the trace's own time. Each result carries the
    load's on-time reference (in the trace's time too: it scales out) beside the system."""
    results = []
    costs = CostModel(catalog)
    for label, arrivals, window in loads:
        reference = on_time_reference(arrivals, gpus, costs)
        for system in systems:
            outcomes, stats = simulate(system, scale_arrivals(arrivals, time_scale), catalog, gpus, hosts, time_scale,
                                       **options)
            for outcome in outcomes:  # back in the trace's time
                if outcome.latency_s is not None:
                    outcome.latency_s /= time_scale
            summary = summarize(outcomes, window) if outcomes else {}
            stats = {k: v for k, v in stats.items() if k not in ("timeline", "decisions")}
            results.append({"system": system.name, "load": label, "requests": len(arrivals), "window_s": window,
                            **reference.beside(summary.get("slo_met", 0)), "reference": reference.to_dict(),
                            "summary": summary, "stats": stats})
            if progress:
                progress(results[-1])
    return results


OVERHEAD_FLAGS = (  # (flag, Overheads field, what it is)
    ("--task-overhead-ms", "task_s", "per dispatched batch: the broker's hop and the actor's Python"),
    ("--row-overhead-ms", "row_s", "per task of a batch beyond its first"),
    ("--request-overhead-ms", "request_s", "per request: submit and the result back to the client"),
    ("--fetch-overhead-ms", "fetch_s", "per fetch, beside its bytes (with --fetch-gbps)"),
)


def overheads_of(args) -> Overheads:
    """The runtime overheads the flags ask for (milliseconds and GB/s on the command line)."""
    values = {field: getattr(args, flag[2:].replace("-", "_")) / 1e3 for flag, field, _ in OVERHEAD_FLAGS}
    for flag, field, _ in OVERHEAD_FLAGS:
        if values[field] < 0:
            raise ValueError(f"{flag}: expected milliseconds >= 0, got {values[field] * 1e3:g}")
    if args.fetch_gbps is not None and args.fetch_gbps < 0:
        raise ValueError(f"--fetch-gbps: expected >= 0, got {args.fetch_gbps:g}")
    if args.fetch_gbps is not None and args.gpu_host_fetches:
        raise ValueError("--fetch-gbps: cannot be combined with --gpu-host-fetches (one way to price a fetch)")
    by_path = args.fetch_gbps is None  # the default, as MEASURED prices them
    return Overheads(**values, fetch_bytes_per_s=args.fetch_gbps * 1e9 if args.fetch_gbps else None,
                     fetch_by_path=by_path)


def describe(o: Overheads) -> str:
    fetch = f"{o.fetch_s * 1e3:g} ms + {o.fetch_bytes_per_s / 1e9:g} GB/s" if o.fetch_bytes_per_s else "H800 table"
    if o.fetch_by_path:
        fetch = "this runtime on a GPU host, by path"
    return (f"task {o.task_s * 1e3:g} ms, row {o.row_s * 1e3:g} ms, request {o.request_s * 1e3:g} ms, "
            f"fetch {fetch}")


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[dict]) -> str:
    lines = ["| load | system | requests | SLO attainment | on-time ref | share of ref | p50 s | p99 s | goodput /s | "
             "drops/rejects | GPU util | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        s, st = r["summary"], r["stats"]
        codes = ", ".join(f"{k} {v}" for k, v in s.get("codes", {}).items()) or "-"
        lines.append(f"| {r['load']} | {r['system']} | {r['requests']} | {_fmt(s.get('slo_attainment'), '.1%')} | "
                     f"{_fmt(r.get('on_time_ref'), '.1%')} | {_fmt(r.get('share_of_ref'), '.1%')} | "
                     f"{_fmt(s.get('p50_latency_s'))} | {_fmt(s.get('p99_latency_s'))} | {_fmt(s.get('goodput_per_s'))} | "
                     f"{codes} | {_fmt(st['utilisation'], '.0%')} | {st['wall_s']:.1f} |")
    return "\n".join(lines)


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lego bench simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=("paper", "sharing"), default="paper",
                        help="paper: the 3 FLUX.1-schnell workflows (traces or rates); sharing: the 6 SD3/SD3.5L/"
                             "Flux-dev ControlNet workflows, equal mix, Gamma arrivals (rates)")
    parser.add_argument("--systems", default="lego,basic,shepherd,clockwork", help="comma-separated")
    parser.add_argument("--traces", help="a trace file, or a folder of them (TENANT GAP_SECONDS lines)")
    parser.add_argument("--tenants", metavar="A=WORKFLOW,...",
                        help="trace tenants -> workflows (default: A, B, C -> the paper's three FLUX.1-schnell workflows)")
    parser.add_argument("--trace-scale", type=float, default=1.0, help="replay N interleaved copies of each trace")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",") if x], help="Poisson requests/s, comma-separated")
    parser.add_argument("--bursts", type=lambda s: [int(x) for x in s.split(",") if x],
                        help="N simultaneous requests (round robin over the workflows), comma-separated")
    parser.add_argument("--admission-bound", choices=ADMISSION_BOUNDS,
                        help="lego's admission bound (default: the lego system's own)")
    parser.add_argument("--cv", type=float, help="of the arrival gaps at --rates (1: Poisson; default 1 paper, 2 sharing)")
    parser.add_argument("--duration-s", type=float, default=120.0, help="of each load at --rates")
    parser.add_argument("--time-limit-s", type=float, help="only the first seconds of each trace (and Poisson load)")
    parser.add_argument("--gpus", type=int, help="default 8 (paper), 16 (sharing)")
    parser.add_argument("--hosts", type=int, help="default: one per 8 GPUs")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="profile times x this, arrivals compressed alike (as `lego bench cluster` runs them); "
                             "the runtime's overheads stay real seconds; the table is in the trace's time")
    parser.add_argument("--load-time-scale", type=float, help="profile load times x this (default: --time-scale)")
    parser.add_argument("--process-start-s", type=float, default=PROCESS_START_S)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="client timeout of a request")
    parser.add_argument("--device-model", choices=("fifo", "shared"), default="shared",
                        help="shared: actors on one GPU time-slice it (the emulated backend's default); "
                             "fifo: one batch at a time per GPU (its device_sharing=fifo)")
    for flag, field, what in OVERHEAD_FLAGS:
        parser.add_argument(flag, type=float, default=getattr(MEASURED, field) * 1e3,
                            help=f"{what} (ms; default: the runtime as calibrated, MEASURED)")
    parser.add_argument("--fetch-gbps", type=float,
                        help="price each fetch at this bandwidth, GB/s, plus --fetch-overhead-ms (0: the artifact's "
                             "H800 fetch times; default: by path, as --gpu-host-fetches)")
    parser.add_argument("--gpu-host-fetches", action="store_true",
                        help="price each fetch as `lego bench cluster`'s virtual payloads do (this runtime on a GPU "
                             "host, by path: same GPU, same host, network); the default unless --fetch-gbps is given")
    parser.add_argument("--baselines", default=str(DATA / "baselines"),
                        help="the artifact's placement files (used on 8 GPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every result (summaries and run statistics) to this file")
    args = parser.parse_args(argv)
    try:
        overheads = overheads_of(args)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.time_scale > 0:
        parser.error(f"--time-scale: expected > 0, got {args.time_scale:g}")
    sharing = args.setting == "sharing"
    if not args.traces and not args.rates and not args.bursts:
        parser.error("give --traces DIR|FILE, --rates R1,R2,... and/or --bursts N1,N2,...")
    args.gpus = args.gpus or (16 if sharing else 8)
    args.cv = args.cv or (2.0 if sharing else 1.0)
    catalog = load_catalog()
    try:
        args.tenants = parse_tenants(args.tenants, catalog.workflows) if args.tenants else dict(PAPER_TENANTS)
    except ValueError as exc:
        parser.error(str(exc))
    workflows = list(SHARING_WORKFLOWS) if sharing else tenant_workflows(args.tenants)
    if args.traces and not set(args.tenants.values()) <= set(workflows):
        parser.error(f"--tenants: the sharing setting serves {', '.join(workflows)}; map the trace's tenants onto them")
    paper_workflows = workflows == list(PAPER_WORKFLOWS.values())
    try:
        loads = _loads(args, workflows)
    except ValueError as exc:  # a trace that cannot be replayed: its file and line
        parser.error(str(exc))
    hosts = args.hosts or hosts_for(args.gpus)
    names = tuple(n for n in args.systems.split(",") if n)
    counts = {w: 0 for w in workflows}
    for _, arrivals, _ in loads:
        for a in arrivals:
            counts[a.workflow] = counts.get(a.workflow, 0) + 1
    mix = {w: c for w, c in counts.items() if c} or PAPER_MIX
    # the artifact's placement files name the paper's workflows: another mapping gets generated baselines
    baselines = Path(args.baselines) if paper_workflows else None
    systems = setting_systems(args.setting, catalog, args.gpus, names, mix, args.time_scale, baselines, hosts,
                              args.gpu_memory_gib)
    if args.admission_bound:
        systems = [with_admission_bound(s, args.admission_bound) for s in systems]

    def progress(r: dict) -> None:
        s = r["summary"]
        print(f"  {r['load']:>16} {r['system']:>9}: attainment {_fmt(s.get('slo_attainment'), '.1%')}, "
              f"{r['requests']} requests, {r['stats']['events']} events in {r['stats']['wall_s']:.1f} s", file=sys.stderr, flush=True)

    started = time.perf_counter()
    results = run_matrix(systems, loads, catalog, args.gpus, hosts, args.time_scale, progress,
                         gpu_memory_gib=args.gpu_memory_gib, load_time_scale=args.load_time_scale,
                         process_start_s=args.process_start_s, timeout_s=args.timeout_s, seed=args.seed,
                         workflows=workflows, device_model=args.device_model, overheads=overheads)
    wall = time.perf_counter() - started
    print(f"### Simulated, {args.setting} setting: {args.gpus} GPUs on {hosts} host(s), time_scale {args.time_scale:g}, "
          f"device model {args.device_model}, overheads: {describe(overheads)}\n")
    print(table(results))
    print(f"\nsimulated {len(results)} run(s) in {wall:.1f} s of wall time")
    if args.json:
        Path(args.json).write_text(json.dumps({"setting": args.setting, "gpus": args.gpus, "hosts": hosts, "time_scale": args.time_scale,
                                               "tenants": args.tenants, "wall_s": round(wall, 3), "results": results},
                                              indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
