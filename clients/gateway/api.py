"""The public API handlers: OpenAI-compatible images, native runs (with server-sent
events), workflows. Each handler is thin: bodies.py checks input, runs.py does the work."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import structlog
from aiohttp import web

from clients.gateway.bodies import parse_images, parse_run, read_json
from clients.gateway.errors import ApiError
from clients.gateway.state import ask_broker, gateway_of

log = structlog.get_logger(__name__)

SSE_KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream


async def images_generations(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    images = parse_images(await read_json(request))
    if any(params.get("output", "image") != "image" for params in images.params):
        raise ApiError(400, "unsupported_value", "output: this route returns images; use /v1/runs for latents", "output")
    try:
        runs = await gw.store.start(request["key"].fingerprint, [(images.workflow, p) for p in images.params])
    except ApiError as err:
        err.field = images.openai_field(err.field)
        raise
    try:
        await asyncio.gather(*(gw.store.wait(run, gw.config.image_timeout_s) for run in runs))
    except TimeoutError:
        for run in runs:
            gw.store.cancel(run)
        raise ApiError(504, "timeout", f"the images were not ready within {gw.config.image_timeout_s:g} s; "
                       "their runs were cancelled") from None
    for run in runs:
        if run.state != "succeeded":
            raise ApiError(502 if run.state == "failed" else 409, run.error["code"],
                           f"run {run.id} {run.state}: {run.error['message']}")
    data = [{"b64_json": base64.b64encode(run.png).decode(), "revised_prompt": None} for run in runs]
    return web.json_response({"created": int(runs[0].created), "data": data})


async def create_run(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    workflow, params = parse_run(await read_json(request))
    (run,) = await gw.store.start(request["key"].fingerprint, [(workflow, params)])
    return web.json_response(run.to_json(with_result=False), status=201, headers={"Location": f"/v1/runs/{run.id}"})


def _run_of(request: web.Request):
    key = request["key"]
    return gateway_of(request).store.get(request.match_info["id"], key.fingerprint, key.role == "admin")


async def get_run(request: web.Request) -> web.Response:
    return web.json_response(_run_of(request).to_json())


async def cancel_run(request: web.Request) -> web.Response:
    run = _run_of(request)
    if run.done:
        raise ApiError(409, "already_ended", f"run {run.id} already {run.state}", "id")
    gateway_of(request).store.cancel(run)
    return web.json_response({"id": run.id, "state": run.state, "cancel_requested": True}, status=202)


def _sse(index: int, event: dict) -> bytes:
    return f"id: {index}\nevent: {event['event']}\ndata: {json.dumps(event['data'])}\n\n".encode()


async def run_events(request: web.Request) -> web.StreamResponse:
    """Every progress event of the run (replayed from the start, or after Last-Event-ID), then `end`."""
    run = _run_of(request)
    try:
        index = int(request.headers.get("Last-Event-ID", "-1")) + 1
    except ValueError:
        raise ApiError(400, "invalid_param", "Last-Event-ID must be an integer", "Last-Event-ID") from None
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        while True:
            while index < len(run.events):
                await response.write(_sse(index, run.events[index]))
                index += 1
            if run.done:
                break
            changed = run.changed
            try:
                await asyncio.wait_for(changed.wait(), SSE_KEEPALIVE_S)
            except asyncio.TimeoutError:
                await response.write(b": keepalive\n\n")
        await response.write_eof()
    except ConnectionResetError:  # the subscriber left; the run goes on
        log.info("events_subscriber_left", request_id=run.id)
    return response


async def list_workflows(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    infos = await ask_broker(gw, gw.client.workflows())
    return web.json_response({"workflows": [info.to_wire() for info in infos]})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "time": time.time()})


ROUTES = [
    ("POST", "/v1/images/generations", images_generations),
    ("POST", "/v1/runs", create_run),
    ("GET", "/v1/runs/{id}", get_run),
    ("DELETE", "/v1/runs/{id}", cancel_run),
    ("GET", "/v1/runs/{id}/events", run_events),
    ("GET", "/v1/workflows", list_workflows),
    ("GET", "/healthz", healthz),
]
