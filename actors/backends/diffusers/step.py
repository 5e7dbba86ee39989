"""One denoising step between the blocks that share it: preparation and the sampler update.

Runs in an actor process. A base model's step, its CFG branches and its ControlNets all
prepare the step the same way (`prepare_step`): a fresh scheduler of the requested
sampler from the base model's scheduler config, `set_timesteps(steps)`, the sampler state
restored from the input bundle, the scaled model input. Step 0 first draws the initial
latents from a CPU generator seeded with the request's seed (img2img: noises the encoded
image). The sampler state travels with the latent as tensors (`state/...`): the
generator's state (ancestral samplers draw noise from the pipeline's one generator at
every step) and, for multistep solvers, the previous model outputs. So any actor of the
model can take any step.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from actors.backends.diffusers.conditioning import added_conditioning, conditioning
from actors.backends.diffusers.loading import ActorModel
from actors.store import Bundle
from broker.protocol.messages import TaskSpec
from broker.protocol.tasks import StepParams

SAMPLERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


@dataclass
class Step:
    """One step's state between its preparation and its sampler update."""

    scheduler: Any
    generator: torch.Generator
    cond: Bundle
    latents: torch.Tensor
    t: torch.Tensor
    model_input: torch.Tensor
    embeds: torch.Tensor
    added: dict | None


