"""`lego bench cluster`: micro-serving against monolithic serving, same cluster, same
trace, same SLO, in one invocation.

Two settings. `paper`: 8 GPUs, the three FLUX.1-schnell workflows, the artifact's
traces at rate scales 0.5-8. `sharing`: 16 GPUs, six ControlNet workflows over SD3,
SD3.5 Large and FLUX.1-dev sharing encoders, VAEs and base models, bursty Gamma
arrivals (CV 2) at a range of request rates.

Every (system, rate) runs on a fresh emulated cluster of real processes (broker,
scheduler for `lego`, one node agent with N emulated H800s, actors) so no state
carries over. Arrivals come from the paper's traces (`TENANT GAP_SECONDS`, tenants
A/B/C -> the three FLUX.1-schnell workflows), compressed by `time_scale` along with
every emulated time, so a 120 s trace takes 120 x time_scale seconds and every
ratio is preserved. The SLO of each request is 2x its workflow's solo latency from
the profiles (the paper measured 1.99/2.07/2.40 s with diffusers; the profiles give
2.02/2.10/2.10 s).

Reported per system and rate: SLO attainment, p50/p99 latency, goodput, device
utilisation (actors' busy time over GPU time: above 1 when co-located actors
time-slice a GPU, each counting its whole slowed run). Then per system: the highest
rate scale with >= 90% attainment, the largest simultaneous burst with >= 90%, the
ratios against the best baseline, and the share of the fluid upper bound (GPUs over
device-seconds per request: the rate no scheduler can beat).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker.catalog import load_catalog, validate_params
from broker.costs.model import CostModel
from clients.bench import records
from clients.bench.charts import line_chart
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
from clients.bench.systems import (
    PAPER_TENANTS,
    PAPER_WORKFLOWS,
    SHARING_WORKFLOWS,
    SystemSpec,
    paper_systems,
    sharing_systems,
)
from clients.client import Client
from clients.local import LocalCluster, LocalClusterSpec

DATA = Path(__file__).resolve().parent / "data"  # traces and baseline placements (copied from the artifact)
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
    data_dir: Path = DATA
    run_dir: str = ""
    log_level: str = "warning"
    results: dict = field(default_factory=dict)

    @property
    def workflows(self) -> list[str]:
        return list(SHARING_WORKFLOWS if self.setting == "sharing" else PAPER_WORKFLOWS.values())

    @property
    def window_s(self) -> float:
        return self.trace_limit_s or WINDOW_S


def trace_path(data_dir: Path, rate: float) -> Path:
    return data_dir / "traces" / f"generated_trace_n3_rs{rate:.1f}_st50000_t120_seed666.txt"


def arrivals_at(s: BenchSettings, rate: float) -> list[Arrival]:
    """Unscaled arrivals: the paper's trace at rate scale `rate`, or for the sharing
    setting bursty Gamma arrivals (CV 2) at `rate` requests/s over an equal mix."""
    if s.setting == "sharing":
        return gamma_arrivals(rate, 2.0, s.window_s, s.workflows, seed=666)
    return trace_arrivals(trace_path(s.data_dir, rate), PAPER_TENANTS, s.trace_limit_s)


def systems_of(s: BenchSettings) -> list[SystemSpec]:
    catalog = load_catalog()
    if s.setting == "sharing":
        return sharing_systems(catalog, s.gpus, s.time_scale, s.systems)
    return paper_systems(catalog, s.data_dir / "baselines", s.gpus, s.time_scale, s.systems)


def cluster_spec(system: SystemSpec, s: BenchSettings, run_dir: str) -> LocalClusterSpec:
    gpus, time_scale, log_level = s.gpus, s.time_scale, s.log_level
    placement = [p for p in system.placement if int(p[1].split(":")[1]) < gpus]
    return LocalClusterSpec(
        workflows=s.workflows, emulate_gpus=gpus,
        options={"time_scale": time_scale, "load_time_scale": time_scale}, max_batch_rows=8,
        serving=system.serving, drop_late=system.drop_late, drop_hopeless=system.drop_hopeless,
        admission=system.admission, cfg_split=system.cfg_split,
        scheduler=system.scheduler, scheduler_args=list(system.scheduler_args), placement=placement,
        run_dir=run_dir, log_level=log_level, heartbeat_interval_s=1.0)


def _busy_s(client: Client) -> float:
    return sum(a.telemetry.busy_s for a in client.stats().actors if a.telemetry)


def _warm_up(client: Client, workflows: list[str]) -> None:
    """One request per workflow, one after another: every actor has run once."""
    for workflow in workflows:
        client.generate(workflow, prompt="warm up", seed=0, timeout=300)


def run_arrivals(system: SystemSpec, arrivals: list[Arrival], window_s: float, s: BenchSettings, run_dir: str) -> dict:
    """One fresh cluster, one open-loop run; its summary plus device utilisation."""
    with LocalCluster(cluster_spec(system, s, run_dir)) as cluster, Client(cluster.frontend) as client:
        _warm_up(client, s.workflows)
        time.sleep(1.0)  # a heartbeat carries the warm-up's busy time
        busy_before, started = _busy_s(client), time.monotonic()
        outcomes = run_open_loop_sync(cluster.frontend, arrivals, default_params, timeout_s=60 + 10 * window_s)
        time.sleep(1.0)
        busy = _busy_s(client) - busy_before
        elapsed = time.monotonic() - started
    summary = summarize(outcomes, window_s)
    summary["utilisation"] = round(busy / (s.gpus * elapsed), 3)
    return summary


def rate_sweep(system: SystemSpec, s: BenchSettings, run_dir: str) -> dict[float, dict]:
    out = {}
    for rate in s.rates:
        arrivals = arrivals_at(s, rate)
        window = s.window_s * s.time_scale
        out[rate] = run_arrivals(system, scale_arrivals(arrivals, s.time_scale), window, s, f"{run_dir}/rate-{rate:g}")
        out[rate]["requests_per_s"] = round(len(arrivals) / s.window_s, 3)
        print(f"  {system.name} rate x{rate:g}: attainment {out[rate]['slo_attainment']:.3f} "
              f"({out[rate]['count']} requests)", flush=True)
    return out


def burst_sweep(system: SystemSpec, s: BenchSettings, run_dir: str) -> dict[int, float]:
    """Attainment of n simultaneous requests, for growing n, on one cluster (idle between)."""
    out = {}
    workflows = s.workflows
    with LocalCluster(cluster_spec(system, s, run_dir)) as cluster, Client(cluster.frontend) as client:
        _warm_up(client, workflows)
        for n in s.bursts:
            outcomes = run_open_loop_sync(cluster.frontend, burst_arrivals(n, workflows), default_params,
                                          timeout_s=120)
            out[n] = summarize(outcomes, 1.0)["slo_attainment"]
            print(f"  {system.name} burst {n}: attainment {out[n]:.3f}", flush=True)
            if out[n] < 0.5:
                break  # larger bursts only do worse
            time.sleep(2.0 * s.time_scale + 0.5)  # idle again
    return out


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
    systems = systems_of(s)
    started = time.monotonic()
    result = {"date": records.utc_now(),
              "machine": records.machine(), "setting": s.setting, "workflows": s.workflows, "gpus": s.gpus,
              "time_scale": s.time_scale, "trace_limit_s": s.trace_limit_s, "systems": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = s.run_dir or tmp
        for system in systems:
            print(f"{system.name}:", flush=True)
            rates = rate_sweep(system, s, f"{root}/{system.name}")
            bursts = burst_sweep(system, s, f"{root}/{system.name}/bursts") if s.bursts else {}
            result["systems"][system.name] = {"rates": rates, "bursts": bursts}
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["derived"] = derive(result, s.gpus)
    return result


def derive(result: dict, gpus: int) -> dict:
    fluid = fluid_bound_per_s(result["workflows"]) * gpus
    derived: dict = {"fluid_requests_per_s": round(fluid, 3), "systems": {}}
    for name, runs in result["systems"].items():
        rate = best_at({r: v["slo_attainment"] for r, v in runs["rates"].items()})
        rps = runs["rates"][rate]["requests_per_s"] if rate is not None else None
        burst = best_at(runs["bursts"])
        derived["systems"][name] = {"sustainable_rate_scale": rate, "sustainable_requests_per_s": rps,
                                    "burst_tolerance": burst,
                                    "fluid_share": round(rps / fluid, 3) if rps else None}
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


def _fmt(x, pattern="{:.3f}") -> str:
    return "-" if x is None else pattern.format(x)


def cluster_table(result: dict) -> str:
    label = "rate scale" if result.get("setting", "paper") == "paper" else "offered req/s"
    lines = [f"| system | {label} | req/s | SLO attainment | p50 (s) | p99 (s) | goodput (req/s) | rejected | dropped | actor busy / GPU time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    scale = result["time_scale"]
    for name, runs in result["systems"].items():
        for rate, r in runs["rates"].items():
            dropped = r["codes"].get("deadline_exceeded", 0)
            # latencies and goodput back in the trace's (unscaled) time
            lines.append(f"| {name} | {rate:g} | {r['requests_per_s']} | {r['slo_attainment']:.3f} | "
                         f"{_fmt(r['p50_latency_s'] and r['p50_latency_s'] / scale, '{:.2f}')} | "
                         f"{_fmt(r['p99_latency_s'] and r['p99_latency_s'] / scale, '{:.2f}')} | "
                         f"{r['goodput_per_s'] * scale:.3f} | {r['rejected']} | {dropped} | {r['utilisation']:.2f} |")
    d = result["derived"]
    lines += ["", f"| system | highest {label} >= 90% (req/s) | largest burst >= 90% | share of fluid bound |",
              "| --- | --- | --- | --- |"]
    for name, v in d["systems"].items():
        lines.append(f"| {name} | {_fmt(v['sustainable_rate_scale'], '{:g}')} ({_fmt(v['sustainable_requests_per_s'])}) | "
                     f"{_fmt(v['burst_tolerance'], '{}')} | {_fmt(v['fluid_share'], '{:.0%}')} |")
    ratio = d.get("lego_vs_best_baseline")
    if ratio:
        lines += ["", f"lego vs the best baseline: sustainable rate x{_fmt(ratio['rate_ratio'], '{}')} (target >= 3), "
                      f"burst tolerance x{_fmt(ratio['burst_ratio'], '{}')} (target >= 8); fluid upper bound "
                      f"{d['fluid_requests_per_s']} req/s on {result['gpus']} GPUs."]
    return "\n".join(lines)


def attainment_chart(result: dict, path: str | Path) -> Path:
    series = {name: [(rate, r["slo_attainment"]) for rate, r in runs["rates"].items()]
              for name, runs in result["systems"].items()}
    paper = result.get("setting", "paper") == "paper"
    what = "3 FLUX.1-schnell workflows" if paper else f"{len(result['workflows'])} SD3/SD3.5L/Flux-dev ControlNet workflows"
    return line_chart(series, path, f"SLO attainment vs load ({result['gpus']} emulated H800s, {what}, SLO 2x solo)",
                      "rate scale" if paper else "offered requests/s", "SLO attainment", guide_y=TARGET)
