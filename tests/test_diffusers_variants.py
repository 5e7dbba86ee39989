"""Model variants of the diffusers backend, each bit-identical to its plain pipeline:
FLUX.1-dev-style distilled guidance, SD3 with its T5 encoder, single-file checkpoints.

Shares the tiny build and the in-process DAG runner with tests/test_diffusers.py.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_diffusers import (  # noqa: E402 (tests/ is on sys.path)
    FOLDER,
    SIZE,
    img2img_pipeline,
    one_torch_thread,  # noqa: F401 (autouse fixture: one intra-op thread, as actors run)
    pipeline_image,
    request_params,
    run_in_process,
    source_image,
    tiny_models,
)

from actors.backends.diffusers import DiffusersBackend  # noqa: E402
from broker.protocol import ProtocolError  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_models(tmp_path_factory)  # the build test_diffusers.py made, when it ran first


# ---------------------------------------------------------------- FLUX.1-dev: distilled guidance


def flux_dev_request(workflow, guidance: float | None) -> tuple[dict, dict]:
    """Request params and extra denoise-step params for a distilled guidance scale.

    With the catalog flag `distilled_guidance` (broker/catalog/), the workflow's `guidance`
    input reaches the steps as `distilled_guidance`; before the broker reads that flag the
    tiny catalog leaves it out, and the value is put on the steps here, as the broker would."""
    params = request_params(False, "default", seed=5)
    if guidance is None:
        return params, {}
    if "guidance" in workflow.inputs:
        return {**params, "guidance": guidance}, {}
    return params, {"distilled_guidance": guidance}


@pytest.mark.parametrize("guidance", [None, 2.0, 6.5], ids=["default", "2.0", "6.5"])
def test_flux_dev_distilled_guidance_reproduces_the_pipeline_exactly(tiny, guidance):
    root, _, catalog = tiny
    workflow = catalog.workflow("tiny-flux-dev-txt2img")
    assert not workflow.cfg  # distilled guidance: one model call per step, no negative prompt
    params, step_params = flux_dev_request(workflow, guidance)
    outputs = run_in_process(catalog, workflow, params, step_params=step_params)
    call = {} if guidance is None else {"guidance_scale": guidance}  # FluxPipeline's default: 3.5
    latents = pipeline_image(root, "default", False, 5, output_type="latent", family="flux-dev", **call)
    assert torch.equal(outputs["denoise/3"]["latents"], latents), "latents differ from the pipeline's"
    image = pipeline_image(root, "default", False, 5, family="flux-dev", **call)
    assert np.array_equal(outputs["decode"]["image"].numpy(), image)
    if guidance is not None:  # the scale reaches the transformer: another scale, another image
        other = pipeline_image(root, "default", False, 5, output_type="latent", family="flux-dev")
        assert not torch.equal(latents, other)


def test_flux_dev_shares_the_schnell_shaped_encoders_and_vae(tiny):
    """The dev-shaped folder's encoders and VAE equal the schnell-shaped ones bit for bit,
    so one set of encoder and VAE actors serves both transformers."""
    root, _, catalog = tiny
    workflow = catalog.workflow("tiny-flux-dev-txt2img")
    assert workflow.text_encoders == ("tiny-flux-clip", "tiny-flux-t5") and workflow.vae == "tiny-flux-vae"
    from safetensors.torch import load_file

    for sub in ("text_encoder", "text_encoder_2", "vae"):
        (schnell,) = (root / "flux" / sub).glob("*.safetensors")
        (dev,) = (root / "flux-dev" / sub).glob("*.safetensors")
        a, b = load_file(schnell), load_file(dev)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_a_bad_distilled_guidance_is_refused_naming_the_field(tiny):
    _, _, catalog = tiny
    workflow = catalog.workflow("tiny-flux-dev-txt2img")
    with pytest.raises(ProtocolError, match="params.distilled_guidance"):  # refused by the task's decoder
        run_in_process(catalog, workflow, request_params(False, "default", 1), step_params={"distilled_guidance": "x"})


# ---------------------------------------------------------------- SD3 with T5


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
def test_sd3_with_t5_reproduces_the_pipeline_exactly(tiny, cfg):
    root, _, catalog = tiny
    workflow = catalog.workflow("tiny-sd3-t5-txt2img" if cfg else "tiny-sd3-t5-txt2img-nocfg")
    assert workflow.text_encoders[-1] == "tiny-sd3-t5"
    outputs = run_in_process(catalog, workflow, request_params(cfg, "default", seed=6))
    latents = pipeline_image(root, "default", cfg, 6, output_type="latent", family="sd3-t5")
    assert torch.equal(outputs["denoise/3"]["latents"], latents), "latents differ from the pipeline's"
    assert np.array_equal(outputs["decode"]["image"].numpy(), pipeline_image(root, "default", cfg, 6, family="sd3-t5"))
    # the T5 sequence does condition: without it (zeros in its place) the latents differ
    without = pipeline_image(root, "default", cfg, 6, output_type="latent", family="sd3")
    assert not torch.equal(latents, without)


def test_sd3_with_t5_img2img_reproduces_the_pipeline_exactly(tiny):
    root, _, catalog = tiny
    workflow = catalog.workflow("tiny-sd3-t5-img2img")
    params = {**request_params(True, "default", seed=7), "strength": 0.6}
    outputs = run_in_process(catalog, workflow, params, image=source_image(size=SIZE["sd3-t5"]))
    image = img2img_pipeline(root, "default", 7, 0.6, "np", family="sd3-t5")
    assert np.array_equal(outputs["decode"]["image"].numpy(), image)


# ---------------------------------------------------------------- single-file checkpoints


def test_the_original_format_checkpoint_converts_back_key_for_key(tiny):
    """diffusers' own LDM converters turn the written checkpoint back into the folder's
    state dicts exactly: the file is a faithful original-format (LDM) checkpoint."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import load_file

    root, _, _ = tiny
    checkpoint = load_file(root / "sd15" / "sd15.safetensors")
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in checkpoint)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in checkpoint)
    for cls, sub, convert in ((UNet2DConditionModel, "unet", convert_ldm_unet_checkpoint),
                              (AutoencoderKL, "vae", convert_ldm_vae_checkpoint)):
        model = cls.from_pretrained(root / "sd15", subfolder=sub)
        expected, converted = model.state_dict(), convert(checkpoint, dict(model.config))
        assert converted.keys() == expected.keys(), sub
        assert all(torch.equal(converted[k], expected[k]) for k in expected), sub


