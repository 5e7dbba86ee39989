"""Measure the emulated runtime's overheads against the simulator: `python -m clients.bench.sim.calibrate`.

The simulator times work by the profiles; the emulated cluster of real processes
(`lego bench cluster`) pays the same profile times plus what the runtime itself
costs: the broker's dispatch hop, the actors' Python around each batch, data
fetches through shared memory on this machine, the client's submit and the image
coming back. This probe puts a number on each, as the emulated run sees it:

1. fetch: the data plane's shared-memory path (`actors.shm`: the holder's export,
   the consumer's attach and copy-out) on a bundle of the sizes the emulated FLUX
   actors move, timed in this process; a linear fit in bytes.
2. probes: for each system (micro-serving `lego`, monolith `basic`), a fresh emulated
   cluster built exactly as `lego bench cluster` builds it, and a simulation of the
   same system, get the same arrivals: single requests far enough apart that the
   cluster is idle for each (every workflow in turn), then bursts of simultaneous
   requests. Per request, emulated latency minus simulated latency is what the
   runtime added.
3. fit: the simulated latency is linear in the per-batch and per-request overheads
   at idle; its slope in each is measured by simulating with a unit overhead (the
   number of batches on the request's critical path, and 1). Least squares over the
   idle probes of both systems gives `task_s` and `request_s` at idle.
4. loaded: under a burst the same runtime costs more per batch (2 shared cores: the
   fetches' copies, the actors' Python and the broker compete for them), which is
   what matters at overload. The per-batch overhead at which the simulated mean
   latency of the micro-serving bursts equals the emulated one (bisection) is
   `task_s` under load; the monolith's bursts, which pay it once per request, check it.

Everything is printed (JSON with --json). Runs real processes: a few minutes on the
2-core development VM; repeat it (--repeats) and read the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from actors.shm import ShmExporter, attach_bundle
from actors.store import raw_zeros
from broker.catalog import load_catalog
from clients.bench.cluster import BenchSettings, cluster_spec
from clients.bench.loadgen import Arrival, default_params, run_open_loop_sync, scale_arrivals
from clients.bench.sim.bench import cluster_systems
from clients.bench.sim.simulator import simulate
from clients.bench.sim.timing import NO_OVERHEADS, Overheads
from clients.bench.systems import PAPER_WORKFLOWS, SystemSpec
from clients.client import Client
from clients.local import LocalCluster

WORKFLOWS = list(PAPER_WORKFLOWS.values())
IDLE_GAP_S = 4.0  # trace seconds between single probes: longer than any request alone
BURST_GAP_S = 10.0  # and between bursts: the cluster drains in between


def probe_arrivals(rounds: int, bursts: tuple[int, ...]) -> tuple[list[Arrival], int]:
    """(arrivals in trace time, how many of them are single idle probes: those come first)."""
    arrivals, at = [], 1.0
    for _ in range(rounds):
        for workflow in WORKFLOWS:
            arrivals.append(Arrival(at, workflow, len(arrivals)))
            at += IDLE_GAP_S
    singles = len(arrivals)
    for n in bursts:
        arrivals += [Arrival(at, WORKFLOWS[i % len(WORKFLOWS)], len(arrivals) + i) for i in range(n)]
        at += BURST_GAP_S
    return arrivals, singles


def fetch_fit(repeats: int = 7) -> dict:
    """Seconds per shared-memory fetch (the holder's export, the consumer's attach and
    copy-out) of bundles shaped as the emulated FLUX actors make them, median of
    `repeats`; fitted as fixed + bytes / bandwidth by least squares."""
    from multiprocessing import resource_tracker

    latent, t5 = (2, 16, 128, 128), (2, 512, 4096)  # a CFG step at 1024 px: its latent and T5 conditioning
    bundles = [{"residuals": raw_zeros("bfloat16", latent)},  # a ControlNet's output, 1 MiB
               {"latents": raw_zeros("bfloat16", latent), "cond/0": raw_zeros("bfloat16", (2, 1, 768)),
                "cond/1": raw_zeros("bfloat16", t5)},  # a denoise step's bundle, 9 MiB
               {"image": raw_zeros("uint8", (4, 1024, 1024, 4))}]  # 16 MiB
    points = []
    for bundle in bundles:
        samples = []
        for k in range(repeats):
            exporter = ShmExporter()
            started = time.perf_counter()
            descs = exporter.export(f"t{k}", bundle)
            attach_bundle(descs, as_torch=False)
            samples.append(time.perf_counter() - started)
            for desc in descs:  # the consumer side let go of the tracker's entry; here it is the producer's
                resource_tracker.register(f"/{desc.handle}", "shared_memory")
            exporter.close()
        points.append((sum(t.nbytes for t in bundle.values()), statistics.median(samples)))
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    slope = max(slope, 1e-15)
    return {"points": points, "fetch_s": max(0.0, my - slope * mx), "fetch_bytes_per_s": 1.0 / slope}


def emulated(system: SystemSpec, arrivals: list[Arrival], settings: BenchSettings) -> tuple[list, dict]:
    """Outcomes (latencies back in trace time) of `arrivals` on a fresh emulated cluster,
    built as `lego bench cluster` builds it with these settings."""
    time_scale = settings.time_scale
    with tempfile.TemporaryDirectory() as run_dir:
        with LocalCluster(cluster_spec(system, settings, run_dir)) as cluster, \
                Client(cluster.frontend) as client:
            for workflow in WORKFLOWS:  # every actor has run once, as the benchmark warms up
                client.generate(workflow, prompt="warm up", seed=0, timeout=300)
            outcomes = run_open_loop_sync(cluster.frontend, scale_arrivals(arrivals, time_scale), default_params,
                                          timeout_s=120)
            stats = client.stats()
    telemetry = [a.telemetry for a in stats.actors if a.telemetry]
    info = {"hop_latency_s": stats.hop_latency_s,
            "batches": sum(t.batches for t in telemetry), "fetches": sum(t.fetches for t in telemetry),
            "fetched_bytes": sum(t.fetched_bytes for t in telemetry)}
    return [_in_trace_time(o, time_scale) for o in outcomes], info


def simulated(system: SystemSpec, arrivals: list[Arrival], time_scale: float, overheads: Overheads) -> list:
    outcomes, _ = simulate(system, scale_arrivals(arrivals, time_scale), time_scale=time_scale, overheads=overheads)
    return [_in_trace_time(o, time_scale) for o in outcomes]


def _in_trace_time(outcome, time_scale: float):
    if outcome.latency_s is not None:
        outcome.latency_s /= time_scale
    return outcome


def _latencies(outcomes) -> dict[int, float]:
    return {o.index: o.latency_s for o in outcomes if o.status == "ok"}


def fit(gaps: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares of gap = task_s x batches + request_s over (batches, per_request, gap) rows."""
    sxx = sum(b * b for b, _, _ in gaps)
    sxy = sum(b * r for b, r, _ in gaps)
    syy = sum(r * r for _, r, _ in gaps)
    sxg = sum(b * g for b, _, g in gaps)
    syg = sum(r * g for _, r, g in gaps)
    det = sxx * syy - sxy * sxy
    if abs(det) < 1e-12:
        raise ValueError("fit: the probes do not separate per-batch from per-request overhead")
    return (sxg * syy - syg * sxy) / det, (sxx * syg - sxy * sxg) / det


