"""The asyncio client: the same core as `Client`, awaited instead of blocked on.

    async with AsyncClient() as client:
        job = await client.submit("flux-schnell-txt2img", prompt="a red fox")
        async for event in job.progress():
            ...
        result = await job.result(timeout=60)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from broker import protocol as p
from clients.core import (
    DEFAULT_BROKER_SILENCE_S,
    ClientCore,
    admin_outcome,
    broker_error,
    replicas_message,
)
from clients.errors import Timeout
from clients.results import JobResult

_END = object()


def _settle(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


class AsyncJob:
    def __init__(self, core: ClientCore, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._core = core
        self._events: asyncio.Queue = asyncio.Queue()
        self._answered = loop.create_future()
        self._done = loop.create_future()
        self._state = core.register(request_id, lambda e: loop.call_soon_threadsafe(self._on_event, e))

    def _on_event(self, event: Any) -> None:  # event loop thread
        if isinstance(event, p.Accepted):
            if not self._answered.done():
                self._answered.set_result(event)
        elif isinstance(event, (JobResult, Exception)):
            if not self._answered.done():
                self._answered.set_result(event)
            if not self._done.done():
                self._done.set_result(event)
            self._events.put_nowait(_END)
        else:
            self._events.put_nowait(event)

    @property
    def params(self) -> dict:
        return dict(self._state.accepted.params) if self._state.accepted else {}

    async def wait_accepted(self, timeout: float | None) -> None:
        try:
            answer = await asyncio.wait_for(asyncio.shield(self._answered), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"request {self.request_id}: no answer from the broker within {timeout}s") from None
        if isinstance(answer, Exception):
            raise answer

    def done(self) -> bool:
        return self._done.done()

    async def result(self, timeout: float | None = None) -> JobResult:
        try:
            outcome = await asyncio.wait_for(asyncio.shield(self._done), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"request {self.request_id} not finished within {timeout}s") from None
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def progress(self) -> AsyncIterator[p.Progress]:
        while True:
            event = await self._events.get()
            if event is _END:
                return
            yield event

    def cancel(self) -> None:
        self._core.send(p.Cancel(self.request_id))


class AsyncClient:
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

    async def submit(self, workflow: str, *, request_id: str | None = None, progress: bool = True,
                     wait_accepted: bool = True, **params: Any) -> AsyncJob:
        job = AsyncJob(self._core, request_id or uuid.uuid4().hex, asyncio.get_running_loop())
        self._core.submit(job.request_id, workflow, params, progress)
        if wait_accepted:
            await job.wait_accepted(self.submit_timeout_s)
        return job

    async def _admin(self, msg: p.Message) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        call_id = self._core.admin(msg, lambda r: loop.call_soon_threadsafe(_settle, future, r))
        try:
            reply = await asyncio.wait_for(future, self.admin_timeout_s)
        except asyncio.TimeoutError:
            self._core.forget_admin(call_id)
            raise Timeout(f"no answer from the broker at {self.address} within {self.admin_timeout_s}s") from None
        if isinstance(reply, p.Error):
            raise broker_error(reply)
        return reply

    async def workflows(self) -> list[p.WorkflowInfo]:
        return (await self._admin(p.ListWorkflows())).workflows

    async def stats(self) -> p.Stats:
        return await self._admin(p.GetStats())

    # Admin calls, as on `Client`: the broker's AdminReply, or AdminRefused naming the field.

    async def spawn(self, model: str, device: str = "cpu", backend: str = "emulated", count: int = 1, host: str = "",
                    max_batch_rows: int = 8, options: dict | None = None) -> p.AdminReply:
        msg = p.AdminSpawn(model, device, backend, host, count, max_batch_rows, options)
        return admin_outcome(await self._admin(msg), "spawn")

    async def stop_actor(self, actor_id: str) -> p.AdminReply:
        return admin_outcome(await self._admin(p.AdminStop(actor_id)), "stop")

    async def drain_actor(self, actor_id: str) -> p.AdminReply:
        return admin_outcome(await self._admin(p.AdminDrain(actor_id, True)), "drain")

    async def undrain_actor(self, actor_id: str) -> p.AdminReply:
        return admin_outcome(await self._admin(p.AdminDrain(actor_id, False)), "undrain")

    async def set_replicas(self, model: str, min: int | None = None, max: int | None = None) -> p.AdminReply:  # noqa: A002
        return admin_outcome(await self._admin(replicas_message(model, min, max)), "set_replicas")

    async def pause_workflow(self, workflow: str) -> p.AdminReply:
        return admin_outcome(await self._admin(p.AdminPause(workflow, True)), "pause")

    async def resume_workflow(self, workflow: str) -> p.AdminReply:
        return admin_outcome(await self._admin(p.AdminPause(workflow, False)), "resume")

    async def register_workflow(self, name: str, definition: dict) -> p.AdminReply:
        return admin_outcome(await self._admin(p.AdminRegister(name, definition)), "register_workflow")

    async def close(self) -> None:
        await asyncio.to_thread(self._core.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
