"""The HTTP gateway's added latency per image, against the Python client on the same cluster.

    python -m clients.bench.gateway [--requests 40] [--sizes 256,1024] [--concurrency 1,4]

Starts an emulated local cluster (compressed time, `--time-scale`) and a gateway
process in front of it, then sends the same requests by three paths, interleaved so
that drift hits them alike: the Python client (`Client.generate`: raw pixels back),
the OpenAI route over one keep-alive HTTP connection per caller (PNG, base64, JSON),
and the `openai` package itself (its HTTP stack and parsing too, where installed).
Prints a markdown table: per-image latency (median, p90), the gateway's added
median latency over the Python client, and images per second.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import secrets
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from clients.bench.loadgen import percentile
from clients.client import Client
from clients.gateway.process import GatewayProcess
from clients.local import LocalCluster, LocalClusterSpec

WORKFLOW = "flux-schnell-txt2img"


def start_gateway(broker: str, run_dir: Path) -> tuple[GatewayProcess, str]:
    """A gateway with one user key (returned) and room for every caller's runs."""
    key = secrets.token_urlsafe(24)
    (run_dir / "bench-keys.txt").write_text(f"user {key} bench\n")
    gateway = GatewayProcess(broker, run_dir / "bench-keys.txt", run_dir / "gateway.log", "--max-runs-per-key", "1000",
                             "--log-level", "warning")
    return gateway, key


def python_path(client: Client):
    def run(params: dict) -> None:
        client.generate(WORKFLOW, timeout=120, **params)
    return lambda: run


def http_path(gateway: GatewayProcess, key: str):
    def make():
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=120)  # one per caller, kept alive

        def run(params: dict) -> None:
            body = {"model": WORKFLOW, "response_format": "b64_json",
                    "size": f"{params['width']}x{params['height']}",
                    **{k: v for k, v in params.items() if k not in ("width", "height")}}
            conn.request("POST", "/v1/images/generations", body=json.dumps(body),
                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            if response.status != 200:
                raise RuntimeError(f"gateway answered {response.status}: {payload[:300]!r}")
            base64.b64decode(json.loads(payload)["data"][0]["b64_json"])  # what a caller does with it
        return run
    return make


def openai_path(gateway: GatewayProcess, key: str):
    import openai

    def make():
        client = openai.OpenAI(api_key=key, base_url=f"http://127.0.0.1:{gateway.port}/v1", max_retries=0)

        def run(params: dict) -> None:
            extra = {k: v for k, v in params.items() if k not in ("width", "height", "prompt")}
            client.images.generate(model=WORKFLOW, prompt=params["prompt"], size=f"{params['width']}x{params['height']}",
                                   response_format="b64_json", extra_body=extra)
        return run
    return make


def measure(paths: dict, size: int, requests: int, concurrency: int, steps: int) -> dict[str, list[float]]:
    """Per-image seconds by path. Rounds alternate the paths; each round runs `concurrency`
    callers at once, each sending its share of `requests` one after another."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    walls: dict[str, float] = {name: 0.0 for name in paths}
    callers = {name: [make() for _ in range(concurrency)] for name, make in paths.items()}
    per_caller = max(1, requests // concurrency // 4)
    for round_index in range(4):
        for name in paths:
            def caller(run, start: int) -> list[float]:
                out = []
                for i in range(per_caller):
                    params = {"prompt": "a lighthouse at dusk", "seed": start + i, "steps": steps,
                              "width": size, "height": size}
                    began = time.perf_counter()
                    run(params)
                    out.append(time.perf_counter() - began)
                return out
            began = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                results = pool.map(caller, callers[name], [1000 * round_index + 100 * c for c in range(concurrency)])
                for chunk in results:
                    times[name].extend(chunk)
            walls[name] += time.perf_counter() - began
    return {name: (samples, walls[name]) for name, samples in times.items()}


def table(rows: list[dict]) -> str:
    lines = ["| size | callers | path | images | median ms | p90 ms | added (median) ms | images/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        added = "" if r["added_ms"] is None else f"{r['added_ms']:+.1f}"
        lines.append(f"| {r['size']} px | {r['concurrency']} | {r['path']} | {r['images']} | {r['median_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {added} | {r['rate']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.bench.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40, help="images per path, size and concurrency")
    parser.add_argument("--sizes", default="256,1024", help="image sizes (square), comma-separated")
    parser.add_argument("--concurrency", default="1,4", help="concurrent callers per path, comma-separated")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--time-scale", type=float, default=0.02, help="emulated time compression")
    parser.add_argument("--no-openai", action="store_true", help="leave out the openai package's path")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="lego-bench-gateway-") as tmp:
        spec = LocalClusterSpec(workflows=[WORKFLOW], replicas={"Flux1Schnell": 2}, options={"time_scale": args.time_scale},
                                run_dir=tmp, log_level="warning")
        with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
            gateway, key = start_gateway(cluster.frontend, Path(tmp))
            try:
                paths = {"python client": python_path(client), "gateway (http.client)": http_path(gateway, key)}
                if not args.no_openai:
                    try:
                        paths["gateway (openai package)"] = openai_path(gateway, key)
                    except ImportError:
                        print("openai is not installed: its path is left out", file=sys.stderr)
                measure(paths, sizes[0], 4 * len(levels), 1, args.steps)  # warm-up: connections, first batches
                rows = []
                for size in sizes:
                    for concurrency in levels:
                        results = measure(paths, size, args.requests, concurrency, args.steps)
                        base = statistics.median(results["python client"][0])
                        for name, (samples, wall) in results.items():
                            median = statistics.median(samples)
                            rows.append({"size": size, "concurrency": concurrency, "path": name, "images": len(samples),
                                         "median_ms": 1000 * median, "p90_ms": 1000 * percentile(samples, 90),
                                         "added_ms": None if name == "python client" else 1000 * (median - base),
                                         "rate": len(samples) / wall})
            finally:
                gateway.stop()
    print(f"Emulated {WORKFLOW}, {args.steps} steps, time_scale {args.time_scale}, 2 base-model replicas; "
          f"one gateway process; paths interleaved in 4 rounds.\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
