"""Where a diffusers actor's weights and configs come from, and loading them.

Runs in an actor process. Sources: a pipeline folder or hub id (`from_pretrained`, with
`subfolder`), or, for denoisers, VAEs and ControlNets, one local `.safetensors`
checkpoint (`from_single_file`, original layout or the model's diffusers keys) whose
diffusers config is read from a local folder, never from a hub. `CatalogConfigs` reads
the configs of the catalog's other models (a ControlNet steps with its base model's
scheduler and scales with its VAE's factors) the same way, without loading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actors.backends import controlnet
from actors.backends.diffusers.family import Family, denoiser_folder, sibling_folder
from broker.catalog import ModelSpec

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ActorModel:
    """The actor's one model as the blocks use it: its component (text encoder, base model,
    VAE or ControlNet) on its device once loaded, and what goes with it."""

    spec: ModelSpec
    family: Family
    device: torch.device
    dtype: torch.dtype
    configs: CatalogConfigs  # the catalog's other models' configs (attach_catalog)
    component: Any = None
    tokenizer: Any = None  # text encoders
    scheduler_config: Any = None  # denoisers: any scheduler class reads it; the sampler picks the class per step


class ModelSource:
    """Resolves one catalog model's `source` (and `config`) as its backend loads it."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        self.spec, self.dtype = spec, dtype

    def location(self) -> str:
        path = Path(self.spec.source).expanduser()
        return str(path) if path.exists() else self.spec.source  # a hub id otherwise

    def checkpoint(self) -> Path | None:
        """The file when `source` names a single-file checkpoint, else None (a folder or hub id)."""
        path = Path(self.spec.source).expanduser()
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            return None
        field = f"models.{self.spec.name}.source"
        if path.suffix != ".safetensors":  # torch.load would unpickle it: no pickle anywhere
            raise ValueError(f"{field}: single-file checkpoints load from .safetensors only, got {path.name!r}")
        if not path.is_file():
            raise ValueError(f"{field}: no such checkpoint file: {path}")
        return path

    def single_file_config(self, checkpoint: Path, sub: str) -> str:
        """Where a single-file component's diffusers config is read, so `from_single_file` never
        asks a hub: the model's `config`, else the checkpoint's own folder when
        `{subfolder}/config.json` lies beside it."""
        field = f"models.{self.spec.name}.config"
        config = self.spec.config
        if not config:
            if (checkpoint.parent / sub / "config.json").is_file():
                return str(checkpoint.parent)
            raise ValueError(f"{field}: a single-file source needs a folder holding the diffusers config "
                             f"{sub}/config.json (none beside {checkpoint}); without it diffusers would look "
                             "the config up on the hub")
        folder = Path(config).expanduser()
        if folder.exists() and not (folder / sub / "config.json").is_file():
            raise ValueError(f"{field}: {folder} holds no {sub}/config.json")
        return str(folder) if folder.exists() else config  # a hub id otherwise

    def config_folder(self, sub: str) -> str:
        """The folder (or hub id) holding the configs of `sub`, without loading anything."""
        checkpoint = self.checkpoint()
        return self.location() if checkpoint is None else self.single_file_config(checkpoint, sub)

    def load(self, cls, sub: str) -> tuple[Any, str]:
        """Load a diffusers model from a folder/hub id or a single file; returns it and the
        folder (or hub id) its sibling configs (the scheduler's) are read from."""
        checkpoint = self.checkpoint()
        if checkpoint is None:
            source = self.location()
            return cls.from_pretrained(source, subfolder=sub, torch_dtype=self.dtype), source
        config = self.single_file_config(checkpoint, sub)
        # An original-format (LDM/BFL) checkpoint is converted by diffusers; one holding exactly
        # this model's diffusers keys loads as is.
        return cls.from_single_file(str(checkpoint), config=config, subfolder=sub, torch_dtype=self.dtype), config