def packed_size(model: ActorModel, shape: list) -> tuple[int, int] | None:
    """Flux's latent height and width (2x2-packed into (h/2) x (w/2) tokens); None elsewhere."""
    if not model.family.packed_latents:
        return None
    height, width = shape
    scale = model.spec.vae_scale * 2
    return 2 * (height // scale), 2 * (width // scale)


# A scheduler as `make_scheduler` builds it, before any step: (config, sampler, steps,
# packed size, device) -> (the config, the scheduler). Building one (from_config and
# set_timesteps) costs about 0.5-1.2 ms of CPU per step; a deep copy of a never-stepped
# one is the same object for 0.1-0.4 ms (measured on the 2-core dev VM, 2026-12-07).
# Keyed by the config's identity; the entry keeps the config alive so that the id
# cannot be reused. Bounded: a few samplers x step counts x sizes per actor.
_TEMPLATES: dict[tuple, tuple[Any, Any]] = {}
MAX_TEMPLATES = 256


def make_scheduler(model: ActorModel, config: Any, sampler: str, steps: int, packed: tuple[int, int] | None):
    """A fresh scheduler of the sampler for `steps` (a copy of a cached, never-stepped one)."""
    key = (id(config), sampler, steps, packed, str(model.device))
    entry = _TEMPLATES.get(key)
    if entry is None or entry[0] is not config:
        if len(_TEMPLATES) >= MAX_TEMPLATES:
            _TEMPLATES.clear()
        entry = _TEMPLATES[key] = (config, _build_scheduler(model, config, sampler, steps, packed))
    return copy.deepcopy(entry[1])


def _build_scheduler(model: ActorModel, config: Any, sampler: str, steps: int, packed: tuple[int, int] | None):
    import diffusers

    name = SAMPLERS.get(sampler) or config["_class_name"]
    scheduler = getattr(diffusers, name).from_config(config)
    if packed is None:
        scheduler.set_timesteps(steps, device=model.device)
        return scheduler
    # Flux: explicit sigmas, shifted by the image's token count (as FluxPipeline does)
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    mu = calculate_shift((packed[0] // 2) * (packed[1] // 2), c.get("base_image_seq_len", 256),
                         c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=model.device, mu=mu)
    return scheduler


def prepare_step(model: ActorModel, task: TaskSpec, inputs: list[Bundle], scheduler_config: Any,
                 start_state: torch.Tensor | None = None) -> Step:
    """Everything up to the model call. `scheduler_config`: the base model's. `start_state`:
    where step 0's generator starts instead of the seed (Flux ControlNets: the control
    images drew from it first)."""
    params: StepParams = task.params
    packed = packed_size(model, task.shape)
    scheduler = make_scheduler(model, scheduler_config, params.sampler, params.steps, packed)
    if params.begin_index is not None and hasattr(scheduler, "set_begin_index"):
        # img2img: the pipeline sets the schedule's start; a fresh scheduler at step k
        # must index timestep k, which `begin_index` = k gives it.
        scheduler.set_begin_index(params.step)
    generator = torch.Generator(device="cpu")
    if params.first:
        image = next((b for b in inputs if "init_latents" in b), None)
        cond = conditioning(model, task, [b for b in inputs if b is not image])
        latents = _initial_latents(model, task, scheduler, generator, image, cond["cond/embeds"].dtype, packed,
                                   start_state)
    else:
        (previous,) = inputs
        cond = {k: v for k, v in previous.items() if k.startswith("cond/")}
        latents = previous["latents"]
        generator.set_state(previous["state/generator"].contiguous())
        _restore_multistep(scheduler, previous)
    added = added_conditioning(model, params, cond, packed)
    latents = latents.to(model.device)
    t = scheduler.timesteps[params.step]
    # CFG: one batch-2 model call on [latents; latents], unless the family calls once per row
    model_input = torch.cat([latents] * 2) if task.rows == 2 and not model.family.calls_per_row else latents
    if hasattr(scheduler, "scale_model_input"):  # flow-matching schedulers have none
        model_input = scheduler.scale_model_input(model_input, t)
    return Step(scheduler, generator, cond, latents, t, model_input, cond["cond/embeds"].to(model.device), added)


def _initial_latents(model: ActorModel, task: TaskSpec, scheduler, generator: torch.Generator, image: Bundle | None,
                     dtype: torch.dtype, packed: tuple[int, int] | None, start_state: torch.Tensor | None):
    from diffusers.utils.torch_utils import randn_tensor

    params: StepParams = task.params
    channels = model.component.config.in_channels
    if image is None and packed is not None:  # noise, then packed as FluxPipeline does
        if start_state is not None:
            generator.set_state(start_state.contiguous())
        else:
            generator.manual_seed(params.seed)
        latents = randn_tensor((1, channels // 4, *packed), generator=generator, device=model.device, dtype=dtype)
        return pack_latents(latents, packed)
    if image is None:  # txt2img: pure noise from the request's seed
        generator.manual_seed(params.seed)
        scale = model.spec.vae_scale
        shape = (1, channels, task.shape[0] // scale, task.shape[1] // scale)
        latents = randn_tensor(shape, generator=generator, device=model.device, dtype=dtype)
        if hasattr(scheduler, "init_noise_sigma"):  # flow matching starts from unit noise as is
            latents = latents * scheduler.init_noise_sigma
        return latents
    # img2img: the encoded image, noised to the first timestep run
    generator.set_state(image["state/generator"].contiguous())
    init = image["init_latents"].to(model.device, dtype)
    noise = randn_tensor(init.shape, generator=generator, device=model.device, dtype=dtype)
    start = scheduler.timesteps[params.step: params.step + 1]
    if hasattr(scheduler, "scale_noise"):  # flow matching interpolates instead
        latents = scheduler.scale_noise(init, start, noise)
    else:
        latents = scheduler.add_noise(init, noise, start)
    return latents if packed is None else pack_latents(latents, packed)


def pack_latents(latents: torch.Tensor, packed: tuple[int, int]) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._pack_latents(latents, 1, latents.shape[1], *packed)


def finish_step(task: TaskSpec, step: Step, noise: torch.Tensor) -> Bundle:
    """Guidance and the sampler update; the output bundle carries the sampler state."""
    if task.rows == 2:
        uncond, text = noise.chunk(2)
        noise = uncond + task.params.guidance * (text - uncond)
    scheduler = step.scheduler
    latents = scheduler.step(noise, step.t, step.latents, **_step_kwargs(scheduler, step.generator), return_dict=False)[0]
    return {"latents": latents, **step.cond, "state/generator": step.generator.get_state(), **_save_multistep(scheduler)}


def _step_kwargs(scheduler, generator: torch.Generator) -> dict:
    """What the pipeline's `prepare_extra_step_kwargs` passes: eta=0 and its generator."""
    takes_eta, takes_generator = _step_accepts(type(scheduler))
    kwargs = {}
    if takes_eta:
        kwargs["eta"] = 0.0
    if takes_generator:
        kwargs["generator"] = generator
    return kwargs


@functools.cache
def _step_accepts(scheduler_class: type) -> tuple[bool, bool]:
    """Whether a scheduler class's `step` takes `eta`, `generator` (read once per class)."""
    accepted = inspect.signature(scheduler_class.step).parameters
    return "eta" in accepted, "generator" in accepted


def _save_multistep(scheduler) -> Bundle:
    """A multistep solver's memory of earlier steps, as tensors that travel with the latent."""
    if not hasattr(scheduler, "model_outputs"):
        return {}
    state = {"state/lower_order_nums": torch.tensor([scheduler.lower_order_nums], dtype=torch.int64)}
    for i, output in enumerate(scheduler.model_outputs):
        if output is not None:
            state[f"state/model_output/{i}"] = output
    return state


def _restore_multistep(scheduler, previous: Bundle) -> None:
    if not hasattr(scheduler, "model_outputs") or "state/lower_order_nums" not in previous:
        return
    scheduler.lower_order_nums = int(previous["state/lower_order_nums"][0])
    for i in range(len(scheduler.model_outputs)):
        scheduler.model_outputs[i] = previous.get(f"state/model_output/{i}")


def control_start_state(inputs: list[Bundle]) -> torch.Tensor | None:
    """The generator state the control images left (Flux draws its latents after them)."""
    return next((b["control/generator"] for b in inputs if "control/generator" in b), None)
