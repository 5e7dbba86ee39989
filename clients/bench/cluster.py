"""`lego bench cluster`: micro-serving against monolithic serving, same cluster, same
trace, same SLO, in one invocation.

Two settings. `paper`: 8 GPUs, the three FLUX.1-schnell workflows, the artifact's
traces at rate scales 0.5-8. `sharing`: 16 GPUs, six ControlNet workflows over SD3,
SD3.5 Large and FLUX.1-dev sharing encoders, VAEs and base models, bursty Gamma
arrivals (CV 2) at a range of request rates. `--traces FILE|DIR` replays an operator's
own traces instead (`TENANT GAP_SECONDS` lines, tenants mapped to workflows by
`--tenants`, default A/B/C -> the paper's three); the sweep is then over the traces,
each at its offered requests/s, and systems serving other workflows than the paper's
are generated as `lego bench simulate` generates them.

Every (system, rate) runs on a fresh emulated cluster of real processes (broker,
scheduler for `lego`, one node agent per 8 emulated H800s as the simulator counts hosts,
actors) so no state carries over. An agent hosts its emulated actors on threads of its own process
(`hosted_emulated`, actors/hosted.py: the same runtime and sockets, no process per
actor) unless `--actor-processes` asks for a process each, as on a real GPU node; each
run reports the CPU the emulation itself used (broker, scheduler, agent, actors and
this process, the load generator) and its share of the machine's cores, since an
emulation starved of CPU measures the machine, not the system. Arrivals come from the paper's traces (`TENANT GAP_SECONDS`, tenants
A/B/C -> the three FLUX.1-schnell workflows), compressed by `time_scale` along with
every emulated time, so a 120 s trace takes 120 x time_scale seconds and every
ratio is preserved. The SLO of each request is 2x its workflow's solo latency from
the profiles (the paper measured 1.99/2.07/2.40 s with diffusers; the profiles give
2.02/2.10/2.10 s).

Reported per system and rate: SLO attainment, the on-time reference (how many of the
requests an ideal fluid EDF scheduler finishes within their SLO, `clients.bench.reference`)
and the system's share of it, p50/p99 latency, goodput, device utilisation (actors'
busy time over GPU time: above 1 when co-located actors time-slice a GPU, each counting
its whole slowed run). Then per system: the highest rate scale with >= 90% attainment,
the largest simultaneous burst with >= 90%, the ratios against the best baseline, the
share of the fluid upper bound (GPUs over device-seconds per request: the rate no
scheduler can beat) and of the on-time reference. Progress goes to standard error, so
`--json` prints JSON only.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from broker.catalog import Catalog, load_catalog, validate_params
from broker.costs.model import CostModel
from clients.bench import records
from clients.bench.charts import line_chart
from clients.bench.deploy import lego_cluster, lego_sharing
from clients.bench.loadgen import (
    Arrival,
    burst_arrivals,
    default_params,
    gamma_arrivals,
    run_open_loop_sync,
    scale_arrivals,
    summarize,
    trace_arrivals,
)
from clients.bench.reference import Reference, on_time_reference
from clients.bench.systems import (
    PAPER_TENANTS,
    PAPER_WORKFLOWS,
    SHARING_WORKFLOWS,
    SystemSpec,
    broker_flags,
    hosts_for,
    lego_system,
    paper_systems,
    shared_gpus_system,
    sharing_systems,
    static_split_system,
)
from clients.client import Client
from clients.errors import RequestFailed, RequestRejected
from clients.local import LocalCluster, LocalClusterSpec

DATA = Path(__file__).resolve().parent.parent / "data"  # traces and baseline placements (copied from the artifact)
RATES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
SHARING_RATES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)  # requests/s; the fluid bound is about 2.5 on 16 GPUs
BURSTS = (1, 2, 4, 6, 8, 10, 12, 16, 24, 32, 48)
TARGET = 0.9
WINDOW_S = 120.0  # of each trace, and of the generated arrivals


@dataclass
class BenchSettings:
    setting: str = "paper"  # paper | sharing
    systems: tuple[str, ...] = ("lego", "basic", "shepherd", "clockwork")
    rates: tuple[float, ...] = RATES
    bursts: tuple[int, ...] = BURSTS
    gpus: int = 8
    time_scale: float = 0.25
    trace_limit_s: float | None = None  # only the first seconds of each trace (quick mode)
    traces: str | Path | None = None  # an operator's trace file or folder: replayed instead of the rate sweep
    tenants: dict[str, str] = field(default_factory=lambda: dict(PAPER_TENANTS))  # trace tenant -> workflow
    data_dir: Path = DATA
    run_dir: str = ""
    log_level: str = "warning"
    # Emulated actors on threads of the node agent (one process), not a process each.
    hosted_actors: bool = True
    # Micro-serving's emulated tensors: "virtual" (sizes without bytes, each fetch priced
    # as this runtime on a GPU host: actors/backends/emulated.py) or "real" (bytes moved
    # through this machine's memory, at its speed)
    payloads: str = "virtual"
    results: dict = field(default_factory=dict)

    @property
    def workflows(self) -> list[str]:
        if self.setting == "sharing":
            return list(SHARING_WORKFLOWS)
        return tenant_workflows(self.tenants)

    @property
    def window_s(self) -> float:
        return self.trace_limit_s or WINDOW_S

    @property
    def sweep(self) -> str:
        """What the sweep's x is: the paper's rate scales, or offered requests/s."""
        return "rate scale" if self.setting == "paper" and self.traces is None else "offered req/s"


# ---------------------------------------------------------------- traces and tenants


def parse_tenants(text: str, known: Iterable[str] | None = None) -> dict[str, str]:
    """`A=workflow,B=workflow` as {tenant: workflow}; ValueError naming a malformed entry,
    a tenant given twice or (with `known`) a workflow not among them."""
    tenants: dict[str, str] = {}
    known = None if known is None else set(known)
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        tenant, sep, workflow = (part.strip() for part in entry.partition("="))
        if not sep or not tenant or not workflow or any(c.isspace() for c in tenant):
            raise ValueError(f"--tenants: expected TENANT=WORKFLOW, got {entry!r}")
        if tenant in tenants:
            raise ValueError(f"--tenants: tenant {tenant!r} is mapped twice")
        if known is not None and workflow not in known:
            raise ValueError(f"--tenants: unknown workflow {workflow!r} (known: {', '.join(sorted(known))})")
        tenants[tenant] = workflow
    if not tenants:
        raise ValueError("--tenants: expected TENANT=WORKFLOW[,TENANT=WORKFLOW...]")
    return tenants


def tenant_workflows(tenants: dict[str, str]) -> list[str]:
    """The workflows a tenant mapping serves, each once, in the mapping's order."""
    return list(dict.fromkeys(tenants.values()))


