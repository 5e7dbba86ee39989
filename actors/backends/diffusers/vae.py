"""The VAE's blocks: img2img's image encoding and the final decode.

Runs in an actor process. Both do what the family's pipeline does around its VAE: the
image processor's normalisation, the VAE's scaling (and, SD3 and Flux, shift) factors,
Flux's latent packing, and the float -> uint8 conversion of the pipeline's output.
"""

from __future__ import annotations

import numpy as np
import torch

from actors.backends.diffusers.loading import ActorModel
from actors.store import Bundle
from broker.protocol.messages import TaskSpec
from broker.protocol.tasks import DecodeParams, EncodeImageParams, TaskKind


class EncodeImageBlock:
    """img2img's first node: the client's image through the VAE encoder, as the pipeline does."""

    kind = TaskKind.ENCODE_IMAGE
    components = ("vae",)
    params = EncodeImageParams

    def __call__(self, model: ActorModel, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        vae = model.component
        (client,) = inputs
        pixels = client["image"].numpy().astype(np.float32) / 255.0  # VaeImageProcessor.pil_to_numpy
        image = torch.from_numpy(pixels[None].transpose(0, 3, 1, 2))
        image = (2.0 * image - 1.0).to(model.device, model.dtype)  # normalize to [-1, 1], request precision
        generator = torch.Generator(device="cpu").manual_seed(task.params.seed)
        # SDXL's img2img encodes with the VAE in float32 whatever the request's precision
        upcast = model.family.upcast_vae and vae.config.force_upcast
        weights = vae.dtype
        if upcast:
            vae.to(torch.float32)
            image = image.float()
        try:
            latents = vae.encode(image).latent_dist.sample(generator)
        finally:
            vae.to(weights)
        latents = latents.to(model.dtype)  # back to the request's precision, before scaling (the pipelines' order)
        if model.family.shifted_latents:  # as those img2img pipelines have them
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        else:
            latents = latents * vae.config.scaling_factor
        # the pipeline's one generator goes on to draw the noise: its state travels on
        return {"init_latents": latents, "state/generator": generator.get_state()}


class DecodeBlock:
    """`latents / scaling_factor` through the VAE, then the image processor's
    denormalisation and the pipeline's float -> uint8 conversion."""

    kind = TaskKind.DECODE
    components = ("vae",)
    params = DecodeParams

    def __call__(self, model: ActorModel, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        vae = model.component
        (previous,) = inputs
        latents = previous["latents"].to(model.device, vae.dtype)
        if model.family.packed_latents:
            from diffusers import FluxPipeline

            scale = 2 ** (len(vae.config.block_out_channels) - 1)  # the pipeline's vae_scale_factor
            latents = FluxPipeline._unpack_latents(latents, task.shape[0], task.shape[1], scale)
        latents = latents / vae.config.scaling_factor
        if model.family.shifted_latents:
            latents = latents + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1)  # VaeImageProcessor.denormalize
        pixels = image.cpu().permute(0, 2, 3, 1).float().numpy()[0]
        as_uint8 = (pixels * 255).round().astype("uint8")  # the pipeline's numpy_to_pil
        return {"image": torch.from_numpy(np.ascontiguousarray(as_uint8))}  # row-major for clients
