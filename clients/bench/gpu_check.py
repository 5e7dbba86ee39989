"""The GPU check: CUDA IPC and full-size models on a lent GPU machine, in one short run.

`python -m clients.bench.gpu_check run [--dry-run] [--record] [--stages LIST] [--out DIR]` (what
scripts/gpu-check.sh runs). Processes and sockets: this driver's main thread owns a
client DEALER to the broker it starts and the fetch DEALERs of a consumer actor
runtime (`Consumer`); it starts, as processes of its own, a producer peer
(`python -m clients.bench.gpu_check peer`: an actor runtime whose data thread owns its data
ROUTER and whose main thread takes commands as JSON lines on stdin), a consumer that
maps a tensor and holds it until killed (`... hold`, for the tests), a broker, and
one diffusers actor per model; it stops each by its pid, never by name.

Stages, each under a hard time budget (SIGALRM), each reported even when it fails:
- transfers: one fp16 tensor of 128 KiB, 4 MiB and 64 MiB fetched from the producer
  process into this one, ending on this process's GPU, by CUDA IPC, shared memory and
  frames (medians of fresh bundles: every fetch pays its export);
- sdxl, sd3, flux: full-size components (actors/models/fullsize.py, random weights;
  SDXL fp16 with CFG, SD3 bf16 with CFG, Flux bf16 FLUX.1-schnell-sized without CFG and
  with a 2-layer T5 of T5-XXL's width) built on the GPU, one actor per component on the
  same GPU, so every hop is a CUDA IPC fetch; the micro-served image must equal the
  diffusers pipeline's; the served and in-process times at 4 and 20 steps give the
  per-step overhead (the slope) and the per-request overhead (the rest). By default
  flux runs last, after batching (its 12 B transformer is loaded twice: served and
  in-process).
- batching: SDXL (fp16), SD3 (bf16) and Flux (bf16, FLUX.1-schnell's transformer)
  denoisers at full size and 1024 px, built in memory on the GPU, stepping batches of
  1, 2, 4 and 8 requests (SDXL and SD3 with CFG: two rows each; Flux without: one)
  through the diffusers backend in `fused` mode (one model call) and `exact` mode (one
  call per task): denoise steps per second of each and the fused results' largest
  difference from the exact ones.

`--dry-run` runs the same code on the CPU with shrunken components at 64 px and no
IPC, so a machine without a GPU catches what would break on one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from actors.models import fullsize
from actors.models.fullsize import FLUX_TRANSFORMER, FLUX_TRANSFORMER_DRY
from broker.catalog import ModelSpec
from broker.protocol.messages import TaskSpec
from broker.protocol.tasks import DenoiseParams
from clients.bench import records
from clients.bench.gpu_transfers import (
    KIB,
    MIB,
    TRANSFER_SIZES,
    TRANSPORTS,
    bench_transfers,
    hold_main,
    peer_main,
    synchronize,
)
from clients.client import Client
from clients.local import free_port

REPO = Path(__file__).resolve().parents[2]  # the repository root (this file is clients/bench/gpu_check.py)
PROMPT, NEGATIVE = "a lighthouse on a cliff at dusk", "blurry"  # SDXL zeroes an empty negative prompt
BATCH_SIZES = (1, 2, 4, 8)  # requests per denoise batch in the batching stage
FAMILY_DTYPES = {"sdxl": "float16", "sd3": "bfloat16", "flux": "bfloat16"}
STAGES = ("transfers", "sdxl", "sd3", "batching", "flux")  # all of them, in the default order
# Kept back from --time-limit: a stage's cleanup after its alarm (stopping its cluster:
# up to 10 s per process group), and writing the report.
REPORT_MARGIN_S = 30


class MiniCluster:
    """A broker and one actor per model, all on one device, as processes of this machine."""

    def __init__(self, catalog: Path, models: list[str], device: str, run_dir: Path):
        self.catalog, self.models, self.device, self.run_dir = catalog, models, device, run_dir
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.backend = f"tcp://127.0.0.1:{free_port()}"
        self.processes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str]) -> None:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        with open(self.run_dir / "logs" / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen([sys.executable, "-m", *args], stdout=log,
                                                    stderr=subprocess.STDOUT, cwd=REPO, env=env)

    def start(self) -> None:
        common = ["--catalog", str(self.catalog), "--log-level", "warning"]
        self._start("broker", ["broker.server", "--frontend", self.frontend, "--backend", self.backend, *common])
        for model in self.models:
            self._start(f"actor-{model}", ["actors", "--model", model, "--broker", self.backend, "--device",
                                           self.device, "--backend", "diffusers", *common])

    def wait_ready(self, client: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}")
            with contextlib.suppress(Exception):
                if len(client.stats(timeout=2.0).actors) >= len(self.models):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"actors did not join within {timeout_s}s")
            time.sleep(0.2)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.run_dir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        """Actors first, then the broker; SIGKILL what outlives a grace period."""
        for names in ([n for n in self.processes if n != "broker"], ["broker"]):
            for name in names:
                if self.processes[name].poll() is None:
                    self.processes[name].send_signal(signal.SIGTERM)
            for name in names:
                try:
                    self.processes[name].wait(10)
                except subprocess.TimeoutExpired:
                    self.processes[name].kill()
                    self.processes[name].wait()


def _guidance(family: str) -> tuple[dict, dict]:
    """(pipeline arguments, request parameters) of the family's guidance: CFG at 7.5 with a
    negative prompt, or (Flux, schnell: guidance-distilled, no guidance embedding) none."""
    if family == "flux":
        return {"guidance_scale": 0.0}, {}
    return {"negative_prompt": NEGATIVE, "guidance_scale": 7.5}, {"negative_prompt": NEGATIVE, "guidance": 7.5}


def _pipeline_image(pipe: Any, family: str, seed: int, steps: int, size: int) -> Any:
    import torch

    out = pipe(PROMPT, num_inference_steps=steps, height=size, width=size, **_guidance(family)[0],
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    return (out * 255).round().astype("uint8")


def check_family(family: str, *, dry: bool, device: str, root: Path, short: int, long: int, rounds: int) -> dict:
    """Build, serve and compare one family; times served vs in-process at `short` and `long` steps."""
    import diffusers
    import numpy as np
    import torch

    dtype = FAMILY_DTYPES[family]
    build = {"sdxl": fullsize.build_sdxl, "sd3": fullsize.build_sd3, "flux": fullsize.build_flux}[family]
    started = time.perf_counter()
    built = build(root / family, size="dry" if dry else "full", dtype=dtype, device=device)
    prefix = f"check-{family}"
    catalog = root / f"{family}.toml"
    catalog.write_text(fullsize.catalog_text(built, prefix))
    result: dict = {"family": family, "dtype": dtype, "size": built.image, "build_s": round(time.perf_counter() - started, 1)}
    models = [f"{prefix}-{name}" for name in built.encoders] + [f"{prefix}-denoiser", f"{prefix}-vae"]
    cluster = MiniCluster(catalog, models, device, root / f"{family}-run")
    cluster.start()  # the actors load while this process loads the reference pipeline
    pipe = None
    try:
        pipe = getattr(diffusers, fullsize.pipeline_class(family)).from_pretrained(
            built.folder, torch_dtype=getattr(torch, dtype), **fullsize.pipeline_extra(family)).to(device)
        pipe.set_progress_bar_config(disable=True)
        reference = _pipeline_image(pipe, family, 1, short, built.image)
        with Client(cluster.frontend) as client:
            cluster.wait_ready(client, 240)
            result["ready_s"] = round(time.perf_counter() - started, 1)
            params = {"prompt": PROMPT, **_guidance(family)[1], "width": built.image, "height": built.image}
            served = client.generate(f"{prefix}-txt2img", timeout=120, seed=1, steps=short, **params).image
            result["identical"] = bool(np.array_equal(served, reference))
            result["max_abs_diff"] = int(np.abs(served.astype(np.int16) - reference.astype(np.int16)).max())
            times: dict = {}
            for steps in (short, long):
                times[steps] = {"served": [], "pipeline": []}
                for seed in range(2, 2 + rounds):  # alternate, so drift hits both sides alike
                    t0 = time.perf_counter()
                    client.generate(f"{prefix}-txt2img", timeout=120, seed=seed, steps=steps, **params)
                    times[steps]["served"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    _pipeline_image(pipe, family, seed, steps, built.image)
                    synchronize(device)
                    times[steps]["pipeline"].append(time.perf_counter() - t0)
            time.sleep(1.5)  # one heartbeat carries the actors' telemetry
            telemetry = [a.telemetry for a in client.stats().actors if a.telemetry]
        med = {steps: {side: statistics.median(v) for side, v in t.items()} for steps, t in times.items()}
        gap = {steps: m["served"] - m["pipeline"] for steps, m in med.items()}
        per_step = (gap[long] - gap[short]) / (long - short)
        result.update({
            "steps": (short, long), "rounds": rounds,
            "served_s": {s: round(m["served"], 3) for s, m in med.items()},
            "pipeline_s": {s: round(m["pipeline"], 3) for s, m in med.items()},
            "per_step_overhead_ms": round(per_step * 1000, 2),
            "per_request_overhead_ms": round((gap[short] - short * per_step) * 1000, 1),
            "fetches": sum(t.fetches for t in telemetry), "ipc_fetches": sum(t.ipc_fetches for t in telemetry),
            "ipc_fallbacks": sum(t.ipc_fallbacks for t in telemetry),
            "fetch_fallbacks": sum(t.fetch_fallbacks for t in telemetry),
            "ipc_pins_left": sum(t.ipc_pins for t in telemetry),
        })
    except Exception as exc:
        tails = "\n".join(f"--- {name}\n{cluster.log_tail(name, 8)}" for name in cluster.processes)
        raise RuntimeError(f"{type(exc).__name__}: {exc}\n{tails}") from None
    finally:
        cluster.stop()
        pipe = None  # before emptying the cache: the next family needs the memory
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        shutil.rmtree(built.folder, ignore_errors=True)  # gigabytes of weights
    return result


# ------------------------------------------------------------------ fused vs exact batching


def _batching_denoiser(family: str, dry: bool, device: str, dtype: Any) -> tuple[Any, Any]:
    """(denoiser module, scheduler config) at full size (or shrunken), random weights,
    initialised on the device in `dtype` (Flux in float32 would need 48 GB)."""
    import diffusers
    import torch

    cls, config, scheduler = {
        "sdxl": (diffusers.UNet2DConditionModel, fullsize.SDXL_UNET_DRY if dry else fullsize.SDXL_UNET,
                 diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                  steps_offset=1, timestep_spacing="leading")),
        "sd3": (diffusers.SD3Transformer2DModel, fullsize.SD3_TRANSFORMER_DRY if dry else fullsize.SD3_TRANSFORMER,
                diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)),
        "flux": (diffusers.FluxTransformer2DModel, FLUX_TRANSFORMER_DRY if dry else FLUX_TRANSFORMER,
                 diffusers.FlowMatchEulerDiscreteScheduler(**fullsize.FLUX_SCHEDULER)),
    }[family]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    # what `DDIMScheduler.load_config` gives an actor: the config with its class name
    return module.eval(), {**scheduler.config, "_class_name": type(scheduler).__name__}


def _encoder_outputs(family: str, dry: bool, rows: int, seed: int, dtype: Any) -> list[dict]:
    """What the family's text encoders hand step 0 (random, of their real shapes)."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)

    def rand(*shape: int) -> Any:
        return torch.randn(shape, generator=generator).to(dtype)

    clip_l, clip_g = (32, 32) if dry else (768, 1280)
    if family == "sdxl":
        return [{"embeds": rand(rows, 77, clip_l)}, {"embeds": rand(rows, 77, clip_g), "pooled": rand(rows, clip_g)}]
    if family == "sd3":
        return [{"embeds": rand(rows, 77, clip_l), "pooled": rand(rows, clip_l)},
                {"embeds": rand(rows, 77, clip_g), "pooled": rand(rows, clip_g)}]
    config = FLUX_TRANSFORMER_DRY if dry else FLUX_TRANSFORMER
    return [{"pooled": rand(rows, config["pooled_projection_dim"])},
            {"t5": rand(rows, 16 if dry else 512, config["joint_attention_dim"])}]


