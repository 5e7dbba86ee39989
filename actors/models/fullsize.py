"""Full-size SDXL, SD3 and Flux components from their published configs, with random weights.

Runs in whichever process builds them (the GPU check, `clients/bench/gpu_check.py`); no
sockets. Nothing is downloaded: the architecture settings below are the values of
the published `config.json` files (stabilityai/stable-diffusion-xl-base-1.0,
stabilityai/stable-diffusion-3-medium-diffusers and black-forest-labs/FLUX.1-schnell),
the weights are random and are built directly on the target device (a 2.6 B-parameter
UNet then takes seconds, not minutes of CPU initialisation), and the tokenizers are
tiny.py's byte-level CLIP tokenizer and printable-ASCII T5 tokenizer, since the real
vocabularies cannot be fetched: the CLIP encoders keep their real 49,408-row embedding
tables and simply see low token ids (Flux's T5 takes its vocabulary size from the
tokenizer). Each pipeline is saved in the layout `from_pretrained` reads, so the actors
and the reference pipeline load it through the real loading path, plus a catalog naming
its models and workflow.

`size="dry"` shrinks every width and depth (same block structure, same latent
channels and VAE scale) so the same code runs on a CPU in seconds: the GPU check's
`--dry-run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from actors.models.tiny import write_clip_tokenizer, write_t5_tokenizer

SIZES = ("full", "dry")
# Every family's VAE has four levels, in both sizes. Flux packs 2x2 latent patches into
# tokens on top of it (its catalog `vae_scale` is still the VAE's 8: the backend doubles it).
VAE_SCALE = 8

# text_encoder (CLIP ViT-L/14) and text_encoder_2 (OpenCLIP ViT-bigG/14), as SDXL and SD3 ship
# them; Flux's text_encoder is the same CLIP-L.
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu", "vocab_size": 49408, "max_position_embeddings": 77}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "hidden_act": "gelu", "vocab_size": 49408, "max_position_embeddings": 77}
CLIP_DRY = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
            "projection_dim": 32, "vocab_size": 49408, "max_position_embeddings": 77}

SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
SDXL_UNET_DRY = {
    **SDXL_UNET, "addition_time_embed_dim": 8, "attention_head_dim": [2, 4, 4], "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 64, "layers_per_block": 1, "projection_class_embeddings_input_dim": 8 * 6 + 32,
    "sample_size": 8, "transformer_layers_per_block": [1, 1, 1],
}
SDXL_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD3_TRANSFORMER = {
    "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192, "sample_size": 128,
}
SD3_TRANSFORMER_DRY = {
    **SD3_TRANSFORMER, "attention_head_dim": 8, "caption_projection_dim": 32, "joint_attention_dim": 64,
    "num_attention_heads": 4, "num_layers": 2, "pooled_projection_dim": 64, "pos_embed_max_size": 16,
    "sample_size": 8,
}
SD3_VAE = {
    **SDXL_VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
    "use_post_quant_conv": False,
}
VAE_DRY = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "sample_size": 64}
# FLUX.1-schnell's transformer (transformer/config.json: 12 B parameters) and a shrunken one
# of the same structure for --dry-run. Its 64 input channels are 16 latent channels x 2x2.
FLUX_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                    "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}
FLUX_TRANSFORMER_DRY = {**FLUX_TRANSFORMER, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
                        "axes_dims_rope": (4, 6, 6)}
# text_encoder_2: T5 v1.1 XXL's width (google/t5-v1_1-xxl, as FLUX.1 ships it) but 2 of its 24
# layers: see build_flux. Dry: width 32 (the dry transformer's joint_attention_dim).
T5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_heads": 64, "num_layers": 2,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-06, "tie_word_embeddings": False}
T5_DRY = {**T5_XXL, "d_model": 32, "d_kv": 8, "d_ff": 37, "num_heads": 4}
# FLUX.1's VAE: SD3's architecture (16 latent channels) with its own scaling and shift.
FLUX_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
# FlowMatchEulerDiscreteScheduler with Flux's resolution-dependent (dynamic) shift.
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


@dataclass(frozen=True)
class Built:
    """One saved pipeline folder and how the catalog names it."""

    family: str  # sdxl | sd3 | flux
    folder: Path
    dtype: str  # float16 | bfloat16 | float32
    image: int  # default width and height
    encoders: dict  # catalog model suffix -> subfolder
    denoiser: str  # subfolder
    latent_channels: int


def _clip_config(base: dict, vocab: int, dry: bool):
    """A CLIP text config whose special tokens are the byte-level tokenizer's."""
    from transformers import CLIPTextConfig

    values = {**base, **CLIP_DRY} if dry else dict(base)  # dry: same activation, tiny widths
    return CLIPTextConfig(**values, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)


