"""ControlNets as scheduled nodes: micro-served ControlNet and multi-ControlNet workflows
equal the diffusers ControlNet pipelines bit for bit (SD 1.5, SDXL), in process and
through a cluster where every net runs on actors of its own; bad control inputs are
refused before any work.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from actors.backends.controlnet import canny_edges  # noqa: E402
from actors.backends.diffusers import DiffusersBackend  # noqa: E402
from broker import protocol as p  # noqa: E402
from broker.catalog import ParamError, check_image, unroll, validate_params  # noqa: E402
from tests.test_diffusers import (  # noqa: E402,F401
    EXTRA,
    FOLDER,
    NEGATIVE,
    PROMPT,
    SIZE,
    one_torch_thread,
    tiny_models,
)

PIPELINES = {"sd15": "StableDiffusionControlNetPipeline", "sdxl": "StableDiffusionXLControlNetPipeline",
             "sd3": "StableDiffusion3ControlNetPipeline", "flux": "FluxControlNetPipeline"}
NETS = {"sd15": "ControlNetModel", "sdxl": "ControlNetModel", "sd3": "SD3ControlNetModel",
        "flux": "FluxControlNetModel"}
FAMILIES = ["sd15", "sdxl", "sd3", "flux"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_models(tmp_path_factory)


def control_image(seed: int, size: int) -> np.ndarray:
    """A blocky picture: canny finds edges in it (uniform noise would be all edges)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
    return np.kron(cells, np.ones((8, 8, 1), dtype=np.uint8))


def run_in_process(catalog, workflow, params: dict, tensors: dict[str, np.ndarray]) -> dict:
    """Every node of the request's DAG on backends loaded here: {node: output bundle}."""
    backends = {m: DiffusersBackend(catalog.models[m], "cpu", {}) for m in workflow.models}
    for backend in backends.values():
        backend.load()
        backend.attach_catalog(catalog)
    outputs = {}
    for plan in unroll(workflow, validate_params(workflow, params), tensors=set(tensors)):
        task = p.TaskSpec(plan.key, "r", 0, plan.key, plan.kind, plan.model, workflow.name, plan.rows,
                          list(plan.shape), plan.params, [], plan.key)
        inputs = [outputs[k] for k in plan.inputs]
        if plan.kind == "control_image":
            inputs = [{name: torch.from_numpy(tensors[name]) for name in plan.params.tensors}]
        (outputs[plan.key],) = backends[plan.model].run([task], [inputs])
    return outputs


def control_pipeline(root, family: str, nets: list[str], images: list[np.ndarray], cfg: bool, seed: int, **call):
    from PIL import Image

    folder = root / FOLDER[family]
    models = [getattr(diffusers, NETS[family]).from_pretrained(folder / net) for net in nets]
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(
        folder, controlnet=models[0] if len(models) == 1 else models, **EXTRA[family])
    # SD3's pipeline draws the control image's VAE sample from torch's global generator;
    # the served request draws it from a generator seeded with its seed: seed both alike.
    torch.manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    pil = [Image.fromarray(image) for image in images]
    image_arg = "control_image" if family in ("sd3", "flux") else "image"  # what each pipeline calls it
    if family == "flux":  # FluxPipeline's CFG is "true CFG" with its own scale
        call = {"true_cfg_scale": 7.5 if cfg else 1.0, **call}
    else:
        call = {"guidance_scale": 7.5 if cfg else 1.0, **call}
    out = pipe(PROMPT, **{image_arg: pil[0] if len(pil) == 1 else pil}, negative_prompt=NEGATIVE if cfg else None,
               num_inference_steps=4, height=SIZE[family], width=SIZE[family],
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call).images
    return (out[0] * 255).round().astype("uint8")


