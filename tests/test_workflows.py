"""Workflow catalog loading, request parameter validation and DAG unrolling (pure functions)."""

from __future__ import annotations

import math
import random

import pytest

from broker.catalog import (
    MAX_SEED,
    MODEL_KINDS,
    CatalogError,
    ParamError,
    load_catalog,
    parse_catalog,
    unroll,
    validate_params,
)

BUILTIN_WORKFLOWS = {
    "flux-schnell-txt2img",
    "flux-schnell-txt2img-cfg",
    "flux-dev-txt2img",
    "sd15-txt2img",
    "sdxl-txt2img",
}

# ------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def sd15(catalog):
    """A CFG workflow with one text encoder (steps 25, 512x512, guidance 7.5 by default)."""
    return catalog.workflow("sd15-txt2img")


@pytest.fixture(scope="module")
def schnell(catalog):
    """A workflow without CFG and with two text encoders (steps 4, max 16)."""
    return catalog.workflow("flux-schnell-txt2img")


def param_error(workflow, params) -> ParamError:
    with pytest.raises(ParamError) as info:
        validate_params(workflow, params, random.Random(0))
    return info.value


def write_catalog(tmp_path, text: str):
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    return path


def catalog_error(tmp_path, text: str) -> CatalogError:
    with pytest.raises(CatalogError) as info:
        load_catalog([write_catalog(tmp_path, text)])
    return info.value


def plan(workflow, **params):
    params.setdefault("prompt", "a red lego brick")
    return unroll(workflow, validate_params(workflow, params, random.Random(0)))


# ------------------------------------------------------------------ the built-in catalog


def test_builtin_catalog_loads(catalog):
    assert set(catalog.workflows) >= BUILTIN_WORKFLOWS
    assert all(m.kind in MODEL_KINDS for m in catalog.models.values())


@pytest.mark.parametrize("name", sorted(BUILTIN_WORKFLOWS))
def test_builtin_workflow_models_exist_with_their_kind(catalog, name):
    wf = catalog.workflow(name)
    assert wf.text_encoders, "every built-in workflow encodes a prompt"
    for enc in wf.text_encoders:
        assert catalog.models[enc].kind == "text_encoder"
    assert catalog.models[wf.denoiser].kind == "denoiser"
    assert catalog.models[wf.vae].kind == "vae"
    assert set(wf.models) <= set(catalog.models)


@pytest.mark.parametrize("name", sorted(BUILTIN_WORKFLOWS))
def test_builtin_workflow_defaults_validate_and_unroll(catalog, name):
    wf = catalog.workflow(name)
    params = validate_params(wf, {"prompt": "x"}, random.Random(1))
    nodes = unroll(wf, params)
    assert len(nodes) == len(wf.text_encoders) + params["steps"] + 1


def test_builtin_overrides_are_applied(catalog, sd15, schnell):
    assert schnell.inputs["steps"].default == 4
    assert schnell.inputs["steps"].max == 16
    assert sd15.inputs["guidance"].default == 7.5
    assert sd15.inputs["width"].default == 512
    assert catalog.workflow("flux-schnell-txt2img-cfg").cfg is True
    assert "guidance" not in schnell.inputs  # only CFG workflows take a guidance scale


# ------------------------------------------------------------------ validation


def test_validate_fills_defaults(sd15):
    out = validate_params(sd15, {"prompt": "a cat"}, random.Random(0))
    assert out == {"prompt": "a cat", "steps": 25, "width": 512, "height": 512,
                   "seed": out["seed"], "sampler": "default", "negative_prompt": "", "guidance": 7.5, "output": "image"}


def test_validate_keeps_given_values(sd15):
    params = {"prompt": "a cat", "steps": 3, "width": 256, "height": 768, "seed": 0,
              "sampler": "euler", "negative_prompt": "blurry", "guidance": 2.5, "output": "latents"}
    assert validate_params(sd15, dict(params)) == params


def test_validate_picks_a_seed_when_absent(sd15):
    seeds = {validate_params(sd15, {"prompt": "x"}, random.Random(i))["seed"] for i in range(20)}
    assert len(seeds) > 1
    assert all(isinstance(s, int) and 0 <= s < 2**31 for s in seeds)
    assert validate_params(sd15, {"prompt": "x", "seed": None}, random.Random(3))["seed"] is not None


def test_validate_seed_is_reproducible_with_the_same_rng(sd15):
    a = validate_params(sd15, {"prompt": "x"}, random.Random(42))["seed"]
    b = validate_params(sd15, {"prompt": "x"}, random.Random(42))["seed"]
    assert a == b


