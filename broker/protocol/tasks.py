"""Node task kinds and the typed parameters of each: what `TaskSpec.params` carries.

`unroll` (broker/catalog/unroll.py) builds one of these structs per node, the broker
passes it through, and an actor's decoder turns the params map back into the struct of
the task's kind (`TaskSpec.params`, declared `by_kind("kind", TASK_PARAMS)`), checking
each field's type and naming it (`params.<field>`) when it is wrong. So a backend reads
attributes and never re-defaults or re-checks what the decoder guarantees.

On the wire each struct is the msgpack map it always was: fields at their defaults are
left out (`omit_defaults`), which is how the map said "no CFG", "no LoRA" or "not a
split step" before there were structs. Unknown keys are ignored; new fields must be
optional. A monolith's `pipeline` task is the exception: its map is the request's own
parameters (whatever its workflow declares) plus `workflow`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

from broker.protocol.constants import MAX_SEED
from broker.protocol.errors import ErrorCode, ProtocolError
from broker.protocol.structs import Struct, bounded, struct

__all__ = [
    "TaskKind",
    "TaskParams",
    "EncodeParams",
    "EncodeImageParams",
    "ControlImageParams",
    "ControlParams",
    "DenoiseParams",
    "DenoiseBranchParams",
    "DecodeParams",
    "PipelineParams",
    "StepParams",
    "TASK_PARAMS",
]


class TaskKind(str, enum.Enum):
    """A node task's kind (`TaskSpec.kind`, `NodePlan.kind`); the value is what the wire carries."""

    ENCODE = "encode"  # a text encoder on the prompt (and, with CFG, the negative prompt)
    ENCODE_IMAGE = "encode_image"  # img2img: the client's image through the VAE encoder
    CONTROL_IMAGE = "control_image"  # a ControlNet's control image(s), prepared once per request
    CONTROL = "control"  # one ControlNet forward for one step
    DENOISE = "denoise"  # one step: the base model call (unless split) and the sampler update
    DENOISE_BRANCH = "denoise_branch"  # one CFG branch's model call of a split step
    DECODE = "decode"  # the VAE decoder: latents to a uint8 image
    PIPELINE = "pipeline"  # a whole request on a monolith (the baseline)

    # Logs, f-strings and node keys show the wire value, as a plain string would
    # (what enum.StrEnum does from Python 3.11).
    __str__ = str.__str__

    __format__ = str.__format__


# Kinds whose tasks never read their inputs' request constants (the step conditioning,
# REQUEST_CONSTANT_PREFIX): the VAE decodes the latents alone, so its fetch leaves the
# conditioning out (`Fetch.constants`).
KINDS_WITHOUT_CONSTANTS = frozenset({TaskKind.DECODE})


class TaskParams(Struct):
    """Base of the per-kind parameter structs."""

    __slots__ = ()
    KIND: ClassVar[TaskKind]

    @property
    def calls_model(self) -> bool:
        """Whether the task calls its model (a split step's combine does not: its branches did)."""
        return True

    def request_tensors(self) -> tuple[str, ...]:
        """The request's tensor inputs (client images) the task takes, by input name."""
        return ()


def _check_adapters(adapters: list, where: str) -> None:
    """A LoRA set is [[name, weight], ...] (the validated `loras` input)."""
    for i, entry in enumerate(adapters):
        if (entry.__class__ not in (list, tuple) or len(entry) != 2 or entry[0].__class__ is not str
                or entry[1].__class__ not in (int, float)):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"adapters[{i}] must be [name, weight], got {entry!r}",
                                f"{where}adapters[{i}]")


@struct(omit_defaults=True)
class EncodeParams(TaskParams):
    KIND: ClassVar[TaskKind] = TaskKind.ENCODE
    prompt: str
    negative_prompt: str | None = None  # CFG workflows: encoded as the unconditional row
    # The request's LoRA set: [[name, weight], ...]; () when it has none, shared rather than
    # a fresh list per decoded task (an actor decodes thousands a second).
    adapters: list = ()

    def check(self, where: str) -> None:
        _check_adapters(self.adapters, where)


@struct(omit_defaults=True)
class EncodeImageParams(TaskParams):
    KIND: ClassVar[TaskKind] = TaskKind.ENCODE_IMAGE
    seed: int = bounded(0, MAX_SEED)  # the VAE's latent sample draws from a generator seeded with it

    def request_tensors(self) -> tuple[str, ...]:
        return ("image",)  # img2img's image input


