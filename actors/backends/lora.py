"""LoRA adapters on model actors: which adapters are where, and applying a request's set.

Three tiers, as in a LoRA-serving system: on disk (the catalog's registry), in host
memory (an LRU cache bounded in bytes, so that a switch does not re-read disk), and
resident in the model (peft layers injected, bounded in count; evicting one deletes its
layers). A batch runs with one adapter set (the broker batches by set); `Residency.plan`
says what a switch to a set costs (what to read, what to inject, what to evict), which
the emulated backend turns into time and the diffusers backend into the loader calls.

The diffusers side does what `pipeline.load_lora_weights(..., adapter_name=NAME)` then
`pipeline.set_adapters(names, weights)` do, per component: the family's LoRA loader
mixin reads the file (`lora_state_dict`, which also converts kohya/A1111 layouts), the
base model gets `load_lora_into_unet`, a text encoder `load_lora_into_text_encoder` with
its own prefix (`text_encoder`, `text_encoder_2`), and weights go through the same
`set_adapters` / `set_adapters_for_text_encoder`. So a micro-served request with
adapters computes exactly what that pipeline computes (tests/test_lora.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.catalog import task_adapters

LOADER_MIXINS = {"sd15": "StableDiffusionLoraLoaderMixin", "sdxl": "StableDiffusionXLLoraLoaderMixin",
                 "sd3": "SD3LoraLoaderMixin", "flux": "FluxLoraLoaderMixin"}
DEFAULT_HOST_CACHE_BYTES = 4 << 30
DEFAULT_RESIDENT = 8  # adapters injected in one model at a time


@dataclass
class SwitchPlan:
    """What a switch to `target` takes on one actor."""

    target: tuple  # ((name, weight), ...), the set to run with
    from_disk: list[str] = field(default_factory=list)  # not in host memory: read the file
    inject: list[str] = field(default_factory=list)  # not resident in the model: inject its layers
    evict: list[str] = field(default_factory=list)  # resident ones to delete first (least recently used)
    changed: bool = False  # whether the active set (names or weights) changes at all


class Residency:
    """Bookkeeping of the three tiers for one actor (pure: no torch, no files)."""

    def __init__(self, host_bytes: int = DEFAULT_HOST_CACHE_BYTES, max_resident: int = DEFAULT_RESIDENT):
        if max_resident < 1:
            raise ValueError(f"options.lora_resident: must be >= 1, got {max_resident}")
        self.host_bytes = host_bytes
        self.max_resident = max_resident
        self.host: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recent first
        self.resident: OrderedDict[str, None] = OrderedDict()  # least recent first
        self.active: tuple = ()
        self.switches = 0

    @classmethod
    def from_options(cls, options: dict) -> Residency:
        """The actor's bounds from its options (`lora_host_bytes`, `lora_resident`)."""
        return cls(int(options.get("lora_host_bytes", DEFAULT_HOST_CACHE_BYTES)),
                   int(options.get("lora_resident", DEFAULT_RESIDENT)))

    def plan(self, target: tuple) -> SwitchPlan:
        names = [name for name, _ in target]
        plan = SwitchPlan(target, changed=target != self.active)
        plan.from_disk = [n for n in names if n not in self.host]
        plan.inject = [n for n in names if n not in self.resident]
        room = self.max_resident - len(self.resident)
        # A set larger than the actor keeps resident still runs: every other adapter goes,
        # and the set stays over the bound until a later switch evicts down to it.
        victims = [n for n in self.resident if n not in names]
        plan.evict = victims[:max(0, len(plan.inject) - room)]
        return plan

    def commit(self, plan: SwitchPlan, sizes: dict[str, int]) -> list[str]:
        """Record a plan as done; returns the host-cache entries dropped to stay in budget."""
        for name in plan.evict:
            self.resident.pop(name, None)
        for name, _ in plan.target:
            self.resident[name] = None
            self.resident.move_to_end(name)
            if name in sizes:
                self.host[name] = sizes[name]
            if name in self.host:
                self.host.move_to_end(name)
        dropped = []
        in_use = {name for name, _ in plan.target}
        while sum(self.host.values()) > self.host_bytes:
            victim = next((n for n in self.host if n not in in_use), None)
            if victim is None:
                break
            self.host.pop(victim)
            dropped.append(victim)
        if plan.changed:
            self.switches += 1
        self.active = plan.target
        return dropped


def batch_adapters(tasks: list) -> tuple | None:
    """The one LoRA set a batch runs with (None: no adapted model call in it)."""
    sets = {task_adapters(task.kind, task.params) for task in tasks} - {None}
    if len(sets) > 1:
        raise ValueError(f"a batch mixes LoRA adapter sets {sorted(sets)}: the broker batches by set")
    return sets.pop() if sets else None


# Emulated switch costs, in H800 seconds before time_scale. No profile of the paper's
# measures adapters; these are assumptions of the order a LoRA server sees for an SD3-size
# adapter (rank 64, ~100-200 MB in bf16): read from local NVMe, copy to the GPU and inject
# the layers, or only set scales when every adapter is resident. Options override them.
ADAPTER_HOST_BYTES = 150 << 20
LORA_DISK_S = 0.25  # read from disk into host memory (an adapter's own `load_s` wins)
LORA_INJECT_S = 0.06  # host -> GPU copy and peft layer injection, per adapter
LORA_ACTIVATE_S = 0.002  # set_adapters / disable_lora when all are resident


