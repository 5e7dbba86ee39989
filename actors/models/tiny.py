"""Build real diffusers/transformers components from small configs, offline.

`lego models tiny DIR [--size tiny|mid]` writes, per family, a pipeline folder in the
layout `from_pretrained` reads (text_encoder/, tokenizer/, unet/, vae/, scheduler/,
model_index.json) with random weights, plus `DIR/catalog.toml` naming the models and
workflows so a cluster can serve them at once. Nothing is downloaded: the CLIP tokenizer
is a byte-level BPE vocabulary written here, with no merges (one token per byte); the T5
one a unigram vocabulary of printable ASCII.

Besides one workflow set per family: `sd15-file` (the SD 1.5 UNet and VAE loaded from
`sd15/sd15.safetensors`, an original-format single-file checkpoint), `sd3-t5` (SD3 with
its T5 encoder; plain `sd3` leaves it out) and `flux-dev` (a guidance-embedding
transformer sharing the Flux encoders and VAE).

`tiny` is for tests (64 px images, milliseconds per step); `mid` is for a demo a
person can watch on two CPU cores (256 px, a few seconds per image).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from broker.catalog import WorkflowSpec

SIZES = ("tiny", "mid")


@dataclass(frozen=True)
class SD15Size:
    image: int  # default width/height of the workflow
    unet_channels: tuple[int, ...]
    vae_channels: tuple[int, ...]
    text_hidden: int
    text_layers: int
    cross_attention: int
    steps: int


SD15_SIZES = {
    "tiny": SD15Size(64, (32, 64), (32, 64), 32, 2, 32, 4),
    "mid": SD15Size(256, (64, 128, 256), (32, 64, 128, 128), 256, 4, 256, 20),
}


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_clip_tokenizer(folder: Path, max_length: int = 77) -> int:
    """A CLIP tokenizer over single bytes; returns its vocabulary size."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for ch in byte_level_alphabet():
        vocab[ch] = len(vocab)
    for ch in byte_level_alphabet():
        vocab[ch + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return len(vocab)


def build_sd15(folder: Path, size: str, seed: int = 0) -> dict:
    """An SD-1.5-shaped pipeline folder; returns its catalog entry values."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    s = SD15_SIZES[size]
    torch.manual_seed(seed)
    vocab_size = write_clip_tokenizer(folder / "tokenizer")
    n_blocks = len(s.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=s.image // 2 ** (len(s.vae_channels) - 1),
        block_out_channels=s.unet_channels,
        layers_per_block=1 if size == "tiny" else 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_blocks - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_blocks - 1) + ("UpBlock2D",),
        cross_attention_dim=s.cross_attention,
        attention_head_dim=8 if size == "tiny" else 8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=s.vae_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(s.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(s.vae_channels),
        latent_channels=4,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        hidden_size=s.text_hidden, intermediate_size=s.text_hidden * 4, num_attention_heads=4,
        num_hidden_layers=s.text_layers, vocab_size=vocab_size, max_position_embeddings=77, projection_dim=s.text_hidden,
    ))
    # steps_offset=1: StableDiffusionPipeline rewrites 0 to 1 anyway (ENVIRONMENT.md).
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return {"image": s.image, "steps": s.steps, "vae_scale": 2 ** (len(s.vae_channels) - 1)}


def build_sdxl(folder: Path, seed: int = 0) -> dict:
    """An SDXL-shaped pipeline folder (two text encoders, the second with a projection)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    torch.manual_seed(seed)
    vocab_size = write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2")
    hidden, time_dim = 32, 8
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(32, 64), layers_per_block=1, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=time_dim * 6 + hidden,  # 6 time ids + the pooled embedding
        cross_attention_dim=2 * hidden,  # both encoders' hidden states, concatenated
        norm_num_groups=1,
    )
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    config = CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                            hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                            vocab_size=vocab_size, max_position_embeddings=77, projection_dim=hidden, hidden_act="gelu")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), unet=unet, scheduler=scheduler,
    )
    pipe.save_pretrained(folder)
    return {"image": 64, "steps": 4, "vae_scale": 2}


