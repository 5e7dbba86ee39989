"""`lego gateway` / `python -m clients.gateway`: run the HTTP gateway in the foreground.

    python -m clients.gateway --broker tcp://127.0.0.1:5555 --listen 127.0.0.1:8080 --keys keys.txt

Settings: defaults < `[gateway]` of --config < LEGO_* environment < flags
(clients/gateway/config.py). The key file's format: clients/gateway/keys.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from aiohttp import web

from broker.config import ConfigError, add_common_arguments, load_config
from broker.logs import configure_logging
from clients.gateway.app import build_app
from clients.gateway.config import GatewayConfig
from clients.gateway.keys import KeyFileError, KeyRing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lego gateway", description="Serve the HTTP API (OpenAI-compatible images, "
                                     "runs, metrics) and the admin console in front of a broker.")
    parser.add_argument("--broker", help="the broker's frontend address (env LEGO_BROKER)")
    parser.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:8080)")
    parser.add_argument("--keys", help="API key file: one 'ROLE KEY [NAME]' per line, ROLE user or admin")
    parser.add_argument("--broker-key-file", help="cluster keys on: the gateway's admin key to the broker "
                        "(`lego keys`; env LEGO_KEY_FILE)")
    parser.add_argument("--max-body-bytes", type=int, help="larger request bodies get 413 (default 1 MiB)")
    parser.add_argument("--max-runs-per-key", type=int, help="runs in flight per API key; more get 429 (default 8)")
    parser.add_argument("--broker-timeout-s", type=float, help="no answer from the broker within this: 503")
    parser.add_argument("--image-timeout-s", type=float, help="the OpenAI route waits this long for images: 504")
    parser.add_argument("--run-timeout-s", type=float, help="a run not ended by then is cancelled and failed")
    parser.add_argument("--keep-finished-runs", type=int, help="finished runs kept for GET /v1/runs/{id}")
    parser.add_argument("--keep-finished-s", type=float, help="... for at most this long")
    parser.add_argument("--comfy-models-dir", help="serve ComfyUI's API too: graphs are compiled against this "
                                                   "ComfyUI models folder (docs/comfy.md)")
    parser.add_argument("--comfy-catalog", help="the catalog files the cluster was started with, separated by "
                                                f"{os.pathsep!r} (ComfyUI graphs are matched against them)")
    parser.add_argument("--comfy-input-dir", help="where POST /upload/image keeps images (default: a temporary folder)")
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    try:
        config = load_config(GatewayConfig, "gateway", args.config, cli)
        if not config.keys:
            raise ConfigError("keys", "an API key file is required (--keys FILE or LEGO_KEYS)")
        keys = KeyRing.load(config.keys)
        configure_logging(config.log_format, config.log_level, process="gateway")
    except (ConfigError, KeyFileError, ValueError) as exc:
        print(f"lego gateway: {exc}", file=sys.stderr)
        sys.exit(2)
    # access_log=None: our own `http_request` line replaces it (it never carries a key).
    try:
        web.run_app(build_app(config, keys), host=config.host, port=config.port, access_log=None, print=None)
    except OSError as exc:  # the port is taken, or the host is not ours
        print(f"lego gateway: listen {config.listen}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