def test_single_file_models_serve_the_image_of_the_folder_models(tiny):
    root, _, catalog = tiny
    params = request_params(True, "euler", seed=2)
    from_file = run_in_process(catalog, catalog.workflow("tiny-sd15-file-txt2img"), params)
    from_folder = run_in_process(catalog, catalog.workflow("tiny-sd15-txt2img"), params)
    assert catalog.models["tiny-sd15-file-unet"].source.endswith(".safetensors")
    assert torch.equal(from_file["denoise/3"]["latents"], from_folder["denoise/3"]["latents"])
    assert np.array_equal(from_file["decode"]["image"].numpy(), from_folder["decode"]["image"].numpy())
    assert np.array_equal(from_file["decode"]["image"].numpy(), pipeline_image(root, "euler", True, 2))


def _loaded(spec) -> DiffusersBackend:
    backend = DiffusersBackend(spec, "cpu", {})
    backend.load()
    return backend


def test_single_file_config_comes_from_the_config_field_else_a_clear_error(tiny, tmp_path):
    root, _, catalog = tiny
    alone = tmp_path / "v1-5-like.safetensors"  # a checkpoint with no configs beside it
    shutil.copy(root / "sd15" / "sd15.safetensors", alone)
    unet = dataclasses.replace(catalog.models["tiny-sd15-file-unet"], source=str(alone))
    with pytest.raises(ValueError, match=r"models\.tiny-sd15-file-unet\.config: .*unet/config\.json"):
        _loaded(unet)
    with pytest.raises(ValueError, match=r"models\.tiny-sd15-file-unet\.config: .* holds no unet/config\.json"):
        _loaded(dataclasses.replace(unet, config=str(tmp_path)))
    reference = _loaded(catalog.models["tiny-sd15-unet"]).component.state_dict()
    loaded = _loaded(dataclasses.replace(unet, config=str(root / "sd15"))).component.state_dict()  # configs elsewhere
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


@pytest.mark.parametrize(("source", "model", "message"), [
    ("sd15/sd15.safetensors", "tiny-sd15-clip", r"models\.tiny-sd15-clip\.source: text encoders load from a pipeline"),
    ("sd15/missing.safetensors", "tiny-sd15-unet", r"models\.tiny-sd15-unet\.source: no such checkpoint file"),
    ("sd15/sd15.ckpt", "tiny-sd15-unet", r"models\.tiny-sd15-unet\.source: .*\.safetensors only"),
])
def test_bad_single_file_sources_are_refused_naming_the_field(tiny, source, model, message):
    root, _, catalog = tiny
    with pytest.raises(ValueError, match=message):
        _loaded(dataclasses.replace(catalog.models[model], source=str(root / source)))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformers_load_from_a_single_file_of_diffusers_keys(tiny, tmp_path, family):
    """SD3's and Flux's transformers from one .safetensors holding the diffusers state dict
    (from_single_file loads it without conversion), configs from the model's `config`."""
    from safetensors.torch import save_file

    root, _, catalog = tiny
    reference = _loaded(catalog.models[f"tiny-{family}-unet"]).component.state_dict()
    save_file({k: v.contiguous() for k, v in reference.items()}, tmp_path / "transformer.safetensors")
    spec = dataclasses.replace(catalog.models[f"tiny-{family}-unet"], source=str(tmp_path / "transformer.safetensors"),
                               config=str(root / FOLDER[family]))
    backend = _loaded(spec)
    loaded = backend.component.state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert backend.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"