def test_validate_converts_int_to_float(sd15):
    out = validate_params(sd15, {"prompt": "x", "guidance": 8})
    assert out["guidance"] == 8.0 and isinstance(out["guidance"], float)


def test_validate_rejects_unknown_param(sd15):
    err = param_error(sd15, {"prompt": "x", "scheduler": "euler"})
    assert err.field == "scheduler"


def test_validate_rejects_guidance_for_a_workflow_without_cfg(schnell):
    assert param_error(schnell, {"prompt": "x", "guidance": 5.0}).field == "guidance"


def test_validate_rejects_params_that_are_not_a_map(sd15):
    assert param_error(sd15, ["prompt"]).field == "params"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", "4"),
        ("steps", 4.0),
        ("steps", True),
        ("width", 512.0),
        ("seed", 1.5),
        ("guidance", "7"),
        ("guidance", True),
        ("prompt", 5),
        ("prompt", ["a", "cat"]),
        ("negative_prompt", 0),
    ],
)
def test_validate_rejects_wrong_type(sd15, field, value):
    params = {"prompt": "x", field: value}
    err = param_error(sd15, params)
    assert err.field == field
    assert "must be" in err.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("steps", 101),
        ("width", 48),
        ("width", 2064),
        ("height", 32),
        ("guidance", 0.5),
        ("guidance", 30.5),
        ("guidance", math.inf),
        ("seed", -1),
        ("seed", MAX_SEED + 1),
    ],
)
def test_validate_rejects_out_of_bounds(sd15, field, value):
    assert param_error(sd15, {"prompt": "x", field: value}).field == field


def test_validate_bounds_are_inclusive(sd15):
    out = validate_params(sd15, {"prompt": "x", "steps": 100, "width": 64, "height": 2048,
                                 "guidance": 30.0, "seed": MAX_SEED})
    assert (out["steps"], out["width"], out["height"], out["seed"]) == (100, 64, 2048, MAX_SEED)


def test_validate_applies_workflow_override_bounds(schnell):
    assert validate_params(schnell, {"prompt": "x", "steps": 16})["steps"] == 16
    assert param_error(schnell, {"prompt": "x", "steps": 17}).field == "steps"


def test_validate_rejects_nan(sd15):
    assert param_error(sd15, {"prompt": "x", "guidance": math.nan}).field == "guidance"


@pytest.mark.parametrize(("field", "value"), [("width", 520), ("height", 1000), ("width", 72)])
def test_validate_rejects_size_not_a_multiple(sd15, field, value):
    err = param_error(sd15, {"prompt": "x", field: value})
    assert err.field == field
    assert "multiple of 16" in err.message


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_validate_rejects_empty_prompt(sd15, prompt):
    assert param_error(sd15, {"prompt": prompt}).field == "prompt"


def test_validate_requires_prompt(sd15):
    assert param_error(sd15, {}).field == "prompt"
    assert param_error(sd15, {"prompt": None}).field == "prompt"


def test_validate_rejects_overlong_prompt(sd15):
    assert validate_params(sd15, {"prompt": "x" * 8192})["prompt"] == "x" * 8192
    assert param_error(sd15, {"prompt": "x" * 8193}).field == "prompt"


def test_validate_does_not_mutate_the_request(sd15):
    params = {"prompt": "x"}
    validate_params(sd15, params)
    assert params == {"prompt": "x"}


# ------------------------------------------------------------------ unrolling


def test_unroll_one_encode_node_per_text_encoder(schnell):
    nodes = plan(schnell, steps=3)
    encodes = [n for n in nodes if n.kind == "encode"]
    assert [n.model for n in encodes] == list(schnell.text_encoders) == ["CLIP_Flux", "T5_Flux"]
    assert [n.key for n in encodes] == ["encode/CLIP_Flux", "encode/T5_Flux"]
    assert all(n.inputs == [] for n in encodes)
    assert all(n.params.to_wire() == {"prompt": "a red lego brick"} for n in encodes)


