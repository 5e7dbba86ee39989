"""Workflow catalog, parameter validation and DAG unrolling: pure functions.

Runs inside the broker (and the client CLI, to list workflows offline). A workflow
names its models; a request's parameters are validated against the workflow's
declared inputs and then unrolled into node plans: one encode node per text encoder,
one denoise node per step, one VAE decode node. Sampler state and the prompt
conditioning travel with the latent (step k's output bundle is step k+1's only
input), so any actor of the base model can take the next step.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

MODEL_KINDS = ("text_encoder", "denoiser", "vae", "controlnet")
INPUT_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
SAMPLERS = ("default", "ddim", "euler", "euler_a", "dpmpp_2m")
OUTPUTS = ("image", "latents")
CONTROL_PREPROCESSORS = ("none", "canny")
MAX_SEED = 2**63 - 1
MAX_ADAPTERS = 8  # LoRA adapters in one request
ADAPTER_WEIGHT = (-2.0, 2.0)  # the range a request's adapter weight must lie in
# Task kinds whose model call applies the request's LoRA adapters (text encoders and the
# base model; a split step's combine runs no model, ControlNets and VAEs take none).
ADAPTED_KINDS = ("encode", "denoise", "denoise_branch")


class CatalogError(ValueError):
    """The catalog file itself is wrong; `field` is the dotted key at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"catalog: {field}: {message}")
        self.field = field


class ParamError(ValueError):
    """A request parameter was refused; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str
    profile: str = ""
    dtype: str = "float32"
    seq_len: int = 1
    embed_dim: int = 8
    latent_channels: int = 4
    vae_scale: int = 8
    source: str = ""  # diffusers: a local folder or hub id holding the pipeline
    subfolder: str = ""  # diffusers: the component's folder inside `source`
    family: str = ""  # diffusers: the pipeline family whose conventions apply (sd15 | sdxl | sd3 | flux)
    # diffusers, single-file `source` (.safetensors): the folder (or hub id) holding the
    # component's diffusers config, so loading never asks a hub for it.
    config: str = ""


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter of the registry: a local `.safetensors` file or a folder holding one
    (diffusers' `save_lora_weights` layout: `unet.`/`transformer.` and text-encoder keys)."""

    name: str
    base: str  # the denoiser model it was trained for; requests of its workflows may name it
    source: str = ""
    description: str = ""
    # emulated backend: seconds to read it from disk into host memory, at H800 scale
    load_s: float = 0.0


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str
    required: bool = False
    default: Any = None
    min: Any = None
    max: Any = None
    choices: tuple | None = None
    multiple_of: int | None = None
    max_length: int | None = None
    description: str = ""


@dataclass(frozen=True)
class WorkflowSpec:
    name: str
    description: str
    text_encoders: tuple[str, ...]
    denoiser: str
    vae: str
    cfg: bool
    inputs: dict[str, InputSpec]
    img2img: bool = False  # takes an `image` tensor input and a `strength`
    family: str = ""  # the denoiser's pipeline family, where its conventions differ
    # ControlNets run once per step (both CFG rows) on the latent before the step;
    # the step consumes their residuals. Their actors are shared like any model's.
    controlnets: tuple[str, ...] = ()
    slo_s: float = 0.0  # latency objective; 0: the broker's multiple of the solo latency
    # the denoiser embeds the guidance scale (guidance-distilled, FLUX.1-dev): a `guidance`
    # input without CFG, handed to every denoise step as `distilled_guidance`
    distilled_guidance: bool = False
    lora: bool = False  # requests may name LoRA adapters of the denoiser (input `loras`)

    @property
    def models(self) -> list[str]:
        return [*self.text_encoders, self.denoiser, *self.controlnets, self.vae]


@dataclass
class NodePlan:
    """One node of a request's DAG before it becomes a live task."""

    key: str
    kind: str
    model: str
    rows: int
    shape: tuple[int, int]
    params: dict
    inputs: list[str]
    path_len: int
    step: int = -1
    return_output: bool = False
    # Nodes of one group (the two CFG branches of a step) go to different actors when
    # they can: that is what running them in parallel means.
    group: str = ""


