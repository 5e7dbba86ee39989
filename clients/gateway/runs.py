"""Runs: requests the gateway submitted, followed to their end and kept for a while.

Runs in the gateway's event loop. A run is one broker request; the store submits it
(`AsyncClient.submit`), follows its progress and outcome in a task of its own, keeps
every event for server-sent-event subscribers (a late subscriber replays them), counts
runs in flight per API key (the quota), and forgets finished runs after
`keep_finished_s` or beyond `keep_finished_runs`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog

from clients.errors import Cancelled, LegoError, RequestFailed, Timeout
from clients.gateway.errors import ApiError, from_client_error
from clients.results import JobResult, encode_png

log = structlog.get_logger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
# AsyncClient.submit's own keywords: as workflow parameters they would collide with them.
RESERVED_PARAMS = ("workflow", "request_id", "progress", "wait_accepted")


@dataclass
class Run:
    id: str
    workflow: str
    owner: str  # the API key's fingerprint
    created: float  # wall-clock seconds
    params: dict = field(default_factory=dict)
    state: str = "queued"  # queued | running | succeeded | failed | cancelled
    progress: dict = field(default_factory=dict)
    png: bytes | None = None
    tensors: dict = field(default_factory=dict)  # non-image outputs: name -> (dtype, shape, raw)
    error: dict | None = None
    latency_s: float | None = None
    ended: float | None = None
    events: list[dict] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    job: Any = None
    accepted: bool = False

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def record(self, kind: str, data: dict) -> None:
        """An event for subscribers: wakes every waiter, then re-arms."""
        self.events.append({"event": kind, "data": data})
        self.changed.set()
        self.changed = asyncio.Event()

    def to_json(self, with_result: bool = True) -> dict:
        out = {"id": self.id, "workflow": self.workflow, "state": self.state, "created": round(self.created, 3),
               "params": self.params, "progress": self.progress, "error": self.error,
               "latency_s": self.latency_s}
        if with_result and self.state == "succeeded":
            result: dict = {}
            if self.png is not None:
                result["image_png_b64"] = base64.b64encode(self.png).decode()
            for name, (dtype, shape, raw) in self.tensors.items():
                result.setdefault("tensors", {})[name] = {"dtype": dtype, "shape": shape,
                                                          "data_b64": base64.b64encode(raw).decode()}
            out["result"] = result
        return out


class QuotaExceeded(ApiError):
    def __init__(self, limit: int, in_flight: int, asked: int):
        super().__init__(429, "too_many_runs", f"this key has {in_flight} run(s) in flight; the limit is {limit} "
                         f"(asked for {asked} more)", None, 1.0)


class RunStore:
    def __init__(self, client, max_runs_per_key: int, keep_finished_runs: int, keep_finished_s: float,
                 on_end=None, run_timeout_s: float = 3600.0):
        self.client = client
        self.run_timeout_s = run_timeout_s
        self.max_runs_per_key = max_runs_per_key
        self.keep_finished_runs = keep_finished_runs
        self.keep_finished_s = keep_finished_s
        self.on_end = on_end  # called with each run that ends (metrics, the console's failures)
        self.runs: dict[str, Run] = {}
        self.finished: collections.OrderedDict[str, float] = collections.OrderedDict()  # id -> end time
        self.in_flight: collections.Counter[str] = collections.Counter()
        self._followers: set[asyncio.Task] = set()

    def get(self, run_id: str, owner: str, admin: bool = False) -> Run:
        self.prune(time.time())
        run = self.runs.get(run_id)
        if run is None or (run.owner != owner and not admin):  # someone else's run is no business of this key
            raise ApiError(404, "not_found", f"no run {run_id!r} (finished runs are kept "
                           f"{self.keep_finished_s:g} s)", "id")
        return run

    async def start(self, owner: str, requests: list[tuple[str, dict]]) -> list[Run]:
        """Submit every (workflow, params) as one run, all or none: a refusal cancels the rest."""
        self.prune(time.time())
        for _, params in requests:
            for name in RESERVED_PARAMS:
                if name in params:
                    raise ApiError(400, "invalid_param", f"{name}: is not a workflow input", f"params.{name}")
        if self.in_flight[owner] + len(requests) > self.max_runs_per_key:
            raise QuotaExceeded(self.max_runs_per_key, self.in_flight[owner], len(requests))
        self.in_flight[owner] += len(requests)
        runs = [Run(uuid.uuid4().hex, workflow, owner, time.time()) for workflow, _ in requests]
        outcomes = await asyncio.gather(*(self._submit(run, params) for run, (_, params) in zip(runs, requests, strict=True)),
                                        return_exceptions=True)
        refusal = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if refusal is None:
            for run in runs:
                log.info("run_submitted", request_id=run.id, workflow=run.workflow, key_fingerprint=owner)
                self.runs[run.id] = run
                follower = asyncio.create_task(self._follow(run))
                self._followers.add(follower)
                follower.add_done_callback(self._followers.discard)
            return runs
        self._release(owner, len(requests))
        for run in runs:
            if run.accepted:
                run.job.cancel()  # accepted, but its siblings were not: the whole call fails
        if isinstance(refusal, LegoError):
            raise from_client_error(refusal)
        raise refusal

    async def _submit(self, run: Run, params: dict) -> None:
        run.job = await self.client.submit(run.workflow, request_id=run.id, wait_accepted=False, **params)
        try:
            await run.job.wait_accepted(self.client.submit_timeout_s)
        except Timeout:
            run.job.cancel()  # the broker may come back and run it: nobody would collect it
            raise
        run.accepted = True
        run.params = run.job.params

    async def _follow(self, run: Run) -> None:
        job = run.job
        try:
            async for event in job.progress():
                run.state = "running"
                run.progress = {"node": event.node, "kind": event.kind, "step": event.step,
                                "total_steps": event.total_steps, "done_nodes": event.done_nodes,
                                "total_nodes": event.total_nodes}
                run.record("progress", run.progress)
            try:
                await self._finish(run, await job.result())
            except Cancelled:
                self._end(run, "cancelled", {"code": "cancelled", "message": "cancelled"})
            except RequestFailed as exc:
                self._end(run, "failed", {"code": exc.code, "message": exc.message})
        except Exception as exc:  # never leave a run (and its quota slot) hanging
            log.exception("run_follow_failed", request_id=run.id)
            if not run.done:
                self._end(run, "failed", {"code": "internal", "message": str(exc)})

    async def _finish(self, run: Run, result: JobResult) -> None:
        tensors = dict(result.tensors)
        if "image" in tensors:
            image = result.image
            tensors.pop("image")
            run.png = await asyncio.to_thread(encode_png, image)  # big images: not on the event loop
        run.tensors = tensors
        run.latency_s = round(result.latency_s, 4)
        self._end(run, "succeeded", None)

    def _end(self, run: Run, state: str, error: dict | None) -> None:
        if run.done:
            return  # timed out here first; the broker's late answer changes nothing
        run.state, run.error, run.ended = state, error, time.time()
        self._release(run.owner, 1)
        self.finished[run.id] = run.ended
        log.info("run_ended", request_id=run.id, workflow=run.workflow, state=state,
                 code=error["code"] if error else None)
        run.record("end", {"state": state, "error": error})
        if self.on_end is not None:
            self.on_end(run)

    def _release(self, owner: str, count: int) -> None:
        self.in_flight[owner] -= count
        if self.in_flight[owner] <= 0:
            del self.in_flight[owner]  # no zero rows in the console

    def cancel(self, run: Run) -> None:
        if not run.done and run.job is not None:
            run.job.cancel()

    async def wait(self, run: Run, timeout_s: float) -> None:
        """Until the run ends, or Timeout after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not run.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(run.id)
            try:
                await asyncio.wait_for(run.changed.wait(), remaining)
            except asyncio.TimeoutError:
                raise TimeoutError(run.id) from None

    def prune(self, now: float) -> None:
        """Fail runs older than run_timeout_s (a broker that lost them would hold their
        quota forever); forget finished runs beyond keep_finished_runs or older than keep_finished_s."""
        for run in [r for r in self.runs.values() if not r.done and now - r.created > self.run_timeout_s]:
            self.cancel(run)
            self._end(run, "failed", {"code": "timeout", "message": f"not ended within {self.run_timeout_s:g} s"})
        while self.finished:
            run_id, ended = next(iter(self.finished.items()))
            if len(self.finished) <= self.keep_finished_runs and now - ended <= self.keep_finished_s:
                break
            self.finished.popitem(last=False)
            self.runs.pop(run_id, None)

    async def close(self) -> None:
        """Cancel what is still running (nobody would collect it), stop following."""
        for run in self.runs.values():
            self.cancel(run)
        for follower in list(self._followers):
            follower.cancel()
        await asyncio.gather(*self._followers, return_exceptions=True)