def bench_batching(family: str, *, dry: bool, device: str, rounds: int) -> dict:
    """One denoise step of 1, 2, 4 and 8 requests as one batch through the diffusers backend,
    fused and exact: medians of `rounds` timed batches after a warm-up each."""
    import torch

    from actors.backends.diffusers import DiffusersBackend

    dtype_name = FAMILY_DTYPES[family]
    dtype, size = getattr(torch, dtype_name), 64 if dry else 1024
    rows = 1 if family == "flux" else 2  # Flux (schnell-style) without CFG, the others with
    started = time.perf_counter()
    module, scheduler_config = _batching_denoiser(family, dry, device, dtype)
    spec = ModelSpec(f"batching-{family}", "denoiser", dtype=dtype_name, source="(built in memory)", family=family,
                     latent_channels=module.config.in_channels)
    backends = {}
    for mode in ("exact", "fused"):
        backends[mode] = DiffusersBackend(spec, device, {"batching": mode})
        backends[mode].loaded.component, backends[mode].loaded.scheduler_config = module, scheduler_config
    result: dict = {"family": family, "dtype": dtype_name, "size": size, "rows": rows, "rounds": rounds,
                    "build_s": round(time.perf_counter() - started, 1), "steps_per_s": {}, "max_abs_diff": {}}

    def batch(n: int) -> tuple[list, list]:
        # each request at step 0 of a schedule of its own length: every row has its own timestep
        tasks = [TaskSpec(f"b{i}", f"r{i}", 0, "denoise/0", "denoise", spec.name, "batching", rows, [size, size],
                          DenoiseParams(step=0, steps=20 + i, first=True, seed=i, sampler="default",
                                        guidance=7.5 if rows == 2 else None), [], f"b{i}") for i in range(n)]
        return tasks, [_encoder_outputs(family, dry, rows, i, dtype) for i in range(n)]

    for n in BATCH_SIZES:
        tasks, inputs = batch(n)
        times, outputs = {}, {}
        for mode, backend in backends.items():
            outputs[mode] = backend.run(tasks, inputs)  # warm-up (and the outputs compared below)
            samples = []
            for _ in range(rounds):
                synchronize(device)
                t0 = time.perf_counter()
                backend.run(tasks, inputs)
                synchronize(device)
                samples.append(time.perf_counter() - t0)
            times[mode] = statistics.median(samples)
        result["steps_per_s"][n] = {mode: round(n / t, 2) for mode, t in times.items()}
        result["max_abs_diff"][n] = max((a["latents"].float() - b["latents"].float()).abs().max().item()
                                        for a, b in zip(outputs["exact"], outputs["fused"], strict=True))
    del backends, module
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def run_batching(*, dry: bool, device: str, families: tuple[str, ...] = ("sdxl", "sd3", "flux")) -> dict:
    """The batching stage: each family on its own, one failure reported without hiding the rest."""
    report = {}
    for family in families:
        try:
            report[family] = bench_batching(family, dry=dry, device=device, rounds=1 if dry else 3)
        except StageTimeout as exc:  # the stage's budget is spent: keep what was measured
            report[family] = {"error": str(exc)}
            break
        except Exception as exc:  # reported in the table
            report[family] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return report