def build_sd3(folder: Path, seed: int = 0, t5: bool = True) -> dict:
    """An SD3-shaped pipeline folder: two CLIP encoders with projections, an MMDiT, a
    flow-matching scheduler and, with `t5`, a T5 encoder (text_encoder_3/tokenizer_3).

    The MMDiT is the same either way: a pipeline loaded with `text_encoder_3=None` (and the
    catalog's no-T5 workflows) conditions on zeros where the T5 sequence goes."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    vocab_size = write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2")
    hidden = 32
    # two blocks: the last is context_pre_only and takes no ControlNet sample, the first does
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=2 * hidden)
    config = CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                            hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                            vocab_size=vocab_size, max_position_embeddings=77, projection_dim=hidden, hidden_act="gelu")
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    clip_l, clip_g = CLIPTextModelWithProjection(config), CLIPTextModelWithProjection(config)
    # built last, so the other components' weights do not depend on `t5`
    text_encoder_3, tokenizer_3 = _t5_encoder(folder / "tokenizer_3", hidden) if t5 else (None, None)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=clip_l, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=clip_g, tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder)
    return {"image": 32, "steps": 4, "vae_scale": 1, "denoiser": "transformer", "samplers": ["default"]}


def write_t5_tokenizer(folder: Path) -> int:
    """A T5 (unigram) tokenizer over printable ASCII, written offline; returns its size."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(chr(c), -2.0) for c in range(33, 127)]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
    return len(vocab)


def _t5_encoder(tokenizer_folder: Path, hidden: int):
    """A small T5 encoder of width `hidden` and its offline tokenizer (Flux's and SD3's)."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = write_t5_tokenizer(tokenizer_folder)
    encoder = T5EncoderModel(T5Config(vocab_size=vocab, d_model=hidden, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return encoder, T5TokenizerFast.from_pretrained(tokenizer_folder)


def build_flux(folder: Path, seed: int = 0, guidance_embeds: bool = False) -> dict:
    """A FLUX.1-shaped pipeline folder: CLIP (pooled) + T5 (sequence), a Flux transformer on
    2x2-packed latents, flow matching with the resolution shift.

    `guidance_embeds=False` is schnell-shaped; True is dev-shaped: the transformer embeds the
    (distilled) guidance scale. The transformer is built last, so both shapes built with one
    seed share identical text encoders and VAE, as FLUX.1-dev and -schnell do."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    clip_vocab = write_clip_tokenizer(folder / "tokenizer")
    hidden = 32
    clip = CLIPTextModel(CLIPTextConfig(bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1,
                                        pad_token_id=clip_vocab - 1, hidden_size=hidden, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=2, vocab_size=clip_vocab,
                                        max_position_embeddings=77, projection_dim=hidden, hidden_act="gelu"))
    t5, t5_tokenizer = _t5_encoder(folder / "tokenizer_2", hidden)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=hidden,
                                         pooled_projection_dim=hidden, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    return {"image": 32, "steps": 4, "vae_scale": 1, "denoiser": "transformer", "samplers": ["default"]}


STANDARD_WORKFLOWS = [("txt2img", True, False), ("txt2img-nocfg", False, False), ("img2img", True, True)]


def build_all(root: str | Path, size: str = "tiny") -> Path:
    """Build every family under `root` and write `root/catalog.toml`; returns its path.

    SD 1.5 at the given size (also as one original-format single-file checkpoint);
    SDXL, SD3 (with and without T5) and Flux (schnell- and dev-shaped), for tests, always
    at the tiny size.
    """
    if size not in SIZES:
        raise ValueError(f"size: expected one of {SIZES}, got {size!r}")
    root = Path(root).resolve()
    info = build_sd15(root / "sd15", size)
    text = f"# Written by `lego models tiny`: {size} components with random weights.\n"
    text += _family_catalog(f"{size}-sd15", "sd15", root / "sd15", {"clip": "text_encoder"}, info, STANDARD_WORKFLOWS)
    text += _single_file_catalog(f"{size}-sd15", root / "sd15", info)
    if size == "tiny":
        text += _controlnet_catalog("tiny-sd15", "sd15", root / "sd15", info, ["tiny-sd15-clip"])
        text += _lora_catalog("tiny-sd15", "sd15", root / "sd15", info, ["tiny-sd15-clip"])
        sdxl = build_sdxl(root / "sdxl")
        text += _family_catalog("tiny-sdxl", "sdxl", root / "sdxl",
                                {"clip-l": "text_encoder", "clip-g": "text_encoder_2"}, sdxl, STANDARD_WORKFLOWS)
        text += _controlnet_catalog("tiny-sdxl", "sdxl", root / "sdxl", sdxl, ["tiny-sdxl-clip-l", "tiny-sdxl-clip-g"])
        text += _lora_catalog("tiny-sdxl", "sdxl", root / "sdxl", sdxl, ["tiny-sdxl-clip-l", "tiny-sdxl-clip-g"])
        text += _sd3_catalog(root / "sd3")
        text += _flux_catalog(root)
    catalog = root / "catalog.toml"
    catalog.write_text(text)  # last: a catalog file means a complete build
    return catalog


