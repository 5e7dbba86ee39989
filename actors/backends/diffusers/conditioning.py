"""What a denoising step conditions on, per base model architecture.

Runs in an actor process (the denoise and ControlNet blocks). `conditioning` builds,
once at step 0 from the text encoders' outputs, the `cond/...` tensors that travel with
the latent; `added_conditioning` turns them into the model call's extra arguments at
every step. The architectures genuinely differ here, so each has its function in a table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from actors.backends.diffusers.family import FLUX_DIT, SD3_DIT, UNET
from actors.backends.diffusers.loading import ActorModel
from actors.store import Bundle
from broker.protocol.messages import TaskSpec
from broker.protocol.tasks import StepParams

FLUX_DISTILLED_GUIDANCE = 3.5  # FluxPipeline's `guidance_scale` default, for a task that names none


def conditioning(model: ActorModel, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
    """What every step conditions on, built once at step 0 and carried with the latent."""
    pooled = [b["pooled"] for b in inputs if "pooled" in b]
    t5 = [b["t5"] for b in inputs if "t5" in b]
    if len(t5) > 1:
        raise ValueError(f"{task.node}: the workflow lists {len(t5)} T5 encoders; its pipeline takes one")
    return _CONDITIONING[model.family.arch](model, task, inputs, pooled, t5)


def _unet_conditioning(model: ActorModel, task: TaskSpec, inputs: list[Bundle], pooled: list, t5: list) -> Bundle:
    cond = {"cond/embeds": torch.cat([b["embeds"] for b in inputs if "embeds" in b], dim=-1)}
    if model.family.size_conditioning:
        if not pooled:
            raise ValueError(f"{task.node}: SDXL needs pooled embeddings from a projection text encoder")
        # original size + crop top-left + target size; the pipeline's defaults
        height, width = task.shape
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond["cond/embeds"].dtype)
        cond["cond/pooled"] = pooled[0]  # the pipeline keeps the first pooled (2-D) output it sees
        cond["cond/time_ids"] = time_ids.repeat(cond["cond/embeds"].shape[0], 1)  # one per CFG row
    return cond


def _sd3_conditioning(model: ActorModel, task: TaskSpec, inputs: list[Bundle], pooled: list, t5: list) -> Bundle:
    clip = torch.cat([b["embeds"] for b in inputs if "embeds" in b], dim=-1)
    return {"cond/embeds": _sd3_joint(model, clip, t5[0] if t5 else None), "cond/pooled": torch.cat(pooled, dim=-1)}


def _flux_conditioning(model: ActorModel, task: TaskSpec, inputs: list[Bundle], pooled: list, t5: list) -> Bundle:
    # the T5 sequence and CLIP's pooled vector, each from its encoder
    if not t5 or not pooled:
        raise ValueError(f"{task.node}: Flux needs a T5 encoder (sequence) and a CLIP encoder (pooled)")
    return {"cond/embeds": t5[0], "cond/pooled": pooled[0]}


def _sd3_joint(model: ActorModel, clip: torch.Tensor, t5: torch.Tensor | None) -> torch.Tensor:
    """StableDiffusion3Pipeline's joint sequence: the CLIP hidden states padded to T5's
    width, then the T5 rows (zeros of the transformer's joint width without a T5 encoder)."""
    if t5 is None:
        joint = model.component.config.joint_attention_dim
        t5 = torch.zeros((clip.shape[0], model.family.t5_sequence, joint), dtype=clip.dtype, device=clip.device)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2)


_CONDITIONING: dict[str, Callable[..., Bundle]] = {
    UNET: _unet_conditioning, SD3_DIT: _sd3_conditioning, FLUX_DIT: _flux_conditioning,
}


def added_conditioning(model: ActorModel, params: StepParams, cond: Bundle,
                       packed_size: tuple[int, int] | None) -> dict | None:
    """The model call's arguments besides latents, timestep and sequence (None: none).
    `packed_size`: Flux's latent height and width, whose tokens the image ids number."""
    return _ADDED[model.family.arch](model, params, cond, packed_size)


def _unet_added(model: ActorModel, params: StepParams, cond: Bundle, packed_size) -> dict | None:
    if "cond/pooled" not in cond:
        return None
    return {"text_embeds": cond["cond/pooled"].to(model.device), "time_ids": cond["cond/time_ids"].to(model.device)}


def _sd3_added(model: ActorModel, params: StepParams, cond: Bundle, packed_size) -> dict:
    return {"pooled_projections": cond["cond/pooled"].to(model.device)}


def _flux_added(model: ActorModel, params: StepParams, cond: Bundle, packed_size: tuple[int, int]) -> dict:
    from diffusers import FluxPipeline

    lat_h, lat_w = packed_size
    dtype = cond["cond/embeds"].dtype
    added = {"pooled_projections": cond["cond/pooled"].to(model.device),
             "txt_ids": torch.zeros(cond["cond/embeds"].shape[1], 3, device=model.device, dtype=dtype),
             "img_ids": FluxPipeline._prepare_latent_image_ids(1, lat_h // 2, lat_w // 2, model.device, dtype)}
    if model.component.config.guidance_embeds:
        # What FluxPipeline hands a guidance-distilled transformer (FLUX.1-dev): its
        # `guidance_scale` as a float32 tensor of one row (each model call here is one row).
        # The scale comes as `distilled_guidance`, apart from `guidance`, which is the true-CFG
        # scale in a CFG workflow; absent, the pipeline's default applies.
        scale = FLUX_DISTILLED_GUIDANCE if params.distilled_guidance is None else params.distilled_guidance
        added["guidance"] = torch.full([1], float(scale), device=model.device, dtype=torch.float32)
    return added


_ADDED: dict[str, Callable[..., dict | None]] = {UNET: _unet_added, SD3_DIT: _sd3_added, FLUX_DIT: _flux_added}