def _save(pipe, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)


def _torch_dtype(dtype: str):
    import torch

    return getattr(torch, dtype)


def _prepare(folder: str | Path, size: str, seed: int, second_clip: bool = True) -> tuple[bool, Path, int]:
    """Every build's start: check the size, write the CLIP tokenizer (and, with
    `second_clip`, a second one as tokenizer_2), seed torch."""
    import torch

    if size not in SIZES:
        raise ValueError(f"size: expected one of {SIZES}, got {size!r}")
    folder = Path(folder)
    vocab = write_clip_tokenizer(folder / "tokenizer")
    if second_clip:
        write_clip_tokenizer(folder / "tokenizer_2")
    torch.manual_seed(seed)
    return size == "dry", folder, vocab


def build_sdxl(folder: str | Path, *, size: str = "full", dtype: str = "float16", device: str = "cpu",
               seed: int = 0) -> Built:
    """StableDiffusionXLPipeline's components (UNet 2.6 B, CLIP-L, CLIP-bigG, VAE), saved in `dtype`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dry, folder, vocab = _prepare(folder, size, seed)
    with torch.device(device):  # initialise on the device itself: seconds on a GPU
        unet = UNet2DConditionModel(**(SDXL_UNET_DRY if dry else SDXL_UNET))
        text_encoder = CLIPTextModel(_clip_config(CLIP_L, vocab, dry))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(CLIP_G, vocab, dry))
        vae = AutoencoderKL(**(SDXL_VAE | VAE_DRY if dry else SDXL_VAE))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                                       prediction_type="epsilon", use_karras_sigmas=False)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), unet=unet, scheduler=scheduler,
    ).to(dtype=_torch_dtype(dtype))
    _save(pipe, folder)
    del pipe, unet, text_encoder, text_encoder_2, vae
    _release(device)
    return Built("sdxl", folder, dtype, 64 if dry else 512, {"clip-l": "text_encoder", "clip-g": "text_encoder_2"},
                 "unet", 4)


def build_sd3(folder: str | Path, *, size: str = "full", dtype: str = "bfloat16", device: str = "cpu",
              seed: int = 0) -> Built:
    """StableDiffusion3Pipeline's components (MMDiT 2 B, CLIP-L and CLIP-bigG with projections,
    VAE with 16 latent channels), without T5, which that pipeline allows (zeros take its place)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    dry, folder, vocab = _prepare(folder, size, seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**(SD3_TRANSFORMER_DRY if dry else SD3_TRANSFORMER))
        text_encoder = CLIPTextModelWithProjection(_clip_config(CLIP_L, vocab, dry))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(CLIP_G, vocab, dry))
        vae = AutoencoderKL(**(SD3_VAE | VAE_DRY if dry else SD3_VAE))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=text_encoder_2, tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        text_encoder_3=None, tokenizer_3=None,
    ).to(dtype=_torch_dtype(dtype))
    _save(pipe, folder)
    del pipe, transformer, text_encoder, text_encoder_2, vae
    _release(device)
    return Built("sd3", folder, dtype, 64 if dry else 512, {"clip-l": "text_encoder", "clip-g": "text_encoder_2"},
                 "transformer", 16)