def load_model(model: ActorModel) -> None:
    """Load the model's component (and tokenizer or scheduler config) onto its device."""
    loaders = {"text_encoder": _load_text_encoder, "denoiser": _load_denoiser, "vae": _load_vae,
               "controlnet": _load_controlnet}
    if model.spec.kind not in loaders:
        raise ValueError(f"models.{model.spec.name}.kind: {model.spec.kind!r} has no diffusers loader")
    loaders[model.spec.kind](model, ModelSource(model.spec, model.dtype))
    model.component.to(model.device).eval()


def _load_text_encoder(model: ActorModel, source: ModelSource) -> None:
    import transformers
    from transformers import AutoConfig, CLIPTokenizer

    if source.checkpoint() is not None:
        raise ValueError(f"models.{model.spec.name}.source: text encoders load from a pipeline folder or hub id; "
                         "single-file checkpoints are for denoisers and VAEs")
    location, sub = source.location(), model.spec.subfolder or "text_encoder"
    # CLIPTextModel, CLIPTextModelWithProjection (SDXL/SD3) or T5EncoderModel (Flux, SD3), as saved
    (architecture,) = AutoConfig.from_pretrained(location, subfolder=sub).architectures
    tokenizer_cls = transformers.T5TokenizerFast if architecture.startswith("T5") else CLIPTokenizer
    model.tokenizer = tokenizer_cls.from_pretrained(location, subfolder=sibling_folder(sub, "tokenizer"))
    model.component = getattr(transformers, architecture).from_pretrained(location, subfolder=sub,
                                                                          torch_dtype=model.dtype)


def _load_denoiser(model: ActorModel, source: ModelSource) -> None:
    import diffusers

    sub = model.spec.subfolder or model.family.denoiser_folder
    model.component, configs = source.load(getattr(diffusers, model.family.denoiser_class), sub)
    # Any scheduler class reads the config file; the sampler picks the class per step.
    model.scheduler_config = diffusers.DDIMScheduler.load_config(configs, subfolder=sibling_folder(sub, "scheduler"))


def _load_vae(model: ActorModel, source: ModelSource) -> None:
    from diffusers import AutoencoderKL

    model.component, _ = source.load(AutoencoderKL, model.spec.subfolder or "vae")
    if model.family.upcast_vae and model.dtype == torch.float16 and model.component.config.force_upcast:
        # The SDXL pipelines run a half-precision VAE in float32 (`upcast_vae`): so do we.
        model.component.to(torch.float32)


def _load_controlnet(model: ActorModel, source: ModelSource) -> None:
    cls = controlnet.controlnet_class(model.spec.family)
    model.component, _ = source.load(cls, model.spec.subfolder or "controlnet")


class CatalogConfigs:
    """The diffusers configs of the catalog's other models, read once each from their
    sources, never loaded: a base model's scheduler (a ControlNet prepares each step as
    that model does), a VAE's shift and scaling factors, the lead ControlNet's rules."""

    def __init__(self, catalog):
        self.catalog = catalog
        self._configs: dict[str, Any] = {}

    def scheduler_of(self, denoiser: str) -> dict:
        if denoiser not in self._configs:
            from diffusers import DDIMScheduler

            folder, sub = self._folder(denoiser, "denoiser")
            self._configs[denoiser] = DDIMScheduler.load_config(folder, subfolder=sibling_folder(sub, "scheduler"))
        return self._configs[denoiser]

    def config_of(self, name: str, kind: str) -> dict:
        key = f"{kind}:{name}"
        if key not in self._configs:
            from diffusers import AutoencoderKL

            folder, sub = self._folder(name, kind)
            # load_config reads the folder's config.json whatever model wrote it
            self._configs[key] = dict(AutoencoderKL.load_config(folder, subfolder=sub))
        return self._configs[key]

    def _folder(self, name: str, kind: str) -> tuple[str, str]:
        """(folder or hub id, subfolder) holding the configs of model `name`, resolved as that
        model's own backend would (a single-file source reads its configs from its `config` folder)."""
        spec = self.catalog.models.get(name) if self.catalog is not None else None
        if spec is None or spec.kind != kind:
            raise ValueError(f"params: {name!r} is not a {kind} of this actor's catalog")
        sub = spec.subfolder or (denoiser_folder(spec.family) if kind == "denoiser" else kind)
        return ModelSource(spec, torch.float32).config_folder(sub), sub
