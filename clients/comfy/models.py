"""ComfyUI model file names resolved in a ComfyUI-style models folder, as catalog models.

`checkpoints/`, `diffusion_models/` (or `unet/`), `text_encoders/` (or `clip/`), `vae/`,
`loras/`, `controlnet/`. A name may be a file or a folder; where the file is not there a
folder of the same name without its suffix is taken (`v1-5.safetensors` -> `v1-5/`):

- a checkpoint folder: a diffusers pipeline folder (`model_index.json`): its text encoders,
  base model and VAE;
- a diffusion-model folder: one holding `unet/` or `transformer/` (with `scheduler/`);
- a text-encoder folder: one holding a single `text_encoder*/` and its `tokenizer*/`;
- a VAE or ControlNet folder: the model's own (`config.json`), or one holding `vae/`;
- a LoRA: a `.safetensors` file or a folder holding one.

A single `.safetensors` file serves a base model, VAE or ControlNet (diffusers'
`from_single_file`); its diffusers config is read from the folder beside it (`unet/config.json`
next to the file) or from a catalog model of the same family and kind. Text encoders load
from folders only, as the diffusers backend loads them. Paths are resolved (symlinks
followed), so a model already in the catalog is recognised by its source.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FOLDERS = {
    "checkpoints": ("checkpoints",),
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "loras": ("loras",),
    "controlnet": ("controlnet",),
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf")
PIPELINE_FAMILIES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl",
                     "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
DENOISER_FOLDERS = {"sd15": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
CONTROLNET_CLASSES = {"ControlNetModel": ("sd15", "sdxl"), "SD3ControlNetModel": ("sd3",),
                      "FluxControlNetModel": ("flux",)}


class ModelError(ValueError):
    """A model file the importer cannot serve; `type` is the ComfyUI-style error type."""

    def __init__(self, message: str, details: str = "", type_: str = "model_not_found"):
        super().__init__(message)
        self.message, self.details, self.type = message, details, type_


@dataclass
class Model:
    """One catalog model an imported workflow needs."""

    kind: str  # text_encoder | denoiser | vae | controlnet
    family: str
    source: str
    subfolder: str
    file: str  # the ComfyUI name it was resolved from
    config: str = ""
    fields: dict[str, Any] = field(default_factory=dict)  # seq_len, embed_dim, latent_channels, vae_scale
    architecture: str = ""  # text encoders: CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel
    guidance_embeds: bool = False  # Flux: a guidance-distilled transformer (FLUX.1-dev)


def find(models_dir: Path, folder: str, name: str) -> Path:
    """The file or folder a ComfyUI name designates, or ModelError."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or ".." in clean.split("/") or "\x00" in clean:
        raise ModelError(f"{name!r} is not a name inside the models folder", type_="value_not_in_list")
    tried = []
    for sub in FOLDERS[folder]:
        path = models_dir / sub / clean
        tried.append(str(path))
        if path.exists():
            return path.resolve()
        if path.suffix in SINGLE_FILE_SUFFIXES and path.with_suffix("").is_dir():
            return path.with_suffix("").resolve()
    raise ModelError(f"Model file not found: {name}", f"looked for {' or '.join(tried)} (or a folder without the "
                     "suffix)", "value_not_in_list")


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a .safetensors file, read from its header (no tensor is loaded)."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelError(f"{path.name} is not a readable .safetensors file", str(exc), "invalid_model") from None
    return [k for k in header if k != "__metadata__"]


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _single_file(path: Path) -> Path:
    if path.suffix != ".safetensors":
        raise ModelError(f"{path.name}: only .safetensors single files are served",
                         "the diffusers backend never unpickles a checkpoint (.ckpt/.pt/.bin); convert it, or "
                         "name a diffusers folder", "unsupported_model")
    return path


def file_family(keys: list[str]) -> str:
    """The pipeline family of a single-file base model, from its tensor names (original or
    diffusers layout); '' where none of the four fits."""
    text = "\n".join(keys)
    if "double_blocks." in text or "single_transformer_blocks." in text:
        return "flux"
    if "joint_blocks." in text or ("transformer_blocks." in text and "pos_embed." in text):
        return "sd3"
    if "label_emb." in text or "add_embedding." in text:
        return "sdxl"
    if "input_blocks." in text or "down_blocks." in text:
        return "sd15"
    return ""