@dataclass
class Catalog:
    models: dict[str, ModelSpec] = field(default_factory=dict)
    workflows: dict[str, WorkflowSpec] = field(default_factory=dict)
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)

    def workflow(self, name: str) -> WorkflowSpec:
        return self.workflows[name]

    def model(self, name: str) -> ModelSpec | PipelineSpec | None:
        """A declared model, or a monolithic pipeline named `pipeline/WF[+WF...]`."""
        if name.startswith(PIPELINE_PREFIX):
            names = name[len(PIPELINE_PREFIX):].split("+")
            if not names or any(n not in self.workflows for n in names) or len(set(names)) != len(names):
                return None
            return PipelineSpec(name, tuple(self.workflows[n] for n in names), self)
        return self.models.get(name)


PIPELINE_PREFIX = "pipeline/"


@dataclass(frozen=True)
class PipelineSpec:
    """A monolith: whole workflows served by one actor, request by request, the way a
    diffusers pipeline behind a per-GPU queue runs them (the baselines' unit). Named
    `pipeline/WF` (one workflow) or `pipeline/WF1+WF2` (several, loaded on demand)."""

    name: str
    workflows: tuple[WorkflowSpec, ...]
    catalog: Catalog = field(repr=False, compare=False)
    kind: str = "pipeline"
    profile: str = ""
    dtype: str = "uint8"

    def serves(self, workflow: str) -> bool:
        return any(w.name == workflow for w in self.workflows)


def pipeline_name(workflows: list[str]) -> str:
    return PIPELINE_PREFIX + "+".join(workflows)


# ------------------------------------------------------------------- catalog files


def control_suffixes(count: int) -> list[str]:
    """Input-name suffixes of a workflow's ControlNets: none for one net, `_1`..`_N` for several."""
    return [""] if count == 1 else [f"_{i}" for i in range(1, count + 1)]


def _control_inputs(controlnets: tuple[str, ...]) -> list[InputSpec]:
    inputs = []
    for net, s in zip(controlnets, control_suffixes(len(controlnets)), strict=True):
        inputs += [
            InputSpec(f"control_image{s}", "image", required=True,
                      description=f"{net}'s control image: uint8 [height, width, 3], sent as a tensor"),
            InputSpec(f"control_preprocess{s}", "str", default="none", choices=CONTROL_PREPROCESSORS,
                      description="none: the image is already a control map; canny: edges computed on the CPU"),
            InputSpec(f"control_scale{s}", "float", default=1.0, min=0.0, max=2.0,
                      description="controlnet_conditioning_scale: the residuals are multiplied by it"),
            InputSpec(f"control_start{s}", "float", default=0.0, min=0.0, max=1.0,
                      description="control_guidance_start: share of the steps before the net starts"),
            InputSpec(f"control_end{s}", "float", default=1.0, min=0.0, max=1.0,
                      description="control_guidance_end: share of the steps after which it stops"),
        ]
    return inputs


