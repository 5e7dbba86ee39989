"""The GPU check's transfer stage: one tensor fetched from a producer process into this
one by CUDA IPC, shared memory and frames, and the peer processes it needs.

Processes and sockets: `python -m clients.bench.gpu_check peer` (`peer_main`) is an
actor runtime whose data thread owns its data ROUTER and whose main thread takes
commands as JSON lines on stdin (`PeerProcess` drives it); `... hold` (`hold_main`)
maps a tensor and holds it until killed (for tests/test_cuda_ipc.py); `Consumer` is an
actor runtime in this process whose fetcher owns the fetch DEALERs. Every process is
stopped by its pid, never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from actors import cuda_ipc
from actors.backends import register_backend
from actors.runtime import ActorConfig, ActorRuntime
from actors.store import bundle_nbytes
from broker import protocol as p
from broker.logs import configure_logging

REPO = Path(__file__).resolve().parents[2]  # the repository root: the peers run from it
PEER_MODEL = "Flux1Schnell"  # any catalog model: the echo backend never runs it
ECHO_BACKEND = "tensor-echo"
KIB, MIB = 1024, 1024 * 1024
TRANSFER_SIZES = (128 * KIB, 4 * MIB, 64 * MIB)
TRANSPORTS = ("ipc", "shm", "frames")


class TensorBackend:
    """A torch backend that computes nothing (returns its first input): lets an actor
    runtime hold and move torch tensors for data-plane tools and tests."""

    tensor_kind = "torch"

    def __init__(self, model: Any, device: str, options: dict):
        self.device = device

    def load(self) -> None:
        return None

    def memory_bytes(self) -> int:
        return 0

    def run(self, tasks: list, inputs: list[list[dict]]) -> list[dict]:
        return [dict(task_inputs[0]) if task_inputs else {} for task_inputs in inputs]


def register_echo_backend() -> None:
    register_backend(ECHO_BACKEND, "clients.bench.gpu_transfers:TensorBackend")


# ------------------------------------------------------------------ tensors of every layout


def make_tensor(spec: dict, device: str) -> Any:
    """A deterministic tensor from a spec {name, dtype, shape, seed, layout[, device]}:
    the producer makes it, the consumer makes it again to compare."""
    import torch

    device = spec.get("device") or device
    dtype = getattr(torch, spec["dtype"])
    generator = torch.Generator(device=device).manual_seed(spec["seed"])

    def rand(shape: list[int]) -> Any:
        if dtype.is_floating_point:
            return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
        return torch.randint(0, 120, shape, generator=generator, device=device, dtype=dtype)

    shape = list(spec["shape"])
    layout = spec.get("layout", "contiguous")
    if layout == "contiguous":
        return rand(shape)
    if layout == "channels_last":  # dense, not row-major: what a VAE encoder hands a UNet
        return rand(shape).contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # dense, permuted
        return rand(shape[:-2] + [shape[-1], shape[-2]]).transpose(-1, -2)
    if layout == "strided":  # not dense: every other element of a wider storage
        return rand(shape[:-1] + [2 * shape[-1]])[..., ::2]
    if layout == "offset":  # dense, but starting inside its storage
        return rand([shape[0] + 1, *shape[1:]])[1:]
    raise ValueError(f"layout: unknown layout {layout!r}")


# A bundle like a denoise step's output, every layout and dtype that travels.
LAYOUT_BUNDLE = [
    {"name": "latents", "dtype": "float32", "shape": [1, 4, 32, 32], "seed": 1, "layout": "channels_last"},
    {"name": "cond/embeds", "dtype": "bfloat16", "shape": [2, 77, 64], "seed": 2, "layout": "transposed"},
    {"name": "cond/pooled", "dtype": "float16", "shape": [2, 48], "seed": 3, "layout": "strided"},
    {"name": "cond/time_ids", "dtype": "float32", "shape": [2, 6], "seed": 4, "layout": "offset"},
    {"name": "state/lower_order_nums", "dtype": "int64", "shape": [1], "seed": 5},
    {"name": "state/generator", "dtype": "uint8", "shape": [5056], "seed": 6, "device": "cpu"},
]


def dense(tensor: Any) -> bool:
    """Non-overlapping and dense: its layout survives a copy."""
    order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), -tensor.shape[d]))
    return tensor.permute(order).is_contiguous()


def compare_bundle(got: dict, specs: list[dict], device: str) -> list[str]:
    """What differs between a fetched bundle and the specs it was made from ([] if nothing)."""
    problems = []
    for spec in specs:
        want = make_tensor(spec, device)
        value = got.get(spec["name"])
        if value is None:
            problems.append(f"{spec['name']}: missing")
            continue
        value_on = value.to(want.device)
        if value.dtype != want.dtype or list(value.shape) != list(want.shape) or not bool((value_on == want).all()):
            problems.append(f"{spec['name']}: values differ")
        elif dense(want) and value.stride() != want.stride():
            problems.append(f"{spec['name']}: layout {value.stride()} instead of {want.stride()}")
    return problems


# ------------------------------------------------------------------ producer peer process


def peer_main(device: str) -> int:
    """Producer: an actor runtime serving FETCH from its data thread; this main thread
    plays its compute thread, taking JSON-line commands on stdin (put, free, stats, quit)."""
    import torch

    configure_logging("console", "warning", process="gpu-check-peer")
    register_echo_backend()
    runtime = ActorRuntime(ActorConfig(model=PEER_MODEL, backend=ECHO_BACKEND, device=device))
    runtime.start_data_plane()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()

    def reply(value: dict) -> None:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()

    def put(tensor_id: str, specs: list[dict]) -> int:
        bundle = {spec["name"]: make_tensor(spec, device) for spec in specs}
        runtime.store.put(tensor_id, bundle, ready=cuda_ipc.record_ready(bundle))
        return bundle_nbytes(bundle)

    reply({"address": runtime.data_address, "host": runtime.host, "gpu": cuda_ipc.device_uuid(device)})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "put":
                # In a function so that no local of this loop keeps the last bundle
                # alive after its FREE (the GPU run once read that as a leak).
                reply({"nbytes": put(cmd["id"], cmd["tensors"])})
            elif op == "free":
                runtime.free(cmd["ids"])
                reply({})
            elif op == "stats":
                if cuda:
                    torch.cuda.synchronize()
                telemetry = runtime.refresh_telemetry()
                reply({"allocated": torch.cuda.memory_allocated(device) if cuda else 0,
                       "pins": telemetry.ipc_pins, "segments": telemetry.shm_segments,
                       "stored": telemetry.stored_tensors, "ipc_fallbacks": telemetry.ipc_fallbacks})
            elif op == "quit":
                break
            else:
                reply({"error": f"unknown op {op!r}"})
    finally:
        runtime.close_data_plane()
    reply({"bye": True})
    return 0


def hold_main(address: str, tensor_id: str, device: str) -> int:
    """A consumer that maps a bundle's CUDA IPC handles and never lets go (until killed)."""
    import torch
    import zmq

    gpu = cuda_ipc.device_uuid(device)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    sock.send_multipart([b"", *p.encode(p.Fetch(tensor_id, "hold", False, gpu))])
    if not sock.poll(10_000):
        print(json.dumps({"error": "no reply"}), flush=True)
        return 1
    msg, _ = p.decode(sock.recv_multipart()[1:])
    shared = [d for d in getattr(msg, "tensors", []) if d.where == cuda_ipc.WHERE]
    held = [cuda_ipc.open_storage(d, cuda_ipc.device_index(device)) for d in shared]
    torch.cuda.synchronize()
    print(json.dumps({"held": len(held)}), flush=True)
    time.sleep(600)
    return 0


