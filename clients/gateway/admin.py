"""The admin console: its page and static files, the login that turns an admin key into a
session cookie, the JSON snapshot the page polls, and the actions it posts.

Actions are POSTs with a JSON body (Content-Type application/json): with the
SameSite=Strict cookie, another site cannot forge them.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import structlog
from aiohttp import web

from clients.errors import LegoError
from clients.gateway.auth import SESSION_COOKIE
from clients.gateway.bodies import read_json
from clients.gateway.errors import ApiError, admin_refusal
from clients.gateway.state import ask_broker, gateway_of

log = structlog.get_logger(__name__)

STATIC = Path(__file__).parent / "static"
# The console's pages load only their own files: no inline script can run in them.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
ACTOR_ACTIONS = {"drain": "drain_actor", "undrain": "undrain_actor", "stop": "stop_actor"}
WORKFLOW_ACTIONS = {"pause": "pause_workflow", "resume": "resume_workflow"}
MAX_REPLICAS = 1024


async def console(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "admin.html", headers=PAGE_HEADERS)


def _login_page(message: str = "", status: int = 200) -> web.Response:
    text = (STATIC / "login.html").read_text().replace("<!--message-->", html.escape(message))
    return web.Response(text=text, content_type="text/html", status=status, headers=PAGE_HEADERS)


async def login_form(request: web.Request) -> web.Response:
    return _login_page()


async def login(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    form = await request.post()
    key = gw.keys.lookup(str(form.get("key", "")).strip())
    if key is None:
        log.info("console_login_refused", reason="unknown key")
        return _login_page("That key is not valid.", 401)
    if key.role != "admin":
        log.info("console_login_refused", reason="not an admin key", key=key.name)
        return _login_page("That key is not an admin key.", 403)
    log.info("console_login", key=key.name)
    response = web.HTTPSeeOther("/admin")
    response.set_cookie(SESSION_COOKIE, gw.sessions.open(key), max_age=int(gw.config.session_ttl_s), path="/admin",
                        httponly=True, samesite="Strict", secure=request.secure)
    raise response


async def logout(request: web.Request) -> web.Response:
    gateway_of(request).sessions.close(request.cookies.get(SESSION_COOKIE))
    response = web.HTTPSeeOther("/admin/login")
    response.del_cookie(SESSION_COOKIE, path="/admin")
    raise response


async def snapshot(request: web.Request) -> web.Response:
    """The broker's Stats as JSON, the gateway's history and its own recent errors."""
    gw = gateway_of(request)
    stats = await ask_broker(gw, gw.client.stats())
    in_flight = {gw.keys.name_of(fingerprint): count for fingerprint, count in gw.store.in_flight.items()}
    return web.json_response({
        "time": time.time(), "broker": gw.client.address, "stats": stats.to_wire(), "history": gw.history.to_json(),
        "gateway": {"runs_in_flight": in_flight, "recent_errors": list(gw.recent_errors),
                    "key": request["key"].name},
    })


async def _call(request: web.Request, method: str, *args, **kwargs) -> web.Response:
    gw = gateway_of(request)
    try:
        reply = await getattr(gw.client, method)(*args, **kwargs)
    except LegoError as exc:
        log.info("admin_action_refused", action=method, target=args[0] if args else None, key=request["key"].name,
                 reason=str(exc))
        raise admin_refusal(exc) from None
    log.info("admin_action", action=method, target=args[0] if args else None, key=request["key"].name, **kwargs)
    return web.json_response({"ok": True, "message": getattr(reply, "message", "")})


async def actor_action(request: web.Request) -> web.Response:
    await read_json(request)  # the JSON content type is the CSRF guard; the body may be {}
    action = request.match_info["action"]
    if action not in ACTOR_ACTIONS:
        raise ApiError(404, "not_found", f"unknown action {action!r} (actions: {sorted(ACTOR_ACTIONS)})", "action")
    return await _call(request, ACTOR_ACTIONS[action], request.match_info["actor_id"])


async def workflow_action(request: web.Request) -> web.Response:
    await read_json(request)
    action = request.match_info["action"]
    if action not in WORKFLOW_ACTIONS:
        raise ApiError(404, "not_found", f"unknown action {action!r} (actions: {sorted(WORKFLOW_ACTIONS)})", "action")
    return await _call(request, WORKFLOW_ACTIONS[action], request.match_info["workflow"])


def _replica_bound(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_REPLICAS:
        raise ApiError(400, "invalid_param", f"{name} must be null or an integer in 0..{MAX_REPLICAS}, got {value!r}",
                       name)
    return value


async def set_replicas(request: web.Request) -> web.Response:
    body = await read_json(request)
    for name in body:
        if name not in ("min", "max"):
            raise ApiError(400, "invalid_param", f"unknown field {name!r} (fields: min, max)", name)
    low, high = _replica_bound(body, "min"), _replica_bound(body, "max")
    if low is not None and high is not None and low > high:
        raise ApiError(400, "invalid_param", f"min ({low}) must not exceed max ({high})", "min")
    return await _call(request, "set_replicas", request.match_info["model"], min=low, max=high)


ROUTES = [
    ("GET", "/admin", console),
    ("GET", "/admin/login", login_form),
    ("POST", "/admin/login", login),
    ("POST", "/admin/logout", logout),
    ("GET", "/admin/api/snapshot", snapshot),
    ("POST", "/admin/api/actors/{actor_id}/{action}", actor_action),
    ("POST", "/admin/api/workflows/{workflow}/{action}", workflow_action),
    ("POST", "/admin/api/models/{model}/replicas", set_replicas),
]
