"""The options an operator may give the actors it spawns, per backend, and their checks.

Read by the broker (an admin's spawn is refused at once, naming `options.KEY`) and by
the node agent (which starts the process: it checks again, since a spawn may come from
a broker it cannot vouch for). Nothing outside this table reaches an actor: no paths
(an emulated actor's `profile` is a bundled profile's name; the agent alone sets
`device_lock`, inside its run directory), no unknown keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

MAX_SPAWN_COUNT = 64  # actors one admin call may ask for
PROFILE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _number(low: float, high: float) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        number = float(value)  # "0.5" from a flag or 0.5 from the wire
        if not (math.isfinite(number) and low <= number <= high):
            raise ValueError(f"must be a number in [{low:g}, {high:g}], got {value!r}")
        return number
    return check


def _whole(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        number = int(str(value), 10)
        if not low <= number <= high:
            raise ValueError(f"must be a whole number in [{low}, {high}], got {value!r}")
        return number
    return check


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {choices}, got {value!r}")
        return value
    return check


def _profile(value: Any) -> str:
    if not isinstance(value, str) or not PROFILE_NAME.match(value) or value.startswith("."):
        raise ValueError(f"must name a bundled profile (letters, digits, _ . -), got {value!r}")
    return value


_SCALES = {"time_scale": _number(0.0, 1000.0), "load_time_scale": _number(0.0, 1000.0)}
_LORA = {"lora_host_bytes": _whole(0, 1 << 40), "lora_resident": _whole(1, 1024)}
_LORA_COSTS = {"lora_disk_s": _number(0.0, 600.0), "lora_inject_s": _number(0.0, 600.0),
               "lora_activate_s": _number(0.0, 600.0)}
_SHARING = {"device_sharing": _choice("shared", "fifo")}


def _prompt(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 200:
        raise ValueError(f"must be a prompt of 1-200 characters, got {value!r}")
    return value


# Fault injection for the reliability tests: the actor exits when it encodes this prompt.
_FAULTS = {"crash_on_prompt": _prompt}

OPTIONS: dict[str, dict[str, Callable[[Any], Any]]] = {
    # payloads: "virtual" carries sizes without bytes, each fetch priced as on a GPU host
    "emulated": {**_SCALES, **_SHARING, **_LORA, **_LORA_COSTS, **_FAULTS, "profile": _profile,
                 "payloads": _choice("real", "virtual")},
    "monolith": {**_SCALES, **_SHARING, "gpu_memory_gib": _number(1.0, 4096.0)},
    # batching: "fused" (the default) runs a batch of plain denoise steps as one model call;
    # "exact" one call per task, bit for bit the pipeline's result (actors/backends/diffusers/backend.py)
    "diffusers": {**_LORA, "batching": _choice("fused", "exact")},
    # step_shapes: a family of actors.backends.emulated.STEP_SHAPES (`lego bench overhead --step-shapes`)
    "noop": {**_SCALES, "step_shapes": _choice("sd15", "sdxl", "sd3", "flux")},
}


def check_options(backend: str, options: dict | None) -> dict:
    """The options, each checked (and converted) for `backend`; ValueError naming
    `options.KEY` (or `backend`) otherwise."""
    allowed = OPTIONS.get(backend)
    if allowed is None:
        raise ValueError(f"backend: expected one of {sorted(OPTIONS)}, got {backend!r}")
    checked = {}
    for key, value in (options or {}).items():
        check = allowed.get(key)
        if check is None:
            raise ValueError(f"options.{key}: not an option of the {backend} backend (options: {sorted(allowed)})")
        try:
            checked[key] = check(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"options.{key}: {exc}") from None
    return checked