class PeerProcess:
    """The driver's handle on a producer peer process (main thread only)."""

    def __init__(self, device: str):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "clients.bench.gpu_check", "peer", "--device", device],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
        hello = self._read()
        self.address, self.host, self.gpu = hello["address"], hello["host"], hello["gpu"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the producer peer exited (code {self.proc.wait(5)}); see its stderr above")
        return json.loads(line)

    def call(self, op: str, **fields: Any) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"producer peer: {answer['error']}")
        return answer

    def put(self, tensor_id: str, specs: list[dict]) -> int:
        return self.call("put", id=tensor_id, tensors=specs)["nbytes"]

    def free(self, tensor_ids: list[str]) -> None:
        self.call("free", ids=tensor_ids)

    def stats(self) -> dict:
        return self.call("stats")

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.call("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Consumer:
    """An actor runtime in this process that fetches from a peer as a task would."""

    def __init__(self, device: str, shm: bool = False):
        """`shm`: same-host fetches may go through shared memory (off by default, as for actors)."""
        register_echo_backend()
        self.device = device
        self.runtime = ActorRuntime(ActorConfig(model=PEER_MODEL, backend=ECHO_BACKEND, device=device, shm=shm))

    @property
    def gpu(self) -> str:
        return self.runtime.fetcher.local_gpu()

    def fetch(self, peer: PeerProcess, tensor_id: str, nbytes: int, transport: str = "auto") -> dict:
        """`auto`: as a task (IPC, shared memory, frames, with fallbacks); else exactly one transport."""

        ref = p.TensorRef(tensor_id, "peer", peer.address, nbytes, peer.host)
        if transport == "auto":
            return self.runtime.fetcher.fetch(ref)
        shm, gpu = {"ipc": (False, self.gpu), "shm": (True, ""), "frames": (False, "")}[transport]
        return self.runtime.fetcher.fetch(ref, shm=shm, gpu=gpu)

    def close(self) -> None:
        self.runtime.close_data_plane()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------ stage: transfers


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a timed GPU section ends here)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def bench_transfers(device: str, sizes: tuple[int, ...], reps: int, transports: tuple[str, ...]) -> dict:
    """Fetch latency by transport: put a fresh bundle, time the fetch until the tensor is
    on this process's device (frames and shared memory land in host memory first),
    check the first one, free it; the medians over `reps` after one warm-up."""
    results: dict = {"device": device, "reps": reps, "sizes": {}}
    with PeerProcess(device) as peer, Consumer(device) as consumer:
        baseline = peer.stats()["allocated"]
        for size in sizes:
            spec = [{"name": "latents", "dtype": "float16", "shape": [size // 2], "seed": size % 1000}]
            row = results["sizes"][size] = {}
            for transport in transports:
                telemetry = consumer.runtime.telemetry
                before = (telemetry.ipc_fetches, telemetry.shm_fetches)
                times, problems = [], []
                try:
                    for i in range(reps + 1):
                        tensor_id = f"t{size}-{transport}-{i}"
                        nbytes = peer.put(tensor_id, spec)
                        started = time.perf_counter()
                        bundle = consumer.fetch(peer, tensor_id, nbytes, transport)
                        value = bundle["latents"].to(device)
                        synchronize(device)
                        elapsed = time.perf_counter() - started
                        if i == 0:
                            problems = compare_bundle({"latents": value}, spec, device)
                        else:
                            times.append(elapsed)
                        del bundle, value
                        peer.free([tensor_id])
                except Exception as exc:  # one transport failing must not hide the others
                    problems.append(f"{type(exc).__name__}: {exc}")
                used = (telemetry.ipc_fetches - before[0], telemetry.shm_fetches - before[1])
                want = {"ipc": used[0], "shm": used[1]}.get(transport)
                if not problems and want is not None and want != reps + 1:  # the bytes came another way
                    problems.append(f"{want} of {reps + 1} fetches went by {transport}")
                row[transport] = {
                    "median_ms": round(statistics.median(times) * 1000, 3) if times else None,
                    "min_ms": round(min(times) * 1000, 3) if times else None,
                    "ipc_fetches": used[0], "shm_fetches": used[1], "problems": problems,
                }
        results["leftover"] = {**peer.stats(), "baseline": baseline}
    return results


# ------------------------------------------------------------------ stage: full-size families