def params_for(cfg: bool, seed: int, **extra) -> dict:
    params = {"prompt": PROMPT, "seed": seed, "steps": 4, **extra}
    if cfg:
        params.update(negative_prompt=NEGATIVE, guidance=7.5)
    return params


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
def test_controlnet_nodes_reproduce_the_pipeline_exactly(tiny, family, cfg):
    root, _, catalog = tiny
    workflow = catalog.workflow(f"tiny-{family}-control" if cfg else f"tiny-{family}-control-nocfg")
    image = control_image(1, SIZE[family])
    outputs = run_in_process(catalog, workflow, params_for(cfg, 5, control_scale=0.8), {"control_image": image})
    net = "controlnet-a" if cfg else "controlnet-b"
    expected = control_pipeline(root, family, [net], [image], cfg, 5, controlnet_conditioning_scale=0.8)
    assert np.array_equal(outputs["decode"]["image"].numpy(), expected)
    # the net mattered: without it the image is another one
    plain = run_in_process(catalog, workflow, params_for(cfg, 5, control_scale=0.0), {"control_image": image})
    assert not np.array_equal(plain["decode"]["image"].numpy(), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_controlnet_with_scales_and_ranges_reproduces_the_pipeline(tiny, family):
    root, _, catalog = tiny
    workflow = catalog.workflow(f"tiny-{family}-multicontrol")
    images = [control_image(2, SIZE[family]), control_image(3, SIZE[family])]
    params = params_for(True, 6, control_scale_1=1.2, control_scale_2=0.5, control_start_1=0.0, control_end_1=0.5,
                        control_start_2=0.25, control_end_2=1.0)
    outputs = run_in_process(catalog, workflow, params, {"control_image_1": images[0], "control_image_2": images[1]})
    # net 1 runs for steps 0-1, net 2 for steps 1-3: nodes only where the pipeline's keep is 1
    assert sorted(k for k in outputs if k.startswith("control/")) == [
        *(f"control/tiny-{family}-controlnet-a/{k}" for k in (0, 1)),
        *(f"control/tiny-{family}-controlnet-b/{k}" for k in (1, 2, 3))]
    expected = control_pipeline(root, family, ["controlnet-a", "controlnet-b"], images, True, 6,
                                controlnet_conditioning_scale=[1.2, 0.5], control_guidance_start=[0.0, 0.25],
                                control_guidance_end=[0.5, 1.0])
    assert np.array_equal(outputs["decode"]["image"].numpy(), expected)


def test_canny_preprocessing_runs_as_a_node_and_feeds_the_net_its_edges(tiny):
    root, _, catalog = tiny
    workflow = catalog.workflow("tiny-sd15-control")
    photo = control_image(4, 64)
    edges = canny_edges(photo)
    assert set(np.unique(edges)) == {0, 255} and (edges[..., 0] == edges[..., 2]).all()
    assert 0.02 < (edges[..., 0] == 255).mean() < 0.5  # the block borders, not everything
    outputs = run_in_process(catalog, workflow, params_for(True, 7, control_preprocess="canny"), {"control_image": photo})
    prepared = outputs["control_image/tiny-sd15-controlnet-a"]["control/image"]
    assert prepared.shape == (2, 3, 64, 64) and torch.equal(prepared[0], prepared[1])
    assert torch.equal(prepared[0], torch.from_numpy(edges.astype(np.float32) / 255).permute(2, 0, 1))
    expected = control_pipeline(root, "sd15", ["controlnet-a"], [edges], True, 7)
    assert np.array_equal(outputs["decode"]["image"].numpy(), expected)


def test_canny_edges_follow_a_step(tiny):
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:, 16:] = 255
    edges = canny_edges(image)[..., 0] == 255
    columns = np.nonzero(edges.any(axis=0))[0]
    assert set(columns) <= {14, 15, 16, 17} and edges[8:24].any(axis=1).all()  # one thin vertical line
    assert not canny_edges(np.full((16, 16, 3), 90, dtype=np.uint8)).any()  # flat: no edge


@dataclasses.dataclass
class Desc:
    name: str
    dtype: str
    shape: list


