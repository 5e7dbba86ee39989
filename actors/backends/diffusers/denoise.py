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
    """Whether a batch can run as one model call: plain steps (no nets) of a family whose
    pipeline calls its model on all rows at once."""
    plain = not any(controlnet.is_control(b) for task_inputs in inputs for b in task_inputs)
    return (not model.family.calls_per_row and plain and len(tasks) > 1
            and all(t.kind == TaskKind.DENOISE for t in tasks))


def denoise_fused(model: ActorModel, tasks: list[TaskSpec], inputs: list[list[Bundle]]) -> list[Bundle]:
    """One model call for the whole batch (opt-in: `options.batching = "fused"`).

    Rows of all tasks are concatenated, each with its own timestep. Batched kernels
    do not round exactly as batch-1 calls do, so results differ from the pipeline's
    in the low bits (tests/test_diffusers.py measures by how much).
    """
    steps = [prepare_step(model, task, task_inputs, model.scheduler_config)
             for task, task_inputs in zip(tasks, inputs, strict=True)]
    model_input = torch.cat([s.model_input for s in steps])
    timesteps = torch.cat([s.t.reshape(1).expand(s.model_input.shape[0]) for s in steps]).to(model.device)
    embeds = torch.cat([s.embeds for s in steps])
    added = None
    if steps[0].added is not None:
        added = {k: torch.cat([s.added[k] for s in steps]) for k in steps[0].added}
    noise = call_model(model, model_input, timesteps, embeds, added)
    outputs, row = [], 0
    for task, step in zip(tasks, steps, strict=True):
        rows = step.model_input.shape[0]
        outputs.append(finish_step(task, step, noise[row: row + rows]))
        row += rows
    return outputs


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
    # FluxPipeline runs true CFG as two batch-1 calls (positive, negative), so one call
    # per row here gives the same bits; rows stay in [negative; positive] order.
    timestep = t.expand(model_input.shape[0]).to(model_input.dtype) / 1000
    rows = [transformer(hidden_states=model_input, timestep=timestep, guidance=added.get("guidance"),
                        pooled_projections=added["pooled_projections"][r: r + 1], encoder_hidden_states=embeds[r: r + 1],
                        txt_ids=added["txt_ids"], img_ids=added["img_ids"], joint_attention_kwargs={}, return_dict=False,
                        **extra)[0]
            for r in range(embeds.shape[0])]
    return torch.cat(rows)


MODEL_CALLS: dict[str, Callable[..., torch.Tensor]] = {UNET: _unet_call, SD3_DIT: _sd3_call, FLUX_DIT: _flux_call}