def trace_files(path: str | Path) -> list[Path]:
    """A trace file, or a folder's `*.txt` traces in natural order (rs2.0 before rs10.0)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"), key=_natural_order)
        if not files:
            raise ValueError(f"--traces: no *.txt trace files in {path}")
        return files
    if not path.is_file():
        raise ValueError(f"--traces: no such file or folder: {path}")
    return [path]


def _natural_order(file: Path) -> list[tuple[int, float | str]]:
    return [(0, float(x)) if x[0].isdigit() else (1, x) for x in re.findall(r"\d+\.?\d*|\D+", file.name)]


def trace_window_s(file: Path, arrivals: list[Arrival], limit_s: float | None = None) -> float:
    """The arrival window a trace covers: `limit_s`, else the `_tNNN_` of its name (the
    artifact names its window), else up to its last arrival (at least 1 s)."""
    if limit_s:
        return limit_s
    span = re.search(r"_t(\d+)_", file.name)
    return float(span.group(1)) if span else max((a.at_s for a in arrivals), default=0.0) or 1.0


def trace_label(file: Path) -> str:
    """`trace x4.0 (300 s)` for the artifact's traces (the window only when not 120 s), else the file's stem."""
    rate, span = re.search(r"_rs([\d.]+)_", file.name), re.search(r"_t(\d+)_", file.name)
    if not rate:
        return file.stem
    return f"trace x{rate.group(1)}" + (f" ({span.group(1)} s)" if span and span.group(1) != "120" else "")


@dataclass(frozen=True)
class Load:
    """One point of the rate sweep: its x, its name, its arrivals (unscaled) and window."""

    key: float  # a rate scale (the paper's traces) or offered requests/s
    label: str
    arrivals: list[Arrival]
    window_s: float


def trace_path(data_dir: Path, rate: float) -> Path:
    return data_dir / "traces" / f"generated_trace_n3_rs{rate:.1f}_st50000_t120_seed666.txt"


def arrivals_at(s: BenchSettings, rate: float) -> list[Arrival]:
    """Unscaled arrivals: the paper's trace at rate scale `rate`, or for the sharing
    setting bursty Gamma arrivals (CV 2) at `rate` requests/s over an equal mix."""
    if s.setting == "sharing":
        return gamma_arrivals(rate, 2.0, s.window_s, s.workflows, seed=666)
    return trace_arrivals(trace_path(s.data_dir, rate), s.tenants, s.trace_limit_s)


def rate_loads(s: BenchSettings) -> list[Load]:
    """The sweep: the settings' rates, or each of the operator's traces at its offered rate."""
    unserved = sorted(set(s.tenants.values()) - set(s.workflows))
    if unserved and (s.traces is not None or s.setting == "paper"):  # Gamma arrivals name no tenants
        raise ValueError(f"--tenants: the {s.setting} setting serves no {', '.join(unserved)}")
    if s.traces is None:
        return [Load(rate, f"{rate:g}", arrivals_at(s, rate), s.window_s) for rate in s.rates]
    loads: dict[float, Load] = {}
    for file in trace_files(s.traces):
        arrivals = trace_arrivals(file, s.tenants, s.trace_limit_s)
        window = trace_window_s(file, arrivals, s.trace_limit_s)
        key = round(len(arrivals) / window, 4)
        if key in loads:  # the sweep is keyed by rate: one would hide the other
            raise ValueError(f"--traces: {file.name} and {loads[key].label} both offer {key:g} requests/s; "
                             f"replay them in separate runs")
        loads[key] = Load(key, trace_label(file), arrivals, window)
    return [loads[key] for key in sorted(loads)]


def workflow_mix(loads: list[Load], workflows: list[str]) -> dict[str, float]:
    """Requests per workflow over every load (each served workflow at least a little)."""
    counts = dict.fromkeys(workflows, 0.0)
    for load in loads:
        for a in load.arrivals:
            counts[a.workflow] = counts.get(a.workflow, 0.0) + 1
    return {w: c or 1.0 for w, c in counts.items()}


# ---------------------------------------------------------------- systems

# Each emulated GPU's memory: what the local cluster this benchmark starts gives its agents.
EMULATED_GPU_MEMORY_GIB = LocalClusterSpec.gpu_memory_gib

# Pooled needs a monolith that holds each model once for all its workflows; the
# emulated monolith backend (actors/backends/monolith.py) keeps a copy per workflow,
# so on real processes it would load models while serving and measure something else.
NOT_EMULATED = {"pooled": "the emulated monolith backend keeps one copy of each model per workflow "
                          "(no shared model cache yet): compare it with `lego bench simulate`"}


def systems_of(s: BenchSettings, mix: dict[str, float] | None = None) -> list[SystemSpec]:
    for name in s.systems:
        if name in NOT_EMULATED:
            raise ValueError(f"systems: {name} cannot run on emulated processes yet: {NOT_EMULATED[name]}")
    catalog = load_catalog()
    mix = mix or dict.fromkeys(s.workflows, 1.0)
    if s.setting == "sharing":
        systems = sharing_systems(catalog, s.gpus, s.time_scale, s.systems)
    elif s.workflows == list(PAPER_WORKFLOWS.values()):
        systems = paper_systems(catalog, s.data_dir / "baselines", s.gpus, s.time_scale, s.systems)
    else:
        systems = mapped_systems(catalog, mix, s.gpus, s.time_scale, s.systems)
    return [deployed_lego(system, catalog, s, mix) if system.name == "lego" else system for system in systems]


def deployed_lego(system: SystemSpec, catalog: Catalog, s: BenchSettings, mix: dict[str, float]) -> SystemSpec:
    """Lego as `lego bench simulate` deploys it for this workload (`clients.bench.deploy`),
    so the emulated cluster and the simulator run the same placement and pins."""
    if s.setting == "sharing":
        return lego_sharing(system, catalog, s.gpus, mix, EMULATED_GPU_MEMORY_GIB, emulated_hosts(s.gpus))
    return lego_cluster(catalog, s.gpus, mix, s.time_scale, emulated_hosts(s.gpus), EMULATED_GPU_MEMORY_GIB)



def mapped_systems(catalog: Catalog, mix: dict[str, float], gpus: int, time_scale: float,
                   names: tuple[str, ...]) -> list[SystemSpec]:
    """The systems for an operator's own workflows (no artifact placement names them):
    lego's placement, an equal static split (basic), a split in proportion to the
    requests (shepherd), every GPU hosting every workflow (clockwork)."""
    workflows = list(mix)
    makers = {"lego": lambda: lego_system(catalog, workflows, gpus, time_scale),
              "basic": lambda: static_split_system("basic", workflows, gpus),
              "shepherd": lambda: static_split_system("shepherd", workflows, gpus, mix),
              "clockwork": lambda: shared_gpus_system("clockwork", workflows, gpus)}
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ValueError(f"systems: unknown system {unknown[0]!r} for mapped workflows (known: {', '.join(makers)})")
    return [makers[name]() for name in names]


def emulated_hosts(gpus: int) -> int:
    """Hosts of an emulated cluster: one per 8 GPUs where that divides them evenly (as
    `lego bench simulate` counts them), else one."""
    hosts = hosts_for(gpus)
    return hosts if gpus % hosts == 0 else 1


def cluster_spec(system: SystemSpec, s: BenchSettings, run_dir: str) -> LocalClusterSpec:
    gpus, time_scale, log_level = s.gpus, s.time_scale, s.log_level
    placement = [p for p in system.placement if int(p[1].split(":")[1]) < gpus]
    return LocalClusterSpec(
        # one node agent per 8 GPUs, as the simulator counts hosts: fetches between them go as between hosts
        workflows=s.workflows, emulate_gpus=gpus, emulate_hosts=emulated_hosts(gpus),
        options={"time_scale": time_scale, "load_time_scale": time_scale,
                 **({"payloads": s.payloads} if system.serving == "micro" else {})}, max_batch_rows=8,
        serving=system.serving, drop_late=system.drop_late, drop_hopeless=system.drop_hopeless,
        admission=system.admission, cfg_split=system.cfg_split,
        scheduler=system.scheduler, scheduler_args=list(system.scheduler_args), placement=placement,
        run_dir=run_dir, log_level=log_level, heartbeat_interval_s=1.0, broker_args=broker_flags(system),
        hosted_emulated=s.hosted_actors)


def emulation_cpu(cluster: LocalCluster) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each part of the emulation: each of
    the cluster's processes with its descendants (the agent's: its actors, running or
    reaped, a reaped child's time being its parent's children time) and this process,
    the load generator (its own time only: its reaped children are earlier clusters).
    Differences of two readings are exact while the cluster's processes live through both."""
    own = psutil.Process().cpu_times()
    used = {"load generator": own.user + own.system}
    for name, popen in cluster.processes.items():
        used[name] = 0.0
        try:
            root = psutil.Process(popen.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in tree:
            try:
                t = proc.cpu_times()
            except psutil.Error:  # exited meanwhile: its time is in its parent's children time
                continue
            used[name] += t.user + t.system + t.children_user + t.children_system
    return used


def emulation_cpu_s(cluster: LocalCluster) -> float:
    """CPU seconds used so far by the whole emulation (`emulation_cpu`, summed)."""
    return sum(emulation_cpu(cluster).values())


def _busy_s(client: Client) -> float:
    return sum(a.telemetry.busy_s for a in client.stats().actors if a.telemetry)


WARM_UP_TRIES = 3


def _warm_up(client: Client, workflows: list[str]) -> None:
    """One request per workflow, one after another: every actor has run once. A warm-up
    request that misses its deadline (a busy machine, actors still loading) is tried
    again, then let be: it has run on the actors all the same."""
    for workflow in workflows:
        for attempt in range(WARM_UP_TRIES):
            try:
                client.generate(workflow, prompt="warm up", seed=attempt, timeout=300)
                break
            except (RequestFailed, RequestRejected) as exc:
                print(f"  warm-up of {workflow}: {exc}", file=sys.stderr, flush=True)


def run_arrivals(system: SystemSpec, arrivals: list[Arrival], window_s: float, s: BenchSettings, run_dir: str) -> dict:
    """One fresh cluster, one open-loop run; its summary plus device utilisation and the
    CPU the emulation used over the run (`cpu_share`: of every core of this machine), and
    what starting the cluster and warming it up took (`startup_s`, `startup_cpu_s`: the
    cluster's processes only)."""
    starting = time.monotonic()
    with LocalCluster(cluster_spec(system, s, run_dir)) as cluster, \
            Client(cluster.frontend) as client:
        _warm_up(client, s.workflows)
        time.sleep(1.0)  # a heartbeat carries the warm-up's busy time
        busy_before, cpu_before, started = _busy_s(client), emulation_cpu(cluster), time.monotonic()
        outcomes = run_open_loop_sync(cluster.frontend, arrivals, default_params, timeout_s=60 + 10 * window_s)
        time.sleep(1.0)
        busy = _busy_s(client) - busy_before
        cpu = {name: used - cpu_before.get(name, 0.0) for name, used in emulation_cpu(cluster).items()}
        elapsed = time.monotonic() - started
    summary = summarize(outcomes, window_s)
    summary["utilisation"] = round(busy / (s.gpus * elapsed), 3)
    summary["emulation_cpu_s"] = round(sum(cpu.values()), 2)
    summary["emulation_cpu_by_process_s"] = {name: round(used, 2) for name, used in cpu.items()}
    summary["cpu_share"] = round(sum(cpu.values()) / (elapsed * (os.cpu_count() or 1)), 3)
    summary["run_s"] = round(elapsed, 2)
    summary["startup_s"] = round(started - starting, 2)
    summary["startup_cpu_s"] = round(sum(v for k, v in cpu_before.items() if k != "load generator"), 2)
    return summary


def rate_sweep(system: SystemSpec, loads: list[Load], references: dict[float, Reference], s: BenchSettings,
               run_dir: str) -> dict[float, dict]:
    out = {}
    for load in loads:
        window = load.window_s * s.time_scale
        run = run_arrivals(system, scale_arrivals(load.arrivals, s.time_scale), window, s,
                           f"{run_dir}/rate-{load.key:g}")
        run["load"] = load.label
        run["requests_per_s"] = round(len(load.arrivals) / load.window_s, 3)
        run.update(references[load.key].beside(run["slo_met"]))
        out[load.key] = run
        print(f"  {system.name} {s.sweep} {load.label}: attainment {run['slo_attainment']:.3f} "
              f"({run['count']} requests; on-time reference {run['on_time_ref_count']})", file=sys.stderr, flush=True)
    return out


def burst_sweep(system: SystemSpec, s: BenchSettings, run_dir: str) -> dict[int, float]:
    """Attainment of n simultaneous requests, for growing n, on one cluster (idle between)."""
    out = {}
    workflows = s.workflows
    with LocalCluster(cluster_spec(system, s, run_dir)) as cluster, \
            Client(cluster.frontend) as client:
        _warm_up(client, workflows)
        for n in s.bursts:
            outcomes = run_open_loop_sync(cluster.frontend, burst_arrivals(n, workflows), default_params,
                                          timeout_s=120)
            out[n] = summarize(outcomes, 1.0)["slo_attainment"]
            print(f"  {system.name} burst {n}: attainment {out[n]:.3f}", file=sys.stderr, flush=True)
            if out[n] < 0.5:
                break  # larger bursts only do worse
            time.sleep(2.0 * s.time_scale + 0.5)  # idle again
    return out


def burst_shares(bursts: dict[int, float], references: dict[int, Reference]) -> dict[int, float | None]:
    """Each burst's on-time count (attainment x its size) as a share of the reference."""
    return {n: references[n].share_of(round(attainment * n)) for n, attainment in bursts.items()}


def fluid_bound_per_s(workflows: list[str]) -> float:
    """Requests/s per GPU no system can beat: one GPU-second over the mean device-seconds
    of a request of the mix (equal shares), every node in a full batch (profile times)."""
    catalog = load_catalog()
    costs = CostModel(catalog)
    works = [costs.request(catalog.workflows[w], validate_params(catalog.workflows[w], {"prompt": "x", "seed": 0})).min_work_s
             for w in workflows]
    return 1.0 / statistics.mean(works)


def best_at(values: dict, threshold: float = TARGET) -> float | None:
    """The largest key whose attainment reaches `threshold` (None if none does)."""
    passing = [k for k, v in values.items() if v is not None and v >= threshold]
    return max(passing) if passing else None


def run_cluster_bench(s: BenchSettings) -> dict:
    loads = rate_loads(s)
    systems = systems_of(s, workflow_mix(loads, s.workflows))
    costs = CostModel(load_catalog())
    rate_refs = {load.key: on_time_reference(load.arrivals, s.gpus, costs) for load in loads}
    burst_refs = {n: on_time_reference(burst_arrivals(n, s.workflows), s.gpus, costs) for n in s.bursts}
    started = time.monotonic()
    result = {"date": records.utc_now(),
              "machine": records.machine(), "setting": s.setting, "workflows": s.workflows, "gpus": s.gpus,
              "time_scale": s.time_scale, "trace_limit_s": s.trace_limit_s,
              "traces": str(s.traces) if s.traces is not None else None, "tenants": s.tenants, "sweep": s.sweep,
              "hosted_actors": s.hosted_actors, "payloads": s.payloads, "cores": os.cpu_count(),
              "reference": {
                  "rates": {load.key: {**rate_refs[load.key].to_dict(), "load": load.label,
                                       "requests_per_s": round(len(load.arrivals) / load.window_s, 3)}
                            for load in loads},
                  "bursts": {n: ref.to_dict() for n, ref in burst_refs.items()}},
              "systems": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = s.run_dir or tmp
        for system in systems:
            print(f"{system.name}:", file=sys.stderr, flush=True)
            rates = rate_sweep(system, loads, rate_refs, s, f"{root}/{system.name}")
            bursts = burst_sweep(system, s, f"{root}/{system.name}/bursts") if s.bursts else {}
            result["systems"][system.name] = {"rates": rates, "bursts": bursts,
                                              "bursts_share_of_ref": burst_shares(bursts, burst_refs)}
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["derived"] = derive(result, s.gpus)
    return result


def derive(result: dict, gpus: int) -> dict:
    fluid = fluid_bound_per_s(result["workflows"]) * gpus
    derived: dict = {"fluid_requests_per_s": round(fluid, 3), "systems": {}}
    reference = result.get("reference")
    if reference:
        derived["reference"] = _reference_limits(reference, fluid)
    for name, runs in result["systems"].items():
        rate = best_at({r: v["slo_attainment"] for r, v in runs["rates"].items()})
        rps = runs["rates"][rate]["requests_per_s"] if rate is not None else None
        burst = best_at(runs["bursts"])
        derived["systems"][name] = {"sustainable_rate_scale": rate, "sustainable_requests_per_s": rps,
                                    "burst_tolerance": burst,
                                    "fluid_share": round(rps / fluid, 3) if rps else None,
                                    "share_of_ref": _share_of_ref(runs["rates"].values())}
    baselines = {n: d for n, d in derived["systems"].items() if n != "lego"}
    lego = derived["systems"].get("lego")
    if lego and baselines:
        best_rate = max((d["sustainable_requests_per_s"] or 0 for d in baselines.values()), default=0)
        best_burst = max((d["burst_tolerance"] or 0 for d in baselines.values()), default=0)
        derived["lego_vs_best_baseline"] = {
            "rate_ratio": round(lego["sustainable_requests_per_s"] / best_rate, 2)
            if best_rate and lego["sustainable_requests_per_s"] else None,
            "burst_ratio": round(lego["burst_tolerance"] / best_burst, 2)
            if best_burst and lego["burst_tolerance"] else None,
        }
    return derived


def _reference_limits(reference: dict, fluid: float) -> dict:
    """The on-time reference read like a system: its highest rate and largest burst >= 90%."""
    rate = best_at({k: v["share"] for k, v in reference["rates"].items()})
    rps = reference["rates"][rate]["requests_per_s"] if rate is not None else None
    return {"sustainable_rate_scale": rate, "sustainable_requests_per_s": rps,
            "burst_tolerance": best_at({n: v["share"] for n, v in reference["bursts"].items()}),
            "fluid_share": round(rps / fluid, 3) if rps else None}


def _share_of_ref(runs: Iterable[dict]) -> float | None:
    """On-time requests over every rate of the sweep, as a share of the reference's."""
    runs = [r for r in runs if "on_time_ref_count" in r]
    reference = sum(r["on_time_ref_count"] for r in runs)
    return round(sum(r["slo_met"] for r in runs) / reference, 3) if reference else None


def _fmt(x, pattern="{:.3f}") -> str:
    return "-" if x is None else pattern.format(x)


def _sweep_label(result: dict) -> str:
    return result.get("sweep") or ("rate scale" if result.get("setting", "paper") == "paper" else "offered req/s")


def cluster_table(result: dict) -> str:
    label = _sweep_label(result)
    traces = result.get("traces") is not None
    lines = [f"| system | {'trace' if traces else label} | req/s | SLO attainment | on-time ref | share of ref | p50 (s) | "
             f"p99 (s) | goodput (req/s) | rejected | dropped | actor busy / GPU time | emulation CPU (s) | "
             f"CPU share |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    scale = result["time_scale"]
    for name, runs in result["systems"].items():
        for rate, r in runs["rates"].items():
            dropped = r["codes"].get("deadline_exceeded", 0)
            x = r.get("load", f"{rate:g}") if traces else f"{rate:g}"
            # latencies and goodput back in the trace's (unscaled) time
            lines.append(f"| {name} | {x} | {r['requests_per_s']} | {r['slo_attainment']:.3f} | "
                         f"{_fmt(r.get('on_time_ref'), '{:.1%}')} | {_fmt(r.get('share_of_ref'), '{:.1%}')} | "
                         f"{_fmt(r['p50_latency_s'] and r['p50_latency_s'] / scale, '{:.2f}')} | "
                         f"{_fmt(r['p99_latency_s'] and r['p99_latency_s'] / scale, '{:.2f}')} | "
                         f"{r['goodput_per_s'] * scale:.3f} | {r['rejected']} | {dropped} | {r['utilisation']:.2f} | "
                         f"{_fmt(r.get('emulation_cpu_s'), '{:.1f}')} | {_fmt(r.get('cpu_share'), '{:.0%}')} |")
    d = result["derived"]
    lines += ["", f"| system | highest {label} >= 90% (req/s) | largest burst >= 90% | share of fluid bound | "
                  f"share of on-time ref |",
              "| --- | --- | --- | --- | --- |"]
    if d.get("reference"):
        lines.append(_limits_row("on-time ref", d["reference"], "100%"))
    for name, v in d["systems"].items():
        lines.append(_limits_row(name, v, _fmt(v.get("share_of_ref"), "{:.1%}")))
    lines += _burst_lines(result)
    if "hosted_actors" in result:
        actors = "hosted in the node agent (one process)" if result["hosted_actors"] else "a process each"
        lines += ["", f"Emulated actors: {actors}; CPU share: the emulation's CPU seconds (broker, scheduler, agent, "
                      f"actors, load generator) over the run's wall time x {result['cores']} cores."]
    ratio = d.get("lego_vs_best_baseline")
    if ratio:
        lines += ["", f"lego vs the best baseline: sustainable rate x{_fmt(ratio['rate_ratio'], '{}')} (target >= 3), "
                      f"burst tolerance x{_fmt(ratio['burst_ratio'], '{}')} (target >= 8); fluid upper bound "
                      f"{d['fluid_requests_per_s']} req/s on {result['gpus']} GPUs."]
    return "\n".join(lines)


def _limits_row(name: str, v: dict, share_of_ref: str) -> str:
    return (f"| {name} | {_fmt(v['sustainable_rate_scale'], '{:g}')} ({_fmt(v['sustainable_requests_per_s'])}) | "
            f"{_fmt(v['burst_tolerance'], '{}')} | {_fmt(v['fluid_share'], '{:.0%}')} | {share_of_ref} |")


def _burst_lines(result: dict) -> list[str]:
    """Per burst size: the reference, then each system's attainment and share of it
    ('-': not run, a smaller burst already fell below 50%)."""
    references = result.get("reference", {}).get("bursts", {})
    if not references:
        return []
    names = list(result["systems"])
    lines = ["", f"| burst | on-time ref | {' | '.join(f'{n} (share of ref)' for n in names)} |",
             f"| --- | --- | {' | '.join('---' for _ in names)} |"]
    for n, ref in references.items():
        cells = []
        for name in names:
            runs = result["systems"][name]
            attainment = runs["bursts"].get(n)
            share = runs.get("bursts_share_of_ref", {}).get(n)
            cells.append("-" if attainment is None else f"{attainment:.1%} ({_fmt(share, '{:.0%}')})")
        lines.append(f"| {n} | {ref['on_time']} of {ref['requests']} ({_fmt(ref['share'], '{:.0%}')}) | "
                     f"{' | '.join(cells)} |")
    return lines


def attainment_chart(result: dict, path: str | Path) -> Path:
    series = {name: [(rate, r["slo_attainment"]) for rate, r in runs["rates"].items()]
              for name, runs in result["systems"].items()}
    reference = result.get("reference", {}).get("rates", {})
    if reference:  # drawn beside the systems: how many an ideal scheduler finishes on time
        series["on-time ref"] = [(rate, r["share"]) for rate, r in reference.items() if r["share"] is not None]
    paper = result.get("setting", "paper") == "paper"
    what = "3 FLUX.1-schnell workflows" if paper else f"{len(result['workflows'])} SD3/SD3.5L/Flux-dev ControlNet workflows"
    if paper and result["workflows"] != list(PAPER_WORKFLOWS.values()):
        what = f"{len(result['workflows'])} workflows"
    if result.get("traces") is not None:
        what += f", traces {Path(result['traces']).name}"
    return line_chart(series, path, f"SLO attainment vs load ({result['gpus']} emulated H800s, {what}, SLO 2x solo)",
                      _sweep_label(result).replace("req/s", "requests/s"), "SLO attainment", guide_y=TARGET)
