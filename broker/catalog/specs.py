"""The catalog's types: models, adapters, workflows, their declared inputs, node plans.

Shared by every process (the broker, actors, the scheduler and clients read them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.protocol.tasks import TaskKind, TaskParams

MODEL_KINDS = ("text_encoder", "denoiser", "vae", "controlnet")
INPUT_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
SAMPLERS = ("default", "ddim", "euler", "euler_a", "dpmpp_2m")
OUTPUTS = ("image", "latents")
CONTROL_PREPROCESSORS = ("none", "canny")
MAX_ADAPTERS = 8  # LoRA adapters in one request
ADAPTER_WEIGHT = (-2.0, 2.0)  # the range a request's adapter weight must lie in
# Task kinds whose model call applies the request's LoRA adapters (text encoders and the
# base model; a split step's combine runs no model, ControlNets and VAEs take none).
ADAPTED_KINDS = (TaskKind.ENCODE, TaskKind.DENOISE, TaskKind.DENOISE_BRANCH)


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
    kind: TaskKind
    model: str
    rows: int
    shape: tuple[int, int]
    params: TaskParams  # the struct of its kind (broker/protocol/tasks.py), as the task carries it
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


def control_suffixes(count: int) -> list[str]:
    """Input-name suffixes of a workflow's ControlNets: none for one net, `_1`..`_N` for several."""
    return [""] if count == 1 else [f"_{i}" for i in range(1, count + 1)]
