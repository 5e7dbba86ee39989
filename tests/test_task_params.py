"""Typed task parameters (broker/protocol/tasks.py): round trips, refusals naming the
field, and the exact maps the wire carried before the structs existed."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from broker import protocol as p
from broker.catalog import (
    AdapterSpec,
    load_catalog,
    pipeline_name,
    task_adapters,
    unroll,
    unroll_monolith,
    validate_params,
)
from broker.protocol import TaskKind

STEP = {"step": 1, "steps": 4, "first": False, "seed": 7, "sampler": "euler_a"}
SAMPLES: dict[TaskKind, p.TaskParams] = {
    TaskKind.ENCODE: p.EncodeParams("a fox", "blur", [["ink", 0.5]]),
    TaskKind.ENCODE_IMAGE: p.EncodeImageParams(seed=3),
    TaskKind.CONTROL_IMAGE: p.ControlImageParams(["control_image_1", "control_image_2"], ["none", "canny"], 9),
    TaskKind.CONTROL: p.ControlParams(**STEP, guidance=7.5, scale=0.8, denoiser="den", vae="vae", index=1, lead="net"),
    TaskKind.DENOISE: p.DenoiseParams(**STEP, guidance=7.5, begin_index=0, adapters=[["ink", 1.0]], split=True),
    TaskKind.DENOISE_BRANCH: p.DenoiseBranchParams(**STEP, distilled_guidance=3.5, branch=1),
    TaskKind.DECODE: p.DecodeParams(),
    TaskKind.PIPELINE: p.PipelineParams("sd15-txt2img", {"prompt": "a fox", "steps": 4, "loras": []}),
}


def task(kind: TaskKind, params: p.TaskParams) -> p.TaskSpec:
    return p.TaskSpec("r/n", "r", 0, "n", kind, "m", "wf", 1, [64, 64], params, [], "r/n@0")


def header(spec: p.TaskSpec) -> dict:
    """The TaskSpec's map as a peer reads it (msgpack gives plain types back)."""
    return msgpack.unpackb(msgpack.packb(spec.to_wire()))


def on_the_wire(spec: p.TaskSpec) -> p.TaskSpec:
    frames = p.encode(p.Tasks(batch_id=1, tasks=[spec]))
    decoded, _ = p.decode([bytes(f) for f in frames])
    return decoded.tasks[0]


def test_every_kind_has_one_params_struct():
    assert set(SAMPLES) == set(TaskKind) == set(p.TASK_PARAMS)
    assert all(p.TASK_PARAMS[kind] is type(params) for kind, params in SAMPLES.items())


@pytest.mark.parametrize("kind", list(TaskKind), ids=str)
def test_every_kind_round_trips_to_an_equal_struct(kind):
    decoded = on_the_wire(task(kind, SAMPLES[kind]))
    assert type(decoded.params) is type(SAMPLES[kind])
    assert decoded.params == SAMPLES[kind]
    assert decoded.kind == kind


