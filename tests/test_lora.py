"""LoRA adapters per request on the diffusers backend: a micro-served request with
adapters equals a diffusers pipeline with the same adapters loaded (`load_lora_weights`)
and weighted (`set_adapters`), bit for bit; an actor switching between requests'
adapter sets (and back to none) never lets one request see another's adapters.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from actors.backends.diffusers import DiffusersBackend  # noqa: E402
from actors.backends.lora import Residency  # noqa: E402
from broker import protocol as p  # noqa: E402
from broker.catalog import unroll, validate_params  # noqa: E402
from tests.test_controlnet import control_image, control_pipeline  # noqa: E402
from tests.test_diffusers import (  # noqa: E402,F401
    EXTRA,
    FOLDER,
    NEGATIVE,
    PIPELINES,
    PROMPT,
    SIZE,
    one_torch_thread,
    tiny_models,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_models(tmp_path_factory)


class Backends:
    """One backend per model of the workflows, loaded once and reused across requests,
    as one actor per model would be."""

    def __init__(self, catalog):
        self.catalog, self.backends = catalog, {}

    def run(self, workflow_name: str, params: dict, tensors: dict | None = None) -> np.ndarray:
        workflow = self.catalog.workflow(workflow_name)
        tensors = tensors or {}
        outputs = {}
        for plan in unroll(workflow, validate_params(workflow, params, adapters=self.catalog.adapters),
                           tensors=set(tensors)):
            backend = self.backends.get(plan.model)
            if backend is None:
                backend = self.backends[plan.model] = DiffusersBackend(self.catalog.models[plan.model], "cpu", {})
                backend.load()
                backend.attach_catalog(self.catalog)
            task = p.TaskSpec(plan.key, "r", 0, plan.key, plan.kind, plan.model, workflow.name, plan.rows,
                              list(plan.shape), plan.params, [], plan.key)
            inputs = [outputs[k] for k in plan.inputs]
            if plan.kind == "control_image":
                inputs = [{name: torch.from_numpy(tensors[name]) for name in plan.params.tensors}]
            (outputs[plan.key],) = backend.run([task], [inputs])
        return outputs["decode"]["image"].numpy()


def lora_pipeline(root, family: str, adapters: list[tuple[str, float]], seed: int, pipe=None) -> np.ndarray:
    pipe = pipe or getattr(diffusers, PIPELINES[family]).from_pretrained(root / FOLDER[family], **EXTRA[family])
    pipe.set_progress_bar_config(disable=True)
    for name, _ in adapters:
        pipe.load_lora_weights(root / FOLDER[family] / "loras" / name, adapter_name=f"tiny-{family}-{name}")
    if adapters:
        pipe.set_adapters([f"tiny-{family}-{n}" for n, _ in adapters], [w for _, w in adapters])
    guidance = {"true_cfg_scale": 7.5} if family == "flux" else {"guidance_scale": 7.5}  # Flux: true CFG
    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, height=SIZE[family], **guidance,
               width=SIZE[family], generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return (out[0] * 255).round().astype("uint8")


def params_for(family: str, adapters: list[tuple[str, float]], seed: int) -> dict:
    return {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance": 7.5, "steps": 4, "seed": seed,
            "loras": [{"name": f"tiny-{family}-{n}", "weight": w} for n, w in adapters]}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_requests_switching_adapter_sets_on_one_set_of_actors_each_equal_their_pipeline(tiny, family):
    root, _, catalog = tiny
    backends = Backends(catalog)
    # ink and neon carry text-encoder layers, clay only UNet ones; weights of either sign
    sequence = [[("ink", 0.7), ("neon", -0.4)], [("clay", 1.0)], [], [("ink", 0.7), ("neon", -0.4)],
                [("neon", -0.4), ("ink", 0.7)], [("ink", 1.3)]]
    images = [backends.run(f"tiny-{family}-lora", params_for(family, adapters, 21)) for adapters in sequence]
    for adapters, image in zip(sequence, images, strict=True):
        assert np.array_equal(image, lora_pipeline(root, family, adapters, 21)), adapters
    assert np.array_equal(images[0], images[3])  # back to a set: the same image (nothing left over)
    # the effects are large: every set differs (the two orders of one set may round alike)
    assert len({images[i].tobytes() for i in (0, 1, 2, 5)}) == 4
    assert backends.backends[f"tiny-{family}-unet"].adapter_switch_s > 0  # reported in the actor's telemetry
    unet = backends.backends[f"tiny-{family}-unet"].adapters
    assert unet.residency.switches == 6 and unet.residency.active == (("tiny-" + family + "-ink", 1.3),)


def test_lora_with_controlnet_and_cfg_equals_the_pipeline(tiny):
    root, _, catalog = tiny
    image = control_image(3, 64)
    adapters = [("ink", 0.8)]
    served = Backends(catalog).run("tiny-sd15-lora-control", {**params_for("sd15", adapters, 22), "control_scale": 0.9},
                                   {"control_image": image})
    from PIL import Image

    net = diffusers.ControlNetModel.from_pretrained(root / "sd15" / "controlnet-a")
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(root / "sd15", controlnet=net, **EXTRA["sd15"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(root / "sd15" / "loras" / "ink", adapter_name="tiny-sd15-ink")
    pipe.set_adapters(["tiny-sd15-ink"], [0.8])
    out = pipe(PROMPT, image=Image.fromarray(image), negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5,
               height=64, width=64, controlnet_conditioning_scale=0.9, generator=torch.Generator("cpu").manual_seed(22),
               output_type="np").images
    assert np.array_equal(served, (out[0] * 255).round().astype("uint8"))
    # the adapter changed the image: ControlNet alone gives another one
    assert not np.array_equal(served, control_pipeline(root, "sd15", ["controlnet-a"], [image], True, 22,
                                                       controlnet_conditioning_scale=0.9))


def test_residency_reads_injects_and_evicts_in_lru_order():
    residency = Residency(host_bytes=300, max_resident=2)
    plan = residency.plan((("a", 1.0),))
    assert (plan.from_disk, plan.inject, plan.evict, plan.changed) == (["a"], ["a"], [], True)
    residency.commit(plan, {"a": 100})
    residency.commit(residency.plan((("b", 1.0),)), {"b": 100})
    plan = residency.plan((("c", 0.5),))  # a and b resident: a is the least recent
    assert (plan.inject, plan.evict) == (["c"], ["a"])
    assert residency.commit(plan, {"c": 200}) == ["a"]  # 400 bytes > 300: a leaves host memory too
    assert residency.plan((("c", 0.5),)).changed is False
    plan = residency.plan((("b", 1.0),))
    assert (plan.from_disk, plan.inject, plan.evict) == ([], [], [])  # resident: only the scales change
    # a set larger than the bound still runs; a later switch evicts back down to it
    plan = residency.plan((("a", 1.0), ("b", 1.0), ("c", 1.0)))
    assert (plan.inject, sorted(plan.evict)) == (["a"], [])
    residency.commit(plan, {"a": 100})
    assert len(residency.resident) == 3
    residency.commit(residency.plan((("d", 1.0),)), {"d": 10})
    assert len(residency.resident) == 2 and "d" in residency.resident


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_concurrent_requests_with_different_adapters_on_one_actor_never_share_a_batch(tiny, tmp_path):
    from clients import Client, RequestRejected
    from clients.local import LocalCluster, LocalClusterSpec

    root, catalog_path, _ = tiny
    spec = LocalClusterSpec(workflows=["tiny-sd15-lora", "tiny-sd15-txt2img"], backend="diffusers",
                            catalog=[str(catalog_path)], run_dir=str(tmp_path / "run"), log_level="warning",
                            # concurrent requests of one adapter set share denoise batches, and each image
                            # is compared bit for bit: fused batching (the default) is only within a tolerance
                            max_batch_rows=8, options={"batching": "exact"})
    sets = [[("ink", 1.0)], [("clay", 1.0)], [("ink", 1.0)], [("neon", 0.5), ("clay", -1.0)], []]
    with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
        jobs = [client.submit("tiny-sd15-lora", **params_for("sd15", adapters, 30)) for adapters in sets]
        plain = client.submit("tiny-sd15-txt2img", prompt=PROMPT, negative_prompt=NEGATIVE, guidance=7.5, steps=4, seed=30)
        results = [job.result(timeout=180) for job in jobs]
        plain = plain.result(timeout=180)
        with pytest.raises(RequestRejected) as err:
            client.submit("tiny-sd15-lora", **params_for("sd15", [("velvet", 1.0)], 1))
        assert err.value.field == "params.loras[0].name"
        with pytest.raises(RequestRejected) as err:
            client.submit("tiny-sd15-lora", **params_for("sd15", [("ink", 3.0)], 1))
        assert err.value.field == "params.loras[0].weight"
        stats = client.stats()
    unet = next(m for m in stats.models if m.model == "tiny-sd15-unet")
    assert unet.actors == 1
    for adapters, result in zip(sets, results, strict=True):
        assert np.array_equal(result.image, lora_pipeline(root, "sd15", adapters, 30)), adapters
    assert np.array_equal(results[0].image, results[2].image)
    assert np.array_equal(plain.image, results[4].image)  # no adapters: the plain model, wherever it ran
    assert stats.counters["adapter_switches"] >= 3
