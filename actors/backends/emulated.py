"""The emulated backend: replays measured execution times; imports no torch.

A batch takes the time the model's profile gives for its mode, rows and resolution
(scaled by `time_scale`), and produces tensors of the real sizes so the data plane
moves real bytes. Contents are zeros except a 16-byte digest at the front of each
tensor that chains prompt -> embeddings -> latents (with seed and step) -> image, so
a lost, stale or mixed-up tensor shows in the final image.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import numpy as np

from actors.backends.emulated_gpu import EmulatedGpu
from actors.backends.lora import ADAPTER_HOST_BYTES, AdapterSwitchCosts, Residency, batch_adapters
from actors.store import Bundle, RawTensor, VirtualTensor, raw_zeros
from broker.catalog import ModelSpec
from broker.costs.profiles import PROFILE_MODE, load_profile
from broker.protocol.messages import TaskSpec
from broker.protocol.tasks import TaskKind
from broker.protocol.tensors import expected_nbytes

DIGEST_BYTES = 16
POISON_EXIT_CODE = 70  # the `crash_on_prompt` fault's exit status


def content_digest(*parts: bytes | str | int) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for part in parts:
        h.update(part if isinstance(part, (bytes, bytearray, memoryview)) else str(part).encode())
    return h.digest()


def read_digest(tensor: RawTensor) -> bytes:
    return bytes(memoryview(tensor.buffer).cast("B")[:DIGEST_BYTES])


def _stamped(dtype: str, shape: tuple, digest: bytes, virtual: bool = False) -> RawTensor | VirtualTensor:
    if virtual:  # the size without the bytes: only the digest exists
        return VirtualTensor(dtype, tuple(shape), digest[: min(DIGEST_BYTES, expected_nbytes(dtype, list(shape)))])
    tensor = raw_zeros(dtype, shape)
    n = min(DIGEST_BYTES, len(tensor.buffer))
    tensor.buffer[:n] = digest[:n]
    return tensor


# What one fetch costs this runtime on a GPU host, per path, as (bytes, seconds) points:
# medians of 20 fetches into the consumer's CUDA memory on the lent H200, 2026-11-27
# (docs/benchmarks.md, "CUDA IPC and full-size models on a GPU"). "device": the holder
# is on the consumer's GPU (CUDA IPC: handle and event setup dominate); "host": another
# GPU of the host, as frames through host memory (shared memory is off by default: it
# was slower at every size measured there, 5.9 against 2.7 ms at 4 MiB); "network": frames
# over the holder's data socket (measured on one host's loopback: a real NIC is no
# faster for this runtime's copies).
_FRAMES_FETCH_S = ((128 << 10, 0.821e-3), (4 << 20, 2.67e-3), (64 << 20, 103.773e-3))
MEASURED_FETCH_S = {
    "device": ((128 << 10, 1.271e-3), (4 << 20, 1.004e-3), (64 << 20, 1.242e-3)),
    "host": _FRAMES_FETCH_S,
    "network": _FRAMES_FETCH_S,
}


def measured_fetch_s(nbytes: int, path: str) -> float:
    """Linear between the measured points, the first point's time below them, the last
    segment's slope above them."""
    points = MEASURED_FETCH_S[path]
    if nbytes <= points[0][0]:
        return points[0][1]
    for (b0, t0), (b1, t1) in zip(points, points[1:], strict=False):
        if nbytes <= b1 or (b1, t1) == points[-1]:
            return t0 + (t1 - t0) * (nbytes - b0) / (b1 - b0)
    raise AssertionError("unreachable")


RENDER_CELL = 8  # pixels per computed sample: a 1024 px image costs 1 ms, not 55 ms of CPU