CONTROLNETS = ("controlnet-a", "controlnet-b")  # two nets per family: multi-ControlNet is tested too


def build_controlnets(folder: Path, seed: int = 0) -> None:
    """ControlNets shaped after the folder's UNet (`ControlNetModel.from_unet`), written to
    `controlnet-a/` and `controlnet-b/`. Their zero-initialised convolutions (what makes a
    fresh ControlNet a no-op) get random weights, so that a residual lost or added twice
    changes the image."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    # one stride-2 stage: the control image (pixels) meets the latent at the VAE's factor 2
    for index, name in enumerate(CONTROLNETS):
        torch.manual_seed(seed + 100 + index)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        zeroed = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
        with torch.no_grad():
            for module in zeroed:
                module.weight.normal_(0.0, 0.5)
                module.bias.normal_(0.0, 0.1)
        net.save_pretrained(folder / name)


def build_sd3_controlnets(folder: Path, seed: int = 0) -> None:
    """SD3ControlNetModels shaped after the folder's MMDiT: `controlnet-a` zeroes the pooled
    projection and takes the image latents unshifted (as InstantX's SD3 nets do),
    `controlnet-b` uses the pooled prompt and the VAE's shift. Their zero-initialised
    output blocks and image embedding get random weights (see build_controlnets)."""
    import torch
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    config = SD3Transformer2DModel.load_config(folder, subfolder="transformer")
    keys = ("sample_size", "patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
            "num_attention_heads", "caption_projection_dim", "joint_attention_dim", "pooled_projection_dim",
            "pos_embed_max_size")
    for index, name in enumerate(CONTROLNETS):
        torch.manual_seed(seed + 100 + index)
        net = SD3ControlNetModel(**{k: config[k] for k in keys}, force_zeros_for_pooled_projection=index == 0)
        with torch.no_grad():
            for module in [*net.controlnet_blocks, net.pos_embed_input.proj]:
                module.weight.normal_(0.0, 0.5)
                module.bias.normal_(0.0, 0.1)
        net.save_pretrained(folder / name)


def build_flux_controlnets(folder: Path, seed: int = 0) -> None:
    """InstantX-style FluxControlNetModels (the image goes in VAE-encoded and packed) shaped
    after the folder's transformer, their zero-initialised layers randomised."""
    import torch
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    c = transformer.config
    for index, name in enumerate(CONTROLNETS):
        torch.manual_seed(seed + 100 + index)
        net = FluxControlNetModel.from_transformer(transformer, num_layers=c.num_layers,
                                                   num_single_layers=c.num_single_layers,
                                                   attention_head_dim=c.attention_head_dim,
                                                   num_attention_heads=c.num_attention_heads)
        with torch.no_grad():
            for module in [*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder]:
                module.weight.normal_(0.0, 0.5)
                module.bias.normal_(0.0, 0.1)
        net.save_pretrained(folder / name)


def _controlnet_catalog(prefix: str, family: str, folder: Path, info: dict, encoders: list[str]) -> str:
    """The folder's two ControlNets and workflows over them: one net with and without CFG,
    and both nets at once (multi-ControlNet)."""
    {"sd3": build_sd3_controlnets, "flux": build_flux_controlnets}.get(family, build_controlnets)(folder)
    text = "".join(_model(f"{prefix}-{name}", "controlnet", family, folder, name,
                          f"latent_channels = 4\nvae_scale = {info['vae_scale']}\n") for name in CONTROLNETS)
    nets = [f"{prefix}-{name}" for name in CONTROLNETS]
    base = (encoders, f"{prefix}-unet", f"{prefix}-vae")
    text += _workflow(f"{prefix}-control", *base, True, False, info, f'controlnets = ["{nets[0]}"]\n')
    text += _workflow(f"{prefix}-control-nocfg", *base, False, False, info, f'controlnets = ["{nets[1]}"]\n')
    return text + _workflow(f"{prefix}-multicontrol", *base, True, False, info,
                            f'controlnets = ["{nets[0]}", "{nets[1]}"]\n')


# name -> (rank, LoRA on the text encoders too): three adapters of one base model, with
# and without text-encoder layers, so that sets of them differ in what they touch.
LORAS = {"ink": (4, True), "clay": (2, False), "neon": (8, True)}


def build_loras(folder: Path, family: str, seed: int = 0) -> dict[str, Path]:
    """LoRA adapters for the folder's UNet (and text encoders), written as diffusers'
    `save_lora_weights` writes them (`loras/NAME/pytorch_lora_weights.safetensors`).
    peft initialises lora_B to zeros (a no-op adapter): it gets random weights here,
    large enough that an adapter applied to the wrong request changes its image."""
    import diffusers
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    encoders = {"sd15": [("text_encoder", CLIPTextModel)],
                "sdxl": [("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)],
                "sd3": [("text_encoder", CLIPTextModelWithProjection), ("text_encoder_2", CLIPTextModelWithProjection)],
                "flux": [("text_encoder", CLIPTextModel)]}[family]  # Flux's T5 takes no LoRA in diffusers
    pipeline, denoiser, denoiser_sub = {
        "sd15": ("StableDiffusionPipeline", "UNet2DConditionModel", "unet"),
        "sdxl": ("StableDiffusionXLPipeline", "UNet2DConditionModel", "unet"),
        "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel", "transformer"),
        "flux": ("FluxPipeline", "FluxTransformer2DModel", "transformer")}[family]
    paths = {}
    for index, (name, (rank, with_text)) in enumerate(LORAS.items()):
        torch.manual_seed(seed + 200 + index)
        layers = {}
        model = getattr(diffusers, denoiser).from_pretrained(folder, subfolder=denoiser_sub)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        layers[f"{denoiser_sub}_lora_layers"] = get_peft_model_state_dict(model)
        for sub, cls in encoders if with_text else ():
            encoder = cls.from_pretrained(folder, subfolder=sub)
            # peft directly: transformers' own add_adapter wants a newer peft than PyPI has
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                               target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), encoder)
            layers[f"{sub}_lora_layers"] = get_peft_model_state_dict(encoder)
        paths[name] = folder / "loras" / name
        getattr(diffusers, pipeline).save_lora_weights(paths[name], **layers)
    return paths