def _standard_inputs(cfg: bool, vae_scale: int, img2img: bool = False, distilled: bool = False,
                     controlnets: tuple[str, ...] = (), lora: bool = False) -> dict[str, InputSpec]:
    multiple = 2 * vae_scale  # Flux packs 2x2 latent patches; UNets need /8 at least
    inputs = [
        InputSpec("prompt", "str", required=True, max_length=8192, description="what to draw"),
        InputSpec("steps", "int", default=20, min=1, max=100, description="denoising steps"),
        InputSpec("width", "int", default=1024, min=64, max=2048, multiple_of=multiple),
        InputSpec("height", "int", default=1024, min=64, max=2048, multiple_of=multiple),
        InputSpec("seed", "int", default=None, min=0, max=MAX_SEED, description="random if absent"),
        InputSpec("sampler", "str", default="default", choices=SAMPLERS,
                  description="default: the scheduler the model ships with"),
        InputSpec("output", "str", default="image", choices=OUTPUTS,
                  description="image: decoded [height, width, 3] uint8; latents: the final latents, not decoded "
                              "(as a diffusers pipeline's output_type='latent')"),
    ]
    if cfg:
        inputs += [
            InputSpec("negative_prompt", "str", default="", max_length=8192),
            InputSpec("guidance", "float", default=7.0, min=1.0, max=30.0, description="CFG scale"),
        ]
    if distilled:
        inputs.append(InputSpec("guidance", "float", default=3.5, min=0.0, max=30.0,
                                description="guidance scale the denoiser embeds (FluxPipeline's guidance_scale)"))
    if img2img:
        inputs += [
            InputSpec("image", "image", required=True, description="uint8 [height, width, 3], sent as a tensor"),
            InputSpec("strength", "float", default=0.75, min=0.0, max=1.0,
                      description="how far to move from the image: steps x strength are run"),
        ]
    inputs += _control_inputs(controlnets)
    if lora:
        inputs.append(InputSpec("loras", "adapters", default=None,
                                description=f"LoRA adapters to apply: a list of up to {MAX_ADAPTERS} "
                                            f"{{name, weight}} (weight in [{ADAPTER_WEIGHT[0]}, {ADAPTER_WEIGHT[1]}], "
                                            "default 1.0), applied in this order"))
    return {i.name: i for i in inputs}


_INPUT_OVERRIDABLE = {"default", "min", "max", "choices", "description", "required"}
_MODEL_FIELDS = {"kind", "profile", "dtype", "seq_len", "embed_dim", "latent_channels", "vae_scale", "source", "subfolder",
                 "family", "config"}
_WORKFLOW_FIELDS = {"description", "text_encoders", "denoiser", "vae", "cfg", "img2img", "inputs", "controlnets", "slo_s",
                    "distilled_guidance", "lora"}
_ADAPTER_FIELDS = {"base", "source", "description", "load_s"}


def _parse_model(name: str, raw: dict) -> ModelSpec:
    if not isinstance(raw, dict):
        raise CatalogError(f"models.{name}", "must be a table of model settings")
    unknown = set(raw) - _MODEL_FIELDS
    if unknown:
        raise CatalogError(f"models.{name}.{sorted(unknown)[0]}", "unknown field")
    if raw.get("kind") not in MODEL_KINDS:
        raise CatalogError(f"models.{name}.kind", f"must be one of {MODEL_KINDS}")
    for key, value in raw.items():
        expected = type(getattr(ModelSpec, key, ""))  # every field has a typed default
        if key != "kind" and not (isinstance(value, expected) and not isinstance(value, bool)):
            raise CatalogError(f"models.{name}.{key}", f"must be {expected.__name__}, got {type(value).__name__}")
    return ModelSpec(name=name, **raw)


