"""Measured execution profiles (H800, from the paper's artifact): time and memory.

Format (`broker/costs/h800/*.json`): `{"model_name", "loading": {disk_to_host_mem_time,
host_mem_to_gpu_time, gpu_memory_required}, "execution": [{"mode", "results":
[{"batch_size", "height"?, "width"?, "execution_time", "gpu_memory_used"}]}]}`.
Batch sizes between measured points are interpolated linearly, larger ones
extrapolated from the last two; another resolution scales time by pixel count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from broker.protocol.tasks import TaskKind

# The profile mode that times each task kind ("default" is the model's forward call).
# A ControlNet's `control_image` (preprocessing, once per request) has no profile of its
# own: it is priced as one forward of the net, an upper bound.
PROFILE_MODE = {TaskKind.ENCODE: "default", TaskKind.DENOISE: "default", TaskKind.DENOISE_BRANCH: "default",
                TaskKind.CONTROL: "default", TaskKind.CONTROL_IMAGE: "default", TaskKind.DECODE: "decode_latents",
                TaskKind.ENCODE_IMAGE: "prepare_image"}


# The artifact measured these at the latent resolution (128 x 128 for a 1024 px image,
# the VAE's factor 8) where every other profile gives image pixels; read them as pixels
# so one request shape prices every model of a workflow.
LATENT_RESOLUTION = {"StableDiffusion3": 8, "StableDiffusion35Large": 8, "StableDiffusion3VAE": 8,
                     "StableDiffusion35LargeVAE": 8}


class ProfileError(ValueError):
    """A profile is missing or malformed."""


@dataclass(frozen=True)
class Profile:
    name: str
    load_s: float
    resident_bytes: int
    # mode -> sorted [(batch, height, width, seconds, peak_bytes)]
    points: dict[str, list[tuple[int, int, int, float, int]]]

    def modes(self) -> list[str]:
        return sorted(self.points)

    def _series(self, mode: str, height: int, width: int) -> tuple[list, float]:
        if mode not in self.points:
            if "default" not in self.points:
                raise ProfileError(f"profile {self.name}: no mode {mode!r} (has {self.modes()})")
            mode = "default"
        points = self.points[mode]
        # the measured resolution closest to the asked one; time scales with pixels
        ref = min({(h, w) for _, h, w, _, _ in points}, key=lambda hw: abs(hw[0] * hw[1] - height * width))
        series = [(b, t, m) for b, h, w, t, m in points if (h, w) == ref]
        scale = (height * width) / (ref[0] * ref[1]) if ref[0] and ref[1] and height and width else 1.0
        return series, scale

    def exec_time(self, mode: str, batch: int, height: int = 0, width: int = 0) -> float:
        series, scale = self._series(mode, height, width)
        return max(0.0, _interpolate([(b, t) for b, t, _ in series], batch)) * scale

    def peak_bytes(self, mode: str, batch: int, height: int = 0, width: int = 0) -> int:
        series, _ = self._series(mode, height, width)
        return int(max(self.resident_bytes, _interpolate([(b, m) for b, _, m in series], batch)))


def _interpolate(points: list[tuple[int, float]], x: int) -> float:
    points = sorted(points)
    if len(points) == 1:
        return points[0][1] * x / points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            if x <= x0:
                return y0 * x / x0 if x < x0 else y0
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + (y1 - y0) * (x - x1) / (x1 - x0)


def parse_profile(doc: dict, name: str = "") -> Profile:
    try:
        loading = doc["loading"]
        points: dict[str, list] = {}
        factor = LATENT_RESOLUTION.get(doc.get("model_name", name), 1)
        for entry in doc["execution"]:
            rows = [
                (int(r["batch_size"]), int(r.get("height", 0)) * factor, int(r.get("width", 0)) * factor,
                 float(r["execution_time"]), int(r.get("gpu_memory_used", 0)))
                for r in entry["results"]
            ]
            points.setdefault(entry["mode"], []).extend(rows)
        return Profile(
            name=doc.get("model_name", name),
            load_s=float(loading.get("disk_to_host_mem_time", 0)) + float(loading.get("host_mem_to_gpu_time", 0)),
            resident_bytes=int(loading.get("gpu_memory_required", 0)),
            points={m: sorted(v) for m, v in points.items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"profile {name}: malformed ({exc!r})") from None


def load_profile(name_or_path: str) -> Profile:
    """A bundled profile by model name, or a profile JSON file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return parse_profile(json.loads(path.read_text()), path.stem)
    resource = resources.files("broker.costs").joinpath(f"h800/{name_or_path}.json")
    if not resource.is_file():
        raise ProfileError(f"no profile named {name_or_path!r} (bundled profiles are in broker/costs/h800/)")
    return parse_profile(json.loads(resource.read_text()), name_or_path)
