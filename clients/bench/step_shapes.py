"""`lego bench overhead --step-shapes FAMILIES`: the runtime's own cost per denoising
step, with each family's full-size tensors and a model that computes nothing.

Runs in the `lego` process. Served side: per family, a fresh local cluster of real
processes (broker, node agent, one `noop` actor per model with `options.step_shapes`,
shared memory between them) takes requests one at a time on an idle cluster, each
timed from submit to image, twice: with one base actor (the steps stay on it) and with
two whose steps are made to alternate (affinity `avoid`: every step's bundle moves, as
when balancing under load moves a request). In-process side: the same noop calls in
one loop (encode, the steps, decode), each step handed the previous step's bundle as a
pipeline hands its tensors on. Served minus in-process, per step, is what
micro-serving costs. Bytes moved between actors are the actors' own counts, folded
into the broker's stats.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from actors.backends.emulated import STEP_SHAPES, StepShapes, noop_output
from broker.protocol.tasks import TaskKind
from broker.protocol.tensors import ITEMSIZE
from clients.client import Client
from clients.local import LocalCluster, LocalClusterSpec

FAMILIES = tuple(STEP_SHAPES)
# Actor telemetry (what each fetched) reaches the broker with heartbeats: short ones, so
# the totals are complete soon after the last request; many misses, so a busy 2-core
# machine never expires an actor mid-run.
HEARTBEAT_S = 0.25
HEARTBEAT_MISSES = 40
TELEMETRY_WAIT_S = 4 * HEARTBEAT_S
REQUEST_TIMEOUT_S = 300.0
# Where the steps run: (label, base actors, the broker's affinity).
PLACEMENTS = (("stay", 1, "prefer"), ("migrate", 2, "avoid"))

# The no-op models every overhead run uses (clients.bench.overhead adds its own workflow).
NOOP_MODELS = """
[models.noop-encoder]
kind = "text_encoder"
[models.noop-base]
kind = "denoiser"
[models.noop-vae]
kind = "vae"
"""


def catalog_text() -> str:
    """One workflow per family: CFG where its pipeline uses it (Flux-dev embeds its guidance)."""
    workflows = []
    for family, shapes in STEP_SHAPES.items():
        guidance = "cfg = true" if shapes.cfg else "distilled_guidance = true"
        workflows.append(f'[workflows.noop-{family}]\ntext_encoders = ["noop-encoder"]\ndenoiser = "noop-base"\n'
                         f'vae = "noop-vae"\n{guidance}\n')
    return NOOP_MODELS + "\n".join(workflows)


def parse_families(text: str) -> tuple[str, ...]:
    families = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in families if f not in STEP_SHAPES]
    if unknown or not families:
        raise ValueError(f"--step-shapes: expected families from {FAMILIES}, comma-separated; got {text!r}")
    return families


def in_process_s(shapes: StepShapes, steps: int) -> float:
    """One request as an in-process pipeline runs it: nothing but the model calls."""
    started = time.perf_counter()
    bundle = noop_output(shapes, TaskKind.ENCODE, [])
    for step in range(steps):
        bundle = noop_output(shapes, TaskKind.DENOISE, [bundle], first=step == 0)
    noop_output(shapes, TaskKind.DECODE, [bundle])
    return time.perf_counter() - started


def served_run(family: str, placement: tuple, steps: int, repeats: int, catalog: Path, run_dir: str) -> dict:
    """Median seconds per request micro-served, and what each request moved."""
    shapes = STEP_SHAPES[family]
    _, base_actors, affinity = placement
    spec = LocalClusterSpec(workflows=[f"noop-{family}"], backend="noop", options={"step_shapes": family},
                            replicas={"noop-base": base_actors}, affinity=affinity, emulate_gpus=1,
                            catalog=[str(catalog)], run_dir=run_dir, log_level="warning",
                            heartbeat_interval_s=HEARTBEAT_S, heartbeat_misses=HEARTBEAT_MISSES)
    params = {"prompt": "x", "steps": steps, "width": shapes.size, "height": shapes.size, "seed": 0}
    walls = []
    with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
        for i in range(repeats + 1):  # the first warms every process's path up and is not timed
            started = time.perf_counter()
            client.generate(f"noop-{family}", timeout=REQUEST_TIMEOUT_S, **params)
            if i:
                walls.append(time.perf_counter() - started)
        time.sleep(TELEMETRY_WAIT_S)
        moved = client.stats().transfers
    requests = repeats + 1  # the totals count the warm-up request too
    return {
        "served_s": statistics.median(walls),
        "moved_bytes": round((moved.frames_bytes + moved.shm_bytes + moved.ipc_bytes) / requests),
        "fetches": moved.fetches / requests,
        "local_bytes": round(moved.local_bytes / requests),
        "reused_bytes": round(moved.reused_bytes / requests),
    }


def family_results(family: str, steps: int, repeats: int, catalog: Path, run_dir: str) -> list[dict]:
    """One row per placement, each against the same in-process loop."""
    shapes = STEP_SHAPES[family]
    in_process = statistics.median(in_process_s(shapes, steps) for _ in range(repeats + 1))
    rows = []
    for placement in PLACEMENTS:
        served = served_run(family, placement, steps, repeats, catalog, f"{run_dir}-{placement[0]}")
        rows.append(_row(family, placement, in_process, served, steps, repeats))
    return rows


def _row(family: str, placement: tuple, in_process: float, served: dict, steps: int, repeats: int) -> dict:
    shapes = STEP_SHAPES[family]
    served_ms, in_process_ms = 1000 * served["served_s"] / steps, 1000 * in_process / steps
    latent_bytes = ITEMSIZE[shapes.dtype] * math.prod(shapes.latents)
    return {
        "family": family, "image": f"{shapes.size} px {shapes.dtype}", "steps": steps, "repeats": repeats,
        "placement": placement[0], "base_actors": placement[1],
        "served_ms_per_step": round(served_ms, 3), "in_process_ms_per_step": round(in_process_ms, 4),
        "overhead_ms_per_step": round(served_ms - in_process_ms, 3), "latent_bytes": latent_bytes, **served,
    }


def run_step_shapes(families: tuple[str, ...], steps: int, repeats: int, tmp: str) -> list[dict]:
    catalog = Path(tmp) / "noop-step-shapes.toml"
    catalog.write_text(catalog_text())
    return [row for f in families for row in family_results(f, steps, repeats, catalog, f"{tmp}/{f}")]


def step_shapes_table(rows: list[dict]) -> str:
    lines = ["| family | image | steps | base actors, steps | served ms/step | in-process ms/step | overhead ms/step "
             "| moved between actors per request (MB) | fetches per request | used in place per request (MB) "
             "| conditioning reused, not moved, per request (MB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['image']} | {r['steps']} | {r['base_actors']}, {r['placement']} "
                     f"| {r['served_ms_per_step']:.3f} "
                     f"| {r['in_process_ms_per_step']:.4f} | {r['overhead_ms_per_step']:.3f} "
                     f"| {r['moved_bytes'] / 1e6:.3f} | {r['fetches']:g} | {r['local_bytes'] / 1e6:.3f} "
                     f"| {r.get('reused_bytes', 0) / 1e6:.3f} |")
    return "\n".join(lines)
