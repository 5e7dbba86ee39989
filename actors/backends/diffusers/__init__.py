"""The diffusers backend (`--backend diffusers`): real text encoders, base models, VAEs
and ControlNets, one per actor process, computing bit for bit what the diffusers
pipelines compute.

- `backend`: the backend class (loading, LoRA residency, the batch loop);
- one module of blocks per component: `text` (encode), `denoise` (step, CFG branch,
  fused batch), `vae` (img2img encode, decode), `control` (control images, net forward);
- `step` and `conditioning`: the step preparation and sampler update those blocks share;
- `family`: what differs between sd15, sdxl, sd3 and flux, as data;
- `loading`: sources, single-file checkpoints, the catalog's other models' configs.
"""

from actors.backends.diffusers.backend import DiffusersBackend

__all__ = ["DiffusersBackend"]
