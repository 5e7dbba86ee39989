"""ComfyUI graphs imported as catalog workflows (clients/comfy): both formats, every family,
img2img, LoRA, ControlNet, single-file checkpoints, and the graphs that must be refused
with ComfyUI-shaped node errors.

The tiny models are built once per module; a ComfyUI-style models folder of symlinks to
them stands in for a user's `ComfyUI/models`. Graph files: tests/data/comfy/.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from process_helpers import lego_cli  # tests/ is on sys.path

pytest.importorskip("diffusers")

from actors.models.tiny import build_all  # noqa: E402
from broker.catalog import load_catalog, validate_params  # noqa: E402
from clients.comfy import ComfyImportError, import_graph, load_graph, to_api  # noqa: E402

DATA = Path(__file__).parent / "data" / "comfy"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tiny build root, its catalog path, the catalog, a ComfyUI models folder)."""
    root = tmp_path_factory.mktemp("comfy-tiny")
    catalog_path = build_all(root, "tiny")
    models = root / "comfy-models"

    def link(path: str, target: Path) -> None:
        where = models / path
        where.parent.mkdir(parents=True, exist_ok=True)
        where.symlink_to(target, target_is_directory=target.is_dir())

    # file names map to folders of the same name without the suffix (the tiny models are folders)
    link("checkpoints/tiny_sd15", root / "sd15")
    link("checkpoints/tiny_sdxl", root / "sdxl")
    link("checkpoints/tiny_sd3", root / "sd3")
    link("checkpoints/tiny_sd15_file.safetensors", root / "sd15" / "sd15.safetensors")
    link("diffusion_models/tiny_flux_schnell", root / "flux")
    link("unet/tiny_flux_dev", root / "flux-dev")  # ComfyUI's older folder name
    for name, family, sub in [("tiny_flux_clip_l", "flux", ""), ("tiny_flux_t5", "flux", "_2"),
                              ("tiny_sd15_clip", "sd15", "")]:
        link(f"text_encoders/{name}/text_encoder{sub}", root / family / f"text_encoder{sub}")
        link(f"text_encoders/{name}/tokenizer{sub}", root / family / f"tokenizer{sub}")
    link("clip/tiny_sd15_two_encoders/text_encoder", root / "sdxl" / "text_encoder")
    link("clip/tiny_sd15_two_encoders/text_encoder_2", root / "sdxl" / "text_encoder_2")
    link("vae/tiny_flux_ae", root / "flux" / "vae")
    link("vae/tiny_sd15_file.safetensors", root / "sd15" / "sd15.safetensors")
    for name in ("ink", "clay"):
        link(f"loras/tiny_sd15_{name}", root / "sd15" / "loras" / name)
    link("controlnet/tiny_sd15_canny", root / "sd15" / "controlnet-a")
    link("controlnet/tiny_sd15_depth", root / "sd15" / "controlnet-b")
    (models / "checkpoints" / "old.ckpt").write_bytes(b"not a pickle we would open")
    return root, catalog_path, load_catalog([catalog_path]), models


def graph(name: str) -> dict:
    return load_graph(DATA / name)


def imported(tiny, name: str, graph_dict: dict | None = None, workflow: str = "imported"):
    _, _, catalog, models = tiny
    return import_graph(graph_dict if graph_dict is not None else graph(name), name=workflow, models_dir=models,
                        catalog=catalog)


def load_with_tiny(tiny, result, tmp_path):
    """The imported TOML loaded by the catalog loader after the tiny catalog."""
    path = tmp_path / f"{result.name}.toml"
    path.write_text(result.toml)
    return load_catalog([tiny[1], path])


# ---- valid graphs: each imports onto the tiny catalog's own models


def test_sd15_txt2img_maps_onto_the_tiny_models_and_its_literals_become_defaults(tiny, tmp_path):
    result = imported(tiny, "sd15_txt2img_api.json")
    catalog = load_with_tiny(tiny, result, tmp_path)
    wf = catalog.workflow("imported")
    assert (wf.text_encoders, wf.denoiser, wf.vae) == (("tiny-sd15-clip",), "tiny-sd15-unet", "tiny-sd15-vae")
    assert wf.cfg and not wf.img2img and not wf.controlnets and not wf.lora
    assert "[models." not in result.toml  # every model already served: reused by name
    assert result.defaults == {"prompt": "a red fox in the snow", "negative_prompt": "blurry", "seed": 42, "steps": 4,
                               "guidance": 7.5, "width": 64, "height": 64, "sampler": "euler"}
    assert result.images == {}
    # a request without parameters reproduces the graph
    assert validate_params(wf, {}) == {**result.defaults, "output": "image"}
    assert catalog.workflows["imported"] == result.workflow


