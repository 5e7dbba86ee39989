"""A checked ComfyUI graph mapped onto one catalog workflow: its models, flags and defaults.

The graph must be one txt2img or img2img pipeline: a loader chain (checkpoint or separate
base model / text encoders / VAE, LoRAs), two text encodes (ControlNets and Flux guidance
applied to them), one sampler on an empty latent or a VAE-encoded image, one VAE decode
into SaveImage / PreviewImage. Every literal becomes a default of the workflow's inputs;
what the workflow cannot express is refused with a node error, never approximated.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from broker.catalog import (
    ADAPTER_WEIGHT,
    MAX_ADAPTERS,
    MAX_SEED,
    Catalog,
    CatalogError,
    ParamError,
    WorkflowSpec,
    control_suffixes,
    img2img_runs,
    parse_catalog,
    validate_params,
)
from clients.comfy import models as m
from clients.comfy.errors import Collector, ComfyImportError, node_error
from clients.comfy.graph import to_api, validate
from clients.comfy.nodes import SAMPLER_NODES
from clients.comfy.samplers import group, map_sampler

ENCODE_NODES = ("CLIPTextEncode", "CLIPTextEncodeSDXL", "CLIPTextEncodeFlux")
CLIP_TYPES = {"stable_diffusion": "sd15", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}
ENCODERS = {  # family -> the encoder architectures it conditions on, in the pipeline's order
    "sd15": (["CLIPTextModel"],),
    "sdxl": (["CLIPTextModel", "CLIPTextModelWithProjection"],),
    "sd3": (["CLIPTextModelWithProjection", "CLIPTextModelWithProjection"],
            ["CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]),
    "flux": (["CLIPTextModel", "T5EncoderModel"],),
}
DTYPES = {"sd15": "float16", "sdxl": "float16", "sd3": "float16", "flux": "bfloat16"}
FLUX_PIPELINE_GUIDANCE = 3.5  # what a guidance-distilled Flux embeds under true CFG, and ComfyUI's default
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ImportedWorkflow:
    """One imported graph: `toml` holds its [models.*], [adapters.*] and [workflows.*]
    entries (load it after `catalog` with `load_catalog([..., file])`); `defaults` are the
    request parameters that reproduce the graph (its literals, LoRAs included); `images`
    maps the workflow's image inputs to the graph's LoadImage file names."""

    name: str
    toml: str
    workflow: WorkflowSpec
    catalog: Catalog  # the given catalog with the imported entries
    defaults: dict[str, Any]
    images: dict[str, str]
    api: dict  # the graph in ComfyUI's API format
    notes: list[str] = field(default_factory=list)


def import_graph(graph: dict, *, name: str, models_dir: str | Path, catalog: Catalog, replace: bool = False,
                 dtype: str | None = None) -> ImportedWorkflow:
    """Import a ComfyUI graph (API or UI format) as workflow `name`, its model files
    resolved under `models_dir` (ComfyUI's models folder layout). Models and adapters
    `catalog` already declares (same source) are reused by name. `dtype`: of the models it
    declares (default: float16, bfloat16 for Flux). Raises ComfyImportError."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ComfyImportError(error=node_error("invalid_workflow_name", f"Invalid workflow name {name!r}",
                                                "letters, digits, '.', '_' and '-', not starting with a symbol"))
    if name in catalog.workflows and not replace:
        raise ComfyImportError(error=node_error("invalid_workflow_name", f"Workflow {name!r} already exists",
                                                "pick another name, or replace it"))
    api = to_api(graph)
    outputs, deps = validate(api)
    return _Importer(api, deps, Path(models_dir), catalog, name, dtype).run(outputs)


