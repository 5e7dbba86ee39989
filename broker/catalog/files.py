"""Catalog files: the built-in TOML and an operator's own, parsed into a `Catalog`.

Errors name the dotted key at fault (`CatalogError.field`).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib
from broker.catalog.params import check_value
from broker.catalog.specs import (
    ADAPTER_WEIGHT,
    CONTROL_PREPROCESSORS,
    MAX_ADAPTERS,
    MODEL_KINDS,
    OUTPUTS,
    SAMPLERS,
    AdapterSpec,
    Catalog,
    CatalogError,
    InputSpec,
    ModelSpec,
    ParamError,
    WorkflowSpec,
    control_suffixes,
)
from broker.protocol.constants import MAX_SEED


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
                check_value(inputs[input_name], inputs[input_name].default)
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