def batching_rows(report: dict, dry: bool) -> list[tuple[str, str, str]]:
    rows = []
    for family, r in report.items():
        if "error" in r:
            rows.append((f"batching {family}", f"FAILED: {r['error'].splitlines()[0][:300]}", ""))
            continue
        label = (f"{family.upper()} {'shrunken (dry run)' if dry else 'full size'}, {r['dtype']}, {r['size']} px, "
                 f"{r['rows']} row(s) per request")
        cells = []
        for n, by in r["steps_per_s"].items():
            gain = by["fused"] / by["exact"] if by["exact"] else 0.0
            cells.append(f"{n}: {by['exact']} / {by['fused']} (x{gain:.2f})")
        rows.append((f"{label}: denoise steps/s, exact / fused, at batch {', '.join(str(n) for n in r['steps_per_s'])} "
                     f"requests (medians of {r['rounds']})", "; ".join(cells), "fused > exact from batch 2"))
        diffs = ", ".join(f"{n}: {d:.2g}" for n, d in r["max_abs_diff"].items())
        rows.append((f"{label}: fused vs exact, max abs diff of the step's latents", diffs, "0 at batch 1"))
    return rows


# ------------------------------------------------------------------ driver


class StageTimeout(Exception):
    """A stage ran past its time budget."""