class _Importer:
    def __init__(self, api: dict, deps: dict, models_dir: Path, catalog: Catalog, name: str, dtype: str | None):
        self.api, self.models_dir, self.catalog, self.name, self.dtype = api, models_dir, catalog, name, dtype
        self.errors = Collector(api, deps)
        self.where: dict[str, tuple[str, str]] = {}  # workflow input -> (node id, ComfyUI input) it came from
        self.notes: list[str] = []

    # ---- graph access
    def cls(self, node_id: str) -> str:
        return self.api[node_id]["class_type"]

    def val(self, node_id: str, name: str, default: Any = None) -> Any:
        return self.api[node_id]["inputs"].get(name, default)

    def src(self, node_id: str, name: str) -> tuple[str, int]:
        value = self.api[node_id]["inputs"][name]
        return str(value[0]), value[1]

    def fail(self, node_id: str, message: str, input_name: str | None = None, details: str = "",
             type_: str = "unsupported_value"):
        received = self.val(node_id, input_name) if input_name and input_name in self.api[node_id]["inputs"] else None
        if isinstance(received, list):
            received = None
        self.errors.fail(node_id, type_, message, details, input_name, received)

    def model(self, node_id: str, input_name: str, resolve, *args) -> Any:
        try:
            return resolve(self.models_dir, self.val(node_id, input_name), *args)
        except m.ModelError as exc:
            self.fail(node_id, exc.message, input_name, exc.details, exc.type)

    # ---- the walk
    def run(self, outputs: list[str]) -> ImportedWorkflow:
        decode_ids = set()
        for out in outputs:
            source, _ = self.src(out, "images")
            if self.cls(source) != "VAEDecode":
                self.fail(out, f"images must come from a VAEDecode of a sampler's latent, not from {self.cls(source)}",
                          "images", type_="unsupported_graph")
            decode_ids.add(source)
        samplers = {}
        for decode in sorted(decode_ids):
            source, _ = self.src(decode, "samples")
            if self.cls(source) not in SAMPLER_NODES:
                self.fail(decode, f"samples must come from a KSampler, not from {self.cls(source)}", "samples",
                          type_="unsupported_graph")
            samplers.setdefault(source, decode)
        if len(samplers) > 1:
            first, second = sorted(samplers)[:2]
            self.fail(second, "The graph runs several samplers: a workflow runs one",
                      details=f"samplers {sorted(samplers)}; import each branch as its own graph", type_="unsupported_graph")
        (sampler, decode), = samplers.items()
        return self.compile(sampler, sorted(decode_ids))

    def compile(self, s: str, decodes: list[str]) -> ImportedWorkflow:
        advanced = self.cls(s) == "KSamplerAdvanced"
        seed_input = "noise_seed" if advanced else "seed"
        steps, cfg = int(self.val(s, "steps")), float(self.val(s, "cfg"))
        if self.val(s, seed_input) > MAX_SEED:
            self.fail(s, f"seed above {MAX_SEED} (the largest torch takes)", seed_input)

        # latent: txt2img from an empty latent, img2img from a VAE-encoded image
        latent, _ = self.src(s, "latent_image")
        latent_cls = self.cls(latent)
        if latent_cls in SAMPLER_NODES:
            self.fail(s, "Two samplers chained: the latent comes from another sampler", "latent_image",
                      f"node {latent} ({latent_cls}); a workflow runs one sampler", "unsupported_graph")
        if latent_cls not in ("EmptyLatentImage", "EmptySD3LatentImage", "VAEEncode"):
            self.fail(s, f"latent_image from {latent_cls} is not supported", "latent_image",
                      "an EmptyLatentImage, EmptySD3LatentImage or VAEEncode of a LoadImage", "unsupported_graph")
        img2img = latent_cls == "VAEEncode"
        strength = None
        if advanced:
            strength = self._advanced(s, steps, img2img)
        else:
            denoise = float(self.val(s, "denoise", 1.0))
            if denoise < 1.0 and not img2img:
                self.fail(s, "denoise < 1 on an empty latent has no diffusers equivalent", "denoise",
                          "partial denoising needs an image: VAEEncode a LoadImage into latent_image")
            if img2img:
                strength, self.where["strength"] = denoise, (s, "denoise")
                if denoise < 1.0:
                    self.notes.append(f"node {s}: denoise {denoise} is the img2img strength: the pipeline runs "
                                      f"steps x strength of {steps} steps, where ComfyUI runs {steps} steps over the "
                                      "last share of a longer schedule (docs/comfy.md)")

        # the base model, its LoRAs, the text encoders
        model_loras, base = self._model_chain(s)
        denoiser = base["denoiser"]
        family = denoiser.family
        if advanced and img2img and img2img_runs(family, steps, strength) != steps - self.val(s, "start_at_step"):
            self.fail(s, "start_at_step has no exact img2img strength for this step count", "start_at_step",
                      f"the pipeline would run {img2img_runs(family, steps, strength)} steps, ComfyUI "
                      f"{steps - self.val(s, 'start_at_step')}")
        positive = self._conditioning(*self.src(s, "positive"))
        negative = self._conditioning(*self.src(s, "negative"))
        if cfg < 1.0:
            self.fail(s, "cfg below 1 has no diffusers equivalent", "cfg")
        use_cfg = cfg != 1.0
        clip_loras, encoders, clip_loader = self._clip_chain(positive["encoder"], family, base)
        if use_cfg:
            neg_loras, _, neg_loader = self._clip_chain(negative["encoder"], family, base)
            if (neg_loader, [n for n, *_ in neg_loras]) != (clip_loader, [n for n, *_ in clip_loras]):
                self.fail(negative["encoder"], "The negative prompt is encoded by other text encoders than the "
                          "positive one", "clip", "both must come from the same loader and LoRA chain")

        vae = self._vae(*self.src(decodes[0], "vae"), family, base)
        for other in decodes[1:]:
            if self._vae(*self.src(other, "vae"), family, base) != vae:
                self.fail(other, "Another VAE decodes the sampler's latent", "vae", type_="unsupported_graph")
        images: dict[str, str] = {}
        width = height = None
        if img2img:
            pixels, slot = self.src(latent, "pixels")
            if self.cls(pixels) != "LoadImage":
                self.fail(latent, f"pixels from {self.cls(pixels)}: the image to start from must be a LoadImage",
                          "pixels", type_="unsupported_graph")
            images["image"] = self.val(pixels, "image")
            if self._vae(*self.src(latent, "vae"), family, base) != vae:
                self.fail(latent, "VAEEncode and VAEDecode use different VAEs", "vae", type_="unsupported_graph")
        else:
            if self.val(latent, "batch_size") != 1:
                self.fail(latent, "batch_size must be 1: a request makes one image", "batch_size")
            width, height = self.val(latent, "width"), self.val(latent, "height")
            self.where["width"], self.where["height"] = (latent, "width"), (latent, "height")

        # prompts
        prompt = self._text(positive["encoder"], family, width, height)
        self.where["prompt"] = (positive["encoder"], _text_input(self.cls(positive["encoder"])))
        if not prompt.strip():
            self.fail(positive["encoder"], "The prompt must not be empty", self.where["prompt"][1])
        if self.cls(positive["encoder"]) == "CLIPTextEncodeSDXL" and width is None:
            width, height = self.val(positive["encoder"], "width"), self.val(positive["encoder"], "height")
            self.where["width"] = (positive["encoder"], "width")
            self.where["height"] = (positive["encoder"], "height")
        negative_prompt = None
        if use_cfg:
            negative_prompt = self._text(negative["encoder"], family, width, height)
            self.where["negative_prompt"] = (negative["encoder"], _text_input(self.cls(negative["encoder"])))

        # guidance: CFG scale, or the scale a guidance-distilled Flux embeds
        distilled = family == "flux" and denoiser.guidance_embeds and not use_cfg
        guidance = None
        if use_cfg:
            guidance, self.where["guidance"] = cfg, (s, "cfg")
            if family == "flux" and denoiser.guidance_embeds:
                for cond in (positive, negative):
                    if cond["guidance"] and cond["guidance"][1] != FLUX_PIPELINE_GUIDANCE:
                        self.fail(cond["guidance"][0], "With cfg > 1 a guidance-distilled Flux model embeds "
                                  f"the guidance {FLUX_PIPELINE_GUIDANCE} (FluxPipeline's true CFG)", "guidance",
                                  "set cfg to 1 to serve the embedded guidance, or the guidance to 3.5")
        elif distilled:
            guidance = positive["guidance"][1] if positive["guidance"] else FLUX_PIPELINE_GUIDANCE
            if positive["guidance"]:
                self.where["guidance"] = (positive["guidance"][0], "guidance")
        if positive["guidance"] and not (family == "flux" and denoiser.guidance_embeds):
            self.notes.append(f"node {positive['guidance'][0]}: the guidance has no effect on this model "
                              "(it embeds none), as in ComfyUI")

        sampler, bad, why = map_sampler(family, self.val(s, "sampler_name"), self.val(s, "scheduler"))
        if sampler is None:
            self.fail(s, why, bad)
        self.where["sampler"] = (s, "sampler_name")
        self.where["seed"], self.where["steps"] = (s, seed_input), (s, "steps")

        controls = self._controls(positive, negative, use_cfg, family, vae, base)
        adapters = self._loras(model_loras, clip_loras, denoiser)

        # names, entries, defaults
        new_models: dict[str, dict] = {}
        names = {}
        role = {"sd15": ["clip"], "sdxl": ["clip-l", "clip-g"], "sd3": ["clip-l", "clip-g", "t5"],
                "flux": ["clip", "t5"]}[family]
        for i, enc in enumerate(encoders):
            names[id(enc)] = self._name(enc, role[i], new_models)
        for model, suffix in [(denoiser, "denoiser"), (vae, "vae"), *[(c["model"], "controlnet") for c in controls]]:
            names[id(model)] = self._name(model, suffix, new_models)
        new_adapters = {}
        loras = []
        for path, weight, node_id, file in adapters:
            adapter = self._adapter_name(path, file, names[id(denoiser)], new_adapters)
            if any(entry["name"] == adapter for entry in loras):
                self.fail(node_id, "The same LoRA is loaded twice", "lora_name")
            self.where[f"loras[{len(loras)}]"] = (node_id, "strength_model")
            loras.append({"name": adapter, "weight": weight})
        if len(loras) > MAX_ADAPTERS:
            self.fail(adapters[MAX_ADAPTERS][2], f"At most {MAX_ADAPTERS} LoRAs per request", "lora_name")

        defaults: dict[str, Any] = {"prompt": prompt, "seed": self.val(s, seed_input), "steps": steps,
                                    "sampler": sampler}
        if width is not None:
            defaults["width"], defaults["height"] = width, height
        if negative_prompt is not None:
            defaults["negative_prompt"] = negative_prompt
        if guidance is not None:
            defaults["guidance"] = guidance
        if img2img:
            defaults["strength"] = strength
        suffixes = control_suffixes(len(controls)) if controls else []
        for control, sfx in zip(controls, suffixes, strict=True):
            images[f"control_image{sfx}"] = control["image"]
            for ours, theirs in (("scale", "strength"), ("start", "start_percent"), ("end", "end_percent")):
                defaults[f"control_{ours}{sfx}"] = control[theirs]
                self.where[f"control_{ours}{sfx}"] = (control["node"], theirs)
        workflow = {
            "description": f"Imported from a ComfyUI graph ({family}, {'image' if img2img else 'text'}-to-image"
                           f"{', CFG' if use_cfg else ''})",
            "text_encoders": [names[id(e)] for e in encoders], "denoiser": names[id(denoiser)],
            "vae": names[id(vae)], "cfg": use_cfg, "img2img": img2img,
        }
        if controls:
            workflow["controlnets"] = [names[id(c["model"])] for c in controls]
        if distilled:
            workflow["distilled_guidance"] = True
        if loras:
            workflow["lora"] = True
            defaults["loras"] = loras
        inputs = {k: {"default": v} for k, v in defaults.items() if k != "loras"}
        inputs["prompt"]["required"] = False
        denoiser_name = names[id(denoiser)]
        spec = self.catalog.models.get(denoiser_name)
        scale = spec.vae_scale if spec is not None else new_models[denoiser_name].get("vae_scale", 8)
        for size in ("width", "height"):
            # ComfyUI takes any multiple of 8 from 16: the model's own multiple is the bound, for
            # img2img too (its size, the image's, has no default but must not be held to 64)
            inputs.setdefault(size, {})["min"] = 2 * scale
        if group(family) == "flow":
            inputs["sampler"]["choices"] = ["default"]
        workflow["inputs"] = inputs
        toml = _document(self.name, new_models, new_adapters, workflow)
        return self._finish(toml, defaults, images)

    def _finish(self, toml: str, defaults: dict, images: dict) -> ImportedWorkflow:
        try:
            merged = parse_catalog(tomllib.loads(toml), self.catalog)
        except CatalogError as exc:
            field_name = exc.field.split(".inputs.", 1)[1].split(".")[0] if ".inputs." in exc.field else ""
            node_id, input_name = self.where.get(field_name, (None, None))
            if node_id is None:
                raise ComfyImportError(error=node_error("invalid_catalog", str(exc))) from None
            self.fail(node_id, str(exc).split(": ", 2)[-1], input_name, str(exc))
        workflow = merged.workflows[self.name]
        try:
            validate_params(workflow, dict(defaults), adapters=merged.adapters)
        except ParamError as exc:
            node_id, input_name = self.where.get(exc.field, self.where.get(exc.field.split(".")[0], (None, None)))
            if node_id is None:
                raise ComfyImportError(error=node_error("invalid_defaults", str(exc))) from None
            self.fail(node_id, exc.message, input_name, str(exc))
        return ImportedWorkflow(self.name, toml, workflow, merged, defaults, images, self.api, self.notes)

    def _advanced(self, s: str, steps: int, img2img: bool) -> float | None:
        if self.val(s, "add_noise") != "enable":
            self.fail(s, "add_noise = disable has no diffusers equivalent", "add_noise")
        if self.val(s, "return_with_leftover_noise") != "disable":
            self.fail(s, "return_with_leftover_noise = enable has no diffusers equivalent",
                      "return_with_leftover_noise")
        if self.val(s, "end_at_step") < steps:
            self.fail(s, "end_at_step < steps stops before the end: no diffusers equivalent", "end_at_step")
        start = self.val(s, "start_at_step")
        if start and not img2img:
            self.fail(s, "start_at_step > 0 on an empty latent has no diffusers equivalent", "start_at_step")
        if start >= steps:
            self.fail(s, "start_at_step must be below steps", "start_at_step")
        if img2img:
            self.where["strength"] = (s, "start_at_step")
            return (steps - start) / steps  # the img2img pipelines run the last steps x strength of `steps`
        return None

    def _model_chain(self, s: str) -> tuple[list, dict]:
        """The LoRAs on the model path (application order) and the loader's resolution."""
        loras = []
        node_id, slot = self.src(s, "model")
        seen: set[str] = set()
        while self.cls(node_id) in ("LoraLoader", "LoraLoaderModelOnly"):
            self._acyclic(node_id, seen)
            loras.append((node_id, self.val(node_id, "strength_model")))
            node_id, slot = self.src(node_id, "model")
        loras.reverse()
        if self.cls(node_id) == "UNETLoader":
            if self.val(node_id, "weight_dtype") != "default":
                self.fail(node_id, "weight_dtype other than default (fp8) has no diffusers equivalent", "weight_dtype")
            return loras, {"denoiser": self.model(node_id, "unet_name", m.diffusion_model, self.catalog), "node": None}
        checkpoint = self.model(node_id, "ckpt_name", m.checkpoint, self.catalog)
        return loras, {**checkpoint, "node": node_id}

    def _acyclic(self, node_id: str, seen: set) -> None:
        if node_id in seen:
            self.fail(node_id, "The graph has a dependency cycle through this node", type_="dependency_cycle")
        seen.add(node_id)

    def _conditioning(self, node_id: str, slot: int) -> dict:
        """Walk a sampler's conditioning down to its text encode: ControlNets (outermost first
        as found, returned in application order) and the outermost Flux guidance."""
        controls, guidance = [], None
        seen: set[str] = set()
        while self.cls(node_id) not in ENCODE_NODES:
            self._acyclic(node_id, seen)
            cls = self.cls(node_id)
            if cls == "ControlNetApply":
                controls.append((node_id, 0))
                node_id, slot = self.src(node_id, "conditioning")
            elif cls == "ControlNetApplyAdvanced":
                controls.append((node_id, slot))
                node_id, slot = self.src(node_id, "positive" if slot == 0 else "negative")
            else:  # FluxGuidance
                guidance = guidance or (node_id, float(self.val(node_id, "guidance")))
                node_id, slot = self.src(node_id, "conditioning")
        if self.cls(node_id) == "CLIPTextEncodeFlux" and guidance is None:
            guidance = (node_id, float(self.val(node_id, "guidance")))
        controls.reverse()
        return {"encoder": node_id, "controls": controls, "guidance": guidance}

    def _clip_chain(self, encoder: str, family: str, base: dict) -> tuple[list, list, str]:
        loras = []
        node_id, slot = self.src(encoder, "clip")
        seen: set[str] = set()
        while self.cls(node_id) == "LoraLoader":
            self._acyclic(node_id, seen)
            loras.append((node_id, self.val(node_id, "strength_clip")))
            node_id, slot = self.src(node_id, "clip")
        loras.reverse()
        cls = self.cls(node_id)
        if cls == "CheckpointLoaderSimple":
            found = self.model(node_id, "ckpt_name", m.checkpoint, self.catalog)
            if isinstance(found["encoders"], m.ModelError):
                exc = found["encoders"]
                self.fail(node_id, exc.message, "ckpt_name", exc.details, exc.type)
            if found["family"] != family:
                self.fail(node_id, f"A {found['family']} checkpoint's text encoders with a {family} model",
                          "ckpt_name", type_="unsupported_graph")
            if base.get("node") == node_id:  # one resolution of the checkpoint: the same Model objects
                found = base
            encoders = found["encoders"]
            self._check_encoders(node_id, "ckpt_name", encoders, family)
            return loras, encoders, node_id
        names = [n for n in ("clip_name", "clip_name1", "clip_name2", "clip_name3") if n in self.api[node_id]["inputs"]]
        if cls != "TripleCLIPLoader":
            wanted = CLIP_TYPES.get(self.val(node_id, "type"))
            if wanted != family:
                self.fail(node_id, f"type {self.val(node_id, 'type')!r} does not fit a {family} model", "type",
                          f"use type {[k for k, v in CLIP_TYPES.items() if v == family]}")
        elif family != "sd3":
            self.fail(node_id, f"TripleCLIPLoader conditions SD3 models, not {family}", "clip_name1")
        encoders = []
        for input_name in names:
            encoder = self.model(node_id, input_name, m.text_encoder)
            encoder.family = family
            encoders.append(encoder)
        order = {"CLIPTextModel": 0, "CLIPTextModelWithProjection": 1, "T5EncoderModel": 2}
        encoders.sort(key=lambda e: order.get(e.architecture, 3))  # stable: SD3's CLIP-L, CLIP-G as named
        self._check_encoders(node_id, names[0], encoders, family)
        return loras, encoders, node_id

    def _check_encoders(self, node_id: str, input_name: str, encoders: list, family: str) -> None:
        found = [e.architecture for e in encoders]
        if found not in ENCODERS[family]:
            self.fail(node_id, f"Text encoders {found} do not condition a {family} model", input_name,
                      f"expected {' or '.join(str(x) for x in ENCODERS[family])}", "unsupported_graph")

    def _vae(self, node_id: str, slot: int, family: str, base: dict) -> m.Model:
        if self.cls(node_id) == "VAELoader":
            return self.model(node_id, "vae_name", m.vae, family, self.catalog)
        found = base if base.get("node") == node_id else self.model(node_id, "ckpt_name", m.checkpoint, self.catalog)
        if found["vae"] is None:
            self.fail(node_id, "The checkpoint holds no VAE", "ckpt_name", type_="unsupported_model")
        return found["vae"]

    def _text(self, node_id: str, family: str, width, height) -> str:
        cls = self.cls(node_id)
        if cls == "CLIPTextEncode":
            return self._plain(node_id, "text")
        if cls == "CLIPTextEncodeFlux":
            if family != "flux":
                self.fail(node_id, f"CLIPTextEncodeFlux with a {family} model", "clip", type_="unsupported_graph")
            if self.val(node_id, "clip_l") != self.val(node_id, "t5xxl"):
                self.fail(node_id, "clip_l and t5xxl differ: the served workflow has one prompt for both encoders",
                          "t5xxl")
            return self._plain(node_id, "clip_l")
        if family != "sdxl":
            self.fail(node_id, f"CLIPTextEncodeSDXL with a {family} model", "clip", type_="unsupported_graph")
        if self.val(node_id, "text_g") != self.val(node_id, "text_l"):
            self.fail(node_id, "text_g and text_l differ: the served workflow has one prompt for both encoders",
                      "text_l")
        for name in ("crop_w", "crop_h"):
            if self.val(node_id, name) != 0:
                self.fail(node_id, f"{name} must be 0, as the diffusers pipeline conditions", name)
        size = {"width": width, "height": height}
        for name in ("width", "height"):
            expected = size[name] if size[name] is not None else self.val(node_id, name)
            for input_name in (name, f"target_{name}"):
                if self.val(node_id, input_name) != expected:
                    self.fail(node_id, f"{input_name} must be the image's {name} ({expected}), as the diffusers "
                              "pipeline conditions", input_name)
        return self._plain(node_id, "text_g")

    def _plain(self, node_id: str, input_name: str) -> str:
        """The prompt as the diffusers pipeline reads it: ComfyUI's emphasis `(word:1.2)` and
        embeddings have no equivalent there; its escapes `\\(` `\\)` are literal parentheses."""
        text = self.val(node_id, input_name)
        if re.search(r"(?<!\\)[()]", text):
            self.fail(node_id, "Prompt weighting ( ) has no diffusers equivalent", input_name,
                      "ComfyUI weights the tokens in parentheses; the served pipeline would read them as text. "
                      "Remove the weighting, or escape literal parentheses as \\( \\)")
        if re.search(r"(^|[\s,(])embedding:", text):
            self.fail(node_id, "Textual-inversion embeddings are not served", input_name)
        return text.replace("\\(", "(").replace("\\)", ")")

    def _controls(self, positive: dict, negative: dict, use_cfg: bool, family: str, vae: m.Model, base: dict) -> list:
        if use_cfg:
            pos = [n for n, _ in positive["controls"]]
            neg = [n for n, _ in negative["controls"]]
            for node_id in pos + neg:
                if self.cls(node_id) == "ControlNetApply" or pos != neg:
                    self.fail(node_id, "With cfg > 1 a ControlNet must condition both the positive and the negative "
                              "prompt alike (diffusers applies it to both rows)", "conditioning"
                              if self.cls(node_id) == "ControlNetApply" else "negative",
                              "use one ControlNetApplyAdvanced for both", "unsupported_graph")
        controls = []
        for node_id, _ in positive["controls"]:
            net_node, _ = self.src(node_id, "control_net")
            model = self.model(net_node, "control_net_name", m.controlnet, family, self.catalog)
            image, _ = self.src(node_id, "image")
            if self.cls(image) != "LoadImage":
                self.fail(node_id, f"image from {self.cls(image)}: a control image must be a LoadImage", "image",
                          "preprocessors are not served; preprocess the image beforehand", "unsupported_graph")
            advanced = self.cls(node_id) == "ControlNetApplyAdvanced"
            start = float(self.val(node_id, "start_percent")) if advanced else 0.0
            end = float(self.val(node_id, "end_percent")) if advanced else 1.0
            if start >= end:
                self.fail(node_id, "end_percent must be above start_percent", "end_percent")
            if advanced and "vae" in self.api[node_id]["inputs"]:
                if self._vae(*self.src(node_id, "vae"), family, base) != vae:
                    self.fail(node_id, "The ControlNet's VAE differs from the workflow's", "vae", type_="unsupported_graph")
            if any(c["model"] == model for c in controls):
                self.fail(node_id, "The same ControlNet is applied twice", "control_net", type_="unsupported_graph")
            controls.append({"node": node_id, "model": model, "image": self.val(image, "image"),
                             "strength": float(self.val(node_id, "strength")), "start_percent": start,
                             "end_percent": end})
        return controls

    def _loras(self, model_loras: list, clip_loras: list, denoiser: m.Model) -> list[tuple[Path, float, str, str]]:
        """(source, weight, node, ComfyUI name) per LoRA: one weight applies to the base model and the text
        encoders, so a LoRA with text-encoder layers must load into both with one strength."""
        clip = {}
        for node_id, strength in clip_loras:
            path, text = self.model(node_id, "lora_name", m.lora)
            clip[path] = (node_id, strength, text)
        out = []
        for node_id, strength in model_loras:
            path, text = self.model(node_id, "lora_name", m.lora)
            if not ADAPTER_WEIGHT[0] <= strength <= ADAPTER_WEIGHT[1]:
                self.fail(node_id, f"strength_model must be in [{ADAPTER_WEIGHT[0]}, {ADAPTER_WEIGHT[1]}]",
                          "strength_model")
            on_clip = clip.pop(path, None)
            if text and on_clip is None:
                self.fail(node_id, "The LoRA has text-encoder layers but is not applied to the text encoder",
                          "lora_name", "the served adapter applies to both: use LoraLoader on the model and the "
                          "CLIP the prompts use, with equal strengths")
            if text and on_clip[1] != strength:
                self.fail(on_clip[0], "strength_clip differs from strength_model: the served adapter has one weight",
                          "strength_clip")
            out.append((path, float(strength), node_id, self.val(node_id, "lora_name")))
        for node_id, _, text in clip.values():
            if text:
                self.fail(node_id, "The LoRA is applied to the text encoder only: the served adapter applies to the "
                          "base model too", "lora_name")
        return out

    # ---- catalog entries
    def _name(self, model: m.Model, role: str, new: dict) -> str:
        source = Path(model.source).expanduser().resolve()
        for name, spec in self.catalog.models.items():
            if spec.kind == model.kind and spec.subfolder == model.subfolder and spec.family == model.family and \
                    Path(spec.source).expanduser().resolve() == source and spec.config == model.config:
                return name
        for name, entry in new.items():
            if entry["_model"] == model:
                return name
        stem = re.sub(r"[^A-Za-z0-9._-]", "-", Path(model.file.replace("\\", "/")).name)
        stem = stem.rsplit(".", 1)[0] if Path(stem).suffix in m.SINGLE_FILE_SUFFIXES else stem
        base = f"{stem}-{role}".lstrip(".-_") or role
        name, i = base, 1
        while name in self.catalog.models or name in new:
            i += 1
            name = f"{base}-{i}"
        entry = {"kind": model.kind, "family": model.family, "source": str(source), "subfolder": model.subfolder,
                 "dtype": self.dtype or DTYPES[model.family], **model.fields}
        if model.config:
            entry["config"] = model.config
        if model.kind == "controlnet":
            entry.pop("latent_channels", None)
        new[name] = {**entry, "_model": model}
        return name

    def _adapter_name(self, path: Path, file: str, base: str, new: dict) -> str:
        for name, spec in self.catalog.adapters.items():
            if spec.base == base and spec.source and Path(spec.source).expanduser().resolve() == path.resolve():
                return name
        for name, entry in new.items():
            if entry["source"] == str(path):
                return name
        base_name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(file.replace("\\", "/")).name)
        base_name = base_name.rsplit(".", 1)[0] if Path(base_name).suffix in m.SINGLE_FILE_SUFFIXES else base_name
        name, i = base_name, 1
        while name in self.catalog.adapters or name in new:
            i += 1
            name = f"{base_name}-{i}"
        new[name] = {"base": base, "source": str(path)}
        return name


def _text_input(cls: str) -> str:
    return {"CLIPTextEncode": "text", "CLIPTextEncodeSDXL": "text_g", "CLIPTextEncodeFlux": "clip_l"}[cls]


# ---- TOML writing (values the catalog reads: strings, numbers, booleans, lists, inline tables)
def _string(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _string(key)


def _document(name: str, models: dict, adapters: dict, workflow: dict) -> str:
    lines = [f"# Imported from a ComfyUI graph as workflow {name!r} (lego workflows import)."]
    for model_name, entry in models.items():
        lines += ["", f"[models.{_key(model_name)}]"]
        lines += [f"{k} = {_value(v)}" for k, v in entry.items() if not k.startswith("_")]
    for adapter_name, entry in adapters.items():
        lines += ["", f"[adapters.{_key(adapter_name)}]"] + [f"{k} = {_value(v)}" for k, v in entry.items()]
    lines += ["", f"[workflows.{_key(name)}]"]
    for key, value in workflow.items():
        if key == "inputs":
            lines += [f"inputs.{_key(k)} = {_value(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key} = {_value(value)}")
    return "\n".join(lines) + "\n"