def _parse_workflow(name: str, raw: dict, models: dict[str, ModelSpec]) -> WorkflowSpec:
    if not isinstance(raw, dict):
        raise CatalogError(f"workflows.{name}", "must be a table of workflow settings")
    unknown = set(raw) - _WORKFLOW_FIELDS
    if unknown:
        raise CatalogError(f"workflows.{name}.{sorted(unknown)[0]}", "unknown field")
    roles = {"denoiser": "denoiser", "vae": "vae"}
    for role, kind in roles.items():
        model = raw.get(role)
        if model not in models or models[model].kind != kind:
            raise CatalogError(f"workflows.{name}.{role}", f"{model!r} is not a declared {kind} model")
    encoders = tuple(raw.get("text_encoders", ()))
    for i, enc in enumerate(encoders):
        if enc not in models or models[enc].kind != "text_encoder":
            raise CatalogError(f"workflows.{name}.text_encoders[{i}]", f"{enc!r} is not a declared text_encoder model")
    for i, enc in enumerate(encoders):
        if enc in encoders[:i]:
            raise CatalogError(f"workflows.{name}.text_encoders[{i}]", f"{enc!r} is listed twice")
    controlnets = _model_list(name, raw, "controlnets", "controlnet", models)
    slo_s = raw.get("slo_s", 0.0)
    if isinstance(slo_s, bool) or not isinstance(slo_s, (int, float)) or slo_s < 0:
        raise CatalogError(f"workflows.{name}.slo_s", f"must be a number of seconds >= 0, got {slo_s!r}")
    cfg = raw.get("cfg", False)
    if not isinstance(cfg, bool):
        raise CatalogError(f"workflows.{name}.cfg", f"must be true or false, got {cfg!r}")
    img2img = raw.get("img2img", False)
    if not isinstance(img2img, bool):
        raise CatalogError(f"workflows.{name}.img2img", f"must be true or false, got {img2img!r}")
    distilled = raw.get("distilled_guidance", False)
    if not isinstance(distilled, bool):
        raise CatalogError(f"workflows.{name}.distilled_guidance", f"must be true or false, got {distilled!r}")
    if distilled and cfg:
        raise CatalogError(f"workflows.{name}.distilled_guidance", "cannot be combined with cfg = true: "
                           "`guidance` would name two scales")
    lora = raw.get("lora", False)
    if not isinstance(lora, bool):
        raise CatalogError(f"workflows.{name}.lora", f"must be true or false, got {lora!r}")
    inputs = _standard_inputs(cfg, models[raw["denoiser"]].vae_scale, img2img, distilled, controlnets, lora)
    for input_name, override in raw.get("inputs", {}).items():
        if input_name not in inputs:
            raise CatalogError(f"workflows.{name}.inputs.{input_name}", "not an input of this workflow")
        if not isinstance(override, dict):
            raise CatalogError(f"workflows.{name}.inputs.{input_name}", "must be a table, e.g. { default = 4 }")
        bad = set(override) - _INPUT_OVERRIDABLE
        if bad:
            raise CatalogError(f"workflows.{name}.inputs.{input_name}.{sorted(bad)[0]}", "cannot be overridden")
        spec = inputs[input_name]
        if not isinstance(override.get("required", False), bool):
            raise CatalogError(f"workflows.{name}.inputs.{input_name}.required", "must be true or false")
        merged = {**spec.__dict__, **override}
        if merged.get("choices") is not None:
            merged["choices"] = tuple(merged["choices"])
        inputs[input_name] = InputSpec(**merged)
        if spec.default is not None or override.get("default") is not None:
            try:  # a default must itself pass validation
                _check_value(inputs[input_name], inputs[input_name].default)
            except ParamError as exc:
                raise CatalogError(f"workflows.{name}.inputs.{input_name}.default", exc.message) from None
    return WorkflowSpec(name, raw.get("description", ""), encoders, raw["denoiser"], raw["vae"], cfg, inputs, img2img,
                        models[raw["denoiser"]].family, controlnets, float(slo_s), distilled, lora)


def _model_list(workflow: str, raw: dict, role: str, kind: str, models: dict[str, ModelSpec]) -> tuple[str, ...]:
    names = raw.get(role, [])
    if not isinstance(names, list):
        raise CatalogError(f"workflows.{workflow}.{role}", f"must be a list of {kind} model names")
    for i, model in enumerate(names):
        if model not in models or models[model].kind != kind:
            raise CatalogError(f"workflows.{workflow}.{role}[{i}]", f"{model!r} is not a declared {kind} model")
        if model in names[:i]:
            raise CatalogError(f"workflows.{workflow}.{role}[{i}]", f"{model!r} is listed twice")
    return tuple(names)