def build_flux(folder: str | Path, *, size: str = "full", dtype: str = "bfloat16", device: str = "cpu",
               seed: int = 0) -> Built:
    """FluxPipeline's components, FLUX.1-schnell-sized (transformer 12 B, no guidance
    embedding; CLIP-L for the pooled vector; the 16-channel VAE), saved in `dtype`.

    The T5 encoder (text_encoder_2) has T5-XXL's real width (d_model 4096, 64 heads of 64,
    gated-GELU feed-forward of 10240) but 2 layers instead of 24: it runs once per request,
    and only its output, a 512 x 4096 sequence, enters the per-step path (the transformer's
    joint attention), so its depth changes the per-request time, not what a step moves or
    computes. Everything is initialised on the device directly in `dtype` (the transformer
    in float32 would need 48 GB)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    dry, folder, clip_vocab = _prepare(folder, size, seed, second_clip=False)
    t5_vocab = write_t5_tokenizer(folder / "tokenizer_2")  # as tiny.py's Flux: printable ASCII
    t5_config = T5Config(**(T5_DRY if dry else T5_XXL), vocab_size=t5_vocab, pad_token_id=0, eos_token_id=1,
                         decoder_start_token_id=0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(_torch_dtype(dtype))
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**(FLUX_TRANSFORMER_DRY if dry else FLUX_TRANSFORMER))
            text_encoder = CLIPTextModel(_clip_config(CLIP_L, clip_vocab, dry))
            text_encoder_2 = T5EncoderModel(t5_config)
            vae = AutoencoderKL(**(FLUX_VAE | VAE_DRY if dry else FLUX_VAE))
    finally:
        torch.set_default_dtype(previous)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), text_encoder_2=text_encoder_2,
        tokenizer_2=T5TokenizerFast.from_pretrained(folder / "tokenizer_2"), transformer=transformer,
    ).to(dtype=_torch_dtype(dtype))
    _save(pipe, folder)
    del pipe, transformer, text_encoder, text_encoder_2, vae
    _release(device)
    return Built("flux", folder, dtype, 64 if dry else 512, {"clip": "text_encoder", "t5": "text_encoder_2"},
                 "transformer", 16)


def _release(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()  # the builder's copies: the actors and the reference load their own


def catalog_text(built: Built, prefix: str) -> str:
    """Catalog entries for a built folder: its models and a text-to-image workflow `{prefix}-txt2img`,
    with CFG (SDXL, SD3) or without (Flux: schnell is guidance-distilled)."""
    def model(name: str, kind: str, subfolder: str, extra: str = "") -> str:
        return (f'\n[models.{prefix}-{name}]\nkind = "{kind}"\nfamily = "{built.family}"\n'
                f'source = "{built.folder.resolve()}"\nsubfolder = "{subfolder}"\ndtype = "{built.dtype}"\n{extra}')

    text = "".join(model(name, "text_encoder", sub) for name, sub in built.encoders.items())
    text += model("denoiser", "denoiser", built.denoiser,
                  f"latent_channels = {built.latent_channels}\nvae_scale = {VAE_SCALE}\n")
    text += model("vae", "vae", "vae")
    encoders = ", ".join(f'"{prefix}-{name}"' for name in built.encoders)
    text += (f"\n[workflows.{prefix}-txt2img]\n"
             f'description = "{built.family} at full architecture size, random weights, {built.dtype}"\n'
             f'text_encoders = [{encoders}]\ndenoiser = "{prefix}-denoiser"\nvae = "{prefix}-vae"\n'
             f"cfg = {str(built.family != 'flux').lower()}\n"
             f"inputs.steps = {{ default = 4 }}\n"
             f"inputs.width = {{ default = {built.image} }}\ninputs.height = {{ default = {built.image} }}\n")
    if built.family in ("sd3", "flux"):  # flow matching: the model's own scheduler only
        text += 'inputs.sampler = { choices = ["default"], default = "default" }\n'
    return text


def pipeline_class(family: str) -> str:
    return {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]


def pipeline_extra(family: str) -> dict:
    """What from_pretrained must be told about components a folder leaves out."""
    if family == "sd3":
        return {"text_encoder_3": None, "tokenizer_3": None, "image_encoder": None, "feature_extractor": None}
    if family == "flux":
        return {"image_encoder": None, "feature_extractor": None}
    return {}
