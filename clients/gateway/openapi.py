"""The OpenAPI 3.1 document of every route (served at /openapi.json).

Written by hand, checked by tests/test_gateway_http.py: every route the app has must
appear here with its methods (ComfyUI's routes, clients/gateway/comfy_api.py, when the
gateway serves them: `openapi_document(comfy=True)`).
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


COMFY_ERROR = {"type": "object", "description": "ComfyUI's shape (docs/comfy.md: Errors)", "properties": {
    "error": {"type": "object", "properties": {"type": {"type": "string"}, "message": {"type": "string"},
                                               "details": {"type": "string"}, "extra_info": {"type": "object"}}},
    "node_errors": {"type": "object", "description": "node id -> {errors, dependent_outputs, class_type}"}}}
PROMPT_BODY = {"type": "object", "required": ["prompt"], "properties": {
    "prompt": {"type": "object", "description": "the graph in ComfyUI's API format"},
    "client_id": {"type": "string", "description": "the WebSocket client (/ws?clientId=) that gets its messages"},
    "extra_data": {"type": "object"}}}
PROMPT_OK = {"type": "object", "properties": {"prompt_id": {"type": "string"}, "number": {"type": "integer"},
                                              "node_errors": {"type": "object"}}}
IDS_BODY = {"type": "object", "properties": {"clear": {"type": "boolean"},
                                             "delete": {"type": "array", "items": {"type": "string"}}}}


def comfy_paths() -> dict:
    """ComfyUI's routes on the gateway (docs/comfy.md), each also under /api/."""
    def op(summary: str, ok: dict | None = None, **kwargs) -> dict:
        return _op(f"ComfyUI: {summary}", ok, errors=COMFY_ERROR, **kwargs)

    paths = {
        "/prompt": {"post": op("Queue a graph (compiled to a served or registered workflow)", _json(PROMPT_OK),
                               body=PROMPT_BODY, codes=(400, 401, 413, 429, 503)),
                    "get": op("The queue's length: {exec_info: {queue_remaining}}", _json(ANY), codes=(401,))},
        "/history": {"get": op("Ended prompts of this key (?max_items=)", _json(ANY), codes=(401,)),
                     "post": op("Forget ended prompts: {clear} or {delete: [ids]}", body=IDS_BODY, codes=(400, 401))},
        "/history/{prompt_id}": {"get": op("One ended prompt (empty when unknown)", _json(ANY), params=["prompt_id"],
                                           codes=(401,))},
        "/queue": {"get": op("Running and pending prompts of this key", _json(ANY), codes=(401,)),
                   "post": op("Cancel pending prompts: {clear} or {delete: [ids]}", body=IDS_BODY, codes=(400, 401))},
        "/interrupt": {"post": op("Cancel this key's running prompts (or {prompt_id}'s)", codes=(400, 401))},
        "/view": {"get": op("An image (?filename=&subfolder=&type=output|temp|input)",
                            {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                            codes=(401, 403, 404))},
        "/upload/image": {"post": op("Upload an image (multipart `image`, `subfolder`, `overwrite`): a LoadImage choice",
                                     _json(ANY), codes=(400, 401, 413))},
        "/object_info": {"get": op("The supported nodes and their inputs", _json(ANY), codes=(401,))},
        "/object_info/{node_class}": {"get": op("One node class (empty when unsupported)", _json(ANY),
                                                params=["node_class"], codes=(401,))},
        "/system_stats": {"get": op("The gateway host; one device standing for the cluster", _json(ANY), codes=(401,))},
        "/ws": {"get": op("WebSocket (?clientId=, ?token=KEY): status, execution and progress messages",
                          status="101", codes=(401,))},
    }
    return {**paths, **{"/api" + path: ops for path, ops in paths.items()}}


def openapi_document(comfy: bool = False) -> dict:
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
                 "description": "OpenAI-compatible images API, native runs API, metrics and admin console"
                                + (", ComfyUI's API" if comfy else "") + ". Authorization: Bearer KEY (roles user "
                                "and admin)" + ("; ComfyUI's routes also take basic auth with the key as the password"
                                                if comfy else "") + "."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {**paths, **(comfy_paths() if comfy else {})},
    }
