"""The OpenAPI 3.1 document of every route (served at /openapi.json).

Written by hand, checked by tests/test_gateway_http.py: every route the app has must
appear here with its methods.
"""

from __future__ import annotations

ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": ["string", "null"]}}}}}
OPENAI_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": "string"}}}}}
RUN = {"type": "object", "properties": {
    "id": {"type": "string"}, "workflow": {"type": "string"},
    "state": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
    "created": {"type": "number"}, "params": {"type": "object"},
    "progress": {"type": "object", "description": "node, kind, step, total_steps, done_nodes, total_nodes"},
    "error": {"type": ["object", "null"]}, "latency_s": {"type": ["number", "null"]},
    "result": {"type": "object", "description": "when succeeded: image_png_b64, or tensors (latents) as base64",
               "properties": {"image_png_b64": {"type": "string"}, "tensors": {"type": "object"}}}}}
ANY = {"type": "object"}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _op(summary: str, ok: dict | None = None, *, status: str = "200", body: dict | None = None, errors: dict = ERROR,
        public: bool = False, params: list[str] = (), codes: tuple = (400, 401, 403)) -> dict:
    op = {"summary": summary, "responses": {status: {"description": "OK", **(ok or {})}}}
    for code in codes:
        op["responses"][str(code)] = {"description": "error", **_json(errors)}
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    if public:
        op["security"] = []
    if params:
        op["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                            for name in params]
    return op


IMAGES_BODY = {"type": "object", "required": ["model", "prompt"], "additionalProperties": True,
               "description": "OpenAI's images API; any other field is passed to the workflow as a parameter",
               "properties": {"model": {"type": "string", "description": "the workflow's name"},
                              "prompt": {"type": "string"}, "n": {"type": "integer", "minimum": 1, "maximum": 10},
                              "size": {"type": "string", "pattern": "^[0-9]+x[0-9]+$|^auto$"},
                              "response_format": {"enum": ["b64_json"]}, "seed": {"type": "integer"}}}
IMAGES_OK = {"type": "object", "properties": {"created": {"type": "integer"}, "data": {"type": "array", "items": {
    "type": "object", "properties": {"b64_json": {"type": "string"}}}}}}


def openapi_document() -> dict:
    user = (400, 401, 403, 404)
    paths = {
        "/v1/images/generations": {"post": _op(
            "Generate n images with a workflow (OpenAI-compatible)", _json(IMAGES_OK), body=IMAGES_BODY,
            errors=OPENAI_ERROR, codes=(400, 401, 413, 415, 429, 502, 503, 504))},
        "/v1/runs": {"post": _op("Start a run of a workflow", _json(RUN), status="201", codes=(400, 401, 413, 415, 429, 503),
                                 body={"type": "object", "required": ["workflow"], "properties": {
                                     "workflow": {"type": "string"}, "params": {"type": "object"}}})},
        "/v1/runs/{id}": {"get": _op("A run: state, progress, result, error", _json(RUN), params=["id"], codes=user),
                          "delete": _op("Cancel a run", _json(ANY), status="202", params=["id"], codes=(401, 404, 409))},
        "/v1/runs/{id}/events": {"get": _op("Server-sent events: progress, then end",
                                            {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
                                            params=["id"], codes=user)},
        "/v1/workflows": {"get": _op("Workflows and their declared inputs", _json(ANY), codes=(401, 503))},
        "/metrics": {"get": _op("Prometheus metrics: the cluster's and the gateway's",
                                {"content": {"text/plain": {"schema": {"type": "string"}}}}, codes=(401,))},
        "/openapi.json": {"get": _op("This document", _json(ANY), public=True, codes=())},
        "/healthz": {"get": _op("Liveness of the gateway itself", _json(ANY), public=True, codes=())},
        "/admin": {"get": _op("The admin console (admin key, or the session cookie of /admin/login)",
                              {"content": {"text/html": {}}}, codes=(401, 403))},
        "/admin/login": {"get": _op("The console's login form", {"content": {"text/html": {}}}, public=True, codes=()),
                         "post": _op("Log in with an admin key (form field `key`): sets an HttpOnly session cookie",
                                     status="303", public=True, codes=(401, 403))},
        "/admin/logout": {"post": _op("End the console session", status="303", public=True, codes=())},
        "/admin/static/{filename}": {"get": _op("The console's script and style", params=["filename"], public=True,
                                                codes=(404,))},
        "/admin/api/snapshot": {"get": _op("The broker's Stats as JSON, history, recent gateway errors", _json(ANY),
                                           codes=(401, 403, 503))},
        "/admin/api/actors/{actor_id}/{action}": {"post": _op(
            "drain | undrain | stop an actor", _json(ANY), body=ANY, params=["actor_id", "action"])},
        "/admin/api/workflows/{workflow}/{action}": {"post": _op(
            "pause | resume admission for a workflow", _json(ANY), body=ANY, params=["workflow", "action"])},
        "/admin/api/models/{model}/replicas": {"post": _op(
            "Set a model's min/max replicas (null: no bound)", _json(ANY), params=["model"],
            body={"type": "object", "properties": {"min": {"type": ["integer", "null"]},
                                                   "max": {"type": ["integer", "null"]}}})},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "LegoDiffusion gateway", "version": "1",
                 "description": "OpenAI-compatible images API, native runs API, metrics and admin console. "
                                "Authorization: Bearer KEY (roles user and admin)."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }
