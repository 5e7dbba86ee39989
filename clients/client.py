"""The synchronous Python client: submit work, follow progress, get results.

    from clients import Client
    with Client() as client:                     # LEGO_BROKER or tcp://127.0.0.1:5555
        job = client.submit("flux-schnell-txt2img", prompt="a lighthouse at dusk", seed=7)
        for event in job.progress():
            print(event.node, event.step, "/", event.total_steps)
        job.result(timeout=60).save_png("out.png")
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from broker import protocol as p
from clients.core import (
    DEFAULT_BROKER_SILENCE_S,
    ClientCore,
    JobState,
    admin_outcome,
    broker_error,
    replicas_message,
)
from clients.errors import Timeout
from clients.results import JobResult

_END = object()


class Job:
    def __init__(self, core: ClientCore, request_id: str):
        self.request_id = request_id
        self._core = core
        self._events: queue.Queue = queue.Queue()
        self._ended = False  # progress() has seen the end: a second call returns at once
        self._answered = threading.Event()
        self._done = threading.Event()
        self._state: JobState = core.register(request_id, self._on_event)

    def _on_event(self, event: Any) -> None:  # IO thread
        if isinstance(event, p.Accepted):
            self._answered.set()
        elif isinstance(event, (JobResult, Exception)):
            self._answered.set()
            self._done.set()
            self._events.put(_END)
        else:
            self._events.put(event)

    @property
    def params(self) -> dict:
        """The parameters the broker will run with (defaults and seed filled in)."""
        return dict(self._state.accepted.params) if self._state.accepted else {}

    def wait_accepted(self, timeout: float | None) -> None:
        if not self._answered.wait(timeout):
            raise Timeout(f"request {self.request_id}: no answer from the broker at {self._core.address} within {timeout}s")
        if isinstance(self._state.outcome, Exception) and not self._state.accepted:
            raise self._state.outcome

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> JobResult:
        if not self._done.wait(timeout):
            raise Timeout(f"request {self.request_id} not finished within {timeout}s")
        if isinstance(self._state.outcome, Exception):
            raise self._state.outcome
        return self._state.outcome

    def progress(self, timeout: float | None = None) -> Iterator[p.Progress]:
        """Progress events (node done, step i of N) until the request ends."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ended:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = self._events.get(timeout=remaining)
            except queue.Empty:
                raise Timeout(f"request {self.request_id}: no progress within {timeout}s") from None
            if event is _END:
                self._ended = True
                return
            yield event

    def cancel(self) -> None:
        self._core.send(p.Cancel(self.request_id))


class Client:
    def __init__(self, address: str | None = None, submit_timeout_s: float = 10.0, admin_timeout_s: float = 10.0,
                 key_file: str | None = None, broker_silence_s: float | None = DEFAULT_BROKER_SILENCE_S):
        """`key_file`: this client's key (`lego keys new client NAME`), else $LEGO_KEY_FILE;
        needed when the cluster's keys are on. `broker_silence_s`: jobs in flight fail with
        BrokerUnreachable once the broker has answered nothing (not even a probe) this long;
        None: wait for ever."""
        self._core = ClientCore(address, key_file, broker_silence_s)
        self.address = self._core.address
        self.submit_timeout_s = submit_timeout_s
        self.admin_timeout_s = admin_timeout_s

    def submit(self, workflow: str, *, request_id: str | None = None, progress: bool = True,
               wait_accepted: bool = True, **params: Any) -> Job:
        """Submit one request. Raises RequestRejected at once if the broker refuses it."""
        job = Job(self._core, request_id or uuid.uuid4().hex)
        self._core.submit(job.request_id, workflow, params, progress)
        if wait_accepted:
            job.wait_accepted(self.submit_timeout_s)
        return job

    def generate(self, workflow: str, timeout: float | None = None, **params: Any) -> JobResult:
        return self.submit(workflow, progress=False, **params).result(timeout)

    def _admin(self, msg: p.Message, timeout: float | None) -> Any:
        box: queue.Queue = queue.Queue()
        call_id = self._core.admin(msg, box.put)
        timeout = self.admin_timeout_s if timeout is None else timeout
        try:
            reply = box.get(timeout=timeout)
        except queue.Empty:
            self._core.forget_admin(call_id)
            raise Timeout(f"no answer from the broker at {self.address} within {timeout}s") from None
        if isinstance(reply, p.Error):
            raise broker_error(reply)
        return reply

    def workflows(self, timeout: float | None = None) -> list[p.WorkflowInfo]:
        return self._admin(p.ListWorkflows(), timeout).workflows

    def stats(self, timeout: float | None = None) -> p.Stats:
        return self._admin(p.GetStats(), timeout)

    # Admin calls return the broker's AdminReply; a refusal raises AdminRefused naming the field.

    def spawn(self, model: str, device: str = "cpu", backend: str = "emulated", count: int = 1, host: str = "",
              max_batch_rows: int = 8, options: dict | None = None, timeout: float | None = None) -> p.AdminReply:
        """Ask a node agent to start `count` actors of `model`."""
        msg = p.AdminSpawn(model, device, backend, host, count, max_batch_rows, options)
        return admin_outcome(self._admin(msg, timeout), "spawn")

    def stop_actor(self, actor_id: str, timeout: float | None = None) -> p.AdminReply:
        """Drain an actor (no new work; what it holds stays served), then stop it."""
        return admin_outcome(self._admin(p.AdminStop(actor_id), timeout), "stop")

    def drain_actor(self, actor_id: str, timeout: float | None = None) -> p.AdminReply:
        """No new work for the actor; it stays alive (and serves what it holds) until undrained."""
        return admin_outcome(self._admin(p.AdminDrain(actor_id, True), timeout), "drain")

    def undrain_actor(self, actor_id: str, timeout: float | None = None) -> p.AdminReply:
        return admin_outcome(self._admin(p.AdminDrain(actor_id, False), timeout), "undrain")

    def set_replicas(self, model: str, min: int | None = None, max: int | None = None,  # noqa: A002
                     timeout: float | None = None) -> p.AdminReply:
        """The model's replica bounds for the scheduler (over its own flags); None: no bound."""
        return admin_outcome(self._admin(replicas_message(model, min, max), timeout), "set_replicas")

    def pause_workflow(self, workflow: str, timeout: float | None = None) -> p.AdminReply:
        """Reject the workflow's new requests (code `paused`); accepted ones run on."""
        return admin_outcome(self._admin(p.AdminPause(workflow, True), timeout), "pause")

    def resume_workflow(self, workflow: str, timeout: float | None = None) -> p.AdminReply:
        return admin_outcome(self._admin(p.AdminPause(workflow, False), timeout), "resume")

    def register_workflow(self, name: str, definition: dict, timeout: float | None = None) -> p.AdminReply:
        """Serve a new workflow from now on (admin keys only): `definition` is the table a
        catalog file holds under [workflows.NAME], over models the broker's catalog declares.
        An identical one registered again is accepted; the broker journals it (a restart keeps it)."""
        return admin_outcome(self._admin(p.AdminRegister(name, definition), timeout), "register_workflow")

    def configure(self, settings: dict | None = None, plan: dict | None = None,
                  timeout: float | None = None) -> p.AdminReply:
        """Set the broker's live settings (admission, slo_multiple, cfg_split); post a plan."""
        return admin_outcome(self._admin(p.AdminConfigure(settings or {}, plan), timeout), "configure")

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
