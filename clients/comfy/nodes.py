"""The ComfyUI nodes the importer knows: their inputs, outputs and widget order, as data.

Each class lists its inputs in ComfyUI's declaration order: a link input names the type it
takes (`MODEL`, `CLIP`, ...), a value input its kind (`INT`, `FLOAT`, `STRING`, `COMBO`,
`FILE`: a file name under a models folder). `widgets` is the order of the values a UI-format
node keeps in `widgets_values` (the front end's order); `None` marks a widget that is no
input (KSampler's `control_after_generate`, LoadImage's upload button).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SAMPLER_NAMES = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "er_sde", "seeds_2", "seeds_3", "ddim", "uni_pc", "uni_pc_bh2",
)
SCHEDULER_NAMES = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
                   "linear_quadratic", "kl_optimal")
CONTROL_AFTER_GENERATE = ("fixed", "increment", "decrement", "randomize")
MAX_INT = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed widget range


@dataclass(frozen=True)
class In:
    """One input: a link of `type` (upper case ComfyUI type) or a value of `kind`."""

    type: str  # MODEL, CLIP, VAE, CONDITIONING, LATENT, IMAGE, CONTROL_NET | INT, FLOAT, STRING, COMBO, FILE
    optional: bool = False
    min: Any = None
    max: Any = None
    choices: tuple | None = None
    folder: str = ""  # FILE: the models folder it names a file in

    @property
    def is_link(self) -> bool:
        return self.type not in ("INT", "FLOAT", "STRING", "COMBO", "FILE", "BOOLEAN")


@dataclass(frozen=True)
class NodeType:
    inputs: dict[str, In]
    outputs: tuple[str, ...]
    widgets: tuple[str | None, ...] = ()
    output_node: bool = False
    extra_widgets: tuple[str, ...] = field(default=())  # trailing widgets newer front ends add


def _seed() -> In:
    return In("INT", min=0, max=MAX_INT)


_STEPS = In("INT", min=1, max=10000)
_CFG = In("FLOAT", min=0.0, max=100.0)
_SIZE = In("INT", min=16, max=16384)
_TEXT = In("STRING")

NODES: dict[str, NodeType] = {
    "CheckpointLoaderSimple": NodeType({"ckpt_name": In("FILE", folder="checkpoints")}, ("MODEL", "CLIP", "VAE"),
                                       ("ckpt_name",)),
    "UNETLoader": NodeType({"unet_name": In("FILE", folder="diffusion_models"),
                            "weight_dtype": In("COMBO", choices=("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"))},
                           ("MODEL",), ("unet_name", "weight_dtype")),
    "CLIPLoader": NodeType({"clip_name": In("FILE", folder="text_encoders"), "type": In("COMBO"),
                            "device": In("COMBO", optional=True, choices=("default", "cpu"))},
                           ("CLIP",), ("clip_name", "type"), extra_widgets=("device",)),
    "DualCLIPLoader": NodeType({"clip_name1": In("FILE", folder="text_encoders"),
                                "clip_name2": In("FILE", folder="text_encoders"), "type": In("COMBO"),
                                "device": In("COMBO", optional=True, choices=("default", "cpu"))},
                               ("CLIP",), ("clip_name1", "clip_name2", "type"), extra_widgets=("device",)),
    "TripleCLIPLoader": NodeType({"clip_name1": In("FILE", folder="text_encoders"),
                                  "clip_name2": In("FILE", folder="text_encoders"),
                                  "clip_name3": In("FILE", folder="text_encoders")},
                                 ("CLIP",), ("clip_name1", "clip_name2", "clip_name3")),
    "VAELoader": NodeType({"vae_name": In("FILE", folder="vae")}, ("VAE",), ("vae_name",)),
    "CLIPTextEncode": NodeType({"text": _TEXT, "clip": In("CLIP")}, ("CONDITIONING",), ("text",)),
    "CLIPTextEncodeSDXL": NodeType(
        {"clip": In("CLIP"), "width": _SIZE, "height": _SIZE, "crop_w": In("INT", min=0, max=16384),
         "crop_h": In("INT", min=0, max=16384), "target_width": _SIZE, "target_height": _SIZE, "text_g": _TEXT,
         "text_l": _TEXT},
        ("CONDITIONING",), ("width", "height", "crop_w", "crop_h", "target_width", "target_height", "text_g", "text_l")),
    "CLIPTextEncodeFlux": NodeType({"clip": In("CLIP"), "clip_l": _TEXT, "t5xxl": _TEXT,
                                    "guidance": In("FLOAT", min=0.0, max=100.0)},
                                   ("CONDITIONING",), ("clip_l", "t5xxl", "guidance")),
    "EmptyLatentImage": NodeType({"width": _SIZE, "height": _SIZE, "batch_size": In("INT", min=1, max=4096)},
                                 ("LATENT",), ("width", "height", "batch_size")),
    "EmptySD3LatentImage": NodeType({"width": _SIZE, "height": _SIZE, "batch_size": In("INT", min=1, max=4096)},
                                    ("LATENT",), ("width", "height", "batch_size")),
    "KSampler": NodeType(
        {"model": In("MODEL"), "seed": _seed(), "steps": _STEPS, "cfg": _CFG,
         "sampler_name": In("COMBO", choices=SAMPLER_NAMES), "scheduler": In("COMBO", choices=SCHEDULER_NAMES),
         "positive": In("CONDITIONING"), "negative": In("CONDITIONING"), "latent_image": In("LATENT"),
         "denoise": In("FLOAT", min=0.0, max=1.0)},
        ("LATENT",), ("seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise")),
    "KSamplerAdvanced": NodeType(
        {"model": In("MODEL"), "add_noise": In("COMBO", choices=("enable", "disable")), "noise_seed": _seed(),
         "steps": _STEPS, "cfg": _CFG, "sampler_name": In("COMBO", choices=SAMPLER_NAMES),
         "scheduler": In("COMBO", choices=SCHEDULER_NAMES), "positive": In("CONDITIONING"),
         "negative": In("CONDITIONING"), "latent_image": In("LATENT"), "start_at_step": In("INT", min=0, max=10000),
         "end_at_step": In("INT", min=0, max=10000),
         "return_with_leftover_noise": In("COMBO", choices=("disable", "enable"))},
        ("LATENT",), ("add_noise", "noise_seed", None, "steps", "cfg", "sampler_name", "scheduler", "start_at_step",
                      "end_at_step", "return_with_leftover_noise")),
    "FluxGuidance": NodeType({"conditioning": In("CONDITIONING"), "guidance": In("FLOAT", min=0.0, max=100.0)},
                             ("CONDITIONING",), ("guidance",)),
    "LoraLoader": NodeType({"model": In("MODEL"), "clip": In("CLIP"), "lora_name": In("FILE", folder="loras"),
                            "strength_model": In("FLOAT", min=-100.0, max=100.0),
                            "strength_clip": In("FLOAT", min=-100.0, max=100.0)},
                           ("MODEL", "CLIP"), ("lora_name", "strength_model", "strength_clip")),
    "LoraLoaderModelOnly": NodeType({"model": In("MODEL"), "lora_name": In("FILE", folder="loras"),
                                     "strength_model": In("FLOAT", min=-100.0, max=100.0)},
                                    ("MODEL",), ("lora_name", "strength_model")),
    "ControlNetLoader": NodeType({"control_net_name": In("FILE", folder="controlnet")}, ("CONTROL_NET",),
                                 ("control_net_name",)),
    "ControlNetApply": NodeType({"conditioning": In("CONDITIONING"), "control_net": In("CONTROL_NET"),
                                 "image": In("IMAGE"), "strength": In("FLOAT", min=0.0, max=10.0)},
                                ("CONDITIONING",), ("strength",)),
    "ControlNetApplyAdvanced": NodeType(
        {"positive": In("CONDITIONING"), "negative": In("CONDITIONING"), "control_net": In("CONTROL_NET"),
         "image": In("IMAGE"), "strength": In("FLOAT", min=0.0, max=10.0),
         "start_percent": In("FLOAT", min=0.0, max=1.0), "end_percent": In("FLOAT", min=0.0, max=1.0),
         "vae": In("VAE", optional=True)},
        ("CONDITIONING", "CONDITIONING"), ("strength", "start_percent", "end_percent")),
    "LoadImage": NodeType({"image": In("FILE", folder="input")}, ("IMAGE", "MASK"), ("image", None)),
    "VAEEncode": NodeType({"pixels": In("IMAGE"), "vae": In("VAE")}, ("LATENT",)),
    "VAEDecode": NodeType({"samples": In("LATENT"), "vae": In("VAE")}, ("IMAGE",)),
    "SaveImage": NodeType({"images": In("IMAGE"), "filename_prefix": In("STRING", optional=True)}, (),
                          ("filename_prefix",), output_node=True),
    "PreviewImage": NodeType({"images": In("IMAGE")}, (), (), output_node=True),
}

SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
OUTPUT_NODES = tuple(name for name, node in NODES.items() if node.output_node)
# UI-only nodes: resolved (Reroute, PrimitiveNode) or dropped (notes) when converting to the API format
UI_ONLY = ("Reroute", "PrimitiveNode", "Note", "MarkdownNote")
