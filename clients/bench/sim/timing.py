"""What simulated work costs in virtual time: batch, request and load times from the
measured profiles (cached), output sizes as the emulated backend makes them, data
fetches between actors, and the runtime's own overheads (`Overheads`).

Fetches cost what the DiFlow artifact measured on H800s for that many bytes
(`profiles-h800/overhead_data_1n2g.csv`: between two GPUs of one host;
`overhead_data_2n1g.csv`: between hosts), interpolated linearly: about 57 us for
small tensors, 150 us (same host) or 460 us (other host) for 16 MiB. Inputs an actor
holds itself cost nothing.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from actors.backends.emulated import measured_fetch_s
from broker import protocol as p
from broker.catalog import Catalog
from broker.costs.model import CostModel
from broker.costs.profiles import PROFILE_MODE
from broker.protocol import TaskKind

# (bytes, seconds) of one fetch, from the artifact's measurements (powers of two, 1 KiB..256 MiB)
_SIZES = [2**k for k in range(10, 29)]
FETCH_SAME_HOST = list(zip(_SIZES, [x * 1e-6 for x in (
    57.34, 57.33, 57.55, 56.31, 55.80, 55.61, 56.06, 56.79, 56.98, 59.65, 61.36, 67.99, 79.55, 103.27, 149.22,
    243.94, 431.15, 807.64, 1562.40)], strict=True))
FETCH_OTHER_HOST = list(zip(_SIZES, [x * 1e-6 for x in (
    55.49, 54.77, 55.75, 55.48, 55.15, 55.67, 56.01, 58.42, 61.01, 67.60, 80.47, 104.62, 156.14, 254.21, 456.69,
    854.95, 1669.20, 3295.17, 6569.21)], strict=True))
ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}
CPU_BYTES = 512 * 1024**3


def fetch_s(nbytes: int, same_host: bool) -> float:
    """Seconds to fetch `nbytes` from a peer: interpolated in the measured table."""
    table = FETCH_SAME_HOST if same_host else FETCH_OTHER_HOST
    if nbytes <= table[0][0]:
        return table[0][1]
    i = bisect.bisect_left(_SIZES, nbytes)
    (x0, y0), (x1, y1) = table[min(i, len(table) - 1) - 1], table[min(i, len(table) - 1)]
    return y0 + (y1 - y0) * (nbytes - x0) / (x1 - x0)


@dataclass(frozen=True)
class Overheads:
    """What the runtime costs beyond the GPU's time, in real seconds (not scaled by
    time_scale: it is the broker's, the actors' and the client's, not the device's).

    - `task_s`: per dispatched batch, on its task's path: the broker's dispatch hop
      (TASK out, DONE back, the broker's Python on both) and the actor's per-call
      Python (decode, resolve inputs, pack the result). The actor is busy for the
      broker meanwhile; its GPU is free. A monolith pays it once per request.
    - `row_s`: per task of a batch beyond the first (the codec's and the core's
      per-task Python in a batched hop).
    - `request_s`: per completed request: SUBMIT from the client and the RESULT (the
      image's frames through the broker) back to it.
    - `fetch_s` + nbytes / `fetch_bytes_per_s`: per input fetched from a peer, when
      `fetch_bytes_per_s` is set (the emulated data plane: shared memory or frames on
      loopback); None keeps the artifact's H800 measurements (`fetch_s()`).

    Defaults (`MEASURED`) come from the runtime as calibrated against the emulated
    cluster; see `clients/bench/sim/calibrate.py` and docs/benchmarks.md (issue 14, "the
    simulator's default overheads recalibrated") for how they were measured.
    `NO_OVERHEADS` is the ideal runtime.
    """

    task_s: float = 0.0
    row_s: float = 0.0
    request_s: float = 0.0
    fetch_s: float = 0.0
    fetch_bytes_per_s: float | None = None
    # True: a fetch costs what the emulated backend's virtual payloads charge (this
    # runtime on a GPU host, by path: actors/backends/emulated.py MEASURED_FETCH_S), as
    # `lego bench cluster` emulates by default; `fetch_s` and `fetch_bytes_per_s` unused.
    fetch_by_path: bool = False

    def __post_init__(self):
        for name in ("task_s", "row_s", "request_s", "fetch_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"overheads.{name}: expected seconds >= 0, got {value!r}")
        if self.fetch_bytes_per_s is not None and not self.fetch_bytes_per_s > 0:
            raise ValueError(f"overheads.fetch_bytes_per_s: expected > 0 or None, got {self.fetch_bytes_per_s!r}")

    def batch_s(self, tasks: int) -> float:
        """The runtime's time around one batch of `tasks` tasks."""
        return self.task_s + self.row_s * max(0, tasks - 1)

    def transfer_s(self, nbytes: int, same_host: bool, path: str = "") -> float:
        """One fetch of `nbytes` from a peer (`path`: device, host or network)."""
        if self.fetch_by_path:
            return measured_fetch_s(nbytes, path or ("host" if same_host else "network"))
        if self.fetch_bytes_per_s is None:
            return fetch_s(nbytes, same_host)
        return self.fetch_s + nbytes / self.fetch_bytes_per_s


NO_OVERHEADS = Overheads()
# The runtime as it is now (2026-12-07 14:22 UTC, `python -m clients.bench.sim.calibrate
# --time-scale 1` against the emulated cluster `lego bench cluster` runs: hosted actors,
# virtual payloads): per batch 3.98 ms at idle (1.15 ms fitted under an 8-request burst:
# the idle figure is kept, the dearer one), 9.93 ms per request (submit, the image back);
# each fetch priced by its path as this runtime took on the lent H200 (actors/backends/
# emulated.py MEASURED_FETCH_S). The emulated paper setting agrees with the simulator on
# these: five repeated runs' means within 0.4 points of attainment on the traces' first
# 60 s, within 1.4 on their whole 120 s (docs/benchmarks.md, issue 14); `lego bench
# overhead` measures 0.7-2.6 ms per step for the runtime itself.
# Per extra task of a batch: the broker core and codec's 34 us (29,000 tasks/s at batch 49).
MEASURED = Overheads(task_s=0.00398, row_s=0.000034, request_s=0.00993, fetch_by_path=True)
# What `MEASURED` was until 2026-12-07 (every simulated table in docs/benchmarks.md dated
# before the "simulator's default overheads recalibrated" section used it): the
# emulation of 2026-11-27, a process per actor moving real bytes through shared memory
# on 2 cores: 10.5 ms per batch under a burst, 14 ms per request, fetches at 1.42 GB/s.
# That CPU contention was the emulation's, not the runtime's; kept to reproduce old tables.
EMULATION_2026_11_27 = Overheads(task_s=0.0105, row_s=0.000034, request_s=0.014, fetch_s=0.0001,
                                 fetch_bytes_per_s=1.42e9)


class Timing:
    """Batch times, load times and output sizes, cached (the hot path of a simulation)."""

    def __init__(self, catalog: Catalog, costs: CostModel, time_scale: float, load_time_scale: float):
        self.catalog, self.costs = catalog, costs
        self.time_scale, self.load_time_scale = time_scale, load_time_scale
        self._batch: dict[tuple, float] = {}
        self._request: dict[tuple, float] = {}
        self._nbytes: dict[tuple, int] = {}

    def batch_s(self, model: str, tasks: list[p.TaskSpec]) -> float:
        rows = sum(t.rows for t in tasks if t.params.calls_model)
        if not rows:
            return 0.0
        first = tasks[0]
        key = (model, first.kind, rows, first.shape[0], first.shape[1])
        seconds = self._batch.get(key)
        if seconds is None:
            profile = self.costs.profile(model)
            seconds = profile.exec_time(PROFILE_MODE[first.kind], rows, *first.shape) * self.time_scale
            self._batch[key] = seconds
        return seconds

    def request_s(self, workflow: str, params: dict) -> float:
        """A monolith's time for one whole request (every node alone, CFG as batch 2)."""
        key = (workflow, params.get("steps"), params.get("height"), params.get("width"), params.get("strength"))
        seconds = self._request.get(key)
        if seconds is None:
            seconds = self._request[key] = self.costs.request(self.catalog.workflows[workflow], params).work_s * self.time_scale
        return seconds

    def load_s(self, models: list[str]) -> float:
        return sum(self.costs.load_s(m) for m in models) * self.load_time_scale

    def footprint(self, workflow: str) -> int:
        return sum(self.costs.resident_bytes(m) for m in self.catalog.workflows[workflow].models)

    def nbytes(self, task: p.TaskSpec) -> int:
        """The size of the output bundle the emulated backend would make for `task`."""
        key = (task.model, task.kind, task.rows, task.shape[0], task.shape[1], task.workflow)
        size = self._nbytes.get(key)
        if size is None:
            size = self._nbytes[key] = self._bundle_bytes(task)
        return size

    def constant_bytes(self, workflow_name: str) -> int:
        """Of a denoise step's bundle, the request constants (its conditioning): fetched
        once per actor and request, and never by the VAE (actors/request_constants.py)."""
        key = ("constants", workflow_name)
        size = self._nbytes.get(key)
        if size is None:
            workflow = self.catalog.workflows.get(workflow_name)
            rows = 2 if workflow is not None and workflow.cfg else 1  # a denoise step's rows
            size = self._nbytes[key] = sum(
                rows * m.seq_len * m.embed_dim * ITEM_BYTES.get(m.dtype, 4)
                for m in (self.catalog.models[name] for name in (workflow.text_encoders if workflow else ())))
        return size

    def _bundle_bytes(self, task: p.TaskSpec) -> int:
        height, width = task.shape
        if task.kind in (TaskKind.DECODE, TaskKind.PIPELINE):
            return height * width * 3
        m = self.catalog.models[task.model]
        item = ITEM_BYTES.get(m.dtype, 4)
        latent = m.latent_channels * (height // m.vae_scale) * (width // m.vae_scale) * item
        if task.kind == TaskKind.ENCODE:
            return task.rows * m.seq_len * m.embed_dim * item
        if task.kind in (TaskKind.DENOISE_BRANCH, TaskKind.ENCODE_IMAGE):
            return latent
        if task.kind == TaskKind.CONTROL:
            return task.rows * 16 * (height // 8) * (width // 8) * item
        workflow = self.catalog.workflows.get(task.workflow)
        cond = 0
        for name in workflow.text_encoders if workflow else ():  # conditioning travels with the latent
            enc = self.catalog.models[name]
            cond += task.rows * enc.seq_len * enc.embed_dim * ITEM_BYTES.get(enc.dtype, 4)
        return task.rows * latent + cond
