"""Shared by tests/test_gateway*.py: API keys, a gateway process, raw HTTP calls."""

from __future__ import annotations

import http.client
import json
import secrets
from pathlib import Path

from clients.gateway.process import GatewayProcess


def write_keys(path: Path) -> dict[str, str]:
    """A key file with an admin key and two user keys; returns name -> key."""
    keys = {"ops": f"adm-{secrets.token_hex(16)}", "alice": f"usr-{secrets.token_hex(16)}",
            "bob": f"usr-{secrets.token_hex(16)}"}
    path.write_text("# test keys\n"
                    f"admin {keys['ops']} ops\n"
                    f"user  {keys['alice']} alice   # a comment\n"
                    f"user  {keys['bob']} bob\n")
    return keys


class Gateway(GatewayProcess):
    """A gateway process that logs at debug level (the key-leak test reads every line)."""

    def __init__(self, broker: str, keys_file: Path, log_path: Path, *args: str):
        super().__init__(broker, keys_file, log_path, "--log-level", "debug", *args)

    def log(self) -> str:
        return self.log_path.read_text()


def request(gateway: Gateway, method: str, path: str, body=None, *, key: str | None = None,
            headers: dict | None = None, raw: bytes | None = None, timeout: float = 60):
    """(status, headers, JSON or bytes). `body` is sent as JSON; `raw` as given."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=timeout)
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        payload = response.read()
        answer = dict(response.getheaders())
    finally:
        conn.close()
    if answer.get("Content-Type", "").startswith("application/json"):
        return response.status, answer, json.loads(payload)
    return response.status, answer, payload


def sse_events(gateway: Gateway, path: str, key: str, timeout: float = 60, last_event_id: int | None = None,
               stop_after: int | None = None) -> list[tuple[str, dict]]:
    """Every (event, data) of a server-sent event stream, until the server ends it (or
    until `stop_after` events, when the connection is dropped mid-stream)."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=timeout)
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert response.getheader("Content-Type").startswith("text/event-stream")
        events, kind = [], None
        for line in response:
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[len("data: "):])))
                if stop_after is not None and len(events) >= stop_after:
                    break
        return events
    finally:
        conn.close()


def app_routes(app) -> set[tuple[str, str]]:
    """(path, method) of every route an aiohttp app serves, HEAD left out (aiohttp adds it
    beside GET), a static folder as its `{filename}` path: what /openapi.json must list."""
    from aiohttp import web

    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical
        if isinstance(route.resource, web.StaticResource):
            path += "/{filename}"
        if route.method != "HEAD":
            routes.add((path, route.method.lower()))
    return routes
