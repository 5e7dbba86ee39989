"""A request's parameters checked against its workflow's declared inputs.

Runs in the broker at submit (and in clients that validate offline); errors name the
field (`ParamError.field`).
"""

from __future__ import annotations

import math
import random
from typing import Any

from broker.catalog.specs import (
    ADAPTED_KINDS,
    ADAPTER_WEIGHT,
    INPUT_TYPES,
    MAX_ADAPTERS,
    AdapterSpec,
    InputSpec,
    ParamError,
    WorkflowSpec,
    control_suffixes,
)
from broker.protocol.tasks import TaskParams


def check_value(spec: InputSpec, value: Any) -> Any:
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


def task_adapters(kind: str, params: TaskParams) -> tuple | None:
    """The LoRA adapter set a task's model call runs with, as ((name, weight), ...):
    () for none; None for a task that calls no adapted model (it changes no actor's set)."""
    if kind not in ADAPTED_KINDS or not params.calls_model:
        return None
    adapters = params.adapters
    return tuple((name, weight) for name, weight in adapters) if adapters else ()


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
            out[name] = check_value(spec, params[name])
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
