"""How the benchmarks deploy micro-serving: lego's placement, sized for a workload.

Pure functions over `clients.bench.systems.SystemSpec` (no processes, no sockets), shared
by the simulator (`lego bench simulate`, `lego bench suite`) and the emulated cluster
(`lego bench cluster`), so both run the same lego:

- `sized_replicas`: every model beside the base one gets as many actors as its share of
  the device time (or a burst, `burst_replicas`) asks for;
- `spare_memory_replicas`: a small base model on every GPU with room to spare, where the
  base models do not all fit one GPU;
- `controlnets_beside_base`: each ControlNet beside every actor of its base model;
- `lego_cluster` (the paper's workflows, or an operator's) and `lego_sharing` (the
  six-workflow sharing setting) put them together.

Each was shaped by a simulated benchmark, quoted in its docstring (docs/benchmarks.md,
issue 14).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from broker.catalog import Catalog, unroll, validate_params
from broker.costs.model import CostModel
from clients.bench.systems import SystemSpec, hosts_for, lego_system


def lego_cluster(catalog: Catalog, gpus: int, mix: dict[str, float], time_scale: float = 1.0,
                 hosts: int = 1, gpu_memory_gib: float = 80.0) -> SystemSpec:
    """`lego_system`'s placement on every host (a base-model actor on every GPU, one
    actor of every other model spread over the host's GPUs), sized by `sized_replicas`,
    ControlNets beside the base model (`controlnets_beside_base`); the scheduler may
    use every GPU."""
    sized = sized_replicas(lego_system(catalog, list(mix), gpus, time_scale), catalog, gpus, mix, hosts)
    return controlnets_beside_base(sized, catalog, gpu_memory_gib)


def sized_replicas(system: SystemSpec, catalog: Catalog, gpus: int, mix: dict[str, float], hosts: int = 1) -> SystemSpec:
    """A lego system's base-model actors as placed, and every other model with more
    replicas where its share of the device time asks for more (full-batch profile costs
    weighted by the workflow mix: one ControlNet actor beside eight base ones queues every
    step of a model whose ControlNet costs a third of it) or a burst would queue on it
    (`burst_replicas`); the scheduler keeps those (it would stop them between bursts)
    and may use every GPU."""
    costs = CostModel(catalog)
    share: dict[str, float] = {}
    alone: dict[str, float] = {}
    solo = 0.0
    total = sum(mix.values())
    for name, weight in mix.items():
        workflow = catalog.workflows[name]
        params = validate_params(workflow, {"prompt": "x", "seed": 0})
        solo += (costs.solo_s(workflow, params) or 0.0) * weight / total
        for plan in unroll(workflow, params):
            one, full = costs.plan_costs(plan)  # full batches: what a busy cluster spends
            share[plan.model] = share.get(plan.model, 0.0) + full * weight / total
            alone[plan.model] = alone.get(plan.model, 0.0) + one * weight / total
    denoisers = {m for m in share if catalog.models[m].kind == "denoiser"}
    base_s = sum(share[m] for m in denoisers)
    small = [m for m in share if m not in denoisers]
    per_host = -(-gpus // hosts)
    host_ranks = [list(range(h * per_host, min(gpus, (h + 1) * per_host))) for h in range(hosts)]
    host_ranks = [ranks for ranks in host_ranks if ranks]
    placement = [p for p in system.placement if p[0] in denoisers]
    pinned = []
    for i, model in enumerate(small):
        burst = burst_replicas(catalog.models[model].kind, alone[model], solo, gpus)
        count = max(len(host_ranks), math.ceil(gpus * share[model] / base_s - 1e-9), burst)
        for k in range(count):  # round robin over hosts, then over each host's GPUs
            ranks = host_ranks[k % len(host_ranks)]
            placement.append((model, f"emu:{ranks[(i + k // len(host_ranks) * len(small)) % len(ranks)]}", "emulated"))
        if count > len(host_ranks):  # sized for the mix and its bursts, not for the last seconds' queue
            pinned += ["--model-min", f"{model}={count}"]
    args = (*system.scheduler_args, *pinned, "--max-replicas", str(max(64, gpus)))
    return dataclasses.replace(system, placement=tuple(placement), scheduler_args=args)


SMALL_BASE_SHARE = 1 / 8  # a base model whose weights take at most this share of a GPU is "small"
SPARE_HEADROOM_GIB = 8.0  # left free on a GPU beside what is placed: activations, the scheduler's own moves


def spare_memory_replicas(system: SystemSpec, catalog: Catalog, gpu_memory_gib: float) -> SystemSpec:
    """A small base model's actor on every GPU that has room for it beside what is placed.

    Where the base models do not all fit one GPU, they split the GPUs by work, and a
    small model with short requests (SD3 Medium beside SD3.5 Large and FLUX.1-dev on
    48 GiB GPUs) gets two of sixteen: a burst of its requests queues there while the
    other GPUs sit idle between steps. A replica costs it 4 GiB that those GPUs leave
    unused. Simulated on the memory-bound suite (docs/benchmarks.md, issue 14, "spare
    memory"): on-time share of the reference 73.2 -> 82.6% on the Gamma traces, 67.1 ->
    73.6% on the bursts. Large base models get no extra replicas: theirs time-slice the
    GPUs they join with those GPUs' own models (filling every base model: 81.5%)."""
    costs = CostModel(catalog)
    capacity = gpu_memory_gib * 1024**3
    small = sorted((m for m in {m for m, _, _ in system.placement} if catalog.models[m].kind == "denoiser"
                    and 0 < costs.resident_bytes(m) <= SMALL_BASE_SHARE * capacity), key=costs.resident_bytes)
    fill = _Filling(system, costs, capacity)
    for model in small:
        fill.add(model, SPARE_HEADROOM_GIB, lambda hosted: True)
    return fill.system()


CONTROLNET_HEADROOM_GIB = 4.0  # left free on a GPU beside a ControlNet replica: activations


def controlnets_beside_base(system: SystemSpec, catalog: Catalog, gpu_memory_gib: float) -> SystemSpec:
    """Each ControlNet gets an actor on every GPU that holds an actor of its base model,
    where it fits (`CONTROLNET_HEADROOM_GIB` left free), smallest ControlNet first.

    A ControlNet's task sits on its request's critical path at every step (its residuals
    feed the base model's call), so a request waits for it once per step. With one or
    two actors of it (the work split, `sized_replicas`), they queue every such step of
    the cluster and time-slice GPUs busy with other base models (an SD3.5 Large
    ControlNet beside FLUX.1-dev steps: its workflow finished 36 of 73 requests on time
    where its twin with a better-placed ControlNet finished 79 of 80). Beside every base
    actor, one is free where its request's step just ended. Simulated (docs/benchmarks.md,
    issue 14, session 11): memory-bound suite on time 5418 -> 5695 (pooled 5578), paper
    suite 7870 -> 7935.
    Pinned with --model-min so the scheduler keeps them between bursts."""
    fill = _Filling(system, CostModel(catalog), gpu_memory_gib * 1024**3)
    placed = {m for m, _, _ in system.placement}
    bases: dict[str, set[str]] = {}  # ControlNet -> the base models it conditions
    for workflow in catalog.workflows.values():
        for controlnet in workflow.controlnets:
            if controlnet in placed and workflow.denoiser in placed:
                bases.setdefault(controlnet, set()).add(workflow.denoiser)
    for controlnet in sorted(bases, key=lambda m: (fill.costs.resident_bytes(m), m)):
        fill.add(controlnet, CONTROLNET_HEADROOM_GIB, lambda hosted, c=controlnet: bool(hosted & bases[c]))
    return fill.system()


class _Filling:
    """A lego placement being filled up: each device's resident bytes and models, and a
    model added on every device (in rank order) where a condition on the models already
    there holds and it fits with some headroom, then pinned with --model-min (the
    scheduler would otherwise stop an idle replica between bursts)."""

    def __init__(self, system: SystemSpec, costs: CostModel, capacity_bytes: float):
        self.base, self.costs, self.capacity = system, costs, capacity_bytes
        self.placement = list(system.placement)
        self.args = list(system.scheduler_args)
        self.used: dict[str, int] = {}
        self.hosted: dict[str, set[str]] = {}
        for model, device, _ in system.placement:
            self.used[device] = self.used.get(device, 0) + costs.resident_bytes(model)
            self.hosted.setdefault(device, set()).add(model)

    def add(self, model: str, headroom_gib: float, beside: Callable[[set[str]], bool]) -> None:
        size = self.costs.resident_bytes(model)
        for device in sorted(self.used, key=lambda d: int(d.rsplit(":", 1)[1])):  # emu:RANK, in rank order
            hosted = self.hosted[device]
            if (model not in hosted and beside(hosted)
                    and self.used[device] + size + headroom_gib * 1024**3 <= self.capacity):
                self.placement.append((model, device, "emulated"))
                self.used[device] += size
                hosted.add(model)
        self.args = _pinned(self.args, model, sum(1 for m, _, _ in self.placement if m == model))

    def system(self) -> SystemSpec:
        return dataclasses.replace(self.base, placement=tuple(self.placement), scheduler_args=tuple(self.args))


def _pinned(args: list[str], model: str, count: int) -> list[str]:
    """Scheduler arguments with `--model-min MODEL=count` (replacing one for MODEL)."""
    pin = f"{model}="
    args = [f"{model}={count}" if a.startswith(pin) else a for a in args]
    return args if f"{model}={count}" in args else [*args, "--model-min", f"{model}={count}"]


BURST_ENCODER_SHARE = 0.01  # a text encoder costing this share of a request's solo latency is "heavy"


def burst_replicas(kind: str, alone_s: float, solo_s: float, gpus: int) -> int:
    """Replicas a burst of one request per GPU asks of a model beside the base one: it
    reaches the decoder all at once (one per GPU), and a heavy text encoder first (one on
    every second GPU), so neither queues the burst on one actor nor time-slices one GPU
    with all of it. Simulated, a 16-request burst on 8 GPUs: 9 on time with one of each,
    14 with these (docs/benchmarks.md, issue 14)."""
    if kind == "vae":
        return gpus
    if kind == "text_encoder" and solo_s > 0 and alone_s >= BURST_ENCODER_SHARE * solo_s:
        return -(-gpus // 2)
    return 0


def lego_sharing(system: SystemSpec, catalog: Catalog, gpus: int, mix: dict[str, float],
                 gpu_memory_gib: float, hosts: int | None = None) -> SystemSpec:
    """The sharing setting's lego (`clients.bench.systems.sharing_systems`'s): sized for
    the mix, a small base model wherever memory is spare, then ControlNets beside their
    base models in what is left."""
    sized = sized_replicas(system, catalog, gpus, mix, hosts or hosts_for(gpus))
    return controlnets_beside_base(spare_memory_replicas(sized, catalog, gpu_memory_gib), catalog, gpu_memory_gib)