def test_ui_format_with_reroute_primitive_and_note_imports_as_its_api_twin(tiny):
    ui, api = graph("sd15_txt2img_ui.json"), graph("sd15_txt2img_api.json")
    converted = to_api(ui)
    assert set(converted) == set(api)  # the Reroute, PrimitiveNode and Note are gone
    assert converted["3"]["inputs"]["seed"] == 42  # the primitive's value, not the widget's stale one
    assert converted["3"]["inputs"]["model"] == ["4", 0]  # through the Reroute
    for node_id, node in api.items():
        assert converted[node_id]["class_type"] == node["class_type"]
        assert converted[node_id]["inputs"] == node["inputs"], node_id
    a, b = imported(tiny, "", ui), imported(tiny, "", api)
    assert (a.toml, a.defaults, a.images) == (b.toml, b.defaults, b.images)


def test_flux_schnell_ui_twin_with_primitive_prompt_and_rerouted_vae(tiny, tmp_path):
    a, b = imported(tiny, "flux_schnell_ui.json"), imported(tiny, "flux_schnell_api.json")
    assert (a.toml, a.defaults) == (b.toml, b.defaults)
    wf = load_with_tiny(tiny, a, tmp_path).workflow("imported")
    assert (wf.text_encoders, wf.denoiser, wf.vae) == (("tiny-flux-clip", "tiny-flux-t5"), "tiny-flux-unet",
                                                        "tiny-flux-vae")
    assert not wf.cfg and not wf.distilled_guidance  # cfg 1: one row; schnell embeds no guidance
    assert a.defaults["prompt"] == "a cabin in the woods" and a.defaults["sampler"] == "default"
    assert wf.inputs["sampler"].choices == ("default",)


def test_sdxl_with_clip_text_encode_sdxl(tiny, tmp_path):
    result = imported(tiny, "sdxl_txt2img_api.json")
    wf = load_with_tiny(tiny, result, tmp_path).workflow("imported")
    assert wf.text_encoders == ("tiny-sdxl-clip-l", "tiny-sdxl-clip-g") and wf.denoiser == "tiny-sdxl-unet"
    assert result.defaults["prompt"] == "a lighthouse at dusk"
    assert (result.defaults["sampler"], result.defaults["guidance"]) == ("dpmpp_2m", 5.0)


def test_sd3_checkpoint_folder_brings_its_three_encoders(tiny, tmp_path):
    result = imported(tiny, "sd3_txt2img_api.json")
    wf = load_with_tiny(tiny, result, tmp_path).workflow("imported")
    assert wf.text_encoders == ("tiny-sd3-clip-l", "tiny-sd3-clip-g", "tiny-sd3-t5")
    assert (wf.denoiser, wf.vae, wf.family) == ("tiny-sd3-unet", "tiny-sd3-vae", "sd3")
    assert result.defaults["sampler"] == "default" and result.defaults["width"] == 32


def test_flux_dev_guidance_becomes_the_distilled_guidance(tiny, tmp_path):
    result = imported(tiny, "flux_dev_api.json")
    wf = load_with_tiny(tiny, result, tmp_path).workflow("imported")
    assert wf.denoiser == "tiny-flux-dev-unet" and wf.distilled_guidance and not wf.cfg
    assert result.defaults["guidance"] == 3.0
    assert "negative_prompt" not in result.defaults  # cfg 1: ComfyUI skips the negative row too


def test_img2img_denoise_becomes_strength_and_the_image_an_input(tiny, tmp_path):
    result = imported(tiny, "sd15_img2img_api.json")
    wf = load_with_tiny(tiny, result, tmp_path).workflow("imported")
    assert wf.img2img and wf.inputs["image"].required
    assert result.defaults["strength"] == 0.75 and result.defaults["steps"] == 8
    assert result.defaults["sampler"] == "euler_a" and "width" not in result.defaults
    assert result.images == {"image": "fox.png"}
    assert any("denoise 0.75 is the img2img strength" in note for note in result.notes)


