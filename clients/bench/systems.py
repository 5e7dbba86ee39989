"""The serving systems a cluster benchmark compares, as plain data: pure, no IO.

`lego` is micro-serving: every model its own actors, the scheduler actor on
(scaling, placement, admission, parallel CFG groups). The baselines are monoliths in
the same runtime (`pipeline/WORKFLOW` actors, one request at a time), placed as the
paper's artifact places them (`../shared/data/diflow-ae/baselines/*.yml`): `basic`
(a static split), `shepherd` (a static split sized to demand), `clockwork` (every GPU
hosts every workflow, loading on demand). `pooled` is the strongest monolith a
practitioner would deploy: every GPU keeps every served model resident, one copy of a
model shared by the workflows that use it (ComfyUI's model cache), one queue in
deadline order, and micro-serving's admission and drop rules (`pooled_system`). Every
system drops requests whose deadline passed before their work started, as the paper's
baselines do.

Used by the emulated-process benchmark (`clients/bench/cluster.py`) and the
simulator (`clients/bench/sim/simulator.py`), so both run exactly the same configurations.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from broker.catalog import Catalog, pipeline_name, validate_params
from broker.costs.model import CostModel
from scheduler.plan import served_models

# The artifact's workflow names -> ours (tenants A, B, C of the traces, in this order).
PAPER_WORKFLOWS = {
    "flux_schnell_txt2img_workflow": "flux-schnell-txt2img-cfg",
    "flux_schnell_txt2img_controlnet_canny_workflow": "flux-schnell-canny-cfg",
    "flux_schnell_txt2img_controlnet_depth_workflow": "flux-schnell-depth-cfg",
}
PAPER_TENANTS = dict(zip("ABC", PAPER_WORKFLOWS.values(), strict=True))
BASELINES = ("basic", "shepherd", "clockwork", "pooled")
GPUS_PER_HOST = 8  # the paper's H800 nodes: hosts are counted this way everywhere a benchmark places GPUs


def hosts_for(gpus: int) -> int:
    """Hosts a cluster of `gpus` GPUs spans: one per GPUS_PER_HOST, the last one partly filled."""
    return max(1, math.ceil(gpus / GPUS_PER_HOST))


# Admission as the broker ships it, for every system that admits: lookahead (the
# broker's default), plus the runtime's own time per request beside its profile times,
# for a cold start (a burst before any request has completed; lookahead learns the rest).
# The runtime as last calibrated (clients/bench/sim/timing.py MEASURED, 2026-12-07):
# 3.98 ms per dispatched batch on the request's critical path, 9.93 ms for submit and
# result (until then 10.5 and 14 ms: 0.119 and 0.025 s below; the paper suite's totals
# move by 1-3 requests between them). A FLUX.1-schnell request micro-served is about 10 batches
# deep; a monolith's is one batch.
ADMISSION_BOUND = "lookahead"
TASK_OVERHEAD_S, REQUEST_OVERHEAD_S = 0.00398, 0.00993
ADMISSION_OVERHEAD_S = round(10 * TASK_OVERHEAD_S + REQUEST_OVERHEAD_S, 3)  # micro-serving: 0.05 s
MONOLITH_ADMISSION_OVERHEAD_S = round(TASK_OVERHEAD_S + REQUEST_OVERHEAD_S, 3)  # one task: 0.014 s
MODEL_CACHES = ("workflow", "model")
GIB = 1024**3


@dataclass(frozen=True)
class SystemSpec:
    name: str
    serving: str  # micro | monolith
    placement: tuple[tuple[str, str, str], ...]  # (model, device, backend) of every actor at start
    scheduler: bool = False
    cfg_split: str = "never"
    admission: bool = False
    drop_late: bool = True
    # Micro-serving also drops a request once its remaining critical path cannot meet the
    # deadline; the baselines drop only what has expired, as the paper's do.
    drop_hopeless: bool = False
    scheduler_args: tuple[str, ...] = field(default=())
    # Live broker settings a system without the scheduler actor sets at start, as an
    # operator's AdminConfigure would (the scheduler sets its own from scheduler_args).
    broker_settings: tuple[tuple[str, str | float | bool], ...] = field(default=())
    # What a monolith hosting several workflows keeps on its GPU. "workflow": each workflow
    # its own copy of every model, loaded and evicted whole, least recently used first
    # (Clockwork; the emulated monolith backend). "model": one copy of every hosted model,
    # shared by the workflows that use it, all resident from the start (ComfyUI's model
    # cache; pooled): it never loads while serving.
    model_cache: str = "workflow"

    def __post_init__(self) -> None:
        if self.model_cache not in MODEL_CACHES:
            raise ValueError(f"model_cache: expected one of {MODEL_CACHES}, got {self.model_cache!r}")


def broker_flags(system: SystemSpec) -> list[str]:
    """The system's `broker_settings` as `lego broker` flags (an emulated cluster's
    `broker_args`), so a cluster of processes starts its broker as the simulator configures it."""
    def word(value) -> str:
        return ("on" if value else "off") if isinstance(value, bool) else f"{value}"
    return [arg for name, value in system.broker_settings for arg in (f"--{name.replace('_', '-')}", word(value))]


def read_baseline(path: str | Path) -> dict[str, list[int]]:
    """The artifact's placement file: {artifact workflow name: [GPU ranks]}.

    The format is a two-level YAML list (`pipelines: NAME: - rank: N`); read with a
    strict line parser so a malformed file fails naming its line."""
    placement: dict[str, list[int]] = {}
    current = None
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith(("baseline_name:", "pipelines:")):
            continue
        if m := re.fullmatch(r"  ([A-Za-z0-9_]+):\s*", line):
            current = placement.setdefault(m.group(1), [])
        elif (m := re.fullmatch(r"    - rank: (\d+)\s*", line)) and current is not None:
            current.append(int(m.group(1)))
        else:
            raise ValueError(f"{path}:{number}: not a `pipelines: NAME: - rank: N` entry: {line!r}")
    return placement


def baseline_system(name: str, ranks: dict[str, list[int]], workflow_names: dict[str, str] = PAPER_WORKFLOWS) -> SystemSpec:
    """Monolith actors placed by rank; a GPU named by several workflows hosts them all
    in one actor that loads them on demand (Clockwork)."""
    by_gpu: dict[int, list[str]] = {}
    for artifact_name, gpu_ranks in ranks.items():
        if artifact_name not in workflow_names:
            raise ValueError(f"baseline {name}: unknown workflow {artifact_name!r} (known: {sorted(workflow_names)})")
        for rank in gpu_ranks:
            by_gpu.setdefault(rank, []).append(workflow_names[artifact_name])
    placement = tuple((pipeline_name(wfs), f"emu:{rank}", "monolith") for rank, wfs in sorted(by_gpu.items()))
    return SystemSpec(name, "monolith", placement)


def split_gpus(weights: dict[str, float], gpus: int) -> dict[str, int]:
    """GPUs per key in proportion to `weights`, at least one each (largest remainders)."""
    if gpus < len(weights):
        raise ValueError(f"gpus: {gpus} cannot give each of {len(weights)} entries one")
    total = sum(weights.values())
    share = {k: max(1.0, gpus * w / total) for k, w in weights.items()}
    counts = {k: int(v) for k, v in share.items()}
    for k in sorted(share, key=lambda k: share[k] - counts[k], reverse=True):
        if sum(counts.values()) >= gpus:
            break
        counts[k] += 1
    while sum(counts.values()) > gpus:  # the minimum of one each overshot: take from the largest
        counts[max(counts, key=counts.get)] -= 1
    return counts


def lego_system(catalog: Catalog, workflows: list[str], gpus: int, time_scale: float = 1.0,
                base_share: dict[str, float] | None = None, pin_base: bool = True,
                base_everywhere: bool = False) -> SystemSpec:
    """Micro-serving: base-model actors over the GPUs (one base model: all of them;
    several: split by `base_share`, or with `base_everywhere` every base model on every
    GPU, which then serves whichever has work), one actor of every other model spread
    over the GPUs; the scheduler adapts from there."""
    models = served_models(catalog, tuple(workflows))
    base = [m for m in models if catalog.models[m].kind == "denoiser"]
    others = [m for m in models if m not in base]
    if base_everywhere or len(base) == 1:
        counts = dict.fromkeys(base, gpus)
        placement = [(m, f"emu:{g}", "emulated") for m in base for g in range(gpus)]
    else:
        counts = split_gpus(base_share or dict.fromkeys(base, 1.0), gpus)
        devices = iter(range(gpus))
        placement = [(m, f"emu:{next(devices)}", "emulated") for m in base for _ in range(counts[m])]
    placement += [(m, f"emu:{i % gpus}", "emulated") for i, m in enumerate(others)]
    scaled = [("--queue-wait-s", 0.5), ("--sustain-s", 1.0), ("--horizon-s", 4.0),
              ("--up-cooldown-s", 1.0), ("--down-cooldown-s", 10.0)]
    # Admission: see ADMISSION_BOUND. Without the runtime's own time a request that fits
    # its SLO on paper is admitted and then misses (simulated x6, sum bound: 66.9% -> 76.4%).
    args = ["--admission", "true", "--admission-bound", ADMISSION_BOUND, "--cfg-split", "auto",
            "--admission-overhead-s", f"{ADMISSION_OVERHEAD_S:g}", "--interval-s", str(max(0.1, 0.5 * time_scale))]
    args += [arg for flag, value in scaled for arg in (flag, f"{value * time_scale:g}")]
    if pin_base:
        # A dedicated cluster: an idle base-model replica costs nothing while no other
        # model needs its GPU, and dropping one would make the next burst wait for a
        # reload; the scheduler still adds replicas where a model's queue builds.
        args += [arg for m in base for arg in ("--model-min", f"{m}={counts[m]}")]
    return SystemSpec("lego", "micro", tuple(placement), scheduler=True, cfg_split="auto", admission=True,
                      drop_hopeless=True, scheduler_args=tuple(args))


def static_split_system(name: str, workflows: list[str], gpus: int, weights: dict[str, float] | None = None) -> SystemSpec:
    """Monoliths on disjoint GPUs, per workflow in proportion to `weights` (equal: a plain
    static split; demand-weighted: Shepherd-style)."""
    counts = split_gpus(weights or dict.fromkeys(workflows, 1.0), gpus)
    devices = iter(range(gpus))
    placement = tuple((pipeline_name([wf]), f"emu:{next(devices)}", "monolith") for wf in workflows for _ in range(counts[wf]))
    return SystemSpec(name, "monolith", placement)


def shared_gpus_system(name: str, workflows: list[str], gpus: int) -> SystemSpec:
    """Every GPU hosts every workflow, loading on demand (Clockwork-style)."""
    return SystemSpec(name, "monolith", tuple((pipeline_name(workflows), f"emu:{g}", "monolith") for g in range(gpus)))


def request_work(catalog: Catalog, workflows: list[str] | tuple[str, ...]) -> dict[str, float]:
    """Device-seconds of one default request of each workflow, as a monolith runs it."""
    costs = CostModel(catalog)
    return {wf: costs.request(catalog.workflows[wf], validate_params(catalog.workflows[wf], {"prompt": "x", "seed": 0})).work_s
            for wf in workflows}


def hosted_bytes(catalog: Catalog, workflows: list[str] | tuple[str, ...]) -> int:
    """Resident bytes of every model of `workflows`, one copy of each (profile sizes)."""
    costs = CostModel(catalog)
    return sum(costs.resident_bytes(m) for m in {m for wf in workflows for m in catalog.workflows[wf].models})


def pool_groups(catalog: Catalog, workflows: list[str], memory_bytes: int) -> list[list[str]]:
    """`workflows` in groups whose models (one copy each) fit one GPU: one group when all
    fit. Otherwise the workflows of one base model stay together (splitting them would
    hold that model twice) and these families are packed first fit, largest first, so
    a group shares what it can (SD3 and SD3.5 Large their text encoders); a family
    that fits no GPU alone is split into its workflows."""
    if hosted_bytes(catalog, workflows) <= memory_bytes:
        return [list(workflows)]
    families: dict[str, list[str]] = {}
    for wf in workflows:
        families.setdefault(catalog.workflows[wf].denoiser, []).append(wf)
    units = []
    for family in families.values():
        units += [family] if hosted_bytes(catalog, family) <= memory_bytes else [[wf] for wf in family]
    groups: list[list[str]] = []
    for unit in sorted(units, key=lambda u: hosted_bytes(catalog, u), reverse=True):
        if hosted_bytes(catalog, unit) > memory_bytes:
            raise ValueError(f"pooled: {unit[0]} needs {hosted_bytes(catalog, unit) / GIB:.1f} GiB, "
                             f"more than a {memory_bytes / GIB:g} GiB GPU holds")
        group = next((g for g in groups if hosted_bytes(catalog, g + unit) <= memory_bytes), None)
        if group is None:
            groups.append(list(unit))
        else:
            group += unit
    order = {wf: i for i, wf in enumerate(workflows)}
    return sorted((sorted(g, key=order.get) for g in groups), key=lambda g: order[g[0]])


def pooled_system(catalog: Catalog, workflows: list[str], gpus: int, mix: dict[str, float] | None = None,
                  gpu_memory_gib: float = 80.0) -> SystemSpec:
    """The strongest monolith: one process per GPU hosting every workflow, their models
    resident once each, serving one shared queue earliest deadline first, each request
    to completion, with micro-serving's admission and drop rules.

    Where every model does not fit one GPU (`pool_groups`), it does what a practitioner
    would deploy rather than load models on the hot path (Clockwork does that): the
    workflows split into groups that fit, each group pooled on its own GPUs, GPUs given
    in proportion to each group's device time under `mix` (request shares; default
    equal), at least one each, as Shepherd sizes its split."""
    groups = pool_groups(catalog, workflows, int(gpu_memory_gib * GIB))
    if gpus < len(groups):
        raise ValueError(f"pooled: {len(groups)} groups of workflows fit {gpu_memory_gib:g} GiB GPUs, "
                         f"a cluster of {gpus} cannot give each one")
    work, shares = request_work(catalog, workflows), mix or dict.fromkeys(workflows, 1.0)
    demand = {i: sum(work[wf] * shares.get(wf, 0.0) for wf in g) for i, g in enumerate(groups)}
    if not any(demand.values()):  # a mix of none of these workflows: an equal split
        demand = dict.fromkeys(demand, 1.0)
    counts = split_gpus(demand, gpus)
    devices = iter(range(gpus))
    placement = tuple((pipeline_name(g), f"emu:{next(devices)}", "monolith")
                      for i, g in enumerate(groups) for _ in range(counts[i]))
    settings = (("admission_bound", ADMISSION_BOUND), ("admission_overhead_s", MONOLITH_ADMISSION_OVERHEAD_S),
                ("queue_order", "deadline"))
    return SystemSpec("pooled", "monolith", placement, admission=True, drop_hopeless=True,
                      broker_settings=settings, model_cache="model")


SHARING_WORKFLOWS = ("sd3-canny-cfg", "sd3-pose-cfg", "sd35l-canny-cfg", "sd35l-depth-cfg", "flux-dev-canny", "flux-dev-depth")


def sharing_systems(catalog: Catalog, gpus: int = 16, time_scale: float = 1.0,
                    names: tuple[str, ...] = ("lego", *BASELINES), gpu_memory_gib: float = 80.0) -> list[SystemSpec]:
    """The model-sharing setting: six ControlNet workflows over SD3, SD3.5 Large and
    FLUX.1-dev (equal request mix). Baselines: an equal static split (basic), a split in
    proportion to each workflow's work (shepherd), every GPU hosting every workflow
    (clockwork), every GPU holding every model once (pooled: 78.7 GiB, so on smaller
    GPUs the workflows split into groups that fit). Micro-serving puts every base model
    on every GPU (41.6 GB together, with one copy of the shared encoders, VAEs and
    ControlNets beside them), so each GPU serves whichever base model has work; the
    broker prefers a GPU nobody computes on. Where the base models and the other models
    beside them do not fit one GPU, the base models split the GPUs by work instead."""
    work = request_work(catalog, SHARING_WORKFLOWS)
    base_work: dict[str, float] = {}
    for wf, seconds in work.items():
        base = catalog.workflows[wf].denoiser
        base_work[base] = base_work.get(base, 0.0) + seconds
    # every base model on every GPU only where they fit beside the other models lego_system
    # spreads over the GPUs (round robin, in this order)
    costs = CostModel(catalog)
    others = [m for m in served_models(catalog, SHARING_WORKFLOWS) if m not in base_work]
    beside = max(sum(costs.resident_bytes(m) for m in others[g::gpus]) for g in range(min(gpus, len(others))))
    everywhere = sum(costs.resident_bytes(m) for m in base_work) + beside <= gpu_memory_gib * GIB
    systems = []
    for name in names:
        if name == "lego":
            systems.append(lego_system(catalog, list(SHARING_WORKFLOWS), gpus, time_scale, base_work,
                                       base_everywhere=everywhere))
        elif name == "basic":
            systems.append(static_split_system(name, list(SHARING_WORKFLOWS), gpus))
        elif name == "shepherd":
            systems.append(static_split_system(name, list(SHARING_WORKFLOWS), gpus, work))
        elif name == "clockwork":
            systems.append(shared_gpus_system(name, list(SHARING_WORKFLOWS), gpus))
        elif name == "pooled":
            systems.append(pooled_system(catalog, list(SHARING_WORKFLOWS), gpus, gpu_memory_gib=gpu_memory_gib))
        else:
            raise ValueError(f"systems: unknown system {name!r} (known: lego, {', '.join(BASELINES)})")
    return systems


def paper_systems(catalog: Catalog, baselines_dir: str | Path, gpus: int = 8, time_scale: float = 1.0,
                  names: tuple[str, ...] = ("lego", *BASELINES), gpu_memory_gib: float = 80.0) -> list[SystemSpec]:
    """The paper setting's systems: the paper's baselines from the artifact's placement
    files, `pooled` (which the artifact has not) generated for `gpus` GPUs."""
    systems = []
    for name in names:
        if name == "lego":
            systems.append(lego_system(catalog, list(PAPER_WORKFLOWS.values()), gpus, time_scale))
        elif name == "pooled":
            systems.append(pooled_system(catalog, list(PAPER_WORKFLOWS.values()), gpus, gpu_memory_gib=gpu_memory_gib))
        elif name in BASELINES:
            systems.append(baseline_system(name, read_baseline(Path(baselines_dir) / f"{name}.yml")))
        else:
            raise ValueError(f"systems: unknown system {name!r} (known: lego, {', '.join(BASELINES)})")
    return systems
