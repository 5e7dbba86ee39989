"""`lego bench scheduler`: what the scheduler buys, on an emulated cluster, in one run.

8 emulated H800s (80 GB), measured profiles, the paper's three FLUX.1-schnell
workflows (true CFG, 4 steps, 1024 px), every emulated time multiplied by
`time_scale`. Three comparisons, each between two configurations of the same
processes so that this machine's noise hits both alike:

1. Parallel groups at idle: one request at a time, CFG branches on two actors
   (`cfg_split=auto` finds two idle actors) vs one batch-2 call (`never`);
   alternated, medians compared.
2. Parallel groups under load: a burst on fixed replicas (no scaling), `auto`
   (groups collapse when actors are busy) vs `always` (every request split).
3. Scaling: the same burst from 2 base-model replicas, scheduler on vs off.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from clients.bench import records
from clients.client import Client
from clients.errors import RequestRejected
from clients.local import LocalCluster, LocalClusterSpec

WORKFLOWS = ["flux-schnell-txt2img-cfg", "flux-schnell-canny-cfg", "flux-schnell-depth-cfg"]
BASE = "Flux1Schnell"


def _spec(run_dir: str, time_scale: float, base_replicas: int, scheduler: bool, cfg_split: str) -> LocalClusterSpec:
    scaled = [("--queue-wait-s", 0.5), ("--sustain-s", 1.0), ("--horizon-s", 4.0)]
    args = ["--admission", "false", "--interval-s", "0.25", "--cfg-split", cfg_split]
    args += [arg for flag, value in scaled for arg in (flag, str(value * time_scale))]
    return LocalClusterSpec(workflows=WORKFLOWS, replicas={BASE: base_replicas}, emulate_gpus=8,
                            options={"time_scale": time_scale}, cfg_split=cfg_split, scheduler=scheduler,
                            scheduler_args=args, run_dir=run_dir, log_level="warning")


def _burst(client: Client, n: int, time_scale: float) -> dict:
    """n requests at once over the three workflows: wall time, throughput, SLO attainment."""
    started = time.monotonic()
    jobs = []
    for i in range(n):
        try:
            jobs.append(client.submit(WORKFLOWS[i % 3], prompt=f"burst {i}", seed=i, progress=False))
        except RequestRejected:
            continue
    latencies = [job.result(600).latency_s for job in jobs]
    wall = time.monotonic() - started
    slo = {w.workflow: w.slo_s for w in client.stats().workflows}
    met = sum(lat <= slo[WORKFLOWS[i % 3]] for i, lat in enumerate(latencies))
    return {"requests": n, "wall_s": round(wall, 3), "requests_per_s": round(n / wall, 3),
            "p50_s": round(statistics.median(latencies), 3), "slo_attained": round(met / n, 3)}


def _idle_groups(run_dir: str, time_scale: float, rounds: int) -> dict:
    times: dict[str, list[float]] = {"auto": [], "never": []}
    with LocalCluster(_spec(run_dir, time_scale, 2, False, "auto")) as cluster, Client(cluster.frontend) as client:
        client.generate(WORKFLOWS[0], prompt="warm", seed=0, timeout=60)
        for seed in range(1, rounds + 1):
            for mode in ("auto", "never"):
                client.configure({"cfg_split": mode})
                started = time.monotonic()
                client.generate(WORKFLOWS[seed % 3], prompt="idle", seed=seed, timeout=60)
                times[mode].append(time.monotonic() - started)
    split, batched = statistics.median(times["auto"]), statistics.median(times["never"])
    return {"rounds": rounds, "group_s": round(split, 3), "batched_s": round(batched, 3), "ratio": round(split / batched, 3)}


def _loaded_groups(run_dir: str, time_scale: float, burst: int) -> dict:
    out = {}
    with LocalCluster(_spec(run_dir, time_scale, 6, False, "auto")) as cluster, Client(cluster.frontend) as client:
        client.generate(WORKFLOWS[0], prompt="warm", seed=0, timeout=60)
        for mode in ("always", "auto", "always", "auto"):
            client.configure({"cfg_split": mode})
            result = _burst(client, burst, time_scale)
            out.setdefault(mode, []).append(result["requests_per_s"])
    best = {mode: max(values) for mode, values in out.items()}
    return {"burst": burst, "always_rps": best["always"], "auto_rps": best["auto"],
            "ratio": round(best["auto"] / best["always"], 3)}


def _scaling(run_dir: str, time_scale: float, burst: int) -> dict:
    out = {}
    for name, scheduler in (("static", False), ("scheduler", True)):
        with LocalCluster(_spec(f"{run_dir}/{name}", time_scale, 2, scheduler, "auto")) as cluster, \
                Client(cluster.frontend) as client:
            client.generate(WORKFLOWS[0], prompt="warm", seed=0, timeout=60)
            result = _burst(client, burst, time_scale)
            result["peak_base_replicas"] = max(m.actors for m in client.stats().models if m.model == BASE)
            out[name] = result
    return out


def run_scheduler_bench(time_scale: float, rounds: int, burst: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return {
            "date": records.utc_now(),
            "machine": records.machine(), "time_scale": time_scale,
            "idle_groups": _idle_groups(f"{tmp}/idle", time_scale, rounds),
            "loaded_groups": _loaded_groups(f"{tmp}/loaded", time_scale, burst),
            "scaling": _scaling(f"{tmp}/scaling", time_scale, burst),
        }


def scheduler_table(r: dict) -> str:
    idle, loaded, scaling = r["idle_groups"], r["loaded_groups"], r["scaling"]
    static, sched = scaling["static"], scaling["scheduler"]
    rows = [
        (f"idle, one request: CFG group on 2 actors vs one batch-2 call (s, median of {idle['rounds']})",
         f"{idle['group_s']} vs {idle['batched_s']}", f"ratio {idle['ratio']:.2f}"),
        (f"burst of {loaded['burst']} on 6 base replicas: auto (groups collapse) vs always split (req/s, best of 2)",
         f"{loaded['auto_rps']} vs {loaded['always_rps']}", f"ratio {loaded['ratio']:.2f}"),
        (f"burst of {static['requests']} from 2 base replicas: scheduler on vs off (req/s)",
         f"{sched['requests_per_s']} vs {static['requests_per_s']}",
         f"ratio {sched['requests_per_s'] / static['requests_per_s']:.2f}"),
        ("  same burst: p50 latency (s), SLO attainment",
         f"{sched['p50_s']}, {sched['slo_attained']:.0%} vs {static['p50_s']}, {static['slo_attained']:.0%}", ""),
        ("  same burst: peak base-model replicas", f"{sched['peak_base_replicas']} vs {static['peak_base_replicas']}", ""),
    ]
    return "\n".join(["| comparison (emulated H800s, time_scale " + f"{r['time_scale']:g})" + " | measured | result |",
                      "| --- | --- | --- |", *(f"| {a} | {b} | {c} |" for a, b, c in rows)])