def test_loras_become_adapters_with_their_strengths(tiny, tmp_path):
    result = imported(tiny, "sd15_lora_api.json")
    catalog = load_with_tiny(tiny, result, tmp_path)
    wf = catalog.workflow("imported")
    assert wf.lora and result.defaults["sampler"] == "ddim"
    # the tiny catalog registers these two folders already: reused by name, in application order
    assert result.defaults["loras"] == [{"name": "tiny-sd15-ink", "weight": 0.8}, {"name": "tiny-sd15-clay", "weight": 0.5}]
    params = validate_params(wf, {"loras": result.defaults["loras"]}, adapters=catalog.adapters)
    assert params["loras"] == [["tiny-sd15-ink", 0.8], ["tiny-sd15-clay", 0.5]]


def test_controlnet_apply_advanced_on_both_prompts(tiny, tmp_path):
    result = imported(tiny, "sd15_controlnet_api.json")
    wf = load_with_tiny(tiny, result, tmp_path).workflow("imported")
    assert wf.controlnets == ("tiny-sd15-controlnet-a",)
    assert (result.defaults["control_scale"], result.defaults["control_start"], result.defaults["control_end"]) == \
        (0.9, 0.0, 0.8)
    assert result.images == {"control_image": "edges.png"}


def test_single_file_checkpoint_with_a_clip_loader_folder(tiny, tmp_path):
    result = imported(tiny, "sd15_single_file_api.json")
    wf = load_with_tiny(tiny, result, tmp_path).workflow("imported")
    assert (wf.text_encoders, wf.denoiser, wf.vae) == (("tiny-sd15-clip",), "tiny-sd15-file-unet", "tiny-sd15-file-vae")