@struct(omit_defaults=True)
class ControlImageParams(TaskParams):
    KIND: ClassVar[TaskKind] = TaskKind.CONTROL_IMAGE
    tensors: list  # the request's control image inputs, in the workflow's net order
    preprocess: list  # per image: none | canny
    seed: int | None = bounded(0, MAX_SEED, default=None)  # SD3/Flux: VAE-encoded, sampled from this seed

    def check(self, where: str) -> None:
        for name in ("tensors", "preprocess"):
            if any(v.__class__ is not str for v in getattr(self, name)):
                raise ProtocolError(ErrorCode.BAD_HEADER, f"{name} must be a list of strings", where + name)
        if len(self.tensors) != len(self.preprocess) or not self.tensors:
            raise ProtocolError(ErrorCode.BAD_HEADER, "needs one preprocess entry per tensor", where + "preprocess")

    def request_tensors(self) -> tuple[str, ...]:
        return tuple(self.tensors)


@struct(omit_defaults=True)
class StepParams(TaskParams):
    """What every task of one denoising step prepares the step from (a base model's step,
    its CFG branches, its ControlNets): any actor of the model can take any step."""

    step: int  # index into the scheduler's timesteps
    steps: int
    first: bool  # the step the latents start at (img2img: not timestep 0)
    seed: int = bounded(0, MAX_SEED)
    sampler: str  # default | ddim | euler | euler_a | dpmpp_2m
    guidance: float | None = None  # the CFG scale (CFG workflows only)
    distilled_guidance: float | None = None  # a guidance-distilled model's embedded scale (FLUX.1-dev)
    begin_index: int | None = None  # img2img: the schedule's first step run


@struct(omit_defaults=True)
class DenoiseParams(StepParams):
    KIND: ClassVar[TaskKind] = TaskKind.DENOISE
    adapters: list = ()  # as EncodeParams.adapters
    split: bool = False  # CFG split: the branch tasks ran the model; only guidance and the update remain

    def check(self, where: str) -> None:
        _check_adapters(self.adapters, where)

    @property
    def calls_model(self) -> bool:
        return not self.split


@struct(omit_defaults=True)
class DenoiseBranchParams(StepParams):
    KIND: ClassVar[TaskKind] = TaskKind.DENOISE_BRANCH
    adapters: list = ()  # as EncodeParams.adapters
    branch: int = field(kw_only=True)  # 0: unconditional row, 1: conditional

    def check(self, where: str) -> None:
        _check_adapters(self.adapters, where)
        if self.branch not in (0, 1):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"branch must be 0 or 1, got {self.branch}", where + "branch")


@struct(omit_defaults=True)
class ControlParams(StepParams):
    KIND: ClassVar[TaskKind] = TaskKind.CONTROL
    scale: float = field(kw_only=True)  # the net's conditioning scale
    denoiser: str = field(kw_only=True)  # the base model: its scheduler prepares the step
    vae: str = field(kw_only=True)  # SD3/Flux: its shift and scaling apply to the encoded image
    index: int = field(kw_only=True)  # the image's index in the control-image node's output
    lead: str = field(kw_only=True)  # the workflow's first net (SD3 applies its config to all)


@struct(omit_defaults=True)
class DecodeParams(TaskParams):
    KIND: ClassVar[TaskKind] = TaskKind.DECODE


@dataclass(slots=True)
class PipelineParams(TaskParams):
    """A monolith's whole request: its map is the request's validated parameters plus
    `workflow`, so it is coded by hand rather than by `@struct`."""

    KIND: ClassVar[TaskKind] = TaskKind.PIPELINE
    workflow: str
    request: dict  # the request's parameters, as its workflow declares them

    def to_wire(self) -> dict[str, Any]:
        return {**self.request, "workflow": self.workflow}

    @classmethod
    def from_wire(cls, data: Any, where: str = "") -> PipelineParams:
        if data.__class__ is not dict:
            raise ProtocolError(ErrorCode.BAD_HEADER, "PipelineParams must be a map", where.rstrip(".") or None)
        workflow = data.get("workflow")
        if workflow.__class__ is not str:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"PipelineParams.workflow has type {type(workflow).__name__}",
                                where + "workflow")
        return cls(workflow, {k: v for k, v in data.items() if k != "workflow"})


TASK_PARAMS: dict[TaskKind, type[TaskParams]] = {
    cls.KIND: cls for cls in (EncodeParams, EncodeImageParams, ControlImageParams, ControlParams, DenoiseParams,
                              DenoiseBranchParams, DecodeParams, PipelineParams)
}
if set(TASK_PARAMS) != set(TaskKind):  # a programming error, caught at import
    raise RuntimeError("every task kind needs exactly one params struct")