def _file_model(path: Path, kind: str, family: str, sub: str, name: str, catalog) -> Model:
    """A single-file model with where its diffusers config is read."""
    _single_file(path)
    if (path.parent / sub / "config.json").is_file():
        return Model(kind, family, str(path), sub, name)
    # else the one served model of the same family and kind gives its config; several (SD3
    # Medium and 3.5 Large, FLUX.1-dev and -schnell) would be a guess between architectures
    found = {(spec.source, spec.subfolder or sub) for spec in catalog.models.values()
             if spec.kind == kind and spec.family == family and spec.source
             and Path(spec.source).suffix not in SINGLE_FILE_SUFFIXES}
    if len(found) == 1:
        (source, subfolder), = found
        return Model(kind, family, str(path), subfolder, name, config=source)
    raise ModelError(f"{path.name}: no diffusers config for this single-file {kind}",
                     f"put {sub}/config.json beside the file (the catalog has {len(found)} {family} {kind} "
                     "configs to choose from, one would be taken)", "unsupported_model")


def checkpoint(models_dir: Path, name: str, catalog) -> dict[str, Any]:
    """CheckpointLoaderSimple: {"family", "denoiser": Model, "vae": Model | None,
    "encoders": [Model] | ModelError (a file's text encoders cannot be served)}."""
    path = find(models_dir, "checkpoints", name)
    if path.is_dir():
        index = _json(path / "model_index.json")
        family = PIPELINE_FAMILIES.get(index.get("_class_name", ""))
        if family is None:
            raise ModelError(f"{name}: not a pipeline folder of a supported family",
                             f"{path}/model_index.json names {index.get('_class_name')!r}; supported: "
                             f"{sorted(PIPELINE_FAMILIES)}", "unsupported_model")
        denoiser = folder_denoiser(path, name, family)
        encoders = [encoder_at(path, sub, name, family) for sub in ("text_encoder", "text_encoder_2", "text_encoder_3")
                    if index.get(sub, [None])[0] is not None and (path / sub / "config.json").is_file()]
        vae = vae_at(path, "vae", name, family) if (path / "vae" / "config.json").is_file() else None
        return {"family": family, "denoiser": denoiser, "vae": vae, "encoders": encoders}
    keys = safetensors_keys(_single_file(path))
    family = file_family(keys)
    if not family:
        raise ModelError(f"{name}: cannot tell the model family from the checkpoint's tensors", type_="unsupported_model")
    denoiser = _file_model(path, "denoiser", family, DENOISER_FOLDERS[family], name, catalog)
    has_vae = any(k.startswith(("first_stage_model.", "vae.")) for k in keys)
    vae = _file_model(path, "vae", family, "vae", name, catalog) if has_vae else None
    has_clip = any(k.startswith(("cond_stage_model.", "conditioner.", "text_encoders.")) for k in keys)
    encoders = ModelError(
        f"{name}: the text encoders of a single-file checkpoint cannot be served" if has_clip
        else f"{name}: the checkpoint holds no text encoder",
        "the diffusers backend loads text encoders from diffusers folders: load them with CLIPLoader / "
        "DualCLIPLoader / TripleCLIPLoader from such folders, or name a pipeline folder as the checkpoint",
        "unsupported_model")
    _denoiser_fields(denoiser, Path(denoiser.config or path.parent).expanduser() / "vae")
    return {"family": family, "denoiser": denoiser, "vae": vae, "encoders": encoders}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def folder_denoiser(path: Path, name: str, family: str | None = None) -> Model:
    for sub in ("unet", "transformer"):
        config = _config(path / sub)
        if not config:
            continue
        real = (path / sub).resolve()
        found = {"UNet2DConditionModel": None, "SD3Transformer2DModel": "sd3",
                 "FluxTransformer2DModel": "flux"}.get(config.get("_class_name", ""), "?")
        if found == "?":
            break
        if found is None:  # a UNet: SDXL's has the text-time embedding
            found = "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"
        if family and found != family:
            raise ModelError(f"{name}: its {sub} is a {found} model, its pipeline is {family}", type_="unsupported_model")
        if not (real.parent / "scheduler").is_dir():
            raise ModelError(f"{name}: no scheduler/ folder beside {sub}/", "the base model steps with its "
                             "scheduler config", "unsupported_model")
        model = Model("denoiser", found, str(real.parent), real.name, name,
                      guidance_embeds=bool(config.get("guidance_embeds")))
        _denoiser_fields(model, real.parent / "vae")
        return model
    raise ModelError(f"{name}: no unet/ or transformer/ of a supported family in {path}", type_="unsupported_model")


def _denoiser_fields(model: Model, vae_folder: Path) -> None:
    """The latent's channels and the VAE's downscale, from the VAE config beside the model
    (the families' real values where there is none)."""
    vae = _config(vae_folder)
    if vae:
        model.fields = {"latent_channels": int(vae.get("latent_channels", 4)),
                        "vae_scale": 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)}
    else:
        model.fields = {"latent_channels": 16 if model.family in ("sd3", "flux") else 4, "vae_scale": 8}


