"""The base model's blocks: a denoising step, one CFG branch of a split step, a fused batch.

Runs in an actor process. A step is one iteration of the family's pipeline loop
(actors/backends/diffusers/step.py prepares it and applies guidance and the sampler
update); the model call itself is the one place the architectures differ, one function
each in `MODEL_CALLS`, with the step's summed ControlNet residuals when it has nets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from actors.backends import controlnet
from actors.backends.diffusers.family import FLUX_DIT, SD3_DIT, UNET
from actors.backends.diffusers.loading import ActorModel
from actors.backends.diffusers.step import control_start_state, finish_step, prepare_step
from actors.store import Bundle
from broker.protocol.messages import TaskSpec
from broker.protocol.tasks import DenoiseBranchParams, DenoiseParams, TaskKind

ROW_KEYS = ("text_embeds", "time_ids", "pooled_projections")  # added conditioning with one row per CFG branch
SHARED_KEYS = ("txt_ids", "img_ids")  # Flux: ids per token position, one tensor for every row of a call


class DenoiseBlock:
    """One step: the model call and the sampler update, or (a split step) only the update."""

    kind = TaskKind.DENOISE
    components = ("denoiser",)
    params = DenoiseParams

    def __call__(self, model: ActorModel, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        if task.params.split:
            # CFG split: the two branches' model outputs were computed by branch tasks
            # (maybe on other actors); only guidance and the sampler update remain.
            uncond, cond, *previous = inputs
            step = prepare_step(model, task, [b for b in previous if not controlnet.is_control(b)],
                                model.scheduler_config, control_start_state(previous))
            return finish_step(task, step, torch.cat([uncond["noise"], cond["noise"]]))
        controls = [b for b in inputs if controlnet.is_control(b) and "control/generator" not in b]
        step = prepare_step(model, task, [b for b in inputs if not controlnet.is_control(b)], model.scheduler_config,
                            control_start_state(inputs))
        noise = call_model(model, step.model_input, step.t, step.embeds, step.added,
                           controlnet.summed_residuals(controls))
        return finish_step(task, step, noise)


class DenoiseBranchBlock:
    """One CFG branch of a step: the model call on row `branch` (0 uncond, 1 cond) alone.

    A batch-1 call does not round exactly as the pipeline's batch-2 call does; the
    difference is measured in tests/test_diffusers.py.
    """

    kind = TaskKind.DENOISE_BRANCH
    components = ("denoiser",)
    params = DenoiseBranchParams

    def __call__(self, model: ActorModel, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        b = task.params.branch
        controls = [x for x in inputs if controlnet.is_control(x) and "control/generator" not in x]
        step = prepare_step(model, task, [x for x in inputs if not controlnet.is_control(x)], model.scheduler_config,
                            control_start_state(inputs))  # rows == 1: the scaled latents, once
        added = None if step.added is None else {k: v[b: b + 1] if k in ROW_KEYS else v for k, v in step.added.items()}
        residuals = controlnet.summed_residuals(controls, slice(b, b + 1))
        return {"noise": call_model(model, step.model_input, step.t, step.embeds[b: b + 1], added, residuals)}


def fusable(model: ActorModel, tasks: list[TaskSpec], inputs: list[list[Bundle]]) -> bool:
    """Whether a batch can run as one model call: more than one task (a batch of one is
    always the pipeline's own computation), plain steps (no ControlNet residuals), and rows
    the family's pipeline would give its model in one call. SD 1.5, SDXL and SD3 call it
    on all rows at once (CFG as one batch-2 call), so any mix of CFG and not fuses. Flux
    calls its transformer on a whole prompt batch at once only without true CFG, so its
    tasks fuse when each has one row; a true-CFG task (two rows, two batch-1 calls in
    FluxPipeline) keeps the batch per row.

    ControlNet steps stay unfused: their residuals come from other actors, one set per
    task, and tasks of one batch may name different nets, scales and guidance windows
    (SD 1.5 and SDXL residuals cover both CFG rows, Flux's the positive row only), so one
    call would first need every task's residuals in one layout."""
    if len(tasks) < 2 or any(t.kind != TaskKind.DENOISE or t.params.split for t in tasks):
        return False
    if any(controlnet.is_control(b) for task_inputs in inputs for b in task_inputs):
        return False
    return not model.family.calls_per_row or all(t.rows == 1 for t in tasks)


def denoise_fused(model: ActorModel, tasks: list[TaskSpec], inputs: list[list[Bundle]]) -> list[Bundle]:
    """One model call for the whole batch (`options.batching = "fused"`, the default).

    Rows of all tasks are concatenated, each with its own timestep and conditioning;
    tensors per position rather than per row (Flux's text and image ids) are shared.
    Batched kernels do not round exactly as batch-1 calls do, so results differ from the
    pipeline's in the low bits (tests/test_fused_batching.py bounds by how much, per
    family). Steps whose tensors cannot be stacked (sequences of different lengths) run
    one call each, as `exact` does.
    """
    steps = [prepare_step(model, task, task_inputs, model.scheduler_config)
             for task, task_inputs in zip(tasks, inputs, strict=True)]
    if not _stackable(steps):
        noises = [call_model(model, s.model_input, s.t, s.embeds, s.added) for s in steps]
        return [finish_step(task, s, n) for task, s, n in zip(tasks, steps, noises, strict=True)]
    model_input = torch.cat([s.model_input for s in steps])
    timesteps = torch.cat([s.t.reshape(1).expand(s.model_input.shape[0]) for s in steps]).to(model.device)
    embeds = torch.cat([s.embeds for s in steps])
    added = None
    if steps[0].added is not None:
        added = {k: v if k in SHARED_KEYS else torch.cat([s.added[k] for s in steps])
                 for k, v in steps[0].added.items()}
    noise = call_model(model, model_input, timesteps, embeds, added)
    outputs, row = [], 0
    for task, step in zip(tasks, steps, strict=True):
        rows = step.model_input.shape[0]
        outputs.append(finish_step(task, step, noise[row: row + rows]))
        row += rows
    return outputs


def _stackable(steps: list) -> bool:
    """Whether the steps' model inputs concatenate into one call: every row tensor alike
    past its first dimension, every shared tensor equal."""
    first = steps[0]
    for step in steps[1:]:
        if (step.model_input.shape[1:] != first.model_input.shape[1:] or step.embeds.shape[1:] != first.embeds.shape[1:]
                or (step.added is None) != (first.added is None)):
            return False
        if first.added is None:
            continue
        if step.added.keys() != first.added.keys():
            return False
        for key, value in first.added.items():
            other = step.added[key]
            if key in SHARED_KEYS and not torch.equal(other, value):
                return False
            if key not in SHARED_KEYS and other.shape[1:] != value.shape[1:]:
                return False
    return True


def call_model(model: ActorModel, model_input: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
               added: dict | None, residuals: dict | None = None) -> torch.Tensor:
    """The base model's forward, as the family's pipeline calls it (with the summed
    ControlNet residuals of the step, if any)."""
    return MODEL_CALLS[model.family.arch](model.component, model_input, t, embeds, added, dict(residuals or {}))


def _unet_call(unet, model_input, t, embeds, added, residuals) -> torch.Tensor:
    return unet(model_input, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False,
                **residuals)[0]


def _sd3_call(transformer, model_input, t, embeds, added, residuals) -> torch.Tensor:
    # a DiT: per-row timesteps, pooled projections
    timestep = t.expand(model_input.shape[0]) if t.dim() == 0 else t
    extra = {"block_controlnet_hidden_states": residuals["blocks"]} if residuals else {}
    return transformer(hidden_states=model_input, timestep=timestep, encoder_hidden_states=embeds,
                       pooled_projections=added["pooled_projections"], return_dict=False, **extra)[0]


def _flux_call(transformer, model_input, t, embeds, added, residuals) -> torch.Tensor:
    extra = {}
    if residuals:
        extra = {"controlnet_block_samples": residuals["blocks"],
                 "controlnet_single_block_samples": residuals["singles"], "controlnet_blocks_repeat": False}
    timestep = t.expand(model_input.shape[0]).to(model_input.dtype) / 1000

    def call(hidden, step, pooled, sequence):
        return transformer(hidden_states=hidden, timestep=step, guidance=added.get("guidance"), pooled_projections=pooled,
                           encoder_hidden_states=sequence, txt_ids=added["txt_ids"], img_ids=added["img_ids"],
                           joint_attention_kwargs={}, return_dict=False, **extra)[0]

    if model_input.shape[0] == embeds.shape[0]:
        # A latent row per prompt row: FluxPipeline's one call on its prompt batch (a
        # request without true CFG, or a fused batch of such requests, per-row timesteps).
        return call(model_input, timestep, added["pooled_projections"], embeds)
    # True CFG: FluxPipeline runs it as two batch-1 calls (positive, negative) on the one
    # latent, so one call per row here gives the same bits; rows stay in [negative; positive] order.
    return torch.cat([call(model_input, timestep, added["pooled_projections"][r: r + 1], embeds[r: r + 1])
                      for r in range(embeds.shape[0])])


MODEL_CALLS: dict[str, Callable[..., torch.Tensor]] = {UNET: _unet_call, SD3_DIT: _sd3_call, FLUX_DIT: _flux_call}
