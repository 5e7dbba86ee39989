"""Execution backends and the registry through which they plug into the actor runtime.

A backend is a class taking `(model: ModelSpec, device: str, options: dict)` with:

- `tensor_kind`: "raw" (inputs arrive as RawTensor) or "torch";
- `memory_bytes() -> int`: device memory it holds resident;
- `load() -> None`: load weights (called once, before the actor says hello);
- `run(tasks: list[TaskSpec], inputs: list[list[Bundle]]) -> list[Bundle]`: one
  batch of compatible tasks; `inputs[i]` are task i's input bundles in the order of
  `tasks[i].inputs`; returns one output bundle per task.

Backends are named "module:Class" and imported only when an actor asks for them, so
an emulated actor never imports torch. `register_backend` adds one (the diffusers
backend registers itself the same way).
"""

from __future__ import annotations

import importlib
from typing import Any

_REGISTRY = {
    "emulated": "actors.backends.emulated:EmulatedBackend",
    "noop": "actors.backends.emulated:NoopBackend",
    "monolith": "actors.backends.monolith:MonolithBackend",
    "diffusers": "actors.backends.diffusers:DiffusersBackend",
}


def register_backend(name: str, target: str) -> None:
    if ":" not in target:
        raise ValueError(f"backend target must be 'module:Class', got {target!r}")
    _REGISTRY[name] = target


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def create_backend(name: str, model: Any, device: str, options: dict) -> Any:
    target = _REGISTRY.get(name)
    if target is None:
        raise ValueError(f"backend: unknown backend {name!r} (known: {backend_names()})")
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(model, device, options)
