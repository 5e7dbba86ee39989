"""Write an SD-1.5 pipeline folder's UNet and VAE as one original-format checkpoint.

Checkpoints in the wild (`v1-5-pruned.safetensors` and the like) hold the LDM layout:
`model.diffusion_model.input_blocks.1.0.in_layers.0.weight`, `first_stage_model.encoder.
down.0.block.0.norm1.weight`, attention projections as 1x1 convolutions. diffusers reads
them with `from_single_file`, converting the keys with `convert_ldm_unet_checkpoint` and
`convert_ldm_vae_checkpoint`; this module is the inverse of those two (for the block
types SD 1.5 uses), so that the single-file loading path can be exercised offline with
tiny random weights. The round trip is checked key for key and value for value in
tests/test_diffusers_variants.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."  # diffusers' LDM_UNET_KEY
VAE_PREFIX = "first_stage_model."  # the first of diffusers' LDM_VAE_KEYS
UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_TOP = {"conv_norm_out": "norm_out"}  # conv_in, conv_out, quant convs keep their names
SAMPLERS = {"downsamplers": "downsample", "upsamplers": "upsample"}  # VAE levels' resampling convs
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _rename(key: str, pairs) -> str:
    """Replace whole dotted name segments (`norm1.weight`), never parts of other names."""
    parts = key.rsplit(".", 1)
    head = parts[0]
    for new, old in pairs:
        if head == new or head.startswith(new + "."):
            head = old + head[len(new):]
            break
    return f"{head}.{parts[1]}" if len(parts) == 2 else head


def _unet_blocks(config: dict) -> list[tuple[str, str, str]]:
    """(diffusers prefix, LDM prefix, kind) for every UNet block; kind picks the inner renames."""
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise ValueError(f"unet config layers_per_block: one count for every block expected, got {per!r}")
    blocks = []
    for i, up in enumerate(config["up_block_types"]):  # as many levels down as up
        for j in range(per):  # LDM counts input blocks flat: conv_in is 0, each level adds per + 1
            n = (per + 1) * i + j + 1
            blocks += [(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", "resnet"),
                       (f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", "attention")]
        blocks.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(per + 1) * (i + 1)}.0.op", "plain"))
        for j in range(per + 1):
            n = (per + 1) * i + j
            blocks += [(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", "resnet"),
                       (f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", "attention")]
        # the upsampler follows the last resnet, after its attention when the block has one
        slot = 2 if "CrossAttn" in up else 1
        blocks.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{(per + 1) * i + per}.{slot}", "plain"))
    blocks += [("mid_block.resnets.0", "middle_block.0", "resnet"), ("mid_block.attentions.0", "middle_block.1", "attention"),
               ("mid_block.resnets.1", "middle_block.2", "resnet")]
    return blocks


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in the LDM layout (without the prefix)."""
    if config.get("addition_embed_type") or config.get("class_embed_type"):
        raise ValueError("unet config: added/class embeddings (SDXL) are not written by this converter")
    blocks = _unet_blocks(config)
    out = {}
    for key, value in state.items():
        head, leaf = key.rsplit(".", 1)
        if head in UNET_TOP:
            out[f"{UNET_TOP[head]}.{leaf}"] = value
            continue
        block = next((b for b in blocks if key.startswith(b[0] + ".")), None)
        if block is None:
            raise ValueError(f"unet state dict: {key!r} has no place in the LDM layout")
        new, old, kind = block
        rest = key[len(new) + 1:]
        if kind == "resnet":  # attention blocks keep their inner names (norm1 there is a LayerNorm)
            rest = _rename(rest, UNET_RESNET)
        out[f"{old}.{rest}"] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the LDM layout (without the prefix)."""
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        side, _, rest = key.partition(".")
        if side not in ("encoder", "decoder"):  # quant_conv, post_quant_conv
            out[key] = value
            continue
        rest = _rename(rest, tuple(VAE_TOP.items()))
        if rest.startswith("mid_block.attentions.0."):
            rest = "mid.attn_1." + _rename(rest[len("mid_block.attentions.0."):], VAE_ATTENTION)
            if value.dim() == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        elif rest.startswith("mid_block.resnets."):
            j, tail = rest[len("mid_block.resnets."):].split(".", 1)
            rest = f"mid.block_{int(j) + 1}.{_rename(tail, (('conv_shortcut', 'nin_shortcut'),))}"
        elif rest.startswith(("down_blocks.", "up_blocks.")):
            rest = _vae_level(rest, levels)
        out[f"{side}.{rest}"] = value
    return out


def _vae_level(rest: str, levels: int) -> str:
    """`down_blocks.i...` -> `down.i...`; the decoder counts its levels the other way round."""
    direction, i, part, tail = rest.split(".", 3)
    i = int(i)
    if direction == "up_blocks":
        name, i = "up", levels - 1 - i
    else:
        name = "down"
    if part in SAMPLERS:  # `downsamplers.0.conv.weight` -> `downsample.conv.weight`
        return f"{name}.{i}.{SAMPLERS[part]}.{tail.split('.', 1)[1]}"
    j, tail = tail.split(".", 1)  # resnets.j...
    return f"{name}.{i}.block.{j}.{_rename(tail, (('conv_shortcut', 'nin_shortcut'),))}"


def write_sd_checkpoint(folder: Path, path: Path) -> Path:
    """The pipeline folder's UNet and VAE as one original-format .safetensors file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    tensors = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), dict(unet.config)).items()}
    tensors |= {VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
