"""The emulated backend: profile timing, real tensor sizes, a digest chain through the DAG."""

from __future__ import annotations

import numpy as np

from actors.backends import create_backend
from broker import protocol as p
from broker.catalog import load_catalog, unroll, validate_params


def run_request(workflow_name: str, params: dict, cfg_split: bool = False, time_scale: float = 0.0) -> dict:
    catalog = load_catalog()
    workflow = catalog.workflow(workflow_name)
    backends = {m: create_backend("emulated", catalog.models[m], "emu:0", {"time_scale": time_scale})
                for m in workflow.models}
    outputs = {}
    for plan in unroll(workflow, validate_params(workflow, params), cfg_split=cfg_split):
        task = p.TaskSpec(plan.key, "r", 0, plan.key, plan.kind, plan.model, workflow.name, plan.rows,
                          list(plan.shape), plan.params, [], plan.key)
        (outputs[plan.key],) = backends[plan.model].run([task], [[outputs[k] for k in plan.inputs]])
    return outputs


def test_outputs_have_the_real_sizes():
    out = run_request("flux-schnell-txt2img-cfg", {"prompt": "a fox", "seed": 1, "steps": 2})
    assert out["encode/T5_Flux"]["embeds"].shape == (2, 512, 4096)  # [negative; positive] x seq x dim
    assert out["encode/T5_Flux"]["embeds"].nbytes == 2 * 512 * 4096 * 2  # bf16
    assert out["denoise/1"]["latents"].shape == (2, 16, 128, 128)
    assert out["decode"]["image"].shape == (1024, 1024, 3)


def test_the_image_follows_prompt_and_seed_and_split_cfg_changes_nothing():
    base = {"prompt": "a fox", "seed": 1, "steps": 3, "width": 256, "height": 256}
    image = run_request("sd15-txt2img", base)["decode"]["image"].buffer
    split = run_request("sd15-txt2img", base, cfg_split=True)
    assert np.array_equal(split["decode"]["image"].buffer, image)
    assert split["branch/0/1"]["noise"].shape == (1, 4, 32, 32)  # one CFG row per branch
    assert not np.array_equal(run_request("sd15-txt2img", {**base, "seed": 2})["decode"]["image"].buffer, image)
    assert not np.array_equal(run_request("sd15-txt2img", {**base, "prompt": "a cat"})["decode"]["image"].buffer, image)


def test_execution_time_follows_the_profile():
    import time

    started = time.perf_counter()
    run_request("flux-schnell-txt2img", {"prompt": "a fox", "seed": 1, "steps": 1, "width": 512, "height": 512},
                time_scale=1.0)
    elapsed = time.perf_counter() - started
    # H800 profile: CLIP 3 ms + T5 24 ms + one step 224 ms x (512/1024)^2 + VAE 253 ms x 1/4 ~ 146 ms
    assert 0.13 <= elapsed <= 0.6


def test_lora_switches_cost_emulated_time_by_tier_and_are_reported():
    """Disk read + inject on first use, inject only from host memory after an eviction,
    scales only when every adapter is resident; nothing when the set does not change."""
    catalog = load_catalog()
    backend = create_backend("emulated", catalog.models["StableDiffusion3"], "cpu",
                             {"time_scale": 0.0, "lora_resident": 1})
    backend.attach_catalog(catalog)

    def step(adapters):
        return p.TaskSpec("t", "r", 0, "denoise/1", "denoise", "StableDiffusion3", "sd3-lora-cfg", 2, [1024, 1024],
                          p.DenoiseParams(step=1, steps=4, first=False, seed=1, sampler="default", adapters=adapters),
                          [], "o")

    costs = backend.switch_costs
    assert backend._switch_s([step([["a", 1.0]])]) == costs.disk_s + costs.inject_s + costs.activate_s
    assert backend._switch_s([step([["a", 1.0]])]) == 0.0  # the same set: no switch
    assert backend._switch_s([step([["a", 0.5]])]) == costs.activate_s  # new weight, resident adapter
    assert backend._switch_s([step([["b", 1.0]])]) == costs.disk_s + costs.inject_s + costs.activate_s
    assert backend._switch_s([step([["a", 0.5]])]) == costs.inject_s + costs.activate_s  # evicted, still in host memory
    assert backend._switch_s([step([])]) == costs.activate_s  # back to the plain model
    assert backend.residency.switches == 5