@dataclass(frozen=True)
class AdapterSwitchCosts:
    disk_s: float = LORA_DISK_S
    inject_s: float = LORA_INJECT_S
    activate_s: float = LORA_ACTIVATE_S

    @classmethod
    def from_options(cls, options: dict) -> AdapterSwitchCosts:
        costs = cls(float(options.get("lora_disk_s", LORA_DISK_S)), float(options.get("lora_inject_s", LORA_INJECT_S)),
                    float(options.get("lora_activate_s", LORA_ACTIVATE_S)))
        if min(costs.disk_s, costs.inject_s, costs.activate_s) < 0:
            raise ValueError("options.lora_disk_s, lora_inject_s, lora_activate_s: must be >= 0")
        return costs

    def seconds(self, plan: SwitchPlan, registry: dict) -> float:
        disk = sum((registry[n].load_s if n in registry and registry[n].load_s else self.disk_s) for n in plan.from_disk)
        return disk + self.inject_s * len(plan.inject) + (self.activate_s if plan.changed else 0.0)


# ------------------------------------------------------------------ diffusers


def adapter_file(source: str, name: str) -> tuple[str, str | None]:
    """(folder, weight file name or None) for `lora_state_dict`; safetensors only (no pickle)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path), None  # diffusers finds pytorch_lora_weights.safetensors there
    if path.suffix != ".safetensors":
        raise ValueError(f"adapters.{name}.source: a .safetensors file or a folder, got {source!r}")
    if not path.is_file():
        raise ValueError(f"adapters.{name}.source: no such file: {path}")
    return str(path.parent), path.name


class DiffusersAdapters:
    """Applies adapter sets to one component (a UNet or a CLIP text encoder)."""

    def __init__(self, component: Any, family: str, role: str, prefix: str, registry: dict, options: dict):
        import diffusers.loaders

        if family not in LOADER_MIXINS:
            raise ValueError(f"loras: LoRA adapters for family {family!r} are not served yet "
                             f"(served: {sorted(LOADER_MIXINS)})")
        self.mixin = getattr(diffusers.loaders, LOADER_MIXINS[family])
        self.component, self.role, self.prefix, self.registry = component, role, prefix, registry
        self.family = family
        self.residency = Residency.from_options(options)
        self._host: dict[str, tuple] = {}  # name -> (state dict, network alphas, metadata)
        self.present: set[str] = set()  # injected adapters that have layers for this component

    def _read(self, name: str) -> int:
        spec = self.registry.get(name)
        if spec is None or not spec.source:
            raise ValueError(f"loras: adapter {name!r} has no source in this actor's catalog")
        folder, weight_name = adapter_file(spec.source, name)
        kwargs = {"weight_name": weight_name, "use_safetensors": True, "return_lora_metadata": True}
        if self.family == "sd3":  # its reader returns no network alphas
            (state, metadata), alphas = self.mixin.lora_state_dict(folder, **kwargs), None
        elif self.family == "flux":
            state, alphas, metadata = self.mixin.lora_state_dict(folder, return_alphas=True, **kwargs)
            if any("lora" not in key for key in state):
                raise ValueError(f"adapters.{name}.source: Flux control LoRAs (norm layers, expanded inputs) "
                                 "are not served; plain LoRA adapters are")
        else:
            state, alphas, metadata = self.mixin.lora_state_dict(folder, **kwargs)
        self._host[name] = (state, alphas, metadata)
        return sum(t.numel() * t.element_size() for t in state.values())

    def _inject(self, name: str) -> None:
        state, alphas, metadata = self._host[name]
        ours = any(key.startswith(f"{self.prefix}.") for key in state)
        if not ours:
            return  # e.g. an adapter without text-encoder layers: this component runs without it
        if self.role == "denoiser" and self.family == "sd3":
            self.mixin.load_lora_into_transformer(state, self.component, adapter_name=name, metadata=metadata)
        elif self.role == "denoiser" and self.family == "flux":
            self.mixin.load_lora_into_transformer(state, alphas, self.component, adapter_name=name, metadata=metadata)
        elif self.role == "denoiser":
            self.mixin.load_lora_into_unet(state, alphas, self.component, adapter_name=name, metadata=metadata)
        else:
            self.mixin.load_lora_into_text_encoder(state, alphas, self.component, prefix=self.prefix,
                                                   adapter_name=name, metadata=metadata)
        self.present.add(name)

    def _delete(self, name: str) -> None:
        if name not in self.present:
            return
        if self.role == "denoiser":
            self.component.delete_adapters([name])
        else:
            from peft.tuners.tuners_utils import BaseTunerLayer

            for module in self.component.modules():
                if isinstance(module, BaseTunerLayer):
                    module.delete_adapter(name)
            self.component.peft_config.pop(name, None)
        self.present.discard(name)

    def apply(self, target: tuple) -> SwitchPlan:
        """Make `target` the active set of this component (a no-op when it already is)."""
        plan = self.residency.plan(target)
        if not plan.changed:
            return plan
        sizes = {name: self._read(name) for name in plan.from_disk}
        for name in plan.evict:
            self._delete(name)
        for name in plan.inject:
            self._inject(name)
        for name in self.residency.commit(plan, sizes):
            self._host.pop(name, None)
        names = [name for name, _ in target if name in self.present]
        weights = [weight for name, weight in target if name in self.present]
        self._activate(names, weights)
        return plan

    def _activate(self, names: list[str], weights: list[float]) -> None:
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        if not self.present:
            return  # no layers injected: the plain model
        if self.role == "denoiser":
            if names:
                self.component.enable_lora()
                self.component.set_adapters(names, weights)
            else:
                self.component.disable_lora()
        elif names:
            enable_lora_for_text_encoder(self.component)
            set_adapters_for_text_encoder(names, self.component, weights)
        else:
            disable_lora_for_text_encoder(self.component)