def test_bad_control_inputs_are_refused_naming_the_field(tiny):
    _, _, catalog = tiny
    multi = catalog.workflow("tiny-sd15-multicontrol")
    good = validate_params(multi, params_for(True, 1))
    ok = [Desc("control_image_1", "uint8", [64, 64, 3]), Desc("control_image_2", "uint8", [64, 64, 3])]
    check_image(multi, good, ok)
    cases = [
        ([ok[0]], "control_image_2"),  # one net's image missing
        ([ok[0], Desc("control_image_2", "uint8", [32, 32, 3])], "control_image_2"),  # wrong size
        ([ok[0], Desc("control_image_2", "float32", [64, 64, 3])], "control_image_2"),  # wrong format
        ([*ok, Desc("control_image_3", "uint8", [64, 64, 3])], "tensors.control_image_3"),  # no such input
        ([ok[0], ok[0], ok[1]], "control_image_1"),  # twice
    ]
    for tensors, field in cases:
        with pytest.raises(ParamError) as err:
            check_image(multi, good, tensors)
        assert err.value.field == field, (tensors, err.value)
    for params, field in [({"control_scale_1": 2.5}, "control_scale_1"), ({"control_end_2": -0.1}, "control_end_2"),
                          ({"control_start_1": 0.6, "control_end_1": 0.4}, "control_end_1"),
                          ({"control_preprocess_2": "sobel"}, "control_preprocess_2"),
                          ({"control_image": 1}, "control_image")]:
        with pytest.raises(ParamError) as err:
            validate_params(multi, params_for(True, 1, **params))
        assert err.value.field == field


def test_a_controlnet_that_does_not_fit_the_base_model_fails_its_task_naming_why(tiny):
    """An SD 1.5 net on an SDXL step: the residual shapes cannot be summed with the
    other net's (a catalog that pairs them is caught at the first control task)."""
    from actors.backends.controlnet import summed_residuals

    a = {"control/down/0": torch.zeros(1, 4, 8, 8), "control/mid": torch.zeros(1, 4, 2, 2)}
    b = {"control/down/0": torch.zeros(1, 4, 8, 8), "control/down/1": torch.zeros(1, 4, 4, 4),
         "control/mid": torch.zeros(1, 4, 2, 2)}
    with pytest.raises(ValueError, match="do not fit the same base model"):
        summed_residuals([a, b])


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_controlnet_workflows_through_a_cluster_share_one_net_pool_and_equal_the_pipeline(tiny, tmp_path):
    """Every net on actors of its own (another process than the UNet's), one pool of the
    net both workflows name, and the images the pipelines compute."""
    from clients import Client, RequestRejected
    from clients.local import LocalCluster, LocalClusterSpec

    root, catalog_path, _ = tiny
    spec = LocalClusterSpec(workflows=["tiny-sd15-control", "tiny-sd15-multicontrol"], backend="diffusers",
                            catalog=[str(catalog_path)], run_dir=str(tmp_path / "run"), log_level="warning")
    images = [control_image(8, 64), control_image(9, 64)]
    with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
        single = client.submit("tiny-sd15-control", control_image=images[0], **params_for(True, 11))
        multi = client.submit("tiny-sd15-multicontrol", control_image_1=images[0], control_image_2=images[1],
                              control_preprocess_2="canny", control_end_1=0.5, **params_for(True, 12))
        single, multi = single.result(timeout=120), multi.result(timeout=120)
        with pytest.raises(RequestRejected) as err:
            client.submit("tiny-sd15-control", control_image=images[0][:32], **params_for(True, 1))
        assert err.value.field == "params.control_image"
        with pytest.raises(RequestRejected) as err:
            client.submit("tiny-sd15-multicontrol", control_image_1=images[0], **params_for(True, 1))
        assert err.value.field == "params.control_image_2"
        stats = {m.model: m for m in client.stats().models}
    net_a = stats["tiny-sd15-controlnet-a"]
    assert net_a.actors == 1 and set(net_a.workflows) == {"tiny-sd15-control", "tiny-sd15-multicontrol"}
    # request 1: an image node + 4 steps; request 2: an image node + steps 0-1 (control_end_1 = 0.5)
    assert net_a.tasks_done == (1 + 4) + (1 + 2)
    assert stats["tiny-sd15-controlnet-b"].tasks_done == 1 + 4
    assert np.array_equal(single.image, control_pipeline(root, "sd15", ["controlnet-a"], [images[0]], True, 11))
    expected = control_pipeline(root, "sd15", ["controlnet-a", "controlnet-b"], [images[0], canny_edges(images[1])], True,
                                12, control_guidance_end=[0.5, 1.0])
    assert np.array_equal(multi.image, expected)
