"""The diffusers backend: real text encoders, UNets and VAEs, one per actor.

A node task does exactly what the diffusers pipeline does at that point, in the same
order and with the same tensor shapes, so the micro-served result equals the
pipeline's bit for bit. Families (`ModelSpec.family`): `sd15` (StableDiffusionPipeline),
`sdxl` (StableDiffusionXLPipeline: two text encoders, penultimate hidden states,
pooled embeddings and size/crop time ids as added conditioning), `sd3`
(StableDiffusion3Pipeline: two CLIP encoders and an optional T5 encoder, whose sequence
is zeros when the workflow lists none) and `flux` (FluxPipeline; a transformer with
`guidance_embeds` in its config, FLUX.1-dev style, embeds the distilled guidance scale).

Sources: a pipeline folder or hub id (`from_pretrained`, with `subfolder`), or, for
denoisers and VAEs, one local `.safetensors` checkpoint (`from_single_file`, original
layout or the model's diffusers keys) whose diffusers config is read from a local folder,
never from a hub.

- encode: tokenize and run the text encoder, the prompt and (CFG) the negative
  prompt in separate calls as `encode_prompt` does; output `[negative; positive]`
  embeddings (and pooled embeddings from a projection encoder).
- denoise step k: a fresh scheduler of the requested sampler from the pipeline's
  scheduler config, `set_timesteps(steps)`, the sampler state restored from the
  input bundle, then one iteration of the pipeline's loop. Step 0 first draws the
  initial latents from a CPU generator seeded with the request's seed. The sampler
  state travels with the latent as tensors (`state/...`): the generator's state
  (ancestral samplers draw noise from the pipeline's one generator at every step)
  and, for multistep solvers, the previous model outputs. The step index is
  recovered from the timestep. So any actor of the model can take any step.
- decode: `latents / scaling_factor` through the VAE, then the image processor's
  denormalisation and the pipeline's float -> uint8 conversion.

Tasks of one batch run one after another by default (`options.batching = "exact"`):
batched kernels are not bit-identical to single calls, and exactness comes first.
`options.batching = "fused"` runs a batch of denoise tasks as one UNet call, each
row with its own timestep, for throughput; the difference is measured in the tests.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actors.backends import controlnet, lora
from actors.backends.diffusers_control import ControlTasksMixin
from actors.backends.families import FLUX, SD3, SDXL, denoiser_folder, sibling_folder
from actors.store import Bundle
from broker.catalog import ModelSpec
from broker.protocol.messages import TaskSpec

ROW_KEYS = ("text_embeds", "time_ids", "pooled_projections")  # added conditioning with one row per CFG branch
T5_FLUX_SEQUENCE = 512  # FluxPipeline's max_sequence_length
T5_SEQUENCE = 256  # StableDiffusion3Pipeline's max_sequence_length: T5 rows in the joint sequence
# FluxPipeline's `guidance_scale` default: what a guidance-distilled transformer (FLUX.1-dev)
# embeds when a task carries no `distilled_guidance` (e.g. with true CFG, whose scale is `guidance`)
FLUX_DISTILLED_GUIDANCE = 3.5
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _Step:
    """One denoise task between its preparation and its sampler update."""

    scheduler: Any
    generator: torch.Generator
    cond: Bundle
    latents: torch.Tensor
    t: torch.Tensor
    model_input: torch.Tensor
    embeds: torch.Tensor
    added: dict | None


def _step_kwargs(scheduler, generator: torch.Generator) -> dict:
    """What the pipeline's `prepare_extra_step_kwargs` passes: eta=0 and its generator."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def _save_multistep(scheduler) -> Bundle:
    """A multistep solver's memory of earlier steps, as tensors that travel with the latent."""
    if not hasattr(scheduler, "model_outputs"):
        return {}
    state = {"state/lower_order_nums": torch.tensor([scheduler.lower_order_nums], dtype=torch.int64)}
    for i, output in enumerate(scheduler.model_outputs):
        if output is not None:
            state[f"state/model_output/{i}"] = output
    return state


def _restore_multistep(scheduler, previous: Bundle) -> None:
    if not hasattr(scheduler, "model_outputs") or "state/lower_order_nums" not in previous:
        return
    scheduler.lower_order_nums = int(previous["state/lower_order_nums"][0])
    for i in range(len(scheduler.model_outputs)):
        scheduler.model_outputs[i] = previous.get(f"state/model_output/{i}")


