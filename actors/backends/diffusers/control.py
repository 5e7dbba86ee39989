"""The ControlNet blocks: control images, and a net's forward for one step.

Runs in an actor process; computes what the diffusers ControlNet pipelines compute
(actors/backends/controlnet.py holds the pure parts: canny, image preparation, residual
sums; docs/architecture.md, "ControlNets and LoRA"). A net's step is prepared exactly as
its base model prepares it (step.py, with the base model's scheduler config read through
the actor's catalog), so the task can run on any actor and device. The architectures'
net calls differ: one function each in `CONTROL_CALLS`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from actors.backends import controlnet
from actors.backends.diffusers.family import FLUX_DIT, SD3_DIT, UNET
from actors.backends.diffusers.loading import ActorModel
from actors.backends.diffusers.step import Step, control_start_state, prepare_step
from actors.store import Bundle
from broker.protocol.messages import TaskSpec
from broker.protocol.tasks import ControlImageParams, ControlParams, TaskKind


class ControlImageBlock:
    """Control images for one request: on a ControlNet actor, one net's image in pixels;
    on a VAE actor (SD3, Flux), every net's image encoded, in net order, from one
    generator seeded with the request's seed."""

    kind = TaskKind.CONTROL_IMAGE
    components = ("controlnet", "vae")
    params = ControlImageParams

    def __call__(self, model: ActorModel, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        params: ControlImageParams = task.params
        (client,) = inputs
        missing = [name for name in params.tensors if name not in client]
        if missing:
            raise ValueError(f"{missing[0]}: the request carries no such tensor")
        if model.spec.kind != "vae":
            image = controlnet.prepare_control_image(client[params.tensors[0]], params.preprocess[0], task.rows,
                                                     model.dtype, model.device)
            return {"control/image": image}
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        rows = 1 if model.family.calls_per_row else task.rows  # Flux's net sees the positive prompt only
        out = {}
        for i, (name, pre) in enumerate(zip(params.tensors, params.preprocess, strict=True)):
            pixels = controlnet.prepare_control_image(client[name], pre, rows, model.dtype, model.device)
            # VaeImageProcessor.preprocess normalises to [-1, 1] for these pipelines
            out[f"control/image/{i}"] = model.component.encode(2.0 * pixels - 1.0).latent_dist.sample(generator)
        out["control/generator"] = generator.get_state()  # Flux draws its initial latents after these
        return out


class ControlBlock:
    """One ControlNet forward for one step: the step prepared as its base model prepares
    it (same scheduler, same latents), then the net on the control image."""

    kind = TaskKind.CONTROL
    components = ("controlnet",)
    params = ControlParams

    def __call__(self, model: ActorModel, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        images = [b for b in inputs if "control/image" in b or "control/generator" in b]
        if not images:
            raise ValueError(f"{task.node}: no control image: the request must send the workflow's control_image input")
        scheduler_config = model.configs.scheduler_of(task.params.denoiser)
        step = prepare_step(model, task, [b for b in inputs if not controlnet.is_control(b)], scheduler_config,
                            control_start_state(inputs))
        return CONTROL_CALLS[model.family.arch](model, task.params, step, images[0])


def _unet_control(model: ActorModel, params: ControlParams, step: Step, images: Bundle) -> Bundle:
    image = images["control/image"].to(model.device)
    kwargs = {}
    if step.added is not None and "time_ids" in step.added:  # SDXL: the same added conditioning
        kwargs["added_cond_kwargs"] = step.added
    down, mid = model.component(step.model_input, step.t, encoder_hidden_states=step.embeds, controlnet_cond=image,
                                conditioning_scale=float(params.scale), guess_mode=False, return_dict=False, **kwargs)
    return controlnet.residual_bundle(tuple(down), mid)


def _sd3_control(model: ActorModel, params: ControlParams, step: Step, images: Bundle) -> Bundle:
    """StableDiffusion3ControlNetPipeline's net call: the VAE-encoded image shifted and
    scaled (no shift for nets that zero the pooled projection, as InstantX's do), the
    prompt's sequence unless the net has no joint attention (SD3.5's official nets)."""
    vae = model.configs.config_of(params.vae, "vae")
    config = model.component.config
    # StableDiffusion3ControlNetPipeline takes the shift and the pooled projection rule of
    # its first net for every net (SD3MultiControlNetModel's nets[0].config)
    lead = config if params.lead == model.spec.name else model.configs.config_of(params.lead, "controlnet")
    zero_pooled = lead["force_zeros_for_pooled_projection"]
    shift = 0 if zero_pooled else vae["shift_factor"]
    cond = (images[f"control/image/{params.index}"].to(model.device) - shift) * vae["scaling_factor"]
    pooled = step.added["pooled_projections"]
    blocks = model.component(
        hidden_states=step.model_input, timestep=step.t.expand(step.model_input.shape[0]),
        encoder_hidden_states=step.embeds if config.joint_attention_dim is not None else None,
        pooled_projections=torch.zeros_like(pooled) if zero_pooled else pooled,
        joint_attention_kwargs=None, controlnet_cond=cond, conditioning_scale=float(params.scale),
        return_dict=False)[0]
    return {f"control/block/{i}": block for i, block in enumerate(blocks)}


def _flux_control(model: ActorModel, params: ControlParams, step: Step, images: Bundle) -> Bundle:
    """FluxControlNetPipeline's net call (InstantX-style nets, which take the image
    VAE-encoded and packed): once per step, on the positive prompt's row; both CFG rows
    of the transformer take its samples."""
    if getattr(model.component, "input_hint_block", None) is not None:
        raise ValueError(f"models.{model.spec.name}: Flux ControlNets with an input hint block (pixel input, "
                         "XLabs style) are not served; InstantX-style nets are")
    from diffusers import FluxPipeline

    vae = model.configs.config_of(params.vae, "vae")
    sample = images[f"control/image/{params.index}"].to(model.device)
    sample = (sample - vae["shift_factor"]) * vae["scaling_factor"]
    cond = FluxPipeline._pack_latents(sample, 1, sample.shape[1], sample.shape[2], sample.shape[3])
    r = step.embeds.shape[0] - 1  # [negative; positive]: the positive row
    timestep = step.t.expand(step.latents.shape[0]).to(step.latents.dtype)
    blocks, singles = model.component(
        hidden_states=step.model_input, controlnet_cond=cond, controlnet_mode=None,
        conditioning_scale=float(params.scale), timestep=timestep / 1000, guidance=step.added.get("guidance"),
        pooled_projections=step.added["pooled_projections"][r: r + 1], encoder_hidden_states=step.embeds[r: r + 1],
        txt_ids=step.added["txt_ids"], img_ids=step.added["img_ids"], joint_attention_kwargs=None, return_dict=False)
    out = {f"control/block/{i}": block for i, block in enumerate(blocks or ())}
    out.update({f"control/single/{i}": single for i, single in enumerate(singles or ())})
    return out


CONTROL_CALLS: dict[str, Callable[..., Bundle]] = {UNET: _unet_control, SD3_DIT: _sd3_control,
                                                   FLUX_DIT: _flux_control}
