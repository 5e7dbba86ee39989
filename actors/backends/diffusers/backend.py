"""The diffusers backend: one real model per actor, its tasks run by the blocks of their kind.

Runs in an actor process (registered as the `diffusers` backend, actors/backends/).
The backend owns what is the actor's: loading the model (loading.py), its LoRA adapter
residency (actors/backends/lora.py) and the batch loop; every node kind is a block
(text.py, denoise.py, vae.py, control.py) that declares the model kinds it runs on and
the params struct its tasks carry (broker/protocol/tasks.py), as diffusers' Modular
Pipelines blocks declare theirs. Family differences are data (family.py).

A node task does exactly what the diffusers pipeline does at that point, in the same
order and with the same tensor shapes, so the micro-served result equals the pipeline's
bit for bit. A batch of several plain denoise tasks runs as one model call by default
(`options.batching = "fused"`, denoise.py `denoise_fused`): rows of all its requests,
each with its own timestep, which is what makes a batch cheaper per row on a GPU, as
the cost profiles that drive batching assume. Batched kernels do not round exactly as
batch-1 calls do, so such a request differs from the pipeline in the low bits (bounded
per family in tests/test_fused_batching.py). A batch of one task is always exactly the
pipeline's computation, fused or not, and the broker forms batches of several tasks only
up to the rows the model's profile says still pay (`batch_by_profile`, broker/core/
choosers.py `batch_rows`; a model without a profile batches up to `max_batch_rows`).
`options.batching = "exact"` runs a batch's tasks one after another: bit for bit the
pipeline's result whatever the batching, for reproducibility.
"""

from __future__ import annotations

import time

import torch

from actors.backends import lora
from actors.backends.diffusers.control import ControlBlock, ControlImageBlock
from actors.backends.diffusers.denoise import (
    DenoiseBlock,
    DenoiseBranchBlock,
    denoise_fused,
    fusable,
)
from actors.backends.diffusers.family import family_of
from actors.backends.diffusers.loading import DTYPES, ActorModel, CatalogConfigs, load_model
from actors.backends.diffusers.text import EncodeBlock
from actors.backends.diffusers.vae import DecodeBlock, EncodeImageBlock
from actors.store import Bundle
from broker.catalog import ModelSpec
from broker.protocol.messages import TaskSpec
from broker.protocol.tasks import TaskKind

BLOCKS = {block.kind: block for block in (EncodeBlock(), EncodeImageBlock(), ControlImageBlock(), ControlBlock(),
                                          DenoiseBlock(), DenoiseBranchBlock(), DecodeBlock())}


class DiffusersBackend:
    tensor_kind = "torch"

    def __init__(self, model: ModelSpec, device: str, options: dict):
        if not model.source:
            raise ValueError(f"models.{model.name}.source: the diffusers backend needs a folder or repo id")
        if model.dtype not in DTYPES:
            raise ValueError(f"models.{model.name}.dtype: expected one of {sorted(DTYPES)}, got {model.dtype!r}")
        self.batching = str(options.get("batching", "fused"))
        if self.batching not in ("exact", "fused"):
            raise ValueError(f"options.batching: expected 'exact' or 'fused', got {self.batching!r}")
        self.model = model
        self.device = torch.device(device)
        self.dtype = DTYPES[model.dtype]
        self.options = options
        self.loaded = ActorModel(model, family_of(model.family), self.device, self.dtype, CatalogConfigs(None))
        self.peak_bytes = 0
        self.catalog = None  # the actor's catalog: LoRA adapters, and the configs of its other models
        self.adapters: lora.DiffusersAdapters | None = None  # made at the first task with LoRA
        self.adapter_switch_s = 0.0  # seconds spent switching LoRA sets (telemetry)

    @property
    def component(self):
        return self.loaded.component

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def scheduler_config(self):
        return self.loaded.scheduler_config

    def load(self) -> None:
        load_model(self.loaded)

    def attach_catalog(self, catalog) -> None:
        """The actor's catalog (the runtime hands it over): a ControlNet steps with the
        scheduler config of the base model its task names."""
        self.catalog = catalog
        self.loaded.configs = CatalogConfigs(catalog)

    def memory_bytes(self) -> int:
        if self.component is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.component.state_dict().values())

    @torch.no_grad()
    def run(self, tasks: list[TaskSpec], inputs: list[list[Bundle]]) -> list[Bundle]:
        self._apply_adapters(tasks)
        if self.batching == "fused" and fusable(self.loaded, tasks, inputs):
            outputs = denoise_fused(self.loaded, tasks, inputs)
            self._note_peak()
            return outputs
        outputs = []
        for task, task_inputs in zip(tasks, inputs, strict=True):
            block = BLOCKS.get(task.kind)
            if block is None:
                raise ValueError(f"task kind {task.kind!r} is not one this backend runs")
            if self.model.kind not in block.components:
                raise ValueError(f"task kind {task.kind!r} runs on a {' or '.join(block.components)}, "
                                 f"not on {self.model.name} (a {self.model.kind})")
            outputs.append(block(self.loaded, task, task_inputs))
            if task.kind == TaskKind.DENOISE:
                self._note_peak()
        return outputs

    def _note_peak(self) -> None:
        """The device memory high-water mark after a step (telemetry: memory_used_bytes)."""
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))

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
            prefix = self.loaded.family.denoiser_folder if self.model.kind == "denoiser" else (
                self.model.subfolder or "text_encoder")
            self.adapters = lora.DiffusersAdapters(self.component, self.model.family, self.model.kind, prefix, registry,
                                                   self.options)
        started = time.perf_counter()
        self.adapters.apply(target)
        self.adapter_switch_s += time.perf_counter() - started