class DiffusersBackend(ControlTasksMixin):
    tensor_kind = "torch"

    def __init__(self, model: ModelSpec, device: str, options: dict):
        if not model.source:
            raise ValueError(f"models.{model.name}.source: the diffusers backend needs a folder or repo id")
        if model.dtype not in DTYPES:
            raise ValueError(f"models.{model.name}.dtype: expected one of {sorted(DTYPES)}, got {model.dtype!r}")
        self.model = model
        self.device = torch.device(device)
        self.dtype = DTYPES[model.dtype]
        self.batching = str(options.get("batching", "exact"))
        if self.batching not in ("exact", "fused"):
            raise ValueError(f"options.batching: expected 'exact' or 'fused', got {self.batching!r}")
        self.component = None
        self.tokenizer = None
        self.scheduler_config = None
        self.peak_bytes = 0
        self.catalog = None  # the actor's catalog: a ControlNet reads its base model's scheduler there
        self.options = options
        self.adapters: lora.DiffusersAdapters | None = None  # made at the first task with LoRA
        self.adapter_switch_s = 0.0  # seconds spent switching LoRA sets (telemetry)
        self._base_configs: dict[str, dict] = {}

    # ------------------------------------------------------------------ loading

    def _source(self) -> str:
        path = Path(self.model.source).expanduser()
        return str(path) if path.exists() else self.model.source  # a hub id otherwise

    def _checkpoint(self) -> Path | None:
        """The file when `source` names a single-file checkpoint, else None (a folder or hub id)."""
        path = Path(self.model.source).expanduser()
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            return None
        field = f"models.{self.model.name}.source"
        if path.suffix != ".safetensors":  # torch.load would unpickle it: no pickle anywhere
            raise ValueError(f"{field}: single-file checkpoints load from .safetensors only, got {path.name!r}")
        if not path.is_file():
            raise ValueError(f"{field}: no such checkpoint file: {path}")
        return path

    def _single_file_config(self, checkpoint: Path, sub: str) -> str:
        """Where a single-file component's diffusers config is read, so `from_single_file` never
        asks a hub: the model's `config`, else the checkpoint's own folder when
        `{subfolder}/config.json` lies beside it."""
        field = f"models.{self.model.name}.config"
        config = self.model.config
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

    def _from_source(self, cls, sub: str) -> tuple[Any, str]:
        """Load a diffusers model from a folder/hub id or a single file; returns it and the
        folder (or hub id) its sibling configs (the scheduler's) are read from."""
        checkpoint = self._checkpoint()
        if checkpoint is None:
            source = self._source()
            return cls.from_pretrained(source, subfolder=sub, torch_dtype=self.dtype), source
        config = self._single_file_config(checkpoint, sub)
        # An original-format (LDM/BFL) checkpoint is converted by diffusers; one holding exactly
        # this model's diffusers keys loads as is.
        return cls.from_single_file(str(checkpoint), config=config, subfolder=sub, torch_dtype=self.dtype), config

    def load(self) -> None:
        loaders = {"text_encoder": self._load_text_encoder, "denoiser": self._load_denoiser, "vae": self._load_vae,
                   "controlnet": self._load_controlnet}
        if self.model.kind not in loaders:
            raise ValueError(f"models.{self.model.name}.kind: {self.model.kind!r} has no diffusers loader")
        loaders[self.model.kind]()
        self.component.to(self.device).eval()

    def _load_text_encoder(self) -> None:
        import transformers
        from transformers import AutoConfig, CLIPTokenizer

        if self._checkpoint() is not None:
            raise ValueError(f"models.{self.model.name}.source: text encoders load from a pipeline folder or hub id; "
                             "single-file checkpoints are for denoisers and VAEs")
        source, sub = self._source(), self.model.subfolder or "text_encoder"
        # CLIPTextModel, CLIPTextModelWithProjection (SDXL/SD3) or T5EncoderModel (Flux, SD3), as saved
        (architecture,) = AutoConfig.from_pretrained(source, subfolder=sub).architectures
        tokenizer_cls = transformers.T5TokenizerFast if architecture.startswith("T5") else CLIPTokenizer
        self.tokenizer = tokenizer_cls.from_pretrained(source, subfolder=sibling_folder(sub, "tokenizer"))
        self.component = getattr(transformers, architecture).from_pretrained(source, subfolder=sub, torch_dtype=self.dtype)

    def _load_denoiser(self) -> None:
        from diffusers import (
            DDIMScheduler,
            FluxTransformer2DModel,
            SD3Transformer2DModel,
            UNet2DConditionModel,
        )

        cls = {SD3: SD3Transformer2DModel, FLUX: FluxTransformer2DModel}.get(self.model.family, UNet2DConditionModel)
        sub = self.model.subfolder or denoiser_folder(self.model.family)
        self.component, configs = self._from_source(cls, sub)
        # Any scheduler class reads the config file; the sampler picks the class per step.
        self.scheduler_config = DDIMScheduler.load_config(configs, subfolder=sibling_folder(sub, "scheduler"))

    def _load_vae(self) -> None:
        from diffusers import AutoencoderKL

        self.component, _ = self._from_source(AutoencoderKL, self.model.subfolder or "vae")
        if self.model.family == SDXL and self.dtype == torch.float16 and self.component.config.force_upcast:
            # The SDXL pipelines run a half-precision VAE in float32 (`upcast_vae`): so do we.
            self.component.to(torch.float32)

    def attach_catalog(self, catalog) -> None:
        """The actor's catalog (the runtime hands it over): a ControlNet steps with the
        scheduler config of the base model its task names."""
        self.catalog = catalog

    def memory_bytes(self) -> int:
        if self.component is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.component.state_dict().values())

    # ------------------------------------------------------------------ execution

    def _apply_adapters(self, tasks: list[TaskSpec]) -> None:
        """Switch the component to the batch's LoRA set (between batches, never inside one)."""
        target = lora.batch_adapters(tasks)
        if target is None or (not target and self.adapters is None):
            return  # no adapted call, or no adapter ever applied here: the plain model
        if self.adapters is None:
            if self.model.kind not in ("denoiser", "text_encoder"):
                raise ValueError(f"loras: {self.model.name} is a {self.model.kind}; adapters apply to base models "
                                 "and text encoders")
            registry = self.catalog.adapters if self.catalog is not None else {}
            prefix = denoiser_folder(self.model.family) if self.model.kind == "denoiser" else (
                self.model.subfolder or "text_encoder")
            self.adapters = lora.DiffusersAdapters(self.component, self.model.family, self.model.kind, prefix, registry,
                                                   self.options)
        started = time.perf_counter()
        self.adapters.apply(target)
        self.adapter_switch_s += time.perf_counter() - started

    @torch.no_grad()
    def run(self, tasks: list[TaskSpec], inputs: list[list[Bundle]]) -> list[Bundle]:
        self._apply_adapters(tasks)
        fusable = self.model.family != FLUX  # Flux's pipeline calls its model one row at a time
        plain = not any(controlnet.is_control(b) for task_inputs in inputs for b in task_inputs)
        if self.batching == "fused" and fusable and plain and len(tasks) > 1 and all(t.kind == "denoise" for t in tasks):
            return self._denoise_fused(tasks, inputs)
        run = {"encode": self._encode, "denoise": self._denoise, "decode": self._decode,
               "encode_image": self._encode_image, "denoise_branch": self._branch,
               "control_image": self._control_image, "control": self._control}
        outputs = []
        for task, task_inputs in zip(tasks, inputs, strict=True):
            if task.kind not in run:
                raise ValueError(f"task kind {task.kind!r} is not one this backend runs")
            outputs.append(run[task.kind](task, task_inputs))
        return outputs

    def _embed(self, text: str) -> dict[str, torch.Tensor]:
        if self.component.config.model_type == "t5":
            return self._embed_t5(text)
        if self.model.family == FLUX:  # FluxPipeline: CLIP gives the pooled vector only
            ids = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                                 return_overflowing_tokens=False, return_length=False, return_tensors="pt").input_ids
            pooled = self.component(ids.to(self.device), output_hidden_states=False).pooler_output
            return {"pooled": pooled.to(dtype=self.dtype, device=self.device)}
        tokens = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.device)
        if self.model.family in (SDXL, SD3):
            out = self.component(ids, output_hidden_states=True)
            embeds = {"embeds": out.hidden_states[-2]}  # SDXL and SD3 condition on the penultimate layer
            if out[0].ndim == 2:  # a projection encoder: its pooled output conditions too
                embeds["pooled"] = out[0]
            return {k: v.to(dtype=self.dtype, device=self.device) for k, v in embeds.items()}
        mask = None
        if getattr(self.component.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        return {"embeds": self.component(ids, attention_mask=mask)[0].to(dtype=self.dtype, device=self.device)}

    def _embed_t5(self, text: str) -> dict[str, torch.Tensor]:
        """The T5 sequence, padded to the pipeline's `max_sequence_length` (Flux 512, SD3 256).

        Its own key (`t5`): SD3 tells it from the CLIP hidden states it is joined with."""
        length = T5_FLUX_SEQUENCE if self.model.family == FLUX else T5_SEQUENCE
        ids = self.tokenizer(text, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                             return_length=False, return_overflowing_tokens=False, return_tensors="pt").input_ids
        return {"t5": self.component(ids.to(self.device))[0].to(dtype=self.dtype, device=self.device)}

    def _encode(self, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        positive = self._embed(task.params["prompt"])
        if task.rows == 2:  # CFG: [negative; positive], each encoded on its own like the pipeline
            negative = self._embed(task.params.get("negative_prompt") or "")
            return {k: torch.cat([negative[k], positive[k]]) for k in positive}
        return positive

    def _scheduler(self, sampler: str, steps: int, image_seq_len: int | None = None):
        import diffusers

        name = SAMPLERS.get(sampler) or self.scheduler_config["_class_name"]
        scheduler = getattr(diffusers, name).from_config(self.scheduler_config)
        if image_seq_len is None:
            scheduler.set_timesteps(steps, device=self.device)
            return scheduler
        # Flux: explicit sigmas, shifted by the image's token count (as FluxPipeline does)
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=self.device, mu=mu)
        return scheduler

    def _denoise(self, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        if task.params.get("split"):
            # CFG split: the two branches' model outputs were computed by branch tasks
            # (maybe on other actors); only guidance and the sampler update remain.
            uncond, cond, *previous = inputs
            step = self._prepare_step(task, [b for b in previous if not controlnet.is_control(b)],
                                      self._start_state(previous))
            return self._finish_step(task, step, torch.cat([uncond["noise"], cond["noise"]]))
        controls = [b for b in inputs if controlnet.is_control(b) and "control/generator" not in b]
        step = self._prepare_step(task, [b for b in inputs if not controlnet.is_control(b)], self._start_state(inputs))
        noise = self._model(step.model_input, step.t, step.embeds, step.added, controlnet.summed_residuals(controls))
        return self._finish_step(task, step, noise)

    def _model(self, model_input: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, added: dict | None,
               residuals: dict | None = None) -> torch.Tensor:
        """The base model's forward, as the family's pipeline calls it (with the summed
        ControlNet residuals of the step, if any)."""
        residuals = dict(residuals or {})
        if self.model.family == FLUX:
            extra = {}
            if residuals:
                extra = {"controlnet_block_samples": residuals["blocks"],
                         "controlnet_single_block_samples": residuals["singles"], "controlnet_blocks_repeat": False}
            # FluxPipeline runs true CFG as two batch-1 calls (positive, negative), so one
            # call per row here gives the same bits; rows stay in [negative; positive] order.
            timestep = t.expand(model_input.shape[0]).to(model_input.dtype) / 1000
            rows = [self.component(hidden_states=model_input, timestep=timestep, guidance=added.get("guidance"),
                                   pooled_projections=added["pooled_projections"][r: r + 1],
                                   encoder_hidden_states=embeds[r: r + 1], txt_ids=added["txt_ids"],
                                   img_ids=added["img_ids"], joint_attention_kwargs={}, return_dict=False, **extra)[0]
                    for r in range(embeds.shape[0])]
            return torch.cat(rows)
        if self.model.family == SD3:  # a DiT: per-row timesteps, pooled projections
            timestep = t.expand(model_input.shape[0]) if t.dim() == 0 else t
            extra = {"block_controlnet_hidden_states": residuals["blocks"]} if residuals else {}
            return self.component(hidden_states=model_input, timestep=timestep, encoder_hidden_states=embeds,
                                  pooled_projections=added["pooled_projections"], return_dict=False, **extra)[0]
        return self.component(model_input, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False,
                              **residuals)[0]

    def _branch(self, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        """One CFG branch of a step: the model call on row `branch` (0 uncond, 1 cond) alone.

        A batch-1 call does not round exactly as the pipeline's batch-2 call does; the
        difference is measured in tests/test_diffusers.py.
        """
        b = task.params["branch"]
        controls = [x for x in inputs if controlnet.is_control(x) and "control/generator" not in x]
        step = self._prepare_step(task, [x for x in inputs if not controlnet.is_control(x)],
                                  self._start_state(inputs))  # rows == 1: the scaled latents, once
        added = None if step.added is None else {k: v[b: b + 1] if k in ROW_KEYS else v for k, v in step.added.items()}
        residuals = controlnet.summed_residuals(controls, slice(b, b + 1))
        noise = self._model(step.model_input, step.t, step.embeds[b: b + 1], added, residuals)
        return {"noise": noise}

    def _denoise_fused(self, tasks: list[TaskSpec], inputs: list[list[Bundle]]) -> list[Bundle]:
        """One UNet call for the whole batch (opt-in: `options.batching = "fused"`).

        Rows of all tasks are concatenated, each with its own timestep. Batched kernels
        do not round exactly as batch-1 calls do, so results differ from the pipeline's
        in the low bits (tests/test_diffusers.py measures by how much).
        """
        steps = [self._prepare_step(task, task_inputs) for task, task_inputs in zip(tasks, inputs, strict=True)]
        model_input = torch.cat([s.model_input for s in steps])
        timesteps = torch.cat([s.t.reshape(1).expand(s.model_input.shape[0]) for s in steps]).to(self.device)
        embeds = torch.cat([s.embeds for s in steps])
        added = None
        if steps[0].added is not None:
            added = {k: torch.cat([s.added[k] for s in steps]) for k in steps[0].added}
        noise = self._model(model_input, timesteps, embeds, added)
        outputs, row = [], 0
        for task, step in zip(tasks, steps, strict=True):
            rows = step.model_input.shape[0]
            outputs.append(self._finish_step(task, step, noise[row: row + rows]))
            row += rows
        return outputs

    def _prepare_step(self, task: TaskSpec, inputs: list[Bundle], start_state: torch.Tensor | None = None) -> _Step:
        """Everything up to the model call: scheduler, restored state, scaled model input.
        `start_state`: where step 0's generator starts instead of the seed (Flux ControlNets:
        the control images drew from it first)."""
        from diffusers.utils.torch_utils import randn_tensor

        params = task.params
        height, width = task.shape
        if self.model.family == FLUX:  # latents are 2x2-packed: (h/2) x (w/2) tokens
            lat_h, lat_w = 2 * (height // (self.model.vae_scale * 2)), 2 * (width // (self.model.vae_scale * 2))
            scheduler = self._scheduler(params.get("sampler", "default"), params["steps"], (lat_h // 2) * (lat_w // 2))
        else:
            scheduler = self._scheduler(params.get("sampler", "default"), params["steps"])
        if "begin_index" in params and hasattr(scheduler, "set_begin_index"):
            # img2img: the pipeline sets the schedule's start; a fresh scheduler at step k
            # must index timestep k, which `begin_index` = k gives it.
            scheduler.set_begin_index(params["step"])
        generator = torch.Generator(device="cpu")
        if params.get("first", params["step"] == 0):
            image = next((b for b in inputs if "init_latents" in b), None)
            cond = self._conditioning(task, [b for b in inputs if b is not image])
            dtype = cond["cond/embeds"].dtype
            if image is None and self.model.family == FLUX:  # noise, then packed as FluxPipeline does
                from diffusers import FluxPipeline

                if start_state is not None:
                    generator.set_state(start_state.contiguous())
                else:
                    generator.manual_seed(params["seed"])
                channels = self.component.config.in_channels // 4
                latents = randn_tensor((1, channels, lat_h, lat_w), generator=generator, device=self.device, dtype=dtype)
                latents = FluxPipeline._pack_latents(latents, 1, channels, lat_h, lat_w)
            elif image is None:  # txt2img: pure noise from the request's seed
                generator.manual_seed(params["seed"])
                scale = self.model.vae_scale
                shape = (1, self.component.config.in_channels, task.shape[0] // scale, task.shape[1] // scale)
                latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
                if hasattr(scheduler, "init_noise_sigma"):  # flow matching starts from unit noise as is
                    latents = latents * scheduler.init_noise_sigma
            else:  # img2img: the encoded image, noised to the first timestep run
                generator.set_state(image["state/generator"].contiguous())
                init = image["init_latents"].to(self.device, dtype)
                noise = randn_tensor(init.shape, generator=generator, device=self.device, dtype=dtype)
                start = scheduler.timesteps[params["step"]: params["step"] + 1]
                if hasattr(scheduler, "scale_noise"):  # flow matching interpolates instead
                    latents = scheduler.scale_noise(init, start, noise)
                else:
                    latents = scheduler.add_noise(init, noise, start)
                if self.model.family == FLUX:
                    from diffusers import FluxPipeline

                    latents = FluxPipeline._pack_latents(latents, 1, latents.shape[1], lat_h, lat_w)
        else:
            (previous,) = inputs
            cond = {k: v for k, v in previous.items() if k.startswith("cond/")}
            latents = previous["latents"]
            generator.set_state(previous["state/generator"].contiguous())
            _restore_multistep(scheduler, previous)
        added = None
        if self.model.family == FLUX:
            from diffusers import FluxPipeline

            embeds_dtype = cond["cond/embeds"].dtype
            added = {"pooled_projections": cond["cond/pooled"].to(self.device),
                     "txt_ids": torch.zeros(cond["cond/embeds"].shape[1], 3, device=self.device, dtype=embeds_dtype),
                     "img_ids": FluxPipeline._prepare_latent_image_ids(1, lat_h // 2, lat_w // 2, self.device, embeds_dtype)}
            if self.component.config.guidance_embeds:
                added["guidance"] = self._distilled_guidance(task)
        elif self.model.family == SD3:
            added = {"pooled_projections": cond["cond/pooled"].to(self.device)}
        elif "cond/pooled" in cond:
            added = {"text_embeds": cond["cond/pooled"].to(self.device), "time_ids": cond["cond/time_ids"].to(self.device)}
        latents = latents.to(self.device)
        t = scheduler.timesteps[params["step"]]
        # CFG: one batch-2 model call on [latents; latents], except Flux (one call per row)
        model_input = torch.cat([latents] * 2) if task.rows == 2 and self.model.family != FLUX else latents
        if hasattr(scheduler, "scale_model_input"):  # flow-matching schedulers have none
            model_input = scheduler.scale_model_input(model_input, t)
        return _Step(scheduler, generator, cond, latents, t, model_input, cond["cond/embeds"].to(self.device), added)

    def _distilled_guidance(self, task: TaskSpec) -> torch.Tensor:
        """What FluxPipeline hands a guidance-distilled transformer (FLUX.1-dev): its
        `guidance_scale` as a float32 tensor of one row (each model call here is one row).

        The scale comes as `distilled_guidance`, apart from `guidance`, which is the true-CFG
        scale in a CFG workflow; absent, the pipeline's default applies."""
        value = task.params.get("distilled_guidance", FLUX_DISTILLED_GUIDANCE)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{task.node}: params.distilled_guidance must be a number, got {value!r}")
        return torch.full([1], float(value), device=self.device, dtype=torch.float32)

    def _finish_step(self, task: TaskSpec, step: _Step, noise: torch.Tensor) -> Bundle:
        """Guidance and the sampler update; the output bundle carries the sampler state."""
        if task.rows == 2:
            uncond, text = noise.chunk(2)
            noise = uncond + task.params["guidance"] * (text - uncond)
        scheduler = step.scheduler
        latents = scheduler.step(noise, step.t, step.latents, **_step_kwargs(scheduler, step.generator), return_dict=False)[0]
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
        return {"latents": latents, **step.cond, "state/generator": step.generator.get_state(), **_save_multistep(scheduler)}

    def _conditioning(self, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        """What every step conditions on, built once at step 0 and carried with the latent."""
        pooled = [b["pooled"] for b in inputs if "pooled" in b]
        t5 = [b["t5"] for b in inputs if "t5" in b]
        if len(t5) > 1:
            raise ValueError(f"{task.node}: the workflow lists {len(t5)} T5 encoders; its pipeline takes one")
        if self.model.family == FLUX:  # the T5 sequence and CLIP's pooled vector, each from its encoder
            if not t5 or not pooled:
                raise ValueError(f"{task.node}: Flux needs a T5 encoder (sequence) and a CLIP encoder (pooled)")
            return {"cond/embeds": t5[0], "cond/pooled": pooled[0]}
        cond = {"cond/embeds": torch.cat([b["embeds"] for b in inputs if "embeds" in b], dim=-1)}
        if self.model.family == SD3:
            return {"cond/embeds": self._sd3_joint(cond["cond/embeds"], t5[0] if t5 else None),
                    "cond/pooled": torch.cat(pooled, dim=-1)}
        if self.model.family == SDXL:
            if not pooled:
                raise ValueError(f"{task.node}: SDXL needs pooled embeddings from a projection text encoder")
            # original size + crop top-left + target size; the pipeline's defaults
            height, width = task.shape
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond["cond/embeds"].dtype)
            cond["cond/pooled"] = pooled[0]  # the pipeline keeps the first pooled (2-D) output it sees
            cond["cond/time_ids"] = time_ids.repeat(cond["cond/embeds"].shape[0], 1)  # one per CFG row
        return cond

    def _sd3_joint(self, clip: torch.Tensor, t5: torch.Tensor | None) -> torch.Tensor:
        """StableDiffusion3Pipeline's joint sequence: the CLIP hidden states padded to T5's
        width, then the T5 rows (zeros of the transformer's joint width without a T5 encoder)."""
        if t5 is None:
            joint = self.component.config.joint_attention_dim
            t5 = torch.zeros((clip.shape[0], T5_SEQUENCE, joint), dtype=clip.dtype, device=clip.device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2)

    def _encode_image(self, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        """img2img's first node: the client's image through the VAE encoder, as the pipeline does."""
        import numpy as np

        (client,) = inputs
        pixels = client["image"].numpy().astype(np.float32) / 255.0  # VaeImageProcessor.pil_to_numpy
        image = torch.from_numpy(pixels[None].transpose(0, 3, 1, 2))
        image = (2.0 * image - 1.0).to(self.device, self.dtype)  # normalize to [-1, 1], request precision
        generator = torch.Generator(device="cpu").manual_seed(task.params["seed"])
        # SDXL's img2img encodes with the VAE in float32 whatever the request's precision
        upcast = self.model.family == SDXL and self.component.config.force_upcast
        weights = self.component.dtype
        if upcast:
            self.component.to(torch.float32)
            image = image.float()
        try:
            latents = self.component.encode(image).latent_dist.sample(generator)
        finally:
            self.component.to(weights)
        latents = latents.to(self.dtype)  # back to the request's precision, before scaling (the pipelines' order)
        if self.model.family in (SD3, FLUX):  # shifted latents, as those img2img pipelines have them
            latents = (latents - self.component.config.shift_factor) * self.component.config.scaling_factor
        else:
            latents = latents * self.component.config.scaling_factor
        # the pipeline's one generator goes on to draw the noise: its state travels on
        return {"init_latents": latents, "state/generator": generator.get_state()}

    def _decode(self, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        import numpy as np

        (previous,) = inputs
        latents = previous["latents"].to(self.device, self.component.dtype)
        if self.model.family == FLUX:
            from diffusers import FluxPipeline

            scale = 2 ** (len(self.component.config.block_out_channels) - 1)  # the pipeline's vae_scale_factor
            latents = FluxPipeline._unpack_latents(latents, task.shape[0], task.shape[1], scale)
        latents = latents / self.component.config.scaling_factor
        if self.model.family in (SD3, FLUX):
            latents = latents + self.component.config.shift_factor
        image = self.component.decode(latents, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1)  # VaeImageProcessor.denormalize
        pixels = image.cpu().permute(0, 2, 3, 1).float().numpy()[0]
        as_uint8 = (pixels * 255).round().astype("uint8")  # the pipeline's numpy_to_pil
        return {"image": torch.from_numpy(np.ascontiguousarray(as_uint8))}  # row-major for clients