def diffusion_model(models_dir: Path, name: str, catalog) -> Model:
    """UNETLoader: a folder holding unet/ or transformer/ (and scheduler/), or a single file."""
    path = find(models_dir, "diffusion_models", name)
    if path.is_dir():
        return folder_denoiser(path, name)
    keys = safetensors_keys(_single_file(path))
    family = file_family(keys)
    if not family:
        raise ModelError(f"{name}: cannot tell the model family from the file's tensors", type_="unsupported_model")
    model = _file_model(path, "denoiser", family, DENOISER_FOLDERS[family], name, catalog)
    model.guidance_embeds = family == "flux" and any("guidance_in." in k or "guidance_embedder." in k for k in keys)
    config = _config(Path(model.config or path.parent).expanduser() / model.subfolder)
    if family == "flux" and config and bool(config.get("guidance_embeds")) != model.guidance_embeds:
        raise ModelError(f"{name}: its config and its weights disagree on the guidance embedding",
                         "FLUX.1-dev embeds guidance, -schnell does not: give the file its own config", "unsupported_model")
    _denoiser_fields(model, Path(model.config or path.parent).expanduser() / "vae")
    return model


def encoder_at(folder: Path, sub: str, name: str, family: str = "") -> Model:
    real = (folder / sub).resolve()
    config = _config(real)
    architectures = config.get("architectures") or []
    if len(architectures) != 1:
        raise ModelError(f"{name}: {sub}/config.json names no single architecture", type_="unsupported_model")
    tokenizer = real.parent / (real.name.replace("text_encoder", "tokenizer") if "text_encoder" in real.name else "tokenizer")
    if not tokenizer.is_dir():
        raise ModelError(f"{name}: no tokenizer folder {tokenizer.name}/ beside {real.name}/", type_="unsupported_model")
    t5 = architectures[0].startswith("T5")
    hidden = config.get("d_model" if t5 else "hidden_size", 8)
    return Model("text_encoder", family, str(real.parent), real.name, name, architecture=architectures[0],
                 fields={"seq_len": 256 if t5 else 77, "embed_dim": int(hidden)})


def text_encoder(models_dir: Path, name: str) -> Model:
    """CLIPLoader and friends: a folder holding one text_encoder*/ with its tokenizer*/."""
    path = find(models_dir, "text_encoders", name)
    if not path.is_dir():
        raise ModelError(f"{name}: text encoders are served from folders only",
                         "the diffusers backend loads a text encoder with its tokenizer from a diffusers folder; "
                         f"put a folder {Path(name).with_suffix('').name}/ holding text_encoder/ and tokenizer/ there",
                         "unsupported_model")
    subs = sorted(p.name for p in path.iterdir() if p.name.startswith("text_encoder") and (p / "config.json").is_file())
    if len(subs) != 1:
        raise ModelError(f"{name}: the folder holds {len(subs)} text encoders, one expected",
                         f"found {subs} in {path}", "unsupported_model")
    return encoder_at(path, subs[0], name)


def vae_at(folder: Path, sub: str, name: str, family: str) -> Model:
    real = (folder / sub).resolve() if sub else folder.resolve()
    if _config(real).get("_class_name") != "AutoencoderKL":
        raise ModelError(f"{name}: not an AutoencoderKL folder", type_="unsupported_model")
    return Model("vae", family, str(real.parent), real.name, name)


def vae(models_dir: Path, name: str, family: str, catalog) -> Model:
    path = find(models_dir, "vae", name)
    if path.is_dir():
        return vae_at(path, "vae" if (path / "vae" / "config.json").is_file() else "", name, family)
    return _file_model(path, "vae", family, "vae", name, catalog)


def controlnet(models_dir: Path, name: str, family: str, catalog) -> Model:
    path = find(models_dir, "controlnet", name)
    if not path.is_dir():
        return _file_model(path, "controlnet", family, "controlnet", name, catalog)
    sub = "controlnet" if (path / "controlnet" / "config.json").is_file() else ""
    real = (path / sub).resolve() if sub else path
    class_name = _config(real).get("_class_name", "")
    if family not in CONTROLNET_CLASSES.get(class_name, ()):
        raise ModelError(f"{name}: a {class_name or 'unknown'} ControlNet does not fit a {family} base model",
                         type_="unsupported_model")
    return Model("controlnet", family, str(real.parent), real.name, name)


def lora(models_dir: Path, name: str) -> tuple[Path, bool]:
    """(the adapter's source, whether it holds text-encoder layers)."""
    path = find(models_dir, "loras", name)
    file = path
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise ModelError(f"{name}: the folder holds {len(files)} .safetensors files, one expected",
                             type_="unsupported_model")
        file = files[0]
    keys = safetensors_keys(_single_file(file))
    text = any(k.startswith(("text_encoder", "lora_te", "te_", "te1", "te2")) for k in keys)
    return path, text
