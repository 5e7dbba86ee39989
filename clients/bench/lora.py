"""`lego bench lora`: LoRA adapter affinity on an emulated cluster, on vs off.

Many tenants' LoRA adapters over one base model (SD3 Medium, `sd3-lora-cfg`): every
request names one adapter (some two), drawn from a skewed popularity (Zipf), and
arrives by a Poisson process fast enough to saturate the base-model pool. The same
arrivals, with the same adapter sets, run twice on fresh clusters that differ only in
the broker's `adapter_affinity` setting (set live with `Client.configure`); with it
off, dispatch is the plain rule (the holder of the input, else the least loaded).

The adapters have no source: emulated actors pay the switch costs of
`actors/backends/lora.py` (disk read into the host cache, injection into the model,
setting scales), which are ASSUMED figures for an SD3-size adapter, not a measured
profile. With the default residency (8 adapters injected per actor) most switches
only set scales; the `lora_resident=1` variant makes every switch inject, which is
what a memory-tight deployment pays.

Runs in the client process; starts LocalClusters (real broker, agent and actor
processes) and talks to them through the Client library only.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actors.backends.lora import DEFAULT_RESIDENT, LORA_ACTIVATE_S, LORA_DISK_S, LORA_INJECT_S
from broker import protocol as p
from broker.catalog import load_catalog
from clients.bench import records
from clients.bench.loadgen import (
    Arrival,
    Outcome,
    percentile,
    poisson_arrivals,
    run_open_loop_sync,
    scale_arrivals,
)
from clients.bench.sim.control import quiet_logs
from clients.bench.sim.simulator import Simulation
from clients.bench.systems import SystemSpec, lego_system
from clients.client import Client
from clients.local import LocalCluster, LocalClusterSpec

WORKFLOW = "sd3-lora-cfg"
BASE = "StableDiffusion3"
ENCODERS = ("CLIP_L", "CLIP_G", "T5_SD3")
STEADY_FROM = 0.25  # of the arrival window: completions before it are the ramp, not the steady state


@dataclass
class LoraBenchSettings:
    adapters: int = 32
    zipf_s: float = 1.1
    two_adapter_share: float = 0.25  # of requests that name two adapters (the rest name one)
    gpus: int = 4  # one SD3 replica on each; encoders and VAE spread over them
    # offered requests per emulated H800 second, headline first: one that saturates the
    # SD3 pool, one that leaves actors idle at times (where affinity has a choice)
    rates: tuple[float, ...] = (2.6, 1.0)
    window_s: float = 60.0  # of arrivals, emulated H800 seconds
    steps: int = 28
    time_scale: float = 0.25
    seed: int = 11
    # lora_resident of each variant, headline first: the default, and the most a request
    # names (2), so that about every switch injects
    residencies: tuple[int, ...] = (DEFAULT_RESIDENT, 2)
    run_dir: str = ""
    log_level: str = "warning"

    def __post_init__(self) -> None:
        for name in ("adapters", "gpus", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("zipf_s", "window_s", "time_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        if not self.rates or any(not r > 0 for r in self.rates):
            raise ValueError(f"rates: each must be > 0 requests/s, got {self.rates!r}")
        if not 0.0 <= self.two_adapter_share <= 1.0:
            raise ValueError(f"two_adapter_share: must be in [0, 1], got {self.two_adapter_share!r}")
        if self.two_adapter_share > 0 and self.adapters < 2:
            raise ValueError("adapters: two-adapter requests need at least 2 adapters")
        largest = 2 if self.two_adapter_share > 0 else 1  # an actor holds a request's whole set at once
        if not self.residencies or any(r < largest for r in self.residencies):
            raise ValueError(f"residencies: each lora_resident must be >= {largest} (the adapters one request "
                             f"names), got {self.residencies!r}")


# CI check of the harness: 2 GPUs, a few wall seconds of arrivals, a load that leaves
# actors idle at times (affinity only chooses among idle actors), few adapters.
QUICK = {"gpus": 2, "rates": (0.5,), "window_s": 30.0, "adapters": 6, "residencies": (2,)}


# ---------------------------------------------------------------- pure parts


def adapter_names(n: int) -> list[str]:
    return [f"tenant-{i:02d}" for i in range(n)]


def adapter_catalog(names: list[str], base: str = BASE) -> str:
    """Catalog TOML registering `names` for `base` with no source: emulated adapters."""
    return "".join(f'[adapters.{name}]\nbase = "{base}"\ndescription = "emulated tenant adapter (no weights)"\n\n'
                   for name in names)


def zipf_weights(n: int, s: float) -> np.ndarray:
    """Popularity of ranks 1..n: proportional to 1 / rank^s."""
    weights = 1.0 / np.arange(1, n + 1) ** s
    return weights / weights.sum()


def draw_sets(count: int, names: list[str], s: float, two_share: float, seed: int) -> list[tuple[str, ...]]:
    """`count` adapter sets (in a fixed order of rank, so one pair is always the same set):
    each names one adapter, or with probability `two_share` two distinct ones, by Zipf(s)."""
    rng = np.random.default_rng(seed)
    p = zipf_weights(len(names), s)
    sets = []
    for _ in range(count):
        size = 2 if rng.random() < two_share else 1
        ranks = sorted(rng.choice(len(names), size=size, replace=False, p=p))
        sets.append(tuple(names[r] for r in ranks))
    return sets


def request_params(sets: list[tuple[str, ...]], steps: int):
    """params_for of the open-loop runner: arrival i carries sets[i]."""
    def params_for(arrival: Arrival) -> dict:
        return {"prompt": f"lora bench request {arrival.index}", "seed": arrival.index, "steps": steps,
                "loras": [{"name": name, "weight": 1.0} for name in sets[arrival.index]]}
    return params_for


def consecutive_changes(sets: list[tuple[str, ...]]) -> int:
    """Set changes between consecutive arrivals: what one actor serving them in arrival
    order, one at a time, would switch (a single text-encoder actor, roughly)."""
    return sum(a != b for a, b in zip(sets, sets[1:], strict=False)) + (1 if sets else 0)


def summarize_run(outcomes: list[Outcome], window_s: float, time_scale: float) -> dict:
    """Completed requests, steady-state throughput and latency, wall and emulated H800.

    Throughput counts completions after the ramp (STEADY_FROM of the window) up to the
    window's end: under saturation that is the pool's service rate, the same for any
    window, whereas completions over the whole run include the drain after arrivals stop."""
    ok = [o for o in outcomes if o.status == "ok"]
    start, end = STEADY_FROM * window_s, window_s
    steady = sum(1 for o in ok if start <= o.finished_at < end)
    wall_rps = steady / (end - start)
    latencies = [o.latency_s / time_scale for o in ok]
    return {
        "requests": len(outcomes), "completed": len(ok),
        "not_completed": {status: n for status in ("rejected", "failed", "timeout")
                          if (n := sum(o.status == status for o in outcomes))},
        "throughput_wall_per_s": round(wall_rps, 3),
        "throughput_h800_per_s": round(wall_rps * time_scale, 3),
        "p50_latency_h800_s": round(percentile(latencies, 50), 2) if latencies else None,
        "p99_latency_h800_s": round(percentile(latencies, 99), 2) if latencies else None,
        "makespan_wall_s": round(max((o.finished_at for o in ok), default=0.0), 2),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def compare(runs: dict[str, dict]) -> dict:
    """Affinity on over off: throughput and switches per request."""
    on, off = runs["on"], runs["off"]
    return {"throughput_ratio": _ratio(on["throughput_h800_per_s"], off["throughput_h800_per_s"]),
            "switches_ratio": _ratio(on["switches_per_request"], off["switches_per_request"]),
            "p99_ratio": _ratio(on["p99_latency_h800_s"], off["p99_latency_h800_s"])}


# ---------------------------------------------------------------- runs on a cluster


def placement_of(catalog, gpus: int) -> list[tuple[str, str, str]]:
    return list(lego_system(catalog, [WORKFLOW], gpus).placement)


def cluster_spec(s: LoraBenchSettings, resident: int, catalog: Path, run_dir: str) -> LocalClusterSpec:
    """One SD3 actor per GPU, one of each encoder and the VAE spread over them (as the
    cluster benchmark places micro-serving); no scheduler, so the pool stays fixed."""
    options = {"time_scale": s.time_scale, "load_time_scale": s.time_scale, "lora_resident": resident}
    placement = placement_of(load_catalog([catalog]), s.gpus)
    return LocalClusterSpec(workflows=[WORKFLOW], emulate_gpus=s.gpus, options=options, placement=placement,
                            max_batch_rows=8, catalog=[str(catalog)], run_dir=run_dir, log_level=s.log_level,
                            heartbeat_interval_s=1.0)


def _switch_counts(client: Client) -> dict:
    """Switches so far (the broker's counter: every model of the set) and denoise batches."""
    stats = client.stats()
    return {"total": stats.counters.get("adapter_switches", 0),
            "denoise_batches": sum(m.batches for m in stats.models if m.model == BASE)}


def run_once(s: LoraBenchSettings, affinity: bool, resident: int, arrivals: list[Arrival], params_for,
             catalog: Path, run_dir: str) -> dict:
    """One fresh cluster, one open-loop run of `arrivals` (already in wall time)."""
    with LocalCluster(cluster_spec(s, resident, catalog, run_dir)) as cluster, Client(cluster.frontend) as client:
        client.configure(settings={"adapter_affinity": affinity})
        # Every actor runs once, with no adapter (no switch): the run then starts warm.
        client.generate(WORKFLOW, prompt="warm up", seed=0, steps=s.steps, timeout=120)
        before = _switch_counts(client)
        window = s.window_s * s.time_scale
        outcomes = run_open_loop_sync(cluster.frontend, arrivals, params_for, slo_s={}, timeout_s=120 + 10 * window)
        after = _switch_counts(client)
    result = summarize_run(outcomes, window, s.time_scale)
    switches = {k: after[k] - before[k] for k in after if k in before}
    done = max(1, result["completed"])
    result["adapter_switches"] = switches["total"]
    result["switches_per_request"] = round(switches["total"] / done, 3)
    result["denoise_batches"] = switches["denoise_batches"]
    return result


def simulated_switches(s: LoraBenchSettings, affinity: bool, arrivals: list[Arrival], params_for,
                       catalog: Path) -> dict:
    """The same arrivals (unscaled) through the simulator: the real broker core in virtual
    time, same placement, actors that take the profiles' time and pay no switch costs.
    Its per-actor counts split the switches by model, which the cluster's Stats do not."""

    catalog_doc = load_catalog([catalog])
    system = SystemSpec("lora-affinity", "micro", tuple(placement_of(catalog_doc, s.gpus)), drop_late=False)
    sim = Simulation(system, catalog_doc, gpus=s.gpus, params_for=params_for, device_model="fifo")
    with quiet_logs():
        sim.frontend(b"bench", p.AdminConfigure({"adapter_affinity": affinity}, None))
    if not any(isinstance(r, p.AdminReply) and r.ok for r in sim.replies):
        raise RuntimeError(f"the simulated broker refused adapter_affinity={affinity}: {sim.replies}")
    outcomes, _ = sim.run(arrivals)
    done = max(1, sum(o.status == "ok" for o in outcomes))
    counts: dict[str, list[int]] = {}
    for actor in sim.core.actors.values():
        switches_batches = counts.setdefault(actor.model, [0, 0])
        switches_batches[0] += actor.adapter_switches
        switches_batches[1] += actor.batches
    denoiser = counts.get(BASE, [0, 0])
    encoders = sum(counts.get(model, [0, 0])[0] for model in ENCODERS)
    return {"denoiser_switches_per_request": round(denoiser[0] / done, 3),
            "encoder_switches_per_request": round(encoders / done, 3),
            "denoise_batches_switched": round(denoiser[0] / max(1, denoiser[1]), 3)}


def run_variant(s: LoraBenchSettings, rate: float, resident: int, names: list[str], catalog: Path, root: Path) -> dict:
    """Affinity on, then off, over the same arrivals and adapter sets."""
    arrivals = poisson_arrivals(rate, s.window_s, [WORKFLOW], seed=s.seed)
    sets = draw_sets(len(arrivals), names, s.zipf_s, s.two_adapter_share, seed=s.seed + 1)
    params_for = request_params(sets, s.steps)
    runs = {}
    for label, affinity in (("on", True), ("off", False)):
        run_dir = str(root / f"rate-{rate:g}-resident-{resident}-affinity-{label}")
        runs[label] = run_once(s, affinity, resident, scale_arrivals(arrivals, s.time_scale), params_for, catalog,
                               run_dir)
        print(f"  {rate:g} req/s, lora_resident={resident}, affinity {label}: {runs[label]['completed']} done, "
              f"{runs[label]['switches_per_request']} switches/request, "
              f"{runs[label]['throughput_h800_per_s']} req/s (H800)", file=sys.stderr, flush=True)
    simulated = {label: simulated_switches(s, affinity, arrivals, params_for, catalog)
                 for label, affinity in (("on", True), ("off", False))}
    return {"rate_per_s": rate, "lora_resident": resident, "requests": len(arrivals), "simulated": simulated,
            "distinct_sets": len(set(sets)),
            "top_set_share": round(Counter(sets).most_common(1)[0][1] / len(sets), 3) if sets else 0.0,
            "arrival_order_changes_per_request": round(consecutive_changes(sets) / max(1, len(sets)), 3),
            "runs": runs, "ratios": compare(runs)}


def run_lora_bench(s: LoraBenchSettings) -> dict:
    started = time.monotonic()
    names = adapter_names(s.adapters)
    result = {
        "date": records.utc_now(), "machine": records.machine(),
        "workflow": WORKFLOW, "gpus": s.gpus, "time_scale": s.time_scale, "adapters": s.adapters,
        "zipf_s": s.zipf_s, "two_adapter_share": s.two_adapter_share, "steps": s.steps, "window_s": s.window_s,
        "seed": s.seed,
        "switch_costs_assumed_s": {"disk": LORA_DISK_S, "inject": LORA_INJECT_S, "activate": LORA_ACTIVATE_S},
        "variants": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(s.run_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        catalog = root / "lora_adapters.toml"
        catalog.write_text(adapter_catalog(names))
        for rate in s.rates:
            for resident in s.residencies:
                result["variants"].append(run_variant(s, rate, resident, names, catalog, root))
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


# ---------------------------------------------------------------- tables and the record


def _fmt(x, pattern: str = "{}") -> str:
    return "-" if x is None else pattern.format(x)


def lora_table(result: dict) -> str:
    head = ["offered req/s (H800)", "lora_resident", "affinity", "completed", "req/s (wall)", "req/s (H800)",
            "p50 (H800 s)", "p99 (H800 s)", "switches / request", "sim: denoiser switches / request",
            "sim: text-encoder switches / request", "sim: denoise batches that switched"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for v in result["variants"]:
        for label, r in v["runs"].items():
            sim = v["simulated"][label]
            row = [f"{v['rate_per_s']:g}", str(v["lora_resident"]), label, f"{r['completed']}/{r['requests']}",
                   f"{r['throughput_wall_per_s']:.3f}", f"{r['throughput_h800_per_s']:.3f}",
                   _fmt(r["p50_latency_h800_s"]), _fmt(r["p99_latency_h800_s"]), f"{r['switches_per_request']:.2f}",
                   f"{sim['denoiser_switches_per_request']:.2f}", f"{sim['encoder_switches_per_request']:.2f}",
                   f"{sim['denoise_batches_switched']:.1%}"]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| offered req/s (H800) | lora_resident | throughput on / off | switches per request on / off | "
                  "p99 on / off |", "| --- | --- | --- | --- | --- |"]
    for v in result["variants"]:
        ratio = v["ratios"]
        lines.append(f"| {v['rate_per_s']:g} | {v['lora_resident']} | {_fmt(ratio['throughput_ratio'])} | "
                     f"{_fmt(ratio['switches_ratio'])} | {_fmt(ratio['p99_ratio'])} |")
    return "\n".join(lines)


def describe_setup(result: dict) -> str:
    costs = result["switch_costs_assumed_s"]
    mixes = "; ".join(f"{v['rate_per_s']:g} req/s: {v['requests']} requests, {v['distinct_sets']} distinct sets, "
                      f"the most popular {v['top_set_share']:.0%}, set changes between consecutive arrivals "
                      f"{v['arrival_order_changes_per_request']} per request"
                      for v in {v["rate_per_s"]: v for v in result["variants"]}.values())
    return (f"{result['gpus']} emulated H800s, one SD3 Medium actor on each (`{result['workflow']}`, "
            f"{result['steps']} CFG steps, 1024 px; encoders and VAE one actor each, spread over the GPUs; no "
            f"scheduler), profile times x {result['time_scale']:g}. Poisson arrivals over {result['window_s']:g} s "
            f"(H800 time); each request names 1 LoRA adapter (2 with probability {result['two_adapter_share']:g}) "
            f"of {result['adapters']}, Zipf s={result['zipf_s']:g}, weight 1 ({mixes}). Same arrivals and sets "
            f"with affinity on and off; a fresh cluster per run. Switch costs are ASSUMED, not measured (no "
            f"profile measures adapters): disk read {costs['disk']} s, inject {costs['inject']} s per adapter, "
            f"activate {costs['activate']} s (H800 seconds), host cache 4 GiB of 150 MiB adapters; lora_resident "
            f"adapters stay injected per actor. A switch is counted for every adapted model call (the SD3 denoiser "
            f"and its three text encoders) whose set differs from its actor's current one; the cluster's Stats count "
            f"them in total only, so the `sim:` columns split them by model from the same arrivals run through the "
            f"simulator (the same broker core in virtual time, same placement, no switch costs). Throughput: "
            f"completions from {STEADY_FROM:.0%} of the arrival window to its end.")


def _saturated(v: dict) -> bool:
    """Whether the pool fell behind the offered load (else throughput is the offered rate)."""
    return v["runs"]["off"]["throughput_h800_per_s"] < 0.9 * v["rate_per_s"]


def reading(result: dict) -> str:
    """The result in three lines, from its numbers: the headline variant (the first), where
    the switches are (the simulator's split, per rate), what residency costs."""
    head = result["variants"][0]
    on, off, ratio = head["runs"]["on"], head["runs"]["off"], head["ratios"]
    load = "saturated" if _saturated(head) else "not saturated: throughput is the offered rate"
    lines = [f"Headline, {head['rate_per_s']:g} req/s offered ({load}), lora_resident={head['lora_resident']}: "
             f"{on['switches_per_request']:.2f} switches per request with affinity, {off['switches_per_request']:.2f} "
             f"without (x{_fmt(ratio['switches_ratio'])}); throughput x{_fmt(ratio['throughput_ratio'])}, p99 "
             f"x{_fmt(ratio['p99_ratio'])}."]
    by_rate = {v["rate_per_s"]: v["simulated"] for v in result["variants"]}
    split = "; ".join(f"{rate:g} req/s: denoiser {sim['on']['denoiser_switches_per_request']:.2f} with vs "
                      f"{sim['off']['denoiser_switches_per_request']:.2f} without, text encoders "
                      f"{sim['on']['encoder_switches_per_request']:.2f} vs {sim['off']['encoder_switches_per_request']:.2f}"
                      for rate, sim in by_rate.items())
    lines.append(f"Per request, split by model (simulator, same arrivals): {split}.")
    same_rate = [v for v in result["variants"] if v["rate_per_s"] == head["rate_per_s"]]
    if len(same_rate) > 1:
        costs = ", ".join(f"lora_resident={v['lora_resident']} {v['runs']['off']['throughput_h800_per_s']:.3f}"
                          for v in same_rate)
        lines.append(f"Residency at {head['rate_per_s']:g} req/s, throughput without affinity (req/s, H800): {costs}.")
    return "\n".join(f"- {line}" for line in lines)


def record(result: dict, path: str, command: str, notes: str = "") -> None:
    """Append the run to `path` (docs/benchmarks.md) as its own section."""
    with open(path, "a") as out:
        out.write(f"\n### LoRA adapter affinity, emulated ({result['date']})\n\n"
                  f"Machine: {result['machine']}. Command: `{command}`; took {result['wall_s']} s. "
                  f"{describe_setup(result)}\n\n{lora_table(result)}\n\n{reading(result)}\n"
                  + (f"\n{notes}\n" if notes else ""))


# ---------------------------------------------------------------- `lego bench lora`


def settings_from_args(args) -> LoraBenchSettings:
    """Settings from the CLI's flags (those not given keep their defaults; --quick first)."""
    def numbers(name: str, text: str, cast) -> tuple:
        try:
            return tuple(cast(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--{name}: expected comma-separated numbers, got {text!r}") from None

    given = dict(QUICK) if args.quick else {}
    for name in ("gpus", "adapters", "window_s", "time_scale"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    if args.rates:
        given["rates"] = numbers("rates", args.rates, float)
    if args.residencies:
        given["residencies"] = numbers("residencies", args.residencies, int)
    return LoraBenchSettings(**given)


def run_cli(args, command: str) -> int:
    import json

    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"lego bench lora: {exc}", file=sys.stderr)
        return 2
    result = run_lora_bench(settings)
    print(json.dumps(result, indent=2) if args.json else f"{lora_table(result)}\n\n{reading(result)}")
    if args.record:
        record(result, args.record, command.strip())
    return 0