@contextlib.contextmanager
def time_budget(seconds: int, stage: str):
    """Interrupt the main thread when `seconds` have passed (the stage's cleanup still runs)."""
    def expire(signum: int, frame: Any) -> None:
        raise StageTimeout(f"{stage}: over its budget of {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def machine(device: str) -> str:
    import psutil
    import torch

    text = f"{platform.node()}: {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 1024**3:.0f} GiB"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        text += f", {props.name} ({props.total_memory / 1024**3:.0f} GiB), CUDA {torch.version.cuda}"
    return text + f", torch {torch.__version__}, CPython {platform.python_version()}"


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def table(report: dict) -> str:
    rows: list[tuple[str, str, str]] = []
    if report.get("note"):
        rows.append(("GPU tests (tests/test_cuda_ipc.py -m gpu)", report["note"], "all pass"))
    transfers = report.get("transfers")
    if transfers and "error" in transfers:
        rows.append(("transfers", f"FAILED: {transfers['error'].splitlines()[0][:300]}", ""))
    elif transfers:
        for size, by in transfers["sizes"].items():
            cells = []
            for transport in TRANSPORTS:
                r = by.get(transport)
                if r is None:
                    cells.append("-")
                elif r["problems"]:
                    cells.append("FAILED: " + "; ".join(r["problems"])[:120])
                else:
                    cells.append(f"{r['median_ms']}")
            rows.append((f"fetch of {_size(int(size))} into the consumer's {transfers['device'].split(':')[0].upper()} "
                         f"memory, {' / '.join(TRANSPORTS)} (ms, median of {transfers['reps']})",
                         " / ".join(cells), ""))
        left = transfers["leftover"]
        rows.append(("producer after every FREE: allocated over baseline (bytes), IPC pins, shm segments",
                     f"{left['allocated'] - left['baseline']}, {left['pins']}, {left['segments']}", "0, 0, 0"))
    for family in ("sdxl", "sd3", "flux"):
        r = report.get(family)
        if r is None:
            continue
        if "error" in r:
            rows.append((f"{family}", f"FAILED: {r['error'].splitlines()[0][:300]}", ""))
            continue
        short, long = r["steps"]
        label = f"{family.upper()} {'shrunken (dry run)' if report['dry_run'] else 'full size'}, {r['dtype']}, {r['size']} px"
        rows.append((f"{label}: micro-served image == pipeline's ({short} steps)",
                     "yes" if r["identical"] else f"NO (max diff {r['max_abs_diff']})", "yes"))
        for steps in (short, long):
            rows.append((f"{label}, {steps} steps: served / in-process (s, medians of {r['rounds']})",
                         f"{r['served_s'][steps]} / {r['pipeline_s'][steps]}", ""))
        rows.append((f"{label}: overhead per step / per request (ms)",
                     f"{r['per_step_overhead_ms']} / {r['per_request_overhead_ms']}", ""))
        rows.append((f"{label}: fetches, of them by CUDA IPC; IPC fallbacks; pins left",
                     f"{r['fetches']}, {r['ipc_fetches']}; {r['ipc_fallbacks']}; {r['ipc_pins_left']}", ""))
    if report.get("batching"):
        batching = report["batching"]
        rows += ([("batching", f"FAILED: {batching['error'].splitlines()[0][:300]}", "")] if "error" in batching
                 else batching_rows(batching, report["dry_run"]))
    lines = ["| metric | measured | target |", "| --- | --- | --- |"]
    return "\n".join([*lines, *(f"| {a} | {b} | {c} |" for a, b, c in rows)])


def run_check(args: argparse.Namespace) -> int:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Actors run one intra-op thread; the reference pipeline must too (on a CPU the
    # thread count changes the order of float reductions, hence the low bits).
    torch.set_num_threads(1)
    dry = args.dry_run
    cuda = torch.cuda.is_available() and not dry
    device = args.device or ("cuda:0" if cuda else "cpu")
    stages = [s for s in args.stages.split(",") if s]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"date": records.utc_now(),
                    "machine": machine(device), "device": device, "dry_run": dry, "note": args.note}
    budgets = {"transfers": 20 if dry else 45, "sdxl": 240 if dry else 150, "sd3": 240 if dry else 120,
               "batching": 120 if dry else 150, "flux": 240 if dry else 300}
    # A stage's budget is capped by what is left of --time-limit: an outer `timeout` that
    # killed the driver mid-stage would lose every stage's report, not just the last one's.
    deadline = time.monotonic() + args.time_limit - REPORT_MARGIN_S if args.time_limit else None
    root = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        started = time.perf_counter()
        budget = budgets[stage] if deadline is None else min(budgets[stage], int(deadline - time.monotonic()))
        if budget < 10:
            report[stage] = {"error": f"StageTimeout: {stage}: not run, --time-limit {args.time_limit}s is spent"}
            print(f"gpu-check: {report[stage]['error']}", file=sys.stderr, flush=True)
            continue
        print(f"gpu-check: {stage} (budget {budget}s)", file=sys.stderr, flush=True)
        try:
            with time_budget(budget, stage):
                if stage == "transfers":
                    transports = TRANSPORTS if device.startswith("cuda") else ("shm", "frames")
                    report[stage] = bench_transfers(device, TRANSFER_SIZES, 3 if dry else 20, transports)
                elif stage == "batching":
                    report[stage] = run_batching(dry=dry, device=device)
                else:
                    report[stage] = check_family(stage, dry=dry, device=device, root=root, short=2 if dry else 4,
                                                 long=4 if dry else 20, rounds=1 if dry else 3)
        except Exception as exc:  # report it and go on: one broken stage must not hide the rest
            report[stage] = {"error": f"{type(exc).__name__}: {exc}"[:4000]}
            print(f"gpu-check: {stage} failed: {report[stage]['error']}", file=sys.stderr, flush=True)
        print(f"gpu-check: {stage} took {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    if not args.work:
        shutil.rmtree(root, ignore_errors=True)
    text = table(report)
    print(text)
    entry = (f"\n### CUDA IPC and full-size models on a GPU ({report['date']})\n\n"
             f"Machine: {report['machine']}. Command: `bash scripts/gpu-check.sh --record`.\n\n{text}\n")
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu-check.md").write_text(text + "\n")
    # A lent machine's checkout is thrown away: this file, fetched back, is what to append here.
    (out / "benchmarks-entry.md").write_text(entry)
    if args.record:
        with open(REPO / "docs" / "benchmarks.md", "a") as doc:
            doc.write(entry)
    return 0 if _passed(report, stages) else 1


def _passed(report: dict, stages: list[str]) -> bool:
    for stage in stages:
        r = report.get(stage, {})
        if "error" in r:
            return False
        if stage == "transfers":
            if any(t["problems"] for by in r["sizes"].values() for t in by.values()):
                return False
            left = r["leftover"]
            if left["allocated"] != left["baseline"] or left["pins"] or left["segments"]:
                return False
        elif stage == "batching":
            # a measurement, save one rule: a batch of one task is the pipeline's computation in either mode
            if any("error" in f or f["max_abs_diff"][BATCH_SIZES[0]] != 0 for f in r.values()):
                return False
        elif not r.get("identical") or r.get("ipc_fallbacks") or r.get("ipc_pins_left"):
            return False
        elif report["device"].startswith("cuda") and not r.get("ipc_fetches"):
            return False  # on one GPU every hop between actors must have been an IPC fetch
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.bench.gpu_check", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the check and print its table")
    run.add_argument("--dry-run", action="store_true", help="CPU, shrunken components, no IPC")
    run.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    run.add_argument("--device", default="", help="default: cuda:0 where CUDA is, else cpu")
    run.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    run.add_argument("--out", default=str(REPO / "run" / "gpu-check"), help="where the table and JSON go")
    run.add_argument("--work", default="", help="where models are built (each removed after its stage; default: a temporary folder)")
    run.add_argument("--note", default="", help="the GPU tests' outcome, for the table")
    run.add_argument("--time-limit", type=int, default=0,
                     help="seconds the whole run may take (an outer timeout's): each stage's budget is capped "
                          f"by what is left, less {REPORT_MARGIN_S}s for cleanup and the report; 0: no cap")
    peer = sub.add_parser("peer", help="(internal) a producer peer taking commands on stdin")
    peer.add_argument("--device", default="cpu")
    hold = sub.add_parser("hold", help="(internal) a consumer that maps a bundle and holds it")
    hold.add_argument("--address", required=True)
    hold.add_argument("--tensor-id", required=True)
    hold.add_argument("--device", default="cuda:0")
    args = parser.parse_args(argv)
    if args.command == "run":
        unknown = [s for s in args.stages.split(",") if s and s not in STAGES]
        if unknown:
            parser.error(f"--stages: unknown {', '.join(unknown)} (of {', '.join(STAGES)})")
    if args.command == "peer":
        return peer_main(args.device)
    if args.command == "hold":
        return hold_main(args.address, args.tensor_id, args.device)
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
