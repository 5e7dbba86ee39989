"""ComfyUI's (sampler_name, scheduler) pairs mapped onto the catalog's samplers.

The diffusers backend offers `default` (the scheduler the model ships with), `ddim`,
`euler`, `euler_a` and `dpmpp_2m` (actors/backends/diffusers/step.py), each built from the
model's own scheduler config: its timestep spacing, no Karras or exponential sigmas. So a
ComfyUI scheduler maps only where it spaces the steps uniformly (`normal`, `simple`,
`sgm_uniform`; `ddim_uniform` with `ddim`); flow-matching models (SD3, Flux) step with
their own FlowMatchEulerDiscreteScheduler, ComfyUI's `euler` on them. Every other pair
is refused. docs/comfy.md has the table.
"""

from __future__ import annotations

UNIFORM = ("normal", "simple", "sgm_uniform")
# (family group, sampler_name) -> (our sampler, the ComfyUI schedulers it accepts)
TABLE: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("unet", "euler"): ("euler", UNIFORM),
    ("unet", "euler_ancestral"): ("euler_a", UNIFORM),
    ("unet", "ddim"): ("ddim", (*UNIFORM, "ddim_uniform")),
    ("unet", "dpmpp_2m"): ("dpmpp_2m", UNIFORM),
    ("flow", "euler"): ("default", UNIFORM),
}


def group(family: str) -> str:
    return "flow" if family in ("sd3", "flux") else "unet"


def map_sampler(family: str, sampler_name: str, scheduler: str) -> tuple[str | None, str, str]:
    """(our sampler, '', '') or (None, the input at fault, why)."""
    entry = TABLE.get((group(family), sampler_name))
    if entry is None:
        offered = sorted(name for g, name in TABLE if g == group(family))
        return None, "sampler_name", (f"sampler {sampler_name!r} has no diffusers equivalent for a {family} model "
                                      f"(supported: {offered})")
    sampler, schedulers = entry
    if scheduler not in schedulers:
        return None, "scheduler", (f"scheduler {scheduler!r} with sampler {sampler_name!r} has no diffusers "
                                   f"equivalent for a {family} model (supported: {list(schedulers)})")
    return sampler, "", ""
