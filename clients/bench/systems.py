"""The serving systems a cluster benchmark compares, as plain data: pure, no IO.

`lego` is micro-serving: every model its own actors, the scheduler actor on
(scaling, placement, admission, parallel CFG groups). The baselines are monoliths in
the same runtime (`pipeline/WORKFLOW` actors, one request at a time), placed as the
paper's artifact places them (`../shared/data/diflow-ae/baselines/*.yml`): `basic`
(a static split), `shepherd` (a static split sized to demand), `clockwork` (every GPU
hosts every workflow, loading on demand). Every system drops requests whose deadline
passed before their work started, as the paper's baselines do.

Used by the emulated-process benchmark (`clients/bench/cluster.py`) and the
simulator (`clients/bench/sim/simulator.py`), so both run exactly the same configurations.
"""

from __future__ import annotations

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
BASELINES = ("basic", "shepherd", "clockwork")


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
    # Admission estimates queue-then-solo ("sum"): the paper's lower bound ("max") admits
    # requests that queueing then makes miss (the simulator's finding; docs/benchmarks.md).
    # The runtime's own time per request (about 10 batches x 10.5 ms + 14 ms, measured on
    # the dev VM: docs/benchmarks.md) counts at admission: without it a request that fits
    # its SLO on paper is admitted and then misses (simulated x6: 66.9% -> 76.4%).
    args = ["--admission", "true", "--admission-bound", "sum", "--cfg-split", "auto", "--admission-overhead-s", "0.12",
            "--interval-s", str(max(0.1, 0.5 * time_scale))]
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


SHARING_WORKFLOWS = ("sd3-canny-cfg", "sd3-pose-cfg", "sd35l-canny-cfg", "sd35l-depth-cfg", "flux-dev-canny", "flux-dev-depth")


def sharing_systems(catalog: Catalog, gpus: int = 16, time_scale: float = 1.0,
                    names: tuple[str, ...] = ("lego", *BASELINES)) -> list[SystemSpec]:
    """The model-sharing setting: six ControlNet workflows over SD3, SD3.5 Large and
    FLUX.1-dev (equal request mix). Baselines: an equal static split (basic), a split in
    proportion to each workflow's work (shepherd), every GPU hosting every workflow
    (clockwork). Micro-serving puts every base model on every GPU (41.6 GB together, with
    one copy of the shared encoders, VAEs and ControlNets beside them), so each GPU
    serves whichever base model has work; the broker prefers a GPU nobody computes on."""

    costs = CostModel(catalog)
    work = {wf: costs.request(catalog.workflows[wf], validate_params(catalog.workflows[wf], {"prompt": "x", "seed": 0})).work_s
            for wf in SHARING_WORKFLOWS}
    base_work: dict[str, float] = {}
    for wf, seconds in work.items():
        base = catalog.workflows[wf].denoiser
        base_work[base] = base_work.get(base, 0.0) + seconds
    systems = []
    for name in names:
        if name == "lego":
            systems.append(lego_system(catalog, list(SHARING_WORKFLOWS), gpus, time_scale, base_work,
                                       base_everywhere=True))
        elif name == "basic":
            systems.append(static_split_system(name, list(SHARING_WORKFLOWS), gpus))
        elif name == "shepherd":
            systems.append(static_split_system(name, list(SHARING_WORKFLOWS), gpus, work))
        elif name == "clockwork":
            systems.append(shared_gpus_system(name, list(SHARING_WORKFLOWS), gpus))
        else:
            raise ValueError(f"systems: unknown system {name!r} (known: lego, {', '.join(BASELINES)})")
    return systems


def paper_systems(catalog: Catalog, baselines_dir: str | Path, gpus: int = 8, time_scale: float = 1.0,
                  names: tuple[str, ...] = ("lego", *BASELINES)) -> list[SystemSpec]:
    systems = []
    for name in names:
        if name == "lego":
            systems.append(lego_system(catalog, list(PAPER_WORKFLOWS.values()), gpus, time_scale))
        elif name in BASELINES:
            systems.append(baseline_system(name, read_baseline(Path(baselines_dir) / f"{name}.yml")))
        else:
            raise ValueError(f"systems: unknown system {name!r} (known: lego, {', '.join(BASELINES)})")
    return systems
