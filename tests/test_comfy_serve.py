"""Imported ComfyUI graphs served on one local cluster of real processes: SD 1.5, SDXL, SD3
and Flux, txt2img, img2img, with LoRAs, with a ControlNet, both formats. Each served image
equals, bit for bit, the plain diffusers pipeline configured as docs/comfy.md maps the
graph (its scheduler, steps, cfg, seed, size, strength, LoRA weights, ControlNet range).

The reference of each graph is written out by hand from the graph's literals, not read
from the importer's defaults, so that a mapping error shows. The tiny build is the one
tests/test_diffusers.py makes (shared per session); a ComfyUI models folder of symlinks
to it stands in for a user's `ComfyUI/models`. Graph files: tests/data/comfy/.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from broker.catalog import validate_params  # noqa: E402
from clients import Client  # noqa: E402
from clients.comfy import import_graph, load_graph  # noqa: E402
from clients.local import LocalCluster, LocalClusterSpec  # noqa: E402
from tests.test_controlnet import NETS, control_image  # noqa: E402
from tests.test_controlnet import PIPELINES as CONTROL_PIPELINES  # noqa: E402
from tests.test_diffusers import (  # noqa: E402,F401
    EXTRA,
    FOLDER,
    IMG2IMG,
    PIPELINES,
    SCHEDULERS,
    one_torch_thread,
    source_image,
    tiny_models,
)

DATA = Path(__file__).parent / "data" / "comfy"


def comfy_models_folder(root: Path, models: Path) -> Path:
    """A ComfyUI models folder of symlinks into the tiny build at `root`: the names the
    graph files use (those of tests/test_comfy_import.py, and each family's LoRAs and
    first ControlNet)."""

    def link(path: str, target: Path) -> None:
        where = models / path
        where.parent.mkdir(parents=True, exist_ok=True)
        where.symlink_to(target, target_is_directory=target.is_dir())

    # a file name maps to the folder of the same name without the suffix (the tiny models are folders)
    for family in ("sd15", "sdxl", "sd3"):
        link(f"checkpoints/tiny_{family}", root / family)
    link("checkpoints/tiny_sd15_file.safetensors", root / "sd15" / "sd15.safetensors")
    link("diffusion_models/tiny_flux_schnell", root / "flux")
    link("unet/tiny_flux_dev", root / "flux-dev")  # ComfyUI's older folder name
    for name, family, sub in [("tiny_flux_clip_l", "flux", ""), ("tiny_flux_t5", "flux", "_2"),
                              ("tiny_sd15_clip", "sd15", "")]:
        link(f"text_encoders/{name}/text_encoder{sub}", root / family / f"text_encoder{sub}")
        link(f"text_encoders/{name}/tokenizer{sub}", root / family / f"tokenizer{sub}")
    link("vae/tiny_flux_ae", root / "flux" / "vae")
    for family in ("sd15", "sdxl", "sd3", "flux"):
        for name in ("ink", "clay"):
            link(f"loras/tiny_{family}_{name}", root / family / "loras" / name)
        link(f"controlnet/tiny_{family}_canny", root / family / "controlnet-a")
    return models


@dataclass
class Case:
    """A graph file and the diffusers pipeline docs/comfy.md maps it to.

    `variant` keys tests/test_diffusers.py's FOLDER / EXTRA tables ("sd3-t5": the SD3
    checkpoint folder brings its T5); `sampler` our sampler name ("default": the model's
    own scheduler); `call` the pipeline's arguments; `image` / `control` the size of the
    LoadImage tensors sent (seeded pictures); `loras` (folder name, weight) in order;
    `net` the ControlNet folder."""

    graph: str
    variant: str
    sampler: str
    call: dict
    image: int = 0
    control: int = 0
    loras: list[tuple[str, float]] = field(default_factory=list)
    net: str = ""

    @property
    def name(self) -> str:
        return "comfy-" + self.graph.removesuffix(".json").replace("_", "-")


FOX = {"prompt": "a red fox in the snow", "negative_prompt": "blurry"}
LIGHTHOUSE = {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry"}
CABIN = {"prompt": "a cabin in the woods"}  # cfg 1: ComfyUI skips the negative row, as the pipeline does
SD15 = {**FOX, "num_inference_steps": 4, "guidance_scale": 7.5, "height": 64, "width": 64}
SDXL = {**LIGHTHOUSE, "num_inference_steps": 4, "guidance_scale": 5.0, "height": 64, "width": 64}
SD3 = {**FOX, "num_inference_steps": 4, "guidance_scale": 4.5, "height": 32, "width": 32}
FLUX = {**CABIN, "num_inference_steps": 4, "height": 32, "width": 32}  # schnell embeds no guidance

CASES = [
    Case("sd15_txt2img_api.json", "sd15", "euler", {**SD15, "seed": 42}),
    Case("sd15_single_file_api.json", "sd15", "euler", {**SD15, "seed": 42}),
    Case("sd15_img2img_api.json", "sd15", "euler_a", {**SD15, "seed": 42, "num_inference_steps": 8, "strength": 0.75},
         image=64),
    Case("sd15_lora_api.json", "sd15", "ddim", {**SD15, "seed": 42}, loras=[("ink", 0.8), ("clay", 0.5)]),
    Case("sd15_controlnet_api.json", "sd15", "euler", {**SD15, "seed": 42, "controlnet_conditioning_scale": 0.9,
                                                       "control_guidance_start": 0.0, "control_guidance_end": 0.8},
         control=64, net="controlnet-a"),
    Case("sdxl_txt2img_api.json", "sdxl", "dpmpp_2m", {**SDXL, "seed": 42}),
    Case("sdxl_img2img_api.json", "sdxl", "euler_a", {**SDXL, "seed": 11, "num_inference_steps": 5,
                                                      "guidance_scale": 6.0, "strength": 0.6}, image=64),
    Case("sdxl_lora_api.json", "sdxl", "euler", {**SDXL, "seed": 12}, loras=[("ink", 0.7), ("clay", 0.5)]),
    Case("sdxl_controlnet_api.json", "sdxl", "ddim", {**SDXL, "seed": 13, "controlnet_conditioning_scale": 0.8,
                                                      "control_guidance_start": 0.25, "control_guidance_end": 1.0},
         control=64, net="controlnet-a"),
    Case("sd3_txt2img_api.json", "sd3-t5", "default", {**SD3, "seed": 42}),
    Case("sd3_img2img_api.json", "sd3-t5", "default", {**SD3, "seed": 14, "strength": 0.5}, image=32),
    Case("sd3_lora_api.json", "sd3-t5", "default", {**SD3, "seed": 15}, loras=[("ink", 0.6)]),
    Case("sd3_controlnet_api.json", "sd3-t5", "default", {**SD3, "seed": 16, "controlnet_conditioning_scale": 0.7,
                                                          "control_guidance_start": 0.0, "control_guidance_end": 0.75},
         control=32, net="controlnet-a"),
    Case("flux_schnell_api.json", "flux", "default", {**FLUX, "seed": 7}),
    Case("flux_dev_api.json", "flux-dev", "default", {**FLUX, "seed": 7, "guidance_scale": 3.0}),  # FluxGuidance 3.0
    Case("flux_img2img_api.json", "flux", "default", {**FLUX, "seed": 17, "strength": 0.75}, image=32),
    Case("flux_lora_api.json", "flux", "default", {**FLUX, "seed": 18}, loras=[("ink", 0.8)]),
    Case("flux_controlnet_api.json", "flux", "default", {**FLUX, "seed": 19, "controlnet_conditioning_scale": 0.6,
                                                         "control_guidance_start": 0.0, "control_guidance_end": 1.0},
         control=32, net="controlnet-a"),
]
# the UI-format twins: the same graph as the front end saves it, the same reference
UI_TWINS = ["sd15_txt2img", "sdxl_lora", "sd3_controlnet", "flux_schnell", "flux_img2img"]
CASES += [replace(next(c for c in CASES if c.graph == f"{twin}_api.json"), graph=f"{twin}_ui.json") for twin in UI_TWINS]


def request_tensors(case: Case) -> dict[str, np.ndarray]:
    """The LoadImage files of the graph as the request's tensors (seeded pictures)."""
    seed = case.call["seed"]
    tensors = {"image": source_image(seed, case.image)} if case.image else {}
    if case.control:
        tensors["control_image"] = control_image(seed, case.control)
    return tensors