def _lora_catalog(prefix: str, family: str, folder: Path, info: dict, encoders: list[str]) -> str:
    """The folder's adapters in the registry, and workflows taking them: LoRA with CFG,
    and (SD 1.5) LoRA + ControlNet + CFG."""
    text = ""
    for name, path in build_loras(folder, family).items():
        text += f'\n[adapters.{prefix}-{name}]\nbase = "{prefix}-unet"\nsource = "{path}"\n'
    base = (encoders, f"{prefix}-unet", f"{prefix}-vae")
    text += _workflow(f"{prefix}-lora", *base, True, False, info, "lora = true\n")
    if family == "sd15":
        text += _workflow(f"{prefix}-lora-control", *base, True, False, info,
                          f'lora = true\ncontrolnets = ["{prefix}-{CONTROLNETS[0]}"]\n')
    return text


def _single_file_catalog(prefix: str, folder: Path, info: dict) -> str:
    """The UNet and VAE again, loaded from one original-format checkpoint in the folder
    (`from_single_file`; their configs are read from the folder beside it)."""
    from actors.models.single_file import write_sd_checkpoint  # imports torch: only when asked

    checkpoint = write_sd_checkpoint(folder, folder / "sd15.safetensors")
    text = _model(f"{prefix}-file-unet", "denoiser", "sd15", checkpoint, "unet",
                  f"latent_channels = 4\nvae_scale = {info['vae_scale']}\n")
    text += _model(f"{prefix}-file-vae", "vae", "sd15", checkpoint, "vae")
    return text + _workflow(f"{prefix}-file-txt2img", [f"{prefix}-clip"], f"{prefix}-file-unet", f"{prefix}-file-vae",
                            True, False, info)


def _sd3_catalog(folder: Path) -> str:
    """SD3 without T5 (zeros in its place) and with it: one folder, one MMDiT."""
    info = build_sd3(folder)
    text = _family_catalog("tiny-sd3", "sd3", folder, {"clip-l": "text_encoder", "clip-g": "text_encoder_2"}, info,
                           STANDARD_WORKFLOWS)
    text += _model("tiny-sd3-t5", "text_encoder", "sd3", folder, "text_encoder_3")
    encoders = ["tiny-sd3-clip-l", "tiny-sd3-clip-g", "tiny-sd3-t5"]
    for suffix, cfg, img2img in STANDARD_WORKFLOWS:
        text += _workflow(f"tiny-sd3-t5-{suffix}", encoders, "tiny-sd3-unet", "tiny-sd3-vae", cfg, img2img, info)
    text += _lora_catalog("tiny-sd3", "sd3", folder, info, ["tiny-sd3-clip-l", "tiny-sd3-clip-g"])
    return text + _controlnet_catalog("tiny-sd3", "sd3", folder, info, ["tiny-sd3-clip-l", "tiny-sd3-clip-g"])