def test_unroll_one_denoise_node_per_step_chained(schnell):
    nodes = plan(schnell, steps=3, seed=11)
    denoise = [n for n in nodes if n.kind == "denoise"]
    assert [n.key for n in denoise] == ["denoise/0", "denoise/1", "denoise/2"]
    assert [n.step for n in denoise] == [0, 1, 2]
    assert all(n.model == "Flux1Schnell" for n in denoise)
    assert denoise[0].inputs == ["encode/CLIP_Flux", "encode/T5_Flux"]
    assert denoise[1].inputs == ["denoise/0"]
    assert denoise[2].inputs == ["denoise/1"]
    assert denoise[1].params.to_wire() == {"step": 1, "steps": 3, "first": False, "seed": 11, "sampler": "default"}
    assert denoise[0].params.first is True


def test_unroll_decode_is_last_and_returns_output(schnell):
    nodes = plan(schnell, steps=2)
    decode = nodes[-1]
    assert (decode.key, decode.kind, decode.model) == ("decode", "decode", "Flux1VAE")
    assert decode.inputs == ["denoise/1"]
    assert decode.return_output is True
    assert [n.key for n in nodes if n.return_output] == ["decode"]


def test_unroll_producers_before_consumers(sd15):
    seen = set()
    for node in plan(sd15, steps=4):
        assert set(node.inputs) <= seen, node.key
        seen.add(node.key)
    assert len(seen) == 1 + 4 + 1  # keys are unique


def test_unroll_rows_without_cfg(schnell):
    assert {n.rows for n in plan(schnell, steps=2)} == {1}


def test_unroll_rows_under_cfg(sd15):
    nodes = plan(sd15, steps=2, guidance=3.0, negative_prompt="ugly")
    assert [(n.kind, n.rows) for n in nodes] == [("encode", 2), ("denoise", 2), ("denoise", 2), ("decode", 1)]
    assert nodes[0].params.to_wire() == {"prompt": "a red lego brick", "negative_prompt": "ugly"}
    assert nodes[1].params.guidance == 3.0


def test_unroll_shape_is_height_width(sd15):
    assert {n.shape for n in plan(sd15, width=256, height=768, steps=1)} == {(768, 256)}


def test_unroll_path_len_decreases_toward_the_output(schnell):
    nodes = plan(schnell, steps=5)
    by_key = {n.key: n for n in nodes}
    for node in nodes:
        for producer in node.inputs:
            assert by_key[producer].path_len > node.path_len, (producer, node.key)
    assert by_key["decode"].path_len == 1
    assert [by_key[f"denoise/{k}"].path_len for k in range(5)] == [6, 5, 4, 3, 2]
    assert by_key["encode/T5_Flux"].path_len == 7


# ------------------------------------------------------------------ user catalogs


USER_CATALOG = """
[models.TinyDenoiser]
kind = "denoiser"
vae_scale = 4
latent_channels = 4

[workflows.flux-schnell-txt2img]
description = "replaced"
text_encoders = ["CLIP_Flux"]
denoiser = "Flux1Schnell"
vae = "Flux1VAE"
inputs.steps = { default = 2, max = 3 }

[workflows.tiny]
description = "a tiny one"
text_encoders = ["CLIP_SD15"]
denoiser = "TinyDenoiser"
vae = "StableDiffusion15VAE"
cfg = true
inputs.width = { default = 64 }
inputs.height = { default = 72 }
inputs.guidance = { default = 2.0, max = 4.0 }
"""


def test_user_catalog_replaces_a_workflow(tmp_path):
    catalog = load_catalog([write_catalog(tmp_path, USER_CATALOG)])
    wf = catalog.workflow("flux-schnell-txt2img")
    assert wf.description == "replaced"
    assert wf.text_encoders == ("CLIP_Flux",)
    assert validate_params(wf, {"prompt": "x"})["steps"] == 2
    assert param_error(wf, {"prompt": "x", "steps": 4}).field == "steps"


def test_user_catalog_adds_models_and_workflows(tmp_path):
    catalog = load_catalog([write_catalog(tmp_path, USER_CATALOG)])
    assert set(catalog.workflows) >= BUILTIN_WORKFLOWS | {"tiny"}
    assert catalog.models["TinyDenoiser"].vae_scale == 4
    tiny = catalog.workflow("tiny")
    out = validate_params(tiny, {"prompt": "x"})
    assert (out["width"], out["height"], out["guidance"]) == (64, 72, 2.0)
    assert tiny.inputs["width"].multiple_of == 8  # 2 x the denoiser's vae_scale
    assert param_error(tiny, {"prompt": "x", "guidance": 5.0}).field == "guidance"