def reference_image(root: Path, case: Case) -> np.ndarray:
    """The case's image as the plain diffusers pipeline computes it (uint8, as its PIL output)."""
    from PIL import Image

    family = case.variant.split("-")[0]
    folder = root / FOLDER[case.variant]
    call = dict(case.call)
    tensors = request_tensors(case)
    components = dict(EXTRA[case.variant])
    if case.net:
        components["controlnet"] = getattr(diffusers, NETS[family]).from_pretrained(folder / case.net)
        pipeline = CONTROL_PIPELINES[family]
        # the SD 1.5 / SDXL pipelines call the control image `image`, SD3's and Flux's `control_image`
        call["control_image" if family in ("sd3", "flux") else "image"] = Image.fromarray(tensors["control_image"])
    elif case.image:
        pipeline = IMG2IMG[case.variant]
        call["image"] = Image.fromarray(tensors["image"])
    else:
        pipeline = PIPELINES[case.variant]
    pipe = getattr(diffusers, pipeline).from_pretrained(folder, **components)
    if case.sampler != "default":
        pipe.scheduler = getattr(diffusers, SCHEDULERS[case.sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for name, _ in case.loras:
        pipe.load_lora_weights(folder / "loras" / name, adapter_name=name)
    if case.loras:
        pipe.set_adapters([name for name, _ in case.loras], [weight for _, weight in case.loras])
    seed = call.pop("seed")
    # SD3's ControlNet pipeline draws the control image's VAE sample from torch's global
    # generator; the served request draws it from a generator seeded with its seed
    torch.manual_seed(seed)
    out = pipe(**call, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return (out[0] * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tiny build root, its catalog path, the catalog, a ComfyUI models folder)."""
    root, catalog_path, catalog = tiny_models(tmp_path_factory)
    models = comfy_models_folder(root, tmp_path_factory.mktemp("comfy-serve") / "models")
    return root, catalog_path, catalog, models


@pytest.fixture(scope="module")
def imported(tiny, tmp_path_factory):
    """{case name: ImportedWorkflow} and the catalog files holding them, each graph imported
    onto the catalog of those before it."""
    _, catalog_path, catalog, models = tiny
    folder = tmp_path_factory.mktemp("comfy-serve-catalog")
    results, files = {}, [str(catalog_path)]
    for case in CASES:
        result = import_graph(load_graph(DATA / case.graph), name=case.name, models_dir=models, catalog=catalog)
        catalog = result.catalog
        files.append(str(folder / f"{case.name}.toml"))
        Path(files[-1]).write_text(result.toml)
        results[case.name] = result
    return results, files


@pytest.mark.parametrize("twin", UI_TWINS)
def test_ui_twins_import_as_their_api_graphs(imported, twin):
    """A graph as the front end saves it imports as its "Save (API)" twin: the same entries and defaults."""
    api, ui = imported[0][f"comfy-{twin.replace('_', '-')}-api"], imported[0][f"comfy-{twin.replace('_', '-')}-ui"]
    assert (ui.defaults, ui.images) == (api.defaults, api.images)
    assert ui.toml.replace(ui.name, api.name) == api.toml


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_img2img_sizes_take_the_models_multiple_as_txt2img_sizes_do(imported, family):
    """An img2img graph's size is its image's: no default, but the bound of the txt2img
    graph on the same model (SD3's and Flux's tiny images, 32 pixels, are below the
    catalog's general minimum of 64)."""
    img2img = imported[0][f"comfy-{family}-img2img-api"].workflow
    txt2img = imported[0][f"comfy-{family}-{'schnell' if family == 'flux' else 'txt2img'}-api"].workflow
    for size in ("width", "height"):
        assert img2img.inputs[size].min == txt2img.inputs[size].min < 32
    params = validate_params(img2img, {"width": 32, "height": 32})
    assert (params["width"], params["height"]) == (32, 32)


@pytest.fixture(scope="module")
def served(tiny, imported, tmp_path_factory):
    """{case name: the served image}: every imported workflow on one cluster, all requests
    submitted at once. A request sends the graph's LoRAs (the catalog has no default for
    them), its LoadImage tensors and, for img2img, the image's size; every other parameter
    is the workflow's default, the graph's literal."""
    results, files = imported
    spec = LocalClusterSpec(workflows=[case.name for case in CASES], backend="diffusers", catalog=files,
                            run_dir=str(tmp_path_factory.mktemp("comfy-serve-run") / "run"), log_level="warning",
                            # exact: requests submitted together would share fused denoise batches,
                            # equal to single calls within a tolerance only (tests/test_diffusers.py)
                            options={"batching": "exact"})
    cluster = LocalCluster(spec).start(timeout_s=240)  # ~21 actors, each importing diffusers
    try:
        with Client(cluster.frontend) as client:
            jobs = {}
            for case in CASES:
                params: dict = request_tensors(case)
                defaults = results[case.name].defaults
                if "loras" in defaults:
                    params["loras"] = defaults["loras"]
                if case.image and "width" not in defaults:  # the graph's size is the image's
                    params["width"] = params["height"] = case.image
                jobs[case.name] = client.submit(case.name, progress=False, **params)
            return {name: job.result(timeout=240).image for name, job in jobs.items()}
    finally:
        cluster.stop()


@pytest.mark.cluster
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[case.graph.removesuffix(".json") for case in CASES])
def test_served_graph_equals_the_diffusers_pipeline(tiny, imported, served, case):
    root = tiny[0]
    result = imported[0][case.name]
    assert "[models." not in result.toml  # every model already in the tiny catalog: shared actors
    assert np.array_equal(served[case.name], reference_image(root, case))