@pytest.mark.parametrize(("kind", "field", "value"), [
    (TaskKind.ENCODE, "prompt", 3),
    (TaskKind.ENCODE, "adapters", [["ink", "heavy"]]),
    (TaskKind.ENCODE_IMAGE, "seed", "3"),
    (TaskKind.CONTROL_IMAGE, "tensors", "control_image"),
    (TaskKind.CONTROL_IMAGE, "preprocess", ["none", "canny", "none"]),
    (TaskKind.CONTROL, "scale", "high"),
    (TaskKind.CONTROL, "lead", None),
    (TaskKind.DENOISE, "first", 0),
    (TaskKind.DENOISE, "guidance", "7.5"),
    (TaskKind.DENOISE, "split", "yes"),
    (TaskKind.DENOISE_BRANCH, "branch", 2),
    (TaskKind.DENOISE_BRANCH, "distilled_guidance", "x"),
    (TaskKind.PIPELINE, "workflow", 1),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_wrong_type_is_refused_naming_the_field(kind, field, value):
    wire = header(task(kind, SAMPLES[kind]))
    wire["params"][field] = value
    with pytest.raises(p.ProtocolError) as err:
        p.TaskSpec.from_wire(wire)
    assert err.value.field == f"params.{field}" or err.value.field.startswith(f"params.{field}[")
    assert err.value.code == p.ErrorCode.BAD_HEADER


def test_a_missing_field_is_refused_and_an_unknown_kind_names_the_kind():
    wire = header(task(TaskKind.DENOISE, SAMPLES[TaskKind.DENOISE]))
    del wire["params"]["sampler"]
    with pytest.raises(p.ProtocolError, match="lacks a required field") as err:
        p.TaskSpec.from_wire(wire)
    assert err.value.field == "params.sampler"
    with pytest.raises(p.ProtocolError) as err:
        p.TaskSpec.from_wire({**wire, "kind": "upscale"})
    assert err.value.field == "kind"


def test_unknown_fields_are_ignored_and_new_ones_default():
    wire = header(task(TaskKind.DENOISE, p.DenoiseParams(**STEP)))
    assert wire["params"] == STEP  # fields at their defaults stay off the wire
    wire["params"]["from_a_newer_broker"] = 1
    assert p.TaskSpec.from_wire(wire).params == p.DenoiseParams(**STEP)


# ------------------------------------------------------------ the maps of real requests

ADAPTERS = {"ink": AdapterSpec("ink", "StableDiffusion15")}
IMG2IMG_STEP = {"step": 2, "steps": 4, "first": True, "seed": 3, "sampler": "default", "guidance": 7.5,
                "begin_index": 2}
INK = [["ink", 0.5]]

# What unroll put in each node's params map before the structs existed (a dict built key by
# key), for four requests and a monolith's one node. Order matters: it is the bytes on the wire.
EXPECTED = {
    ("sd15-img2img", True): {
        "encode/CLIP_SD15": {"prompt": "a fox", "negative_prompt": "blur"},
        "encode_image": {"seed": 3},
        "branch/0/1": {**IMG2IMG_STEP, "branch": 1},
        "denoise/0": {**IMG2IMG_STEP, "split": True},
        "decode": {},
    },
    ("sd3-canny-cfg", False): {
        "encode/T5_SD3": {"prompt": "a fox", "negative_prompt": ""},
        "control_images": {"tensors": ["control_image"], "preprocess": ["none"], "seed": 4},
        "control/SD3ControlNetCanny/0": {"step": 0, "steps": 2, "first": True, "seed": 4, "sampler": "default",
                                         "guidance": 7.0, "scale": 1.0, "denoiser": "StableDiffusion3",
                                         "vae": "StableDiffusion3VAE", "index": 0, "lead": "SD3ControlNetCanny"},
        "denoise/1": {"step": 1, "steps": 2, "first": False, "seed": 4, "sampler": "default", "guidance": 7.0},
    },
    ("sd15-lora-canny-cfg", True): {
        "encode/CLIP_SD15": {"prompt": "a fox", "negative_prompt": "", "adapters": INK},
        "control_image/SD15ControlNetCanny": {"tensors": ["control_image"], "preprocess": ["canny"]},
        "control/SD15ControlNetCanny/1": {"step": 1, "steps": 2, "first": False, "seed": 5, "sampler": "default",
                                          "guidance": 7.5, "scale": 1.0, "denoiser": "StableDiffusion15",
                                          "vae": "StableDiffusion15VAE", "index": 0, "lead": "SD15ControlNetCanny"},
        "branch/0/0": {"step": 0, "steps": 2, "first": True, "seed": 5, "sampler": "default", "guidance": 7.5,
                       "adapters": INK, "branch": 0},
        "denoise/0": {"step": 0, "steps": 2, "first": True, "seed": 5, "sampler": "default", "guidance": 7.5,
                      "adapters": INK, "split": True},
    },
    ("flux-dev-txt2img", False): {
        "encode/CLIP_Flux": {"prompt": "a fox"},
        "denoise/1": {"step": 1, "steps": 2, "first": False, "seed": 6, "sampler": "default",
                      "distilled_guidance": 2.5},
    },
}
REQUESTS = {
    "sd15-img2img": ({"prompt": "a fox", "negative_prompt": "blur", "seed": 3, "steps": 4, "strength": 0.5}, {"image"}),
    "sd3-canny-cfg": ({"prompt": "a fox", "seed": 4, "steps": 2, "control_end": 0.5}, {"control_image"}),
    "sd15-lora-canny-cfg": ({"prompt": "a fox", "seed": 5, "steps": 2, "control_preprocess": "canny",
                             "loras": [{"name": "ink", "weight": 0.5}]}, {"control_image"}),
    "flux-dev-txt2img": ({"prompt": "a fox", "seed": 6, "steps": 2, "guidance": 2.5, "output": "latents"}, set()),
}


@pytest.mark.parametrize(("workflow", "cfg_split"), list(EXPECTED), ids=lambda v: v if isinstance(v, str) else None)
def test_unrolled_params_encode_to_exactly_the_old_maps(workflow, cfg_split):
    wf = load_catalog().workflows[workflow]
    request, tensors = REQUESTS[workflow]
    params = validate_params(wf, {**request, "height": 64, "width": 64}, adapters=ADAPTERS)
    plans = {plan.key: plan for plan in unroll(wf, params, cfg_split=cfg_split, tensors=tensors)}
    for key, expected in EXPECTED[workflow, cfg_split].items():
        plan = plans[key]
        assert isinstance(plan.params, p.TASK_PARAMS[plan.kind])
        wire = task(plan.kind, plan.params).to_wire()["params"]
        assert msgpack.packb(wire) == msgpack.packb(expected), key  # same keys, same order, same types
        assert on_the_wire(task(plan.kind, plan.params)).params == plan.params


def test_a_monolith_task_carries_the_request_and_its_workflow():
    wf = load_catalog().workflows["sd15-txt2img"]
    params = validate_params(wf, {"prompt": "a fox", "seed": 1, "steps": 2})
    (plan,) = unroll_monolith(wf, params, pipeline_name([wf.name]))
    assert plan.params.to_wire() == {**params, "workflow": "sd15-txt2img"}
    assert list(plan.params.to_wire())[-1] == "workflow"
    decoded = on_the_wire(task(plan.kind, plan.params)).params
    assert decoded == plan.params and decoded.request == params


def test_split_combines_call_no_model_and_carry_no_adapter_set():
    combine = dataclasses.replace(SAMPLES[TaskKind.DENOISE], split=True)
    assert not combine.calls_model and task_adapters(TaskKind.DENOISE, combine) is None
    assert task_adapters(TaskKind.DENOISE_BRANCH, SAMPLES[TaskKind.DENOISE_BRANCH]) == ()
    assert SAMPLES[TaskKind.CONTROL_IMAGE].request_tensors() == ("control_image_1", "control_image_2")
    assert SAMPLES[TaskKind.ENCODE_IMAGE].request_tensors() == ("image",)
