"""ControlNets on the diffusers backend: control images and residuals, as the pipelines
compute them (StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline).

A ControlNet actor runs two task kinds:

- `control_image` (once per request and net): the client's uint8 image, edge-detected
  first when the request asks for `canny`, then what the pipeline's `prepare_image`
  does: [0, 1] floats (`VaeImageProcessor` without normalisation), the net's dtype, and
  the image twice for the two CFG rows.
- `control` (one per step in the net's range): the same step preparation as the base
  model's (`actors/backends/diffusers/step.py`: scheduler, restored sampler state, scaled
  model input; step 0 draws the same initial latents from the request's seed), then the
  net's forward; its residuals, scaled by `control_scale`, go to the step as
  `control/down/{i}` and `control/mid`.

The base model's step sums the residuals of its nets in the workflow's order, left to
right, as diffusers' `MultiControlNetModel` does, and passes them to the UNet.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from actors.store import Bundle

CONTROL_PREFIX = "control/"
CANNY_LOW, CANNY_HIGH = 100, 200  # the thresholds of diffusers' ControlNet examples (cv2.Canny(image, 100, 200))


def is_control(bundle: Bundle) -> bool:
    """A control task's residuals (or a prepared control image), not a latent or an embedding."""
    return any(key.startswith(CONTROL_PREFIX) for key in bundle)


def controlnet_class(family: str) -> Any:
    import diffusers

    classes = {"sd15": "ControlNetModel", "sdxl": "ControlNetModel", "sd3": "SD3ControlNetModel",
               "flux": "FluxControlNetModel"}
    if family not in classes:
        raise ValueError(f"family: ControlNets of family {family!r} are not served by the diffusers backend yet "
                         f"(served: {sorted(classes)})")
    return getattr(diffusers, classes[family])


# ------------------------------------------------------------------ control images


def _gaussian_kernel(size: int = 5, sigma: float = 1.4) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def canny_edges(rgb: np.ndarray, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> np.ndarray:
    """Canny edges of a uint8 [H, W, 3] image as a uint8 [H, W, 3] map (0 or 255, all
    channels equal): Gaussian blur, Sobel gradients, non-maximum suppression along the
    gradient direction, double threshold, hysteresis. On the CPU, in float32."""
    import torch.nn.functional as F

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"control image: expected uint8 [height, width, 3], got {rgb.dtype} {list(rgb.shape)}")
    image = torch.from_numpy(np.ascontiguousarray(rgb)).float()
    gray = (image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114)[None, None]
    g = _gaussian_kernel()
    gray = F.conv2d(F.pad(gray, (2, 2, 0, 0), mode="reflect"), g.view(1, 1, 1, 5))
    gray = F.conv2d(F.pad(gray, (0, 0, 2, 2), mode="reflect"), g.view(1, 1, 5, 1))
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))[0, 0]
    gy = F.conv2d(padded, sobel.t().contiguous().view(1, 1, 3, 3))[0, 0]
    magnitude = torch.hypot(gx, gy)
    # the gradient's direction, to one of 4 neighbour pairs: 0, 45, 90, 135 degrees
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    sector = (((angle + 22.5) // 45) % 4).long()
    m = F.pad(magnitude, (1, 1, 1, 1))
    h, w = magnitude.shape

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return m[1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w]

    pairs = [((0, 1), (0, -1)), ((1, 1), (-1, -1)), ((1, 0), (-1, 0)), ((1, -1), (-1, 1))]
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for index, (a, b) in enumerate(pairs):
        local_max = (magnitude >= shifted(*a)) & (magnitude >= shifted(*b))
        keep |= (sector == index) & local_max
    thin = torch.where(keep, magnitude, torch.zeros_like(magnitude))
    strong, weak = thin >= high, thin >= low
    # hysteresis: weak pixels joined to a strong one through weak pixels are edges
    edges = strong
    while True:
        grown = F.max_pool2d(edges[None, None].float(), 3, stride=1, padding=1)[0, 0].bool() & weak
        if torch.equal(grown, edges):
            break
        edges = grown
    out = (edges.to(torch.uint8) * 255).numpy()
    return np.repeat(out[:, :, None], 3, axis=2)


def prepare_control_image(pixels: torch.Tensor, preprocess: str, rows: int, dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor:
    """What the ControlNet pipelines' `prepare_image` makes of a PIL image of the request's
    size: [rows, 3, H, W] in [0, 1] (`pil_to_numpy`: uint8 / 255 in float32), in `dtype`."""
    array = pixels.numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    if preprocess == "canny":
        array = canny_edges(array)
    elif preprocess != "none":
        raise ValueError(f"control_preprocess: expected 'none' or 'canny', got {preprocess!r}")
    floats = array.astype(np.float32) / 255.0
    image = torch.from_numpy(floats[None].transpose(0, 3, 1, 2).copy()).to(device=device, dtype=dtype)
    return torch.cat([image] * 2) if rows == 2 else image


# ------------------------------------------------------------------ residuals


def residual_bundle(down: tuple[torch.Tensor, ...], mid: torch.Tensor) -> Bundle:
    bundle = {f"control/down/{i}": sample for i, sample in enumerate(down)}
    bundle["control/mid"] = mid
    return bundle


def _summed(bundles: list[Bundle], prefix: str, rows: slice | None) -> list | None:
    total = None
    for bundle in bundles:
        samples = [bundle[f"{prefix}{i}"] for i in range(sum(1 for k in bundle if k.startswith(prefix)))]
        # per-row samples (CFG rows) are sliced; Flux's one positive-prompt row serves both
        samples = [s[rows] if rows is not None and s.shape[0] > 1 else s for s in samples]
        if total is not None and len(samples) != len(total):
            raise ValueError(f"control: the nets of one step give {len(total)} and {len(samples)} block samples: "
                             "they do not fit the same base model")
        total = samples if total is None else [a + b for a, b in zip(total, samples, strict=True)]
    return total or None


def summed_residuals(bundles: list[Bundle], rows: slice | None = None) -> dict:
    """The base model's residual arguments from the nets' bundles, summed in their order
    (Multi*ControlNetModel: first net's, then `+` each next one's); `rows` picks CFG rows.
    UNets take down and mid residuals; SD3's and Flux's DiTs one sample per ControlNet
    block (`blocks`, and Flux's single-stream `singles`), which the backend names."""
    if not bundles:
        return {}
    if "control/block/0" in bundles[0]:
        return {"blocks": _summed(bundles, "control/block/", rows), "singles": _summed(bundles, "control/single/", rows)}
    down, mid = None, None
    for bundle in bundles:
        count = sum(1 for key in bundle if key.startswith("control/down/"))
        samples = [bundle[f"control/down/{i}"] for i in range(count)]
        sample_mid = bundle["control/mid"]
        if rows is not None:
            samples, sample_mid = [s[rows] for s in samples], sample_mid[rows]
        if down is None:
            down, mid = samples, sample_mid
        else:
            if len(samples) != len(down):
                raise ValueError(f"control: the nets of one step give {len(down)} and {len(samples)} residuals: "
                                 "they do not fit the same base model")
            down = [a + b for a, b in zip(down, samples, strict=True)]
            mid = mid + sample_mid
    return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}
