"""The gateway's settings: one typed object, defaults < TOML [gateway] < LEGO_* env < flags."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayConfig:
    broker: str = ""  # the broker's frontend; empty: LEGO_BROKER or tcp://127.0.0.1:5555
    listen: str = "127.0.0.1:8080"  # HOST:PORT the HTTP server binds
    keys: str = ""  # the API key file (required): see clients/gateway/keys.py
    # The gateway's own CurveZMQ key to the broker when the cluster's keys are on: an
    # admin key (its console drains and stops actors). Empty: LEGO_KEY_FILE, else none.
    broker_key_file: str = ""
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_runs_per_key: int = 8  # runs in flight per API key; more get 429
    broker_timeout_s: float = 5.0  # no answer to a submit or admin call within this: 503
    image_timeout_s: float = 300.0  # the OpenAI route waits this long for its images, then 504
    run_timeout_s: float = 3600.0  # a run not ended by then is cancelled and failed: its quota slot comes back
    keep_finished_runs: int = 256  # finished runs kept for GET /v1/runs/{id}, newest first
    keep_finished_s: float = 600.0  # ... and for at most this long after they ended
    history_interval_s: float = 2.0  # the console's throughput history: one sample per interval
    history_window_s: float = 600.0  # ... over this window
    session_ttl_s: float = 8 * 3600.0  # an admin console login lasts this long
    # ComfyUI's API (clients/gateway/comfy_api.py, docs/comfy.md): on when a models folder
    # is given. The graphs are compiled against it and the catalog files the cluster was
    # started with (comfy_catalog, separated by os.pathsep); uploads go to comfy_input_dir
    # (empty: a temporary folder per gateway process).
    comfy_models_dir: str = ""
    comfy_catalog: str = ""
    comfy_input_dir: str = ""
    log_format: str = "console"
    log_level: str = "info"

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"listen: expected HOST:PORT, got {self.listen!r}")
        for name in ("max_body_bytes", "max_runs_per_key", "keep_finished_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("broker_timeout_s", "image_timeout_s", "run_timeout_s", "keep_finished_s", "history_interval_s",
                     "history_window_s", "session_ttl_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])