def _parse_adapter(name: str, raw: dict, models: dict[str, ModelSpec]) -> AdapterSpec:
    where = f"adapters.{name}"
    if not isinstance(raw, dict):
        raise CatalogError(where, "must be a table of adapter settings")
    unknown = set(raw) - _ADAPTER_FIELDS
    if unknown:
        raise CatalogError(f"{where}.{sorted(unknown)[0]}", "unknown field")
    base = raw.get("base")
    if base not in models or models[base].kind != "denoiser":
        raise CatalogError(f"{where}.base", f"{base!r} is not a declared denoiser model")
    for key in ("source", "description"):
        if not isinstance(raw.get(key, ""), str):
            raise CatalogError(f"{where}.{key}", "must be a string")
    load_s = raw.get("load_s", 0.0)
    if isinstance(load_s, bool) or not isinstance(load_s, (int, float)) or load_s < 0:
        raise CatalogError(f"{where}.load_s", f"must be a number of seconds >= 0, got {load_s!r}")
    return AdapterSpec(name, base, raw.get("source", ""), raw.get("description", ""), float(load_s))


def parse_catalog(doc: dict, base: Catalog | None = None) -> Catalog:
    """Merge a parsed catalog document over `base` (same-named entries are replaced)."""
    catalog = Catalog(dict(base.models) if base else {}, dict(base.workflows) if base else {},
                      dict(base.adapters) if base else {})
    for name, raw in doc.get("models", {}).items():
        catalog.models[name] = _parse_model(name, raw)
    for name, raw in doc.get("workflows", {}).items():
        catalog.workflows[name] = _parse_workflow(name, raw, catalog.models)
    for name, raw in doc.get("adapters", {}).items():
        catalog.adapters[name] = _parse_adapter(name, raw, catalog.models)
    return catalog


def load_catalog(extra_files: list[str | Path] = (), builtin: bool = True) -> Catalog:
    catalog = Catalog()
    if builtin:
        text = resources.files("broker").joinpath("catalog/builtin.toml").read_text()
        catalog = parse_catalog(tomllib.loads(text))
    for path in extra_files:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise CatalogError(str(path), f"not valid TOML: {exc}") from None
        catalog = parse_catalog(doc, catalog)
    return catalog


# ---------------------------------------------------------------- validation


def _check_value(spec: InputSpec, value: Any) -> Any:
    expected = INPUT_TYPES[spec.type]
    if spec.type == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ParamError(spec.name, f"must be {spec.type}, got {type(value).__name__}")
    if spec.type == "float" and not math.isfinite(value):  # NaN passes every < and > check
        raise ParamError(spec.name, f"must be a finite number, got {value}")
    if spec.min is not None and value < spec.min:
        raise ParamError(spec.name, f"must be >= {spec.min}, got {value}")
    if spec.max is not None and value > spec.max:
        raise ParamError(spec.name, f"must be <= {spec.max}, got {value}")
    if spec.multiple_of and value % spec.multiple_of:
        raise ParamError(spec.name, f"must be a multiple of {spec.multiple_of}, got {value}")
    if spec.max_length is not None and len(value) > spec.max_length:
        raise ParamError(spec.name, f"must be at most {spec.max_length} characters, got {len(value)}")
    if spec.choices is not None and value not in spec.choices:
        raise ParamError(spec.name, f"must be one of {list(spec.choices)}, got {value!r}")
    return value