def test_user_catalog_without_builtin(tmp_path):
    text = '[models.E]\nkind = "text_encoder"\n[models.D]\nkind = "denoiser"\n[models.V]\nkind = "vae"\n' \
           '[workflows.w]\ntext_encoders = ["E"]\ndenoiser = "D"\nvae = "V"\n'
    catalog = load_catalog([write_catalog(tmp_path, text)], builtin=False)
    assert set(catalog.workflows) == {"w"}
    assert set(catalog.models) == {"E", "D", "V"}


W = '[workflows.w]\ntext_encoders = ["CLIP_Flux"]\ndenoiser = "Flux1Dev"\nvae = "Flux1VAE"\n'


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('[models.m]\nkind = "denoiser"\nlayers = 3\n', "models.m.layers"),
        ('[models.m]\nkind = "unet"\n', "models.m.kind"),
        ('[models.m]\nprofile = "x"\n', "models.m.kind"),
        (W + "steps = 4\n", "workflows.w.steps"),
        ('[workflows.w]\ndenoiser = "Nope"\nvae = "Flux1VAE"\n', "workflows.w.denoiser"),
        ('[workflows.w]\ndenoiser = "Flux1Dev"\n', "workflows.w.vae"),
        ('[workflows.w]\ndenoiser = "Flux1Dev"\nvae = "Flux1Dev"\n', "workflows.w.vae"),
        ('[workflows.w]\ndenoiser = "Flux1VAE"\nvae = "Flux1VAE"\n', "workflows.w.denoiser"),
        ('[workflows.w]\ntext_encoders = ["CLIP_Flux", "Nope"]\ndenoiser = "Flux1Dev"\nvae = "Flux1VAE"\n',
         "workflows.w.text_encoders[1]"),
        ('[workflows.w]\ntext_encoders = ["Flux1Dev"]\ndenoiser = "Flux1Dev"\nvae = "Flux1VAE"\n',
         "workflows.w.text_encoders[0]"),
        (W + "inputs.steps = { default = 0 }\n", "workflows.w.inputs.steps.default"),
        (W + 'inputs.steps = { default = "four" }\n', "workflows.w.inputs.steps.default"),
        (W + "inputs.steps = { min = 30 }\n", "workflows.w.inputs.steps.default"),
        (W + "inputs.width = { default = 1000 }\n", "workflows.w.inputs.width.default"),
        (W + "inputs.steps = { multiple_of = 2 }\n", "workflows.w.inputs.steps.multiple_of"),
        (W + 'inputs.scheduler = { default = "euler" }\n', "workflows.w.inputs.scheduler"),
        (W + "inputs.guidance = { default = 5.0 }\n", "workflows.w.inputs.guidance"),
    ],
    ids=[
        "model-unknown-field", "model-bad-kind", "model-no-kind", "workflow-unknown-field",
        "undeclared-denoiser", "missing-vae", "vae-of-wrong-kind", "denoiser-of-wrong-kind",
        "undeclared-encoder", "encoder-of-wrong-kind", "default-out-of-bounds", "default-wrong-type",
        "min-above-default", "default-not-multiple", "not-overridable", "unknown-input", "guidance-without-cfg",
    ],
)
def test_bad_catalog_names_the_field(tmp_path, text, field):
    err = catalog_error(tmp_path, text)
    assert err.field == field
    assert field in str(err)


def test_invalid_toml_names_the_file(tmp_path):
    path = write_catalog(tmp_path, "[workflows.w\n")
    with pytest.raises(CatalogError) as info:
        load_catalog([path])
    assert info.value.field == str(path)


def test_parse_catalog_does_not_change_its_base(catalog):
    before = dict(catalog.workflows)
    parse_catalog({"workflows": {"flux-dev-txt2img": {"denoiser": "Flux1Dev", "vae": "Flux1VAE"}}}, catalog)
    assert catalog.workflows == before


def test_scalar_input_override_is_a_catalog_error(tmp_path):
    assert catalog_error(tmp_path, W + "inputs.steps = 4\n").field == "workflows.w.inputs.steps"


def test_duplicate_text_encoder_is_refused_or_unrolled_once(tmp_path):
    text = '[workflows.w]\ntext_encoders = ["CLIP_Flux", "CLIP_Flux"]\ndenoiser = "Flux1Dev"\nvae = "Flux1VAE"\n'
    try:
        catalog = load_catalog([write_catalog(tmp_path, text)])
    except CatalogError as err:
        assert err.field == "workflows.w.text_encoders[1]"
        return
    keys = [n.key for n in plan(catalog.workflow("w"), steps=1)]
    assert len(keys) == len(set(keys))