def render_image(digest: bytes, height: int, width: int) -> np.ndarray:
    """A smooth colour field determined by the digest: [height, width, 3] uint8.

    Computed on a grid of RENDER_CELL-pixel cells and repeated: the emulated actors
    must not spend CPU a GPU would not (55 ms per 1024 px image at full resolution
    showed up as queueing at the knee of the cluster benchmark)."""
    params = np.frombuffer(digest, dtype=np.uint8).astype(np.float32) / 255.0
    rows, cols = -(-height // RENDER_CELL), -(-width // RENDER_CELL)
    y = np.linspace(0.0, 1.0, rows, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, cols, dtype=np.float32)[None, :]
    channels = []
    for c in range(3):
        a, b, ph, fr = params[4 * c: 4 * c + 4]
        wave = np.sin((2 + 6 * fr) * np.pi * (a * x + b * y) + 6.283 * ph)
        ring = np.cos((3 + 5 * a) * np.pi * np.hypot(x - b, y - ph))
        channels.append(127.5 + 63.5 * wave + 63.5 * ring)
    small = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    return np.repeat(np.repeat(small, RENDER_CELL, axis=0), RENDER_CELL, axis=1)[:height, :width]


class EmulatedBackend:
    tensor_kind = "raw"

    def __init__(self, model: ModelSpec, device: str, options: dict):
        self.model = model
        self.device = device
        self.time_scale = float(options.get("time_scale", 1.0))
        self.load_time_scale = float(options.get("load_time_scale", 0.0))
        if self.time_scale < 0 or self.load_time_scale < 0:
            raise ValueError("options.time_scale and options.load_time_scale must be >= 0")
        self.profile = load_profile(options.get("profile") or model.profile or model.name)
        self.peak_bytes = self.profile.resident_bytes
        # Actors on one emulated GPU share it as on a real one (emulated_gpu.py).
        self.gpu = EmulatedGpu(options.get("device_lock", ""), options.get("device_sharing", "shared"))
        self.switch_costs = AdapterSwitchCosts.from_options(options)
        self.residency = Residency.from_options(options)
        self.registry: dict = {}  # the catalog's adapters (attach_catalog)
        self.adapter_switch_s = 0.0  # emulated seconds spent switching LoRA sets (telemetry)
        # `payloads = "virtual"`: tensors are sizes without bytes (store.VirtualTensor) and a
        # fetch of them sleeps what it would take on a GPU host (`transfer_s`), so this
        # machine's CPU is not spent copying what a GPU would move.
        self.virtual = options.get("payloads", "real") == "virtual"
        # Fault injection: a prompt that kills this process when a task encodes it, as a
        # poison input crashes a real model (tests/test_poison.py, the broker's quarantine).
        self.crash_on_prompt = options.get("crash_on_prompt") or None

    def attach_catalog(self, catalog) -> None:
        self.registry = catalog.adapters

    def memory_bytes(self) -> int:
        return self.profile.resident_bytes

    def load(self) -> None:
        time.sleep(self.profile.load_s * self.load_time_scale)

    def transfer_s(self, nbytes: int, path: str) -> float:
        """Seconds a fetch of `nbytes` virtual bytes takes by `path` (device, host or
        network) on a GPU host (MEASURED_FETCH_S), on the emulation's time scale."""
        return measured_fetch_s(nbytes, path) * self.time_scale

    def run(self, tasks: list[TaskSpec], inputs: list[list[Bundle]]) -> list[Bundle]:
        started = time.perf_counter()
        if self.crash_on_prompt is not None and any(
                t.kind == TaskKind.ENCODE and t.params.prompt == self.crash_on_prompt for t in tasks):
            os._exit(POISON_EXIT_CODE)  # no clean-up, no answer: what a segfault in a model call looks like
        # A split step's combine task makes no model call (its branches did): no time.
        rows = sum(t.rows for t in tasks if t.params.calls_model)
        height, width = tasks[0].shape
        mode = PROFILE_MODE[tasks[0].kind]
        duration = self.profile.exec_time(mode, rows, height, width) * self.time_scale if rows else 0.0
        switch_s = self._switch_s(tasks) * self.time_scale
        self.adapter_switch_s += switch_s
        duration += switch_s
        if rows:
            self.peak_bytes = max(self.peak_bytes, self.profile.peak_bytes(mode, rows, height, width))
        outputs = [self._compute(task, task_inputs) for task, task_inputs in zip(tasks, inputs, strict=True)]
        self.gpu.compute(duration - (time.perf_counter() - started))  # building outputs took some already
        return outputs

    def _switch_s(self, tasks: list[TaskSpec]) -> float:
        """H800 seconds of switching to the batch's LoRA set (see AdapterSwitchCosts)."""
        target = batch_adapters(tasks)
        if target is None:
            return 0.0
        plan = self.residency.plan(target)
        if not plan.changed:
            return 0.0
        sizes = dict.fromkeys(plan.from_disk, ADAPTER_HOST_BYTES)
        self.residency.commit(plan, sizes)
        return self.switch_costs.seconds(plan, self.registry)

    def _compute(self, task: TaskSpec, inputs: list[Bundle]) -> Bundle:
        m = self.model
        height, width = task.shape
        params = task.params
        virtual = self.virtual and not task.return_output  # what goes back to the client has its bytes
        if task.kind == TaskKind.ENCODE:
            digest = content_digest(m.name, params.prompt, params.negative_prompt or "")
            return {"embeds": _stamped(m.dtype, (task.rows, m.seq_len, m.embed_dim), digest, virtual)}
        if task.kind == TaskKind.DENOISE_BRANCH:  # one CFG branch's model output
            source = read_digest(next(iter(inputs[0].values())))  # the latent (or, at step 0, embeddings)
            digest = content_digest(source, params.step, params.branch)
            return {"noise": _stamped(m.dtype, (1, m.latent_channels, height // m.vae_scale, width // m.vae_scale), digest, virtual)}
        if task.kind == TaskKind.CONTROL_IMAGE:  # the prepared control image: a digest of the client's
            digest = content_digest(m.name, *(read_digest(t) for b in inputs for t in b.values()))
            return {"control/image": _stamped(m.dtype, (task.rows, 3, height // 8, width // 8), digest, virtual)}
        if task.kind == TaskKind.CONTROL:  # residuals for this step, from the latent it starts from
            digest = content_digest(m.name, read_digest(next(iter(inputs[0].values()))), params.step)
            return {"residuals": _stamped(m.dtype, (task.rows, 16, height // 8, width // 8), digest, virtual)}
        if task.kind == TaskKind.DENOISE:
            if params.split:
                inputs = inputs[2:]  # the branches' outputs; the latent chain is the same as unsplit
            controls = [read_digest(b["residuals"]) for b in inputs if "residuals" in b]
            inputs = [b for b in inputs if "residuals" not in b and not any(k.startswith("control/") for k in b)]
            latent_shape = (task.rows, m.latent_channels, height // m.vae_scale, width // m.vae_scale)
            if params.first:
                cond = {f"cond/{i}": b["embeds"] for i, b in enumerate(inputs)}
                digest = content_digest(params.seed, *(read_digest(t) for t in cond.values()), *controls)
            else:
                (previous,) = inputs
                cond = {k: v for k, v in previous.items() if k.startswith("cond/")}
                digest = content_digest(read_digest(previous["latents"]), params.step, *controls)
            # conditioning travels with the latent, by reference (no copy)
            return {"latents": _stamped(m.dtype, latent_shape, digest, virtual), **cond}
        if task.kind == TaskKind.DECODE:
            (previous,) = inputs
            image = render_image(read_digest(previous["latents"]), height, width)
            return {"image": RawTensor("uint8", image.shape, image)}
        raise ValueError(f"task kind {task.kind!r} is not one this backend runs")


@dataclass(frozen=True)
class StepShapes:
    """One family's tensors at full size, as the diffusers backend's bundles hold them."""

    size: int  # image width and height (px): the family's default
    dtype: str
    latents: tuple
    cond: dict  # name -> shape: built at step 0 from the encoders, carried with every latent
    cfg: bool  # two rows of conditioning (the pipeline's classifier-free guidance)


GENERATOR_STATE_BYTES = 5056  # a CPU torch.Generator's state: `state/generator` travels with the latent

# Guidance scales and Flux's text/image ids are built inside each step from the task's
# parameters, so they never travel; everything below does.
STEP_SHAPES = {
    "sd15": StepShapes(512, "float16", (1, 4, 64, 64), {"embeds": (2, 77, 768)}, cfg=True),
    "sdxl": StepShapes(1024, "float16", (1, 4, 128, 128),
                       {"embeds": (2, 77, 2048), "pooled": (2, 1280), "time_ids": (2, 6)}, cfg=True),
    # SD3: CLIP-L and CLIP-G padded to T5's width, then T5's 256 rows; the two pooled vectors joined
    "sd3": StepShapes(1024, "bfloat16", (1, 16, 128, 128), {"embeds": (2, 77 + 256, 4096), "pooled": (2, 2048)},
                      cfg=True),
    # FLUX.1-dev: guidance-distilled (one row), 2x2-packed latents, T5's 512 rows and CLIP's pooled vector
    "flux": StepShapes(1024, "bfloat16", (1, 4096, 64), {"embeds": (1, 512, 4096), "pooled": (1, 768)}, cfg=False),
}


def noop_output(shapes: StepShapes, kind: str, inputs: list[Bundle], first: bool = False) -> Bundle:
    """What a model that computes nothing returns: zeros of the real sizes. The step
    passes its conditioning on by reference, as the diffusers backend's step does."""
    if kind == TaskKind.ENCODE:
        return {name: raw_zeros(shapes.dtype, shape) for name, shape in shapes.cond.items()}
    if kind == TaskKind.DENOISE:
        if first:
            cond = {f"cond/{name}": tensor for bundle in inputs for name, tensor in bundle.items()}
        else:
            cond = {name: tensor for name, tensor in inputs[0].items() if name.startswith("cond/")}
        return {"latents": raw_zeros(shapes.dtype, shapes.latents), **cond,
                "state/generator": raw_zeros("uint8", (GENERATOR_STATE_BYTES,))}
    if kind == TaskKind.DECODE:
        return {"image": raw_zeros("uint8", (shapes.size, shapes.size, 3))}
    raise ValueError(f"task kind {kind!r} is not one the noop backend runs")


class NoopBackend:
    """Returns at once: measures the runtime's own overhead. Its outputs are one byte,
    or, with `options.step_shapes` (a family of STEP_SHAPES), that family's full-size
    tensors (`lego bench overhead --step-shapes`)."""

    tensor_kind = "raw"

    def __init__(self, model: ModelSpec, device: str, options: dict):
        self.model = model
        family = options.get("step_shapes")
        if family is not None and family not in STEP_SHAPES:
            raise ValueError(f"options.step_shapes: expected one of {sorted(STEP_SHAPES)}, got {family!r}")
        self.shapes = STEP_SHAPES.get(family)

    def memory_bytes(self) -> int:
        return 0

    def load(self) -> None:
        return None

    def run(self, tasks: list[TaskSpec], inputs: list[list[Bundle]]) -> list[Bundle]:
        if self.shapes is None:
            return [{"out": RawTensor("uint8", (1,), b"\0")} for _ in tasks]
        return [noop_output(self.shapes, t.kind, bundles, t.kind == TaskKind.DENOISE and t.params.first)
                for t, bundles in zip(tasks, inputs, strict=True)]