def check_adapters(value: Any, workflow: WorkflowSpec, registry: dict[str, AdapterSpec]) -> list[list]:
    """A request's `loras` as [[name, weight], ...] in its order, or ParamError naming the
    entry at fault. Each must be a registered adapter of the workflow's denoiser."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ParamError("loras", f"must be a list of {{name, weight}} maps, got {type(value).__name__}")
    if len(value) > MAX_ADAPTERS:
        raise ParamError("loras", f"at most {MAX_ADAPTERS} adapters per request, got {len(value)}")
    out, seen = [], set()
    for i, entry in enumerate(value):
        where = f"loras[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"name", "weight"}:
            raise ParamError(where, "must be a map with `name` and optionally `weight`")
        name, weight = entry.get("name"), entry.get("weight", 1.0)
        adapter = registry.get(name) if isinstance(name, str) else None
        if adapter is None or adapter.base != workflow.denoiser:
            known = sorted(a.name for a in registry.values() if a.base == workflow.denoiser)
            raise ParamError(f"{where}.name", f"unknown adapter {name!r} for {workflow.denoiser} (known: {known})")
        if name in seen:
            raise ParamError(f"{where}.name", f"adapter {name!r} is named twice")
        seen.add(name)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ParamError(f"{where}.weight", f"must be a number, got {weight!r}")
        if not ADAPTER_WEIGHT[0] <= weight <= ADAPTER_WEIGHT[1]:
            raise ParamError(f"{where}.weight", f"must be in [{ADAPTER_WEIGHT[0]}, {ADAPTER_WEIGHT[1]}], got {weight}")
        out.append([name, float(weight)])
    return out


def task_adapters(kind: str, params: dict) -> tuple | None:
    """The LoRA adapter set a task's model call runs with, as ((name, weight), ...):
    () for none; None for a task that calls no adapted model (it changes no actor's set)."""
    if kind not in ADAPTED_KINDS or params.get("split"):
        return None
    return tuple((name, weight) for name, weight in params.get("adapters", ()))


def validate_params(workflow: WorkflowSpec, params: dict, rng: random.Random | None = None,
                    adapters: dict[str, AdapterSpec] | None = None) -> dict:
    """The complete parameter set (defaults filled in) or ParamError naming the field.
    `adapters`: the catalog's LoRA registry, which a `loras` input is checked against."""
    if not isinstance(params, dict):
        raise ParamError("params", "must be a map of input name to value")
    for name in params:
        if name not in workflow.inputs:
            raise ParamError(str(name), f"is not an input of workflow {workflow.name!r} (inputs: {sorted(workflow.inputs)})")
    out = {}
    for name, spec in workflow.inputs.items():
        if spec.type == "image":
            if name in params:
                raise ParamError(name, "must be sent as a tensor, not as a parameter")
            continue  # checked against the request's tensors by check_image
        if spec.type == "adapters":
            out[name] = check_adapters(params.get(name), workflow, adapters or {})
            continue
        if name in params and params[name] is not None:
            out[name] = _check_value(spec, params[name])
        elif spec.required:
            raise ParamError(name, "is required")
        else:
            out[name] = spec.default
    if out.get("seed") is None:
        out["seed"] = (rng or random).randrange(0, 2**31)  # reported back so a result can be reproduced
    if "prompt" in out and not out["prompt"].strip():
        raise ParamError("prompt", "must not be empty")
    if workflow.img2img and img2img_runs(workflow.family, out["steps"], out["strength"]) < 1:
        raise ParamError("strength", f"steps x strength must be >= 1 (got {out['steps']} x {out['strength']})")
    for s in control_suffixes(len(workflow.controlnets)):
        if out[f"control_start{s}"] >= out[f"control_end{s}"]:
            raise ParamError(f"control_end{s}", f"must be greater than control_start{s} "
                             f"(got {out[f'control_start{s}']} .. {out[f'control_end{s}']})")
    return out


def img2img_runs(family: str, steps: int, strength: float) -> int:
    """How many of `steps` an img2img request runs, as its family's pipeline counts them."""
    if family in ("sd3", "flux"):  # get_timesteps keeps steps x strength as a float there
        return steps - int(max(steps - min(steps * strength, steps), 0))
    return min(int(steps * strength), steps)


def check_image(workflow: WorkflowSpec, params: dict, tensors: list) -> None:
    """The request's tensors are exactly image inputs of the workflow (each at most once,
    every required one present), each uint8 [height, width, 3] at the request's size."""
    images = {name: spec for name, spec in workflow.inputs.items() if spec.type == "image"}
    seen = set()
    for tensor in tensors:
        if tensor.name not in images:
            if not images:
                raise ParamError(f"tensors.{tensor.name}", f"workflow {workflow.name!r} takes no tensor inputs")
            raise ParamError(f"tensors.{tensor.name}", f"is not an image input of workflow {workflow.name!r} "
                             f"(image inputs: {sorted(images)})")
        if tensor.name in seen:
            raise ParamError(tensor.name, "is sent twice")
        seen.add(tensor.name)
        expected = [params["height"], params["width"], 3]
        if tensor.dtype != "uint8" or list(tensor.shape) != expected:
            raise ParamError(tensor.name, f"must be uint8 {expected} (height, width, RGB), "
                             f"got {tensor.dtype} {list(tensor.shape)}")
    for name, spec in images.items():
        if spec.required and name not in seen:
            raise ParamError(name, "is required, as a tensor input")


# ---------------------------------------------------------------- unrolling


def unroll_monolith(workflow: WorkflowSpec, params: dict, pipeline: str) -> list[NodePlan]:
    """The whole request as one node on a monolith (`pipeline`): no sharing, no
    decomposition; the baseline that micro-serving is measured against."""
    shape = (params["height"], params["width"])
    node = NodePlan("pipeline", "pipeline", pipeline, 1, shape, {**params, "workflow": workflow.name}, [], 1,
                    return_output=True)
    return [node]


def unroll(workflow: WorkflowSpec, params: dict, cfg_split: bool = False, tensors=None) -> list[NodePlan]:
    """The request's DAG, producers before consumers. `params` must be validated.

    `cfg_split` (CFG workflows): each step becomes two branch nodes, the unconditional
    and the conditional model call (one row each, meant for two actors), and a
    `denoise` node that combines them (guidance and the sampler update).

    ControlNets: a `control_image` node per net prepares its control image (on the
    net's actors: canny on the CPU, scaling, the CFG rows), then a `control` node per
    step in the net's [control_start, control_end) range, on the latent the step starts
    from; the step sums their residuals in the workflow's net order, as diffusers'
    MultiControlNetModel does. Outside its range a net has no node at all: the pipeline
    runs it with scale 0, which adds exact zeros. `tensors`: the names of the request's
    tensor inputs (None: the required ones), since an optional control image may be absent.
    """
    steps = params["steps"]
    shape = (params["height"], params["width"])
    rows = 2 if workflow.cfg else 1
    # img2img runs the last steps x strength steps of the schedule, from the noised image
    runs = img2img_runs(workflow.family, steps, params["strength"]) if workflow.img2img else steps
    first_step = steps - runs
    nodes = []
    for enc in workflow.text_encoders:
        prompt_params = {"prompt": params["prompt"]}
        if workflow.cfg:
            prompt_params["negative_prompt"] = params["negative_prompt"]
        if params.get("loras"):  # text-encoder LoRA, where the adapter has one
            prompt_params["adapters"] = params["loras"]
        nodes.append(NodePlan(f"encode/{enc}", "encode", enc, rows, shape, prompt_params, [], 0))
    previous = [n.key for n in nodes]
    image_nodes, controls = _control_plans(workflow, params, rows, shape, tensors)
    nodes += image_nodes
    if workflow.img2img:
        image_params = {"seed": params["seed"]}
        nodes.append(NodePlan("encode_image", "encode_image", workflow.vae, 1, shape, image_params, [], 0))
        previous.append("encode_image")
    for k in range(runs):
        # `step` indexes the scheduler's timesteps; `first` marks where the latents start
        step_params = {"step": first_step + k, "steps": steps, "first": k == 0, "seed": params["seed"],
                       "sampler": params["sampler"]}
        if workflow.cfg:
            step_params["guidance"] = params["guidance"]
        if workflow.distilled_guidance:
            step_params["distilled_guidance"] = params["guidance"]
        if workflow.img2img:
            step_params["begin_index"] = first_step
        if params.get("loras"):
            step_params["adapters"] = params["loras"]
        key = f"denoise/{k}"
        residuals = []
        for net, (start, end), image, scale, index in controls:  # on the latent this step starts from
            if k / runs < start or (k + 1) / runs > end:  # the pipeline's controlnet_keep = 0
                continue
            residuals.append(f"control/{net}/{k}")
            # `lead`: the workflow's first net, whose config the SD3 pipeline applies to all of its nets
            control_params = {**step_params, "scale": scale, "denoiser": workflow.denoiser, "vae": workflow.vae,
                              "index": index, "lead": workflow.controlnets[0]}
            control_params.pop("adapters", None)  # the base model's LoRA, not the net's
            nodes.append(NodePlan(residuals[-1], "control", net, rows, shape, control_params,
                                  previous + ([image] if image else []), 0, step=k))
        if k == 0 and workflow.family == "flux" and image_nodes:
            residuals.append("control_images")  # Flux draws its initial latents after the images' samples
        previous = previous + residuals
        if cfg_split and workflow.cfg:
            branches = [f"branch/{k}/{b}" for b in (0, 1)]  # 0: unconditional, 1: conditional
            for b, branch in enumerate(branches):
                nodes.append(NodePlan(branch, "denoise_branch", workflow.denoiser, 1, shape,
                                      {**step_params, "branch": b}, previous, 0, step=k, group=f"cfg/{k}"))
            step_params = {**step_params, "split": True}
            previous = branches + previous
        nodes.append(NodePlan(key, "denoise", workflow.denoiser, rows, shape, step_params, previous, 0, step=k))
        previous = [key]
    if params.get("output") == "latents":
        nodes[-1].return_output = True  # the last step's latents are the result
    else:
        nodes.append(NodePlan("decode", "decode", workflow.vae, 1, shape, {}, previous, 1, return_output=True))
    _set_path_lengths(nodes)
    return nodes


LATENT_CONTROL_FAMILIES = ("sd3", "flux")  # their ControlNets take the control image VAE-encoded


def _control_plans(workflow: WorkflowSpec, params: dict, rows: int, shape: tuple[int, int],
                   tensors) -> tuple[list[NodePlan], list[tuple]]:
    """The control-image nodes, and per ControlNet (net, (start, end), the key of the node
    holding its image or None, scale, the image's index in that node's output).

    SD 1.5 / SDXL nets take pixels: one node per net on the net's own actors. SD3 and Flux
    nets take the image VAE-encoded: one node on the workflow's VAE encodes every net's
    image in net order from one generator seeded with the request's seed (the pipelines
    draw those samples one after another: SD3 from torch's global generator, Flux from
    the request's own, which then draws the initial latents)."""
    nets, images = [], []
    latent = workflow.family in LATENT_CONTROL_FAMILIES
    for net, s in zip(workflow.controlnets, control_suffixes(len(workflow.controlnets)), strict=True):
        name = f"control_image{s}"
        present = workflow.inputs[name].required if tensors is None else name in tensors
        key, index = None, 0
        if present and latent:
            key, index = "control_images", len(images)
        elif present:
            key = f"control_image/{net}"
        if present:
            images.append((net, key, name, params[f"control_preprocess{s}"]))
        nets.append((net, (params[f"control_start{s}"], params[f"control_end{s}"]), key, params[f"control_scale{s}"],
                     index))
    if latent and images:
        node_params = {"tensors": [name for _, _, name, _ in images],
                       "preprocess": [pre for _, _, _, pre in images], "seed": params["seed"]}
        return [NodePlan("control_images", "control_image", workflow.vae, rows, shape, node_params, [], 0)], nets
    return [NodePlan(key, "control_image", net, rows, shape, {"tensors": [name], "preprocess": [pre]}, [], 0)
            for net, key, name, pre in images], nets


def _set_path_lengths(nodes: list[NodePlan]) -> None:
    """Each node's longest path to the output, counting itself (the output node: 1)."""
    longest = {}
    for node in reversed(nodes):  # consumers come after their producers
        longest.setdefault(node.key, 1)
        node.path_len = longest[node.key]
        for producer in node.inputs:
            longest[producer] = max(longest.get(producer, 1), node.path_len + 1)
