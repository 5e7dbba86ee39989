"""`lego bench overhead`: what the runtime itself costs, with no-op actors on loopback.

Two runs, each on a fresh local cluster of real processes (broker, node agent,
actors running the `noop` backend, which returns at once):

1. throughput: many requests of many steps submitted at once; tasks/s through the
   one broker process (tasks completed / wall time), plus the broker's CPU share.
2. latency: requests offered open-loop at a fixed task rate; the broker measures
   each task's hop (dispatch -> actor -> result back at the broker) and reports
   p50/p99 over the run.
3. core: the broker core plus the codec of both directions, in one process with no
   sockets, at batch size 1 and at the batch size of run 1: the Python cost of a
   task, without ZeroMQ or the scheduler's wake-ups.
4. floor: the round trip of a small message between two bare pyzmq processes on
   the same machine, in the same run, so the hop can be read against it.

`--step-shapes` runs instead the per-step cost with full-size tensors (step_shapes.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import zmq

from broker import protocol as p
from broker.catalog import parse_catalog
from broker.core.machine import BrokerCore
from clients.bench import records
from clients.bench.real import real_table, run_real_bench
from clients.bench.step_shapes import (
    NOOP_MODELS,
    parse_families,
    run_step_shapes,
    step_shapes_table,
)
from clients.client import Client
from clients.local import LocalCluster, LocalClusterSpec, free_port

NOOP_CATALOG = NOOP_MODELS + """
[workflows.noop]
description = "no-op models, for measuring the runtime's own overhead"
text_encoders = ["noop-encoder"]
denoiser = "noop-base"
vae = "noop-vae"
inputs.steps = { default = 8, max = 1000 }
inputs.width = { default = 64 }
inputs.height = { default = 64 }
"""


THROUGHPUT_STEPS = 48  # steps per request of the throughput run, unless --steps
STEP_SHAPES_STEPS = 20  # --step-shapes: a typical request's steps, unless --steps


ECHO_SERVER = """
import sys, zmq
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(sys.argv[1])
while True:
    frames = sock.recv_multipart()
    if frames[-1] == b"stop":
        break
    sock.send_multipart(frames)
