"""`lego bench overhead --real`: a micro-served image against the same components
run in-process by the diffusers pipeline, on this machine, in one run.

Both sides use the `mid` SD-1.5-shaped components (256 px, random weights, built
offline once), one intra-op torch thread (what each actor uses), the same prompt,
seed and steps, and are timed alternately so drift on a shared machine hits both.
The micro-served image must also equal the pipeline's, bit for bit.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from actors.models.tiny import build_all
from clients.client import Client
from clients.local import LocalCluster, LocalClusterSpec

PROMPT = "a lighthouse on a cliff at dusk"


def _pipeline(root: Path):
    import diffusers
    import torch

    torch.set_num_threads(1)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(root / "sd15", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _in_process(pipe, seed: int, steps: int) -> tuple[float, np.ndarray]:
    import torch

    started = time.perf_counter()
    out = pipe(PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=7.5, height=256, width=256,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    return time.perf_counter() - started, (out * 255).round().astype("uint8")


def run_real_bench(models_dir: str, rounds: int, steps: int, run_dir: str) -> dict:
    root = Path(models_dir)
    catalog = root / "catalog.toml"
    if not catalog.exists():
        build_all(root, "mid")
    spec = LocalClusterSpec(workflows=["mid-sd15-txt2img"], backend="diffusers", catalog=[str(catalog)],
                            run_dir=run_dir, log_level="warning")
    pipe = _pipeline(root)
    served, local, identical = [], [], True
    with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
        params = {"prompt": PROMPT, "steps": steps, "guidance": 7.5, "width": 256, "height": 256}
        client.generate("mid-sd15-txt2img", seed=0, timeout=300, **params)  # warm up both sides
        _in_process(pipe, 0, steps)
        time.sleep(1.5)  # let a heartbeat carry the warm-up's telemetry
        busy_before = _busy_by_model(client)
        for seed in range(1, rounds + 1):
            started = time.perf_counter()
            image = client.generate("mid-sd15-txt2img", seed=seed, timeout=300, **params).image
            served.append(time.perf_counter() - started)
            seconds, reference = _in_process(pipe, seed, steps)
            local.append(seconds)
            identical &= bool(np.array_equal(image, reference))
        time.sleep(1.5)
        busy_after = _busy_by_model(client)
    busy = {m: round((busy_after[m][0] - busy_before[m][0]) / max(1, busy_after[m][1] - busy_before[m][1])
                     * (steps if "unet" in m else 1), 3) for m in busy_after}
    ratio = statistics.median(served) / statistics.median(local)
    return {
        "rounds": rounds, "steps": steps,
        "served_median_s": round(statistics.median(served), 3), "served_min_s": round(min(served), 3),
        "in_process_median_s": round(statistics.median(local), 3), "in_process_min_s": round(min(local), 3),
        "ratio": round(ratio, 3), "identical": identical,
        "actor_busy_s_per_image": busy,
    }


def _busy_by_model(client: Client) -> dict[str, tuple[float, int]]:
    """Cumulative (busy seconds, tasks) per model, from the actors' heartbeat telemetry."""
    return {a.model: (a.telemetry.busy_s, a.telemetry.tasks) for a in client.stats().actors if a.telemetry}


def real_table(result: dict) -> str:
    r = result
    rows = [
        (f"micro-served, mid SD 1.5, {r['steps']} steps, 256 px (s, median / min of {r['rounds']})",
         f"{r['served_median_s']} / {r['served_min_s']}", ""),
        ("in-process diffusers pipeline, same components (s, median / min)",
         f"{r['in_process_median_s']} / {r['in_process_min_s']}", ""),
        ("micro-served / in-process (medians)", f"{r['ratio']:.3f}", "<= 1.05"),
        ("images identical", "yes" if r["identical"] else "NO", "yes"),
        ("actor compute per image (s): " + ", ".join(r["actor_busy_s_per_image"]),
         " + ".join(str(v) for v in r["actor_busy_s_per_image"].values())
         + f" = {sum(r['actor_busy_s_per_image'].values()):.3f}", ""),
    ]
    return "\n".join(["| metric | measured | target |", "| --- | --- | --- |", *(f"| {a} | {b} | {c} |" for a, b, c in rows)])
