"""Names the diffusers backend and its ControlNet tasks share: the pipeline families
(`ModelSpec.family`) and where a component's sibling folders are in a pipeline folder."""

from __future__ import annotations

SD15, SDXL, SD3, FLUX = "sd15", "sdxl", "sd3", "flux"


def denoiser_folder(family: str) -> str:
    """The base model's folder in a pipeline folder (and its LoRA key prefix): the DiTs'
    `transformer`, the UNets' `unet`."""
    return "transformer" if family in (SD3, FLUX) else "unet"


def sibling_folder(subfolder: str, kind: str) -> str:
    """The tokenizer/scheduler folder that goes with a component folder."""
    if kind == "tokenizer":
        return subfolder.replace("text_encoder", "tokenizer") if "text_encoder" in subfolder else "tokenizer"
    return "scheduler"