def _flux_catalog(root: Path) -> str:
    """Flux schnell-shaped, and a dev-shaped transformer (guidance embedding) that shares
    its text encoders and VAE, as FLUX.1-dev does with -schnell."""
    info = build_flux(root / "flux")
    text = _family_catalog("tiny-flux", "flux", root / "flux", {"clip": "text_encoder", "t5": "text_encoder_2"}, info,
                           STANDARD_WORKFLOWS)
    text += _controlnet_catalog("tiny-flux", "flux", root / "flux", info, ["tiny-flux-clip", "tiny-flux-t5"])
    text += _lora_catalog("tiny-flux", "flux", root / "flux", info, ["tiny-flux-clip", "tiny-flux-t5"])
    build_flux(root / "flux-dev", guidance_embeds=True)  # a complete pipeline folder, for FluxPipeline
    text += _model("tiny-flux-dev-unet", "denoiser", "flux", root / "flux-dev", "transformer",
                   f"latent_channels = 4\nvae_scale = {info['vae_scale']}\n")
    # Distilled guidance, no CFG: the `guidance` input is the scale the transformer embeds
    # (FluxPipeline's `guidance_scale`). The catalog flag is written once the broker reads it.
    extra = "distilled_guidance = true\n" if _broker_reads("distilled_guidance") else ""
    return text + _workflow("tiny-flux-dev-txt2img", ["tiny-flux-clip", "tiny-flux-t5"], "tiny-flux-dev-unet",
                            "tiny-flux-vae", False, False, info, extra)


def _broker_reads(workflow_field: str) -> bool:
    """Whether broker/catalog/ knows this workflow field: an unknown one fails the catalog."""
    import dataclasses

    return any(f.name == workflow_field for f in dataclasses.fields(WorkflowSpec))


def _model(name: str, kind: str, family: str, source: Path, subfolder: str, extra: str = "") -> str:
    return (f'\n[models.{name}]\nkind = "{kind}"\nfamily = "{family}"\nsource = "{source}"\n'
            f'subfolder = "{subfolder}"\ndtype = "float32"\n{extra}')


def _workflow(name: str, encoders: list[str], denoiser: str, vae: str, cfg: bool, img2img: bool, info: dict,
              extra: str = "") -> str:
    kind = "image-to-image" if img2img else "text-to-image"
    multiple = 2 * info["vae_scale"]  # what the workflow's size inputs must be a multiple of
    names = ", ".join(f'"{encoder}"' for encoder in encoders)
    text = (f"\n[workflows.{name}]\n"
            f'description = "{name}: {kind}, {"CFG" if cfg else "no CFG"} (random weights)"\n'
            f'text_encoders = [{names}]\ndenoiser = "{denoiser}"\nvae = "{vae}"\n'
            f"cfg = {str(cfg).lower()}\nimg2img = {str(img2img).lower()}\n{extra}"
            f'inputs.steps = {{ default = {info["steps"]} }}\n'
            f'inputs.width = {{ default = {info["image"]}, min = {multiple} }}\n'
            f'inputs.height = {{ default = {info["image"]}, min = {multiple} }}\n')
    if "samplers" in info:  # e.g. flow matching: the model's own scheduler only
        text += f'inputs.sampler = {{ choices = {info["samplers"]!r}, default = "default" }}\n'.replace("'", '"')
    return text


def _family_catalog(prefix: str, family: str, folder: Path, encoders: dict[str, str], info: dict,
                    workflows: list[tuple[str, bool, bool]]) -> str:
    """Catalog entries for one pipeline folder: its models, then (suffix, cfg, img2img) workflows."""
    text = "".join(_model(f"{prefix}-{name}", "text_encoder", family, folder, sub) for name, sub in encoders.items())
    text += _model(f"{prefix}-unet", "denoiser", family, folder, info.get("denoiser", "unet"),
                   f"latent_channels = 4\nvae_scale = {info['vae_scale']}\n")
    text += _model(f"{prefix}-vae", "vae", family, folder, "vae")
    names = [f"{prefix}-{name}" for name in encoders]
    return text + "".join(_workflow(f"{prefix}-{suffix}", names, f"{prefix}-unet", f"{prefix}-vae", cfg, img2img, info)
                          for suffix, cfg, img2img in workflows)
