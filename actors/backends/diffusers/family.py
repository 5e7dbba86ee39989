"""What differs between the pipeline families the diffusers backend serves, as data.

Runs in an actor process (imported by every block of the diffusers backend). A model's
`ModelSpec.family` names its row: `sd15` (StableDiffusionPipeline), `sdxl`
(StableDiffusionXLPipeline), `sd3` (StableDiffusion3Pipeline) and `flux` (FluxPipeline).
Where the families genuinely compute differently (the base model's call, the step's
conditioning, a ControlNet's forward), a block keeps one small function per `arch` in a
table; everything else is a flag here.
"""

from __future__ import annotations

from dataclasses import dataclass

SD15, SDXL, SD3, FLUX = "sd15", "sdxl", "sd3", "flux"
UNET, SD3_DIT, FLUX_DIT = "unet", "sd3", "flux"  # the base model architectures (`Family.arch`)


@dataclass(frozen=True)
class Family:
    name: str
    arch: str  # UNET | SD3_DIT | FLUX_DIT: picks the per-architecture functions of the blocks
    denoiser_class: str  # the diffusers class of the base model
    denoiser_folder: str  # the base model's folder in a pipeline folder, and its LoRA key prefix
    # Flux: latents are 2x2 patches packed into tokens, and the sigmas shift with their count
    packed_latents: bool = False
    # Flux: the pipeline calls its transformer once per CFG row (true CFG as two batch-1 calls),
    # so a step never concatenates rows or fuses a batch; its ControlNet sees the positive row only
    calls_per_row: bool = False
    clip_pooled_only: bool = False  # Flux: CLIP gives the pooled vector, T5 the sequence
    penultimate_hidden: bool = False  # SDXL, SD3: CLIP conditions on its penultimate layer
    size_conditioning: bool = False  # SDXL: pooled embeddings and size/crop time ids as added conditioning
    t5_sequence: int = 256  # a T5 encoder's padded length: the pipeline's max_sequence_length
    shifted_latents: bool = False  # SD3, Flux: the VAE's shift_factor applies around its scaling
    upcast_vae: bool = False  # SDXL: a half-precision VAE with force_upcast runs in float32


FAMILIES = {
    SD15: Family(SD15, UNET, "UNet2DConditionModel", "unet"),
    SDXL: Family(SDXL, UNET, "UNet2DConditionModel", "unet", penultimate_hidden=True, size_conditioning=True,
                 upcast_vae=True),
    SD3: Family(SD3, SD3_DIT, "SD3Transformer2DModel", "transformer", penultimate_hidden=True, shifted_latents=True),
    FLUX: Family(FLUX, FLUX_DIT, "FluxTransformer2DModel", "transformer", packed_latents=True, calls_per_row=True,
                 clip_pooled_only=True, t5_sequence=512, shifted_latents=True),
}


def family_of(name: str) -> Family:
    """The row of `ModelSpec.family`; a model that names none follows SD 1.5's conventions
    (a VAE or text encoder of a plain UNet pipeline)."""
    return FAMILIES.get(name, FAMILIES[SD15])


def denoiser_folder(family: str) -> str:
    """The base model's folder in a pipeline folder (and its LoRA key prefix)."""
    return family_of(family).denoiser_folder


def sibling_folder(subfolder: str, kind: str) -> str:
    """The tokenizer/scheduler folder that goes with a component folder."""
    if kind == "tokenizer":
        return subfolder.replace("text_encoder", "tokenizer") if "text_encoder" in subfolder else "tokenizer"
    return "scheduler"