"""


def zmq_baseline(rate_per_s: float, samples: int = 3000) -> dict:
    """Round trip of a 200-byte message to an echo process: the floor under any hop."""

    address = f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, address])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart([b"", b"warm up"])
        sock.poll(10_000)
        sock.recv_multipart()
        rtts = []
        for _ in range(samples):
            started = time.perf_counter()
            sock.send_multipart([b"", b"x" * 200])
            sock.recv_multipart()
            rtts.append(time.perf_counter() - started)
            time.sleep(1.0 / rate_per_s)
        sock.send_multipart([b"", b"stop"])
        server.wait(10)
    finally:
        if server.poll() is None:
            server.kill()
        sock.close()
        ctx.term()
    rtts.sort()
    return {"p50_ms": round(rtts[len(rtts) // 2] * 1000, 3), "p99_ms": round(rtts[int(len(rtts) * 0.99)] * 1000, 3)}


def core_only_run(max_batch_rows: int, requests: int = 200, steps: int = 48) -> float:
    """Tasks/s through BrokerCore with every message encoded and decoded, no sockets."""
    import structlog

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings only
    core = BrokerCore(parse_catalog(tomllib.loads(NOOP_CATALOG)))
    for name, model in (("enc", "noop-encoder"), ("b1", "noop-base"), ("b2", "noop-base"), ("vae", "noop-vae")):
        core.on_backend(name.encode(), p.ActorHello(name, model, "cpu", "h", 0, "noop", max_batch_rows, "tcp://x", 2), [], 0.0)

    def wire(msg, payload=()):
        return p.decode(p.encode(msg, list(payload)))

    started = time.perf_counter()
    pending = []
    for i in range(requests):
        sends = core.on_frontend(b"client", wire(p.Submit(f"r{i}", "noop", {"prompt": "x", "steps": steps}, False))[0], [], 0.0)
        pending += [s for s in sends if isinstance(s.msg, p.Tasks)]
    done = 0
    while pending:
        send = pending.pop()
        batch, _ = wire(send.msg)
        results, payload = [], []
        for task in batch.tasks:
            tensors = []
            if task.return_output:
                tensors = [p.TensorDesc("image", "uint8", [1], len(payload), nbytes=1)]
                payload.append(b"\0")
            results.append(p.TaskResult(task.task_id, task.attempt, task.output_id, 1, tensors))
        msg, frames = wire(p.BatchDone(batch.batch_id, results), payload)
        for out in core.on_backend(send.identity, msg, frames, 0.0):
            p.encode(out.msg, out.payload)
            if isinstance(out.msg, p.Tasks):
                pending.append(out)
        done += len(batch.tasks)
    structlog.reset_defaults()
    return done / (time.perf_counter() - started)


def _cluster(catalog: Path, actors: int, max_batch_rows: int, run_dir: str) -> LocalCluster:
    spec = LocalClusterSpec(
        workflows=["noop"], replicas={"noop-base": actors}, backend="noop", max_batch_rows=max_batch_rows,
        emulate_gpus=1, catalog=[str(catalog)], run_dir=run_dir, log_level="warning",
    )
    return LocalCluster(spec)


def _broker_cpu(cluster: LocalCluster) -> psutil.Process:
    return psutil.Process(cluster.processes["broker"].pid)


def throughput_run(catalog: Path, args, run_dir: str) -> dict:
    with _cluster(catalog, args.actors, args.max_batch_rows, run_dir) as cluster, Client(cluster.frontend) as client:
        client.generate("noop", prompt="warm up", steps=4, timeout=30)
        before = client.stats().counters["tasks_done"]
        broker = _broker_cpu(cluster)
        cpu0 = broker.cpu_times()
        started = time.perf_counter()
        jobs = [client.submit("noop", prompt=f"p{i}", steps=args.steps, progress=False, wait_accepted=False)
                for i in range(args.requests)]
        for job in jobs:
            job.result(timeout=600)
        wall = time.perf_counter() - started
        cpu1 = broker.cpu_times()
        stats = client.stats()
        tasks = stats.counters["tasks_done"] - before
        base = next(m for m in stats.models if m.model == "noop-base")
        return {
            "requests": args.requests, "steps": args.steps, "tasks": tasks, "wall_s": round(wall, 3),
            "tasks_per_s": round(tasks / wall, 1),
            "broker_cpu_share": round(((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / wall, 3),
            "mean_batch_tasks": round(base.tasks_done / max(1, base.batches), 1),
        }


def latency_run(catalog: Path, args, run_dir: str) -> dict:
    steps = 8
    tasks_per_request = steps + 2
    interval = tasks_per_request / args.rate
    with _cluster(catalog, args.actors, args.max_batch_rows, run_dir) as cluster, Client(cluster.frontend) as client:
        client.generate("noop", prompt="warm up", steps=4, timeout=30)
        before = client.stats().hop_latency_s["count"]
        jobs = []
        started = time.perf_counter()
        n = int(args.latency_seconds / interval)
        for i in range(n):
            target = started + i * interval
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            jobs.append(client.submit("noop", prompt=f"p{i}", steps=steps, progress=False, wait_accepted=False))
        offered_s = time.perf_counter() - started
        latencies = [job.result(timeout=120).latency_s for job in jobs]
        hop = client.stats().hop_latency_s
        latencies.sort()
        return {
            "offered_tasks_per_s": round(n * tasks_per_request / offered_s, 1), "requests": n,
            "hop_samples": hop["count"] - before if hop["count"] > before else hop["count"],
            "hop_p50_ms": round(hop["p50"] * 1000, 3), "hop_p99_ms": round(hop["p99"] * 1000, 3),
            "hop_max_ms": round(hop["max"] * 1000, 3),
            "request_p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
            "request_p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2),
        }


def _run_real(args) -> int:
    steps = 20
    with tempfile.TemporaryDirectory() as tmp:
        result = run_real_bench(args.models_dir, args.rounds, steps, f"{tmp}/real")
    result["date"] = records.utc_now()
    result["machine"] = records.machine()
    print(json.dumps(result, indent=2) if args.json else real_table(result))
    if args.record:
        with open(args.record, "a") as out:
            out.write(f"\n### Micro-served vs in-process, real diffusers components ({result['date']})\n\n"
                      f"Machine: {result['machine']}. Command: `lego bench overhead --real --rounds {args.rounds}`.\n\n"
                      f"{real_table(result)}\n")
    return 0 if result["identical"] else 1


def _table(result: dict) -> str:
    t, lat = result["throughput"], result["latency"]
    rows = [
        ("dispatch throughput (tasks/s)", f"{t['tasks_per_s']:,.0f}", ">= 20,000"),
        ("  tasks, wall s, mean batch", f"{t['tasks']} in {t['wall_s']} s, {t['mean_batch_tasks']} tasks/batch", ""),
        ("  broker CPU share", f"{t['broker_cpu_share']:.2f} core", ""),
        (f"hop latency p50 at {lat['offered_tasks_per_s']:,.0f} tasks/s (ms)", f"{lat['hop_p50_ms']:.3f}", ""),
        (f"hop latency p99 at {lat['offered_tasks_per_s']:,.0f} tasks/s (ms)", f"{lat['hop_p99_ms']:.3f}", "< 1 ms"),
        ("  request latency p50 / p99 (ms, 10 tasks)", f"{lat['request_p50_ms']} / {lat['request_p99_ms']}", ""),
        ("core + codec in one process, no sockets (tasks/s, batch 1 / batch max)",
         " / ".join(f"{v:,}" for v in result["core_tasks_per_s"].values()), ""),
        ("floor: raw ZeroMQ round trip p50 / p99 (ms)", f"{result['zmq_baseline']['p50_ms']} / {result['zmq_baseline']['p99_ms']}", ""),
    ]
    lines = ["| metric | measured | target |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def _run_step_shapes(args) -> int:
    try:
        families = parse_families(args.step_shapes)
    except ValueError as exc:
        print(f"lego bench overhead: {exc}", file=sys.stderr)
        return 2
    steps = args.steps or STEP_SHAPES_STEPS
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_step_shapes(families, steps, args.repeats, tmp)
    result = {"date": records.utc_now(), "machine": records.machine(), "families": rows}
    print(json.dumps(result, indent=2) if args.json else step_shapes_table(rows))
    if args.record:
        command = f"lego bench overhead --step-shapes {','.join(families)} --steps {steps} --repeats {args.repeats}"
        with open(args.record, "a") as out:
            out.write(f"\n### Runtime overhead per step with full-size tensors, no-op models ({result['date']})\n\n"
                      f"Machine: {result['machine']}. Command: `{command}`. Medians of {args.repeats} requests.\n\n"
                      f"{step_shapes_table(rows)}\n")
    return 0


def run_overhead_bench(args) -> int:
    if args.real:
        return _run_real(args)
    if args.step_shapes:
        return _run_step_shapes(args)
    args.steps = args.steps or THROUGHPUT_STEPS
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "noop.toml"
        catalog.write_text(NOOP_CATALOG)
        result = {
            "date": records.utc_now(),
            "machine": records.machine(),
            "settings": {"actors": args.actors, "max_batch_rows": args.max_batch_rows},
            "throughput": throughput_run(catalog, args, f"{tmp}/throughput"),
            "latency": latency_run(catalog, args, f"{tmp}/latency"),
            "zmq_baseline": zmq_baseline(args.rate / 10),
            "core_tasks_per_s": {"batch_1": round(core_only_run(1)), f"batch_{args.max_batch_rows}": round(core_only_run(args.max_batch_rows))},
        }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_table(result))
    if args.record:
        command = (f"lego bench overhead --actors {args.actors} --max-batch-rows {args.max_batch_rows} "
                   f"--requests {args.requests} --steps {args.steps} --rate {args.rate:g}")
        with open(args.record, "a") as out:
            out.write(f"\n### Runtime overhead, no-op actors on loopback ({result['date']})\n\n"
                      f"Machine: {result['machine']}. Command: `{command}`.\n\n{_table(result)}\n")
    return 0
