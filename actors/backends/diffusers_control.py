"""ControlNet tasks on the diffusers backend (mixed into `DiffusersBackend`): loading a
net, its control images, and its per-step forward for each family, as the diffusers
ControlNet pipelines compute them (actors/backends/controlnet.py holds the pure parts:
canny, image preparation, residual sums; docs/architecture.md, "ControlNets and LoRA").

A net's step is prepared exactly as its base model prepares it (`_prepare_step`, with the
base model's scheduler config read through the actor's catalog), so the task can run on
any actor and device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from actors.backends import controlnet
from actors.backends.families import FLUX, SD3, denoiser_folder, sibling_folder
from actors.store import Bundle
from broker.protocol.messages import TaskSpec

if TYPE_CHECKING:
    from actors.backends.diffusers_backend import _Step


class ControlTasksMixin:
    def _load_controlnet(self) -> None:
        cls = controlnet.controlnet_class(self.model.family)
        self.component, _ = self._from_source(cls, self.model.subfolder or "controlnet")

    def _base_scheduler(self, denoiser: str) -> dict:
        """The scheduler config of base model `denoiser` (a ControlNet prepares each step as
        that model does); read once per base model."""
        if denoiser not in self._base_configs:
            from diffusers import DDIMScheduler

            folder, sub = self._catalog_folder(denoiser, "denoiser")
            self._base_configs[denoiser] = DDIMScheduler.load_config(folder, subfolder=sibling_folder(sub, "scheduler"))
        return self._base_configs[denoiser]

    def _catalog_folder(self, name: str, kind: str) -> tuple[str, str]:
        """(folder or hub id, subfolder) holding the configs of model `name` of the actor's
        catalog, resolved as that model's own backend would (a single-file source reads its
        configs from its `config` folder)."""
        spec = self.catalog.models.get(name) if self.catalog is not None else None
        if spec is None or spec.kind != kind:
            raise ValueError(f"params: {name!r} is not a {kind} of this actor's catalog")
        other = type(self)(spec, "cpu", {})  # nothing loaded: only its source resolution
        sub = spec.subfolder or (denoiser_folder(spec.family) if kind == "denoiser" else kind)
        checkpoint = other._checkpoint()
        return (other._source() if checkpoint is None else other._single_file_config(checkpoint, sub)), sub

    def _control_image(self, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        """Control images for one request (see actors/backends/controlnet.py): on a
        ControlNet actor, one net's image in pixels; on a VAE actor (SD3, Flux), every
        net's image encoded, in net order, from one generator seeded with the request's seed."""
        (client,) = inputs
        names, preprocess = task.params["tensors"], task.params["preprocess"]
        missing = [name for name in names if name not in client]
        if missing:
            raise ValueError(f"{missing[0]}: the request carries no such tensor")
        if self.model.kind != "vae":
            image = controlnet.prepare_control_image(client[names[0]], preprocess[0], task.rows, self.dtype, self.device)
            return {"control/image": image}
        generator = torch.Generator(device="cpu").manual_seed(task.params["seed"])
        rows = 1 if self.model.family == FLUX else task.rows  # Flux's net sees the positive prompt only
        out = {}
        for i, (name, pre) in enumerate(zip(names, preprocess, strict=True)):
            pixels = controlnet.prepare_control_image(client[name], pre, rows, self.dtype, self.device)
            # VaeImageProcessor.preprocess normalises to [-1, 1] for these pipelines
            out[f"control/image/{i}"] = self.component.encode(2.0 * pixels - 1.0).latent_dist.sample(generator)
        out["control/generator"] = generator.get_state()  # Flux draws its initial latents after these
        return out

    def _control(self, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        """One ControlNet forward for one step: the step prepared as its base model prepares
        it (same scheduler, same latents), then the net on the control image."""
        images = [b for b in inputs if "control/image" in b or "control/generator" in b]
        if not images:
            raise ValueError(f"{task.node}: no control image: the request must send the workflow's control_image input")
        self.scheduler_config = self._base_scheduler(task.params["denoiser"])
        step = self._prepare_step(task, [b for b in inputs if not controlnet.is_control(b)], self._start_state(inputs))
        if self.model.family == SD3:
            return self._control_sd3(task, step, images[0])
        if self.model.family == FLUX:
            return self._control_flux(task, step, images[0])
        image = images[0]["control/image"].to(self.device)
        kwargs = {}
        if step.added is not None and "time_ids" in step.added:  # SDXL: the same added conditioning
            kwargs["added_cond_kwargs"] = step.added
        down, mid = self.component(step.model_input, step.t, encoder_hidden_states=step.embeds, controlnet_cond=image,
                                   conditioning_scale=float(task.params["scale"]), guess_mode=False, return_dict=False,
                                   **kwargs)
        return controlnet.residual_bundle(tuple(down), mid)

    def _control_sd3(self, task: TaskSpec, step: _Step, images: Bundle) -> Bundle:
        """StableDiffusion3ControlNetPipeline's net call: the VAE-encoded image shifted and
        scaled (no shift for nets that zero the pooled projection, as InstantX's do), the
        prompt's sequence unless the net has no joint attention (SD3.5's official nets)."""
        vae = self._config_of(task.params["vae"], "vae")
        config = self.component.config
        # StableDiffusion3ControlNetPipeline takes the shift and the pooled projection rule of
        # its first net for every net (SD3MultiControlNetModel's nets[0].config)
        lead = task.params.get("lead", self.model.name)
        zero_pooled = (config if lead == self.model.name else self._config_of(lead, "controlnet"))[
            "force_zeros_for_pooled_projection"]
        shift = 0 if zero_pooled else vae["shift_factor"]
        cond = (images[f"control/image/{task.params['index']}"].to(self.device) - shift) * vae["scaling_factor"]
        pooled = step.added["pooled_projections"]
        blocks = self.component(
            hidden_states=step.model_input, timestep=step.t.expand(step.model_input.shape[0]),
            encoder_hidden_states=step.embeds if config.joint_attention_dim is not None else None,
            pooled_projections=torch.zeros_like(pooled) if zero_pooled else pooled,
            joint_attention_kwargs=None, controlnet_cond=cond, conditioning_scale=float(task.params["scale"]),
            return_dict=False)[0]
        return {f"control/block/{i}": block for i, block in enumerate(blocks)}

    def _control_flux(self, task: TaskSpec, step: _Step, images: Bundle) -> Bundle:
        """FluxControlNetPipeline's net call (InstantX-style nets, which take the image
        VAE-encoded and packed): once per step, on the positive prompt's row; both CFG rows
        of the transformer take its samples."""
        if getattr(self.component, "input_hint_block", None) is not None:
            raise ValueError(f"models.{self.model.name}: Flux ControlNets with an input hint block (pixel input, "
                             "XLabs style) are not served; InstantX-style nets are")
        from diffusers import FluxPipeline

        vae = self._config_of(task.params["vae"], "vae")
        sample = images[f"control/image/{task.params['index']}"].to(self.device)
        sample = (sample - vae["shift_factor"]) * vae["scaling_factor"]
        cond = FluxPipeline._pack_latents(sample, 1, sample.shape[1], sample.shape[2], sample.shape[3])
        r = step.embeds.shape[0] - 1  # [negative; positive]: the positive row
        timestep = step.t.expand(step.latents.shape[0]).to(step.latents.dtype)
        blocks, singles = self.component(
            hidden_states=step.model_input, controlnet_cond=cond, controlnet_mode=None,
            conditioning_scale=float(task.params["scale"]), timestep=timestep / 1000, guidance=step.added.get("guidance"),
            pooled_projections=step.added["pooled_projections"][r: r + 1], encoder_hidden_states=step.embeds[r: r + 1],
            txt_ids=step.added["txt_ids"], img_ids=step.added["img_ids"], joint_attention_kwargs=None, return_dict=False)
        out = {f"control/block/{i}": block for i, block in enumerate(blocks or ())}
        out.update({f"control/single/{i}": single for i, single in enumerate(singles or ())})
        return out

    @staticmethod
    def _start_state(inputs: list[Bundle]) -> torch.Tensor | None:
        """The generator state the control images left (Flux draws its latents after them)."""
        return next((b["control/generator"] for b in inputs if "control/generator" in b), None)

    def _config_of(self, name: str, kind: str) -> dict:
        """The diffusers config of another model of the catalog (a VAE's shift and scaling
        factors, the lead ControlNet's rules), read once from its source, never loaded."""
        key = f"{kind}:{name}"
        if key not in self._base_configs:
            from diffusers import AutoencoderKL

            folder, sub = self._catalog_folder(name, kind)
            # load_config reads the folder's config.json whatever model wrote it
            self._base_configs[key] = dict(AutoencoderKL.load_config(folder, subfolder=sub))
        return self._base_configs[key]