def _mean_at(latency: dict[int, float], indices: list[int]) -> float | None:
    values = [latency[i] for i in indices if i in latency]
    return statistics.mean(values) if values else None


def loaded_task_s(system: SystemSpec, arrivals: list[Arrival], burst: list[int], target_s: float, time_scale: float,
                  base: Overheads, high_s: float = 0.05) -> float:
    """The per-batch overhead at which the simulated mean latency of the burst requests
    equals the emulated one (`target_s`, trace seconds): bisection, the latency grows
    with the overhead."""
    low = 0.0
    for _ in range(14):
        mid = (low + high_s) / 2
        mean = _mean_at(_latencies(simulated(system, arrivals, time_scale, _with(base, task_s=mid))), burst)
        if mean is not None and mean < target_s:
            low = mid
        else:
            high_s = mid
    return (low + high_s) / 2


def _with(base: Overheads, **changes) -> Overheads:
    return Overheads(**{**vars(base), **changes})


def calibrate(time_scale: float, rounds: int, bursts: tuple[int, ...], repeats: int, systems: tuple[str, ...],
              hosted_actors: bool = True, payloads: str = "virtual") -> dict:
    """Idle probes fit (task_s, request_s); the bursts of the micro-serving system (many
    batches per request, so the per-batch term shows) then give task_s under load.

    The emulated clusters are built as `lego bench cluster` builds them by default
    (actors hosted in the node agent, virtual payloads: fetches priced as on a GPU host,
    which the simulator then prices alike, `Overheads.fetch_by_path`); with real payloads
    the shared-memory fetch is measured and fitted instead."""
    catalog = load_catalog()
    specs = {s.name: s for s in cluster_systems(catalog, 8, systems, time_scale=time_scale)}
    settings = BenchSettings(time_scale=time_scale, hosted_actors=hosted_actors, payloads=payloads)
    arrivals, singles = probe_arrivals(rounds, bursts)
    idle, burst = [a.index for a in arrivals[:singles]], [a.index for a in arrivals[singles:]]
    if payloads == "virtual":
        fetch = {"priced_by_path": True}
        base = Overheads(fetch_by_path=True)
    else:
        fetch = fetch_fit()
        base = Overheads(fetch_s=fetch["fetch_s"], fetch_bytes_per_s=fetch["fetch_bytes_per_s"])
    unit = 1e-3  # a unit overhead, in real seconds, to measure the slopes with
    gaps, runs = [], []
    for name, system in specs.items():
        plain = _latencies(simulated(system, arrivals, time_scale, base))
        per_batch = _latencies(simulated(system, arrivals, time_scale, _with(base, task_s=unit)))
        per_request = _latencies(simulated(system, arrivals, time_scale, _with(base, request_s=unit)))
        for repeat in range(repeats):
            try:
                outcomes, info = emulated(system, arrivals, settings)
            except Exception as exc:  # a cluster that would not start (a shared, busy machine): the others count
                print(f"{name} #{repeat}: no run: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                continue
            latency = _latencies(outcomes)
            rows = []
            for i in idle:
                if i in latency and i in plain:
                    # slopes in trace seconds per real second of overhead; the gap in real seconds
                    b = (per_batch[i] - plain[i]) / unit * time_scale
                    r = (per_request[i] - plain[i]) / unit * time_scale
                    rows.append((b, r, (latency[i] - plain[i]) * time_scale))
            gaps += rows
            runs.append({"system": name, "repeat": repeat, **info, "emulated": latency,
                         "idle_gap_s": statistics.median(g for _, _, g in rows) if rows else None,
                         "batches_on_path": statistics.median(b for b, _, _ in rows) if rows else None,
                         "burst_mean_s": _mean_at(latency, burst)})
            print(f"{name} #{repeat}: median idle gap {runs[-1]['idle_gap_s']:.4f} s real over "
                  f"{runs[-1]['batches_on_path']:.1f} batches; burst mean {runs[-1]['burst_mean_s']} s; "
                  f"hop {info['hop_latency_s']}", file=sys.stderr, flush=True)
    task_s, request_s = fit(gaps)
    idle_fit = _with(base, task_s=max(0.0, task_s), request_s=max(0.0, request_s))
    result = {"time_scale": time_scale, "hosted_actors": hosted_actors, "payloads": payloads, "fetch": fetch,
              "idle": vars(idle_fit), "runs": runs}
    if "lego" in specs and burst:
        target = statistics.median(r["burst_mean_s"] for r in runs if r["system"] == "lego")
        loaded = _with(idle_fit, task_s=loaded_task_s(specs["lego"], arrivals, burst, target, time_scale, idle_fit))
        result["loaded"] = vars(loaded)
        result["check"] = {name: {
            "burst_mean_emulated_s": statistics.median(r["burst_mean_s"] for r in runs if r["system"] == name),
            **{f"burst_mean_simulated_{label}_s": _mean_at(_latencies(simulated(system, arrivals, time_scale, o)), burst)
               for label, o in (("none", NO_OVERHEADS), ("idle", idle_fit), ("loaded", loaded))},
        } for name, system in specs.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.bench.sim.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-scale", type=float, default=0.5, help="of the emulated cluster (the benchmark's: 0.5)")
    parser.add_argument("--rounds", type=int, default=3, help="single requests per workflow")
    parser.add_argument("--bursts", default="8", help="sizes of the simultaneous bursts, comma-separated")
    parser.add_argument("--repeats", type=int, default=2, help="fresh emulated clusters per system")
    parser.add_argument("--systems", default="lego,basic")
    parser.add_argument("--actor-processes", action="store_true", help="a process per emulated actor (as "
                        "`lego bench cluster --actor-processes`)")
    parser.add_argument("--real-payloads", action="store_true", help="real bytes through shared memory (as "
                        "`lego bench cluster --real-payloads`); the fetch is then measured and fitted")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    bursts = tuple(int(x) for x in args.bursts.split(",") if x)
    result = calibrate(args.time_scale, args.rounds, bursts, args.repeats, tuple(args.systems.split(",")),
                       hosted_actors=not args.actor_processes, payloads="real" if args.real_payloads else "virtual")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