def test_single_file_vae_loader(tiny, tmp_path):
    g = graph("sd15_single_file_api.json")
    g["4"]["inputs"]["ckpt_name"] = "tiny_sd15.safetensors"  # the folder's UNet, the file's VAE
    g["11"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_sd15_file.safetensors"}}
    g["8"]["inputs"]["vae"] = ["11", 0]
    wf = load_with_tiny(tiny, imported(tiny, "", g), tmp_path).workflow("imported")
    assert (wf.denoiser, wf.vae) == ("tiny-sd15-unet", "tiny-sd15-file-vae")


def test_new_models_are_declared_and_load(tiny, tmp_path):
    """A catalog without the tiny models: every model is declared by the imported TOML."""
    _, _, _, models = tiny
    empty = load_catalog([], builtin=False)
    result = import_graph(graph("sd15_lora_api.json"), name="fresh", models_dir=models, catalog=empty, dtype="float32")
    assert "[models.tiny_sd15-denoiser]" in result.toml and "[adapters.tiny_sd15_ink]" in result.toml
    path = tmp_path / "fresh.toml"
    path.write_text(result.toml)
    catalog = load_catalog([path], builtin=False)
    wf = catalog.workflow("fresh")
    assert catalog.models[wf.denoiser].vae_scale == 2 and catalog.models[wf.denoiser].dtype == "float32"
    assert [a["name"] for a in result.defaults["loras"]] == ["tiny_sd15_ink", "tiny_sd15_clay"]
    assert catalog.adapters["tiny_sd15_ink"].base == wf.denoiser
    # imported twice (its own output in the catalog): the models and adapters are reused
    again = import_graph(graph("sd15_lora_api.json"), name="again", models_dir=models, catalog=catalog)
    assert "[models." not in again.toml and "[adapters." not in again.toml


def test_ksampler_advanced_start_step_is_an_exact_img2img_strength(tiny):
    g = graph("sd15_img2img_api.json")
    g["3"] = _advanced(g["3"], 2)
    result = imported(tiny, "", g)
    assert (result.defaults["steps"], result.defaults["strength"], result.defaults["seed"]) == (8, 0.75, 42)


def test_escaped_parentheses_are_literal_text(tiny):
    g = graph("sd15_txt2img_api.json")
    g["6"]["inputs"]["text"] = r"a fox \(arctic\)"
    assert imported(tiny, "", g).defaults["prompt"] == "a fox (arctic)"


def test_prompts_with_quotes_and_newlines_survive_the_toml(tiny, tmp_path):
    g = graph("sd15_txt2img_api.json")
    text = 'a "quoted" \\ back\nslash\t\x7f and ünïcode 🦊'
    g["6"]["inputs"]["text"] = text
    result = imported(tiny, "", g)
    assert load_with_tiny(tiny, result, tmp_path).workflow("imported").inputs["prompt"].default == text


# ---- refused graphs: ComfyUI-shaped node errors naming the node and the input


def _mutate(name: str, change) -> dict:
    g = copy.deepcopy(graph(name))
    change(g)
    return g


def _advanced(sampler: dict, start: int, leftover: str = "disable") -> dict:
    """A KSampler node as the KSamplerAdvanced that runs its steps from `start`."""
    inputs = dict(sampler["inputs"])
    inputs["noise_seed"] = inputs.pop("seed")
    del inputs["denoise"]
    inputs.update(add_noise="enable", start_at_step=start, end_at_step=10000, return_with_leftover_noise=leftover)
    return {"class_type": "KSamplerAdvanced", "inputs": inputs}


def _set(node: str, key: str, value):
    def change(g):
        g[node]["inputs"][key] = value
    return change


def _chained(g):
    g["20"] = copy.deepcopy(g["3"])
    g["20"]["inputs"]["latent_image"] = ["3", 0]
    g["8"]["inputs"]["samples"] = ["20", 0]


def _controlnet_apply(g):
    g["12"] = {"class_type": "ControlNetApply", "inputs": {"conditioning": ["6", 0], "control_net": ["10", 0],
                                                           "image": ["11", 0], "strength": 1.0}}
    g["3"]["inputs"]["negative"] = ["7", 0]


def _lora_clip_only(g):
    g["3"]["inputs"]["model"] = ["4", 0]


REFUSED = [
    # (id, graph file, change, node id, input name, error type)
    ("unknown-class", "sd15_txt2img_api.json", lambda g: g["5"].update(class_type="LatentUpscale"), "5", None,
     "unsupported_node"),
    ("sampler-no-equivalent", "sd15_txt2img_api.json", _set("3", "sampler_name", "heun"), "3", "sampler_name",
     "unsupported_value"),
    ("scheduler-no-equivalent", "sd15_txt2img_api.json", _set("3", "scheduler", "karras"), "3", "scheduler",
     "unsupported_value"),
    ("sampler-not-comfyui", "sd15_txt2img_api.json", _set("3", "sampler_name", "warp"), "3", "sampler_name",
     "value_not_in_list"),
    ("flow-model-ancestral", "sd3_txt2img_api.json", _set("3", "sampler_name", "euler_ancestral"), "3", "sampler_name",
     "unsupported_value"),
    ("missing-input", "sd15_txt2img_api.json", lambda g: g["3"]["inputs"].pop("steps"), "3", "steps",
     "required_input_missing"),
    ("link-to-missing-node", "sd15_txt2img_api.json", _set("3", "model", ["99", 0]), "3", "model", "bad_linked_input"),
    ("wrong-output-index", "sd15_txt2img_api.json", _set("3", "positive", ["6", 3]), "3", "positive",
     "bad_linked_input"),
    ("wrong-output-type", "sd15_txt2img_api.json", _set("3", "model", ["4", 1]), "3", "model", "return_type_mismatch"),
    ("literal-for-link", "sd15_txt2img_api.json", _set("8", "vae", "vae.safetensors"), "8", "vae", "invalid_input_type"),
    ("two-samplers-chained", "sd15_txt2img_api.json", _chained, "20", "latent_image", "unsupported_graph"),
    ("model-file-missing", "sd15_txt2img_api.json", _set("4", "ckpt_name", "nope.safetensors"), "4", "ckpt_name",
     "value_not_in_list"),
    ("pickle-checkpoint", "sd15_txt2img_api.json", _set("4", "ckpt_name", "old.ckpt"), "4", "ckpt_name",
     "unsupported_model"),
    ("denoise-on-empty-latent", "sd15_txt2img_api.json", _set("3", "denoise", 0.5), "3", "denoise", "unsupported_value"),
    ("batch-size", "sd15_txt2img_api.json", _set("5", "batch_size", 2), "5", "batch_size", "unsupported_value"),
    ("width-not-multiple", "sd15_txt2img_api.json", _set("5", "width", 66), "5", "width", "unsupported_value"),
    ("steps-above-max", "sd15_txt2img_api.json", _set("3", "steps", 500), "3", "steps", "unsupported_value"),
    ("cfg-below-one", "sd15_txt2img_api.json", _set("3", "cfg", 0.5), "3", "cfg", "unsupported_value"),
    ("empty-prompt", "sd15_txt2img_api.json", _set("6", "text", "  "), "6", "text", "unsupported_value"),
    ("sdxl-two-prompts", "sdxl_txt2img_api.json", _set("6", "text_l", "a lamp"), "6", "text_l", "unsupported_value"),
    ("sdxl-crop", "sdxl_txt2img_api.json", _set("6", "crop_w", 8), "6", "crop_w", "unsupported_value"),
    ("single-file-clip", "sd15_txt2img_api.json", _set("4", "ckpt_name", "tiny_sd15_file.safetensors"), "4",
     "ckpt_name", "unsupported_model"),
    ("lora-strengths-differ", "sd15_lora_api.json", _set("10", "strength_clip", 0.3), "10", "strength_clip",
     "unsupported_value"),
    ("lora-on-clip-only", "sd15_lora_api.json", _lora_clip_only, "10", "lora_name", "unsupported_value"),
    ("lora-strength-range", "sd15_lora_api.json", _set("11", "strength_model", 3.0), "11", "strength_model",
     "unsupported_value"),
    ("controlnet-positive-only-with-cfg", "sd15_controlnet_api.json", _controlnet_apply, "12", "conditioning",
     "unsupported_graph"),
    ("controlnet-end-before-start", "sd15_controlnet_api.json", _set("12", "end_percent", 0.0), "12", "end_percent",
     "unsupported_value"),
    ("controlnet-wrong-family", "sd3_txt2img_api.json",
     lambda g: (g.update({"10": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "tiny_sd15_canny"}},
                          "11": {"class_type": "LoadImage", "inputs": {"image": "e.png"}},
                          "12": {"class_type": "ControlNetApplyAdvanced", "inputs": {
                              "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "positive": ["6", 0],
                              "negative": ["7", 0], "control_net": ["10", 0], "image": ["11", 0]}}}),
                g["3"]["inputs"].update(positive=["12", 0], negative=["12", 1])),
     "10", "control_net_name", "unsupported_model"),
    ("fp8-weights", "flux_dev_api.json", _set("10", "weight_dtype", "fp8_e4m3fn"), "10", "weight_dtype",
     "unsupported_value"),
    ("flux-guidance-with-cfg", "flux_dev_api.json", _set("3", "cfg", 4.0), "13", "guidance", "unsupported_value"),
    ("clip-type-mismatch", "flux_schnell_api.json", _set("11", "type", "sdxl"), "11", "type", "unsupported_value"),
    ("seed-too-large", "sd15_txt2img_api.json", _set("3", "seed", 2**63), "3", "seed", "unsupported_value"),
    ("output-from-image", "sd15_img2img_api.json", _set("9", "images", ["10", 0]), "9", "images", "unsupported_graph"),
    ("prompt-weighting", "sd15_txt2img_api.json", _set("7", "text", "(blurry:1.3)"), "7", "text", "unsupported_value"),
    ("advanced-leftover-noise", "sd15_img2img_api.json", lambda g: g["3"].update(_advanced(g["3"], 2, "enable")), "3",
     "return_with_leftover_noise", "unsupported_value"),
    ("lora-cycle", "sd15_lora_api.json", _set("10", "model", ["11", 0]), "11", None, "dependency_cycle"),
    ("encoders-wrong-family", "sd15_single_file_api.json", _set("10", "clip_name", "tiny_flux_t5"), "10",
     "clip_name", "unsupported_graph"),
]


