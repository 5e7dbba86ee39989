"""The aiohttp application: routes, the middlewares every request passes through
(observe -> errors -> auth), and the start-up that connects to the broker."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import structlog
from aiohttp import web

from clients.aio import AsyncClient
from clients.gateway import admin, api, comfy_api
from clients.gateway.auth import SESSION_COOKIE, Sessions, required_role
from clients.gateway.config import GatewayConfig
from clients.gateway.errors import ApiError
from clients.gateway.keys import KeyRing, bearer_token
from clients.gateway.observe import GatewayMetrics, History
from clients.gateway.openapi import openapi_document
from clients.gateway.runs import RunStore
from clients.gateway.state import GATEWAY, Gateway, ask_broker, gateway_of
from clients.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from clients.metrics import render_metrics

log = structlog.get_logger(__name__)

SAMPLER = web.AppKey("sampler", asyncio.Task)
KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe(request: web.Request, handler):
    """One log line and the HTTP metrics per request, whatever became of it. An `http_id`
    is bound for every line logged on the request's behalf (its runs' lines included:
    their tasks inherit the context) and answered as X-Request-Id."""
    started = time.perf_counter()
    status = 500
    http_id = uuid.uuid4().hex[:16]
    with structlog.contextvars.bound_contextvars(http_id=http_id):
        try:
            response = await handler(request)
            status = response.status
            if not response.prepared:  # an event stream has sent its headers already
                response.headers["X-Request-Id"] = http_id
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            elapsed = time.perf_counter() - started
            route = _route_of(request)
            metrics = gateway_of(request).metrics
            method = request.method if request.method in KNOWN_METHODS else "other"  # labels stay few
            metrics.http_requests.labels(route, method, str(status)).inc()
            metrics.http_seconds.labels(route).observe(elapsed)
            key = request.get("key")
            log.info("http_request", method=request.method, path=request.path, route=route, status=status,
                     duration_ms=round(elapsed * 1000, 2), key=key.name if key else None)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "error"


@web.middleware
async def errors(request: web.Request, handler):
    """Every error answer is JSON: {"error": {code, message, field}}, or OpenAI's shape on its route."""
    gw = gateway_of(request)
    try:
        if request.content_length is not None and request.content_length > gw.config.max_body_bytes:
            raise ApiError(413, "body_too_large", f"the body has {request.content_length} bytes; the limit is "
                           f"{gw.config.max_body_bytes}", "body")
        return await handler(request)
    except ApiError as exc:
        err = exc
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects
        err = ApiError(exc.status, _slug(exc.reason), exc.text if exc.text and exc.text != exc.reason
                       else f"{exc.reason}: {request.method} {request.path}",
                       "path" if exc.status in (404, 405) else None)
    except Exception:
        log.exception("http_handler_failed", method=request.method, path=request.path)
        err = ApiError(500, "internal", "internal error: see the gateway's log")
    headers = err.headers()
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="lego"'
    body = err.openai_body() if request.path.startswith("/v1/images/") else err.native_body()
    if err.status not in (401, 404):  # probes and typos would bury what an operator needs to see
        key = request.get("key")
        gw.recent_errors.append({"time": round(time.time(), 3), "path": request.path, "status": err.status,
                                 "code": err.code, "message": err.message, "field": err.field,
                                 "key": key.name if key else None})
    return web.json_response(body, status=err.status, headers=headers)


@web.middleware
async def authenticate(request: web.Request, handler):
    role = required_role(request.path)
    if role is None:
        return await handler(request)
    gw = gateway_of(request)
    token = bearer_token(request.headers.get("Authorization"))
    if token is not None:
        key = gw.keys.lookup(token)
        if key is None:
            raise ApiError(401, "invalid_key", "the API key is not valid", "Authorization")
    else:
        key = gw.sessions.lookup(request.cookies.get(SESSION_COOKIE)) if role == "admin" else None
    if key is None:
        if request.path == "/admin" and request.method == "GET":
            raise web.HTTPSeeOther("/admin/login")
        hint = " (or log in at /admin/login)" if role == "admin" else ""
        raise ApiError(401, "missing_key", f"send an API key: Authorization: Bearer KEY{hint}", "Authorization")
    if not key.allows(role):
        raise ApiError(403, "forbidden", f"this route needs an {role} key", "Authorization")
    request["key"] = key
    return await handler(request)


async def metrics(request: web.Request) -> web.Response:
    """The cluster's metrics (from a fresh broker snapshot), then the gateway's own."""
    gw = gateway_of(request)
    parts = []
    try:
        parts.append(render_metrics(await ask_broker(gw, gw.client.stats())))
    except ApiError:
        pass  # the gateway's own metrics still answer; lego_gateway_broker_up says 0
    parts.append(gw.metrics.render())
    return web.Response(body=b"".join(parts), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(comfy=comfy_api.COMFY in request.app))


def _on_run_end(gw: Gateway, run) -> None:
    gw.metrics.runs.labels(run.workflow, run.state).inc()
    if run.state == "succeeded":
        gw.metrics.run_seconds.labels(run.workflow).observe(run.ended - run.created)


async def _sample(gw: Gateway) -> None:
    """The console's history: the broker's figures every history_interval_s."""
    while True:
        try:
            gw.store.prune(time.time())
            gw.history.add(await ask_broker(gw, gw.client.stats()), time.time())
        except ApiError:
            pass  # broker away: a gap in the history, broker_up says 0
        except Exception:  # the sampler must outlive one bad snapshot
            log.exception("history_sample_failed")
        await asyncio.sleep(gw.config.history_interval_s)


async def _start(app: web.Application) -> None:
    gw = app[GATEWAY]
    gw.client = AsyncClient(gw.config.broker or None, submit_timeout_s=gw.config.broker_timeout_s,
                            admin_timeout_s=gw.config.broker_timeout_s, key_file=gw.config.broker_key_file or None)
    gw.store = RunStore(gw.client, gw.config.max_runs_per_key, gw.config.keep_finished_runs,
                        gw.config.keep_finished_s, on_end=lambda run: _on_run_end(gw, run),
                        run_timeout_s=gw.config.run_timeout_s)
    gw.metrics.runs_in_flight.set_function(lambda: sum(gw.store.in_flight.values()))
    app[SAMPLER] = asyncio.create_task(_sample(gw))
    log.info("gateway_started", broker=gw.client.address, listen=gw.config.listen, keys=len(gw.keys))


async def _stop(app: web.Application) -> None:
    gw = app[GATEWAY]
    app[SAMPLER].cancel()
    await asyncio.gather(app[SAMPLER], return_exceptions=True)
    await gw.store.close()
    await gw.client.close()


def build_app(config: GatewayConfig, keys: KeyRing) -> web.Application:
    gateway = Gateway(config, keys, Sessions(config.session_ttl_s), GatewayMetrics(), History(config.history_window_s))
    app = web.Application(middlewares=[observe, errors, authenticate], client_max_size=config.max_body_bytes)
    app[GATEWAY] = gateway
    for method, path, handler in [*api.ROUTES, *admin.ROUTES, ("GET", "/metrics", metrics),
                                  ("GET", "/openapi.json", openapi)]:
        app.router.add_route(method, path, handler)
    app.router.add_static("/admin/static", admin.STATIC, show_index=False, follow_symlinks=False)
    if config.comfy_models_dir:  # ComfyUI's HTTP and WebSocket API
        comfy_api.install(app, config)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app