@pytest.mark.parametrize(("case", "name", "change", "node_id", "input_name", "type_"), REFUSED,
                         ids=[r[0] for r in REFUSED])
def test_refused_graphs_name_the_node_and_input(tiny, case, name, change, node_id, input_name, type_):
    with pytest.raises(ComfyImportError) as err:
        imported(tiny, "", _mutate(name, change))
    errors = err.value.node_errors
    assert node_id in errors, f"{case}: {err.value}"
    entry = errors[node_id]
    assert set(entry) == {"errors", "dependent_outputs", "class_type"}
    assert entry["class_type"] == _mutate(name, change)[node_id]["class_type"]
    (first, *_) = entry["errors"]
    assert set(first) == {"type", "message", "details", "extra_info"}
    assert first["type"] == type_, f"{case}: {err.value}"
    if input_name is not None:
        assert first["extra_info"]["input_name"] == input_name, f"{case}: {err.value}"
    assert err.value.response()["error"]["type"] == "prompt_outputs_failed_validation"
    json.dumps(err.value.response())  # the body ComfyUI's front end reads


def test_dependent_outputs_list_the_outputs_that_need_the_node(tiny):
    g = graph("sd15_txt2img_api.json")
    g["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    g["3"]["inputs"]["sampler_name"] = "lms"
    with pytest.raises(ComfyImportError) as err:
        imported(tiny, "", g)
    assert sorted(err.value.node_errors["3"]["dependent_outputs"]) == ["10", "9"]


def test_graph_without_output_is_refused(tiny):
    g = graph("sd15_txt2img_api.json")
    del g["9"]
    with pytest.raises(ComfyImportError) as err:
        imported(tiny, "", g)
    assert err.value.error["type"] == "prompt_no_outputs" and err.value.node_errors == {}


def test_several_errors_are_reported_together(tiny):
    g = graph("sd15_txt2img_api.json")
    del g["3"]["inputs"]["cfg"]
    g["5"]["inputs"]["width"] = "wide"
    with pytest.raises(ComfyImportError) as err:
        imported(tiny, "", g)
    assert set(err.value.node_errors) == {"3", "5"}
    assert "node 3 (KSampler) input 'cfg'" in str(err.value)


def test_ui_bypassed_node_and_bad_widgets_are_refused(tiny):
    ui = graph("sd15_txt2img_ui.json")
    latent = next(n for n in ui["nodes"] if n["type"] == "EmptyLatentImage")
    latent["mode"] = 4  # bypassed
    with pytest.raises(ComfyImportError) as err:
        imported(tiny, "", ui)
    assert err.value.node_errors["5"]["errors"][0]["type"] == "unsupported_node"
    ui = graph("sd15_txt2img_ui.json")
    next(n for n in ui["nodes"] if n["type"] == "EmptyLatentImage")["widgets_values"] = [64, 64, 1, 5]
    with pytest.raises(ComfyImportError) as err:
        imported(tiny, "", ui)
    assert err.value.node_errors["5"]["errors"][0]["type"] == "invalid_widgets"


def test_existing_workflow_names_are_not_replaced_unless_asked(tiny):
    _, _, catalog, models = tiny
    with pytest.raises(ComfyImportError) as err:
        import_graph(graph("sd15_txt2img_api.json"), name="tiny-sd15-txt2img", models_dir=models, catalog=catalog)
    assert err.value.error["type"] == "invalid_workflow_name"
    result = import_graph(graph("sd15_txt2img_api.json"), name="tiny-sd15-txt2img", models_dir=models,
                          catalog=catalog, replace=True)
    assert result.workflow.name == "tiny-sd15-txt2img"


# ---- served: the imported SD 1.5 graph on a local cluster equals the diffusers pipeline


def sd15_reference_image(root: Path):
    """sd15_txt2img_api.json as the diffusers pipeline computes it, configured as docs/comfy.md
    maps the graph (euler / normal), with one torch thread as the actors run."""
    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(root / "sd15", safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the thread count changes the reduction order
    try:
        out = pipe("a red fox in the snow", negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5,
                   height=64, width=64, generator=torch.Generator("cpu").manual_seed(42), output_type="np").images
    finally:
        torch.set_num_threads(threads)
    return (out[0] * 255).round().astype(np.uint8)


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_served_sd15_graph_equals_the_diffusers_pipeline(tiny, tmp_path):
    import numpy as np

    from clients import Client
    from clients.local import LocalCluster, LocalClusterSpec

    root, catalog_path, _, _ = tiny
    result = imported(tiny, "sd15_txt2img_api.json", workflow="comfy-sd15")
    toml_path = tmp_path / "comfy-sd15.toml"
    toml_path.write_text(result.toml)
    spec = LocalClusterSpec(workflows=["comfy-sd15"], backend="diffusers", catalog=[str(catalog_path), str(toml_path)],
                            run_dir=str(tmp_path / "run"), log_level="warning")
    with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
        served = client.generate("comfy-sd15", timeout=120)  # no parameters: the graph's own literals
    assert np.array_equal(served.image, sd15_reference_image(root))


# ---- the command line: `lego workflows import`



def test_the_cli_writes_a_catalog_the_loader_reads_and_refuses_to_overwrite_it(tiny, tmp_path):
    _, catalog_path, _, models = tiny
    out = tmp_path / "mine.toml"
    args = ["workflows", "import", str(DATA / "sd15_txt2img_ui.json"), "--name", "mine", "--models-dir", str(models),
            "--catalog", str(catalog_path), "--out", str(out)]
    done = lego_cli(*args)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    assert "mine" in load_catalog([catalog_path, out]).workflows
    done = lego_cli(*args)
    assert done.returncode == 2 and "--replace" in done.stderr  # exists: not overwritten without --replace
    done = lego_cli(*args, "--replace", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["workflow"] == "mine"


def test_the_cli_prints_comfyui_node_errors_for_a_graph_it_cannot_serve(tiny, tmp_path):
    _, catalog_path, _, models = tiny
    bad = graph("sd15_txt2img_api.json")
    sampler = next(k for k, n in bad.items() if n["class_type"] == "KSampler")
    bad[sampler]["inputs"]["sampler_name"] = "no_such_sampler"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    out = tmp_path / "bad.toml"
    done = lego_cli("workflows", "import", str(path), "--name", "bad", "--models-dir", str(models),
                "--catalog", str(catalog_path), "--out", str(out), "--json")
    assert done.returncode == 1 and not out.exists()
    body = json.loads(done.stdout)
    assert body["node_errors"][sampler]["class_type"] == "KSampler"
    assert body["node_errors"][sampler]["errors"][0]["extra_info"]["input_name"] == "sampler_name"


# ---- sharing: two imported graphs on one checkpoint use the same actors


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_two_imported_graphs_on_one_checkpoint_share_its_actors(tiny, tmp_path):
    from clients import Client
    from clients.local import LocalCluster, LocalClusterSpec

    _, catalog_path, catalog, models = tiny
    first = import_graph(graph("sd15_txt2img_api.json"), name="comfy-fox", models_dir=models, catalog=catalog)
    other = graph("sd15_txt2img_api.json")
    sampler = next(k for k, n in other.items() if n["class_type"] == "KSampler")
    other[sampler]["inputs"].update(seed=7, steps=3)
    second = import_graph(other, name="comfy-fox-3", models_dir=models, catalog=first.catalog)
    assert first.workflow.models == second.workflow.models  # the same checkpoint: the same models
    paths = []
    for result in (first, second):
        paths.append(tmp_path / f"{result.name}.toml")
        paths[-1].write_text(result.toml)
    spec = LocalClusterSpec(workflows=["comfy-fox", "comfy-fox-3"], backend="diffusers",
                            catalog=[str(catalog_path), *map(str, paths)], heartbeat_interval_s=0.2,
                            run_dir=str(tmp_path / "run"), log_level="warning")
    with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
        jobs = [client.submit("comfy-fox"), client.submit("comfy-fox-3")]
        for job in jobs:
            job.result(timeout=120)
        stats = client.stats()
    for model in first.workflow.models:
        row = next(m for m in stats.models if m.model == model)
        assert row.actors == 1, model  # one actor each, serving both workflows
        assert sorted(row.workflows) == ["comfy-fox", "comfy-fox-3"], model
    denoiser = next(m for m in stats.models if m.model == first.workflow.denoiser)
    assert denoiser.tasks_done >= 4 + 3  # both requests' steps on the one denoiser actor
