"""ComfyUI's HTTP API on the gateway: a ComfyUI client queues a graph and gets its images.

`POST /prompt` compiles the graph with clients/comfy's importer against the gateway's
catalog (`comfy_catalog`: the catalog files the cluster was started with) and models
folder (`comfy_models_dir`), finds the served workflow with the same definition and
submits one run with the graph's literals as its parameters. Where the broker serves no
such workflow but every model of the compiled one (each a catalog model with a live
actor; no model file or LoRA the catalog lacks), the gateway registers it at the broker (ADMIN_REGISTER: the gateway's broker key
is an admin key) under a name its definition gives (`comfy-` + a hash of the definition
without the graph's literals), so it runs on the actors those models already have,
batched with every other workflow's steps; a graph over models the cluster does not
serve is refused with node errors naming the import command. The match is cached by the
graph's shape (`graph_shape`: the graph without its literal values); each graph is still
compiled (~2 ms: that reads its literals and checks them). `/history`, `/view`,
`/queue`, `/interrupt`, `/upload/image`, `/object_info`, `/system_stats` answer in
ComfyUI's shapes; the WebSocket is comfy_ws.py. Every route also answers under `/api/`
(ComfyUI's newer front end). docs/comfy.md.

ComfyUI clients send HTTP basic auth (the API key as the password, any user name) or
`Authorization: Bearer KEY`; the WebSocket also takes `?token=KEY`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import uuid

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib
from dataclasses import fields
from pathlib import Path

import numpy as np
import psutil
import structlog
from aiohttp import web

from broker.catalog import CatalogError, WorkflowSpec, load_catalog, parse_catalog
from clients.comfy import ComfyImportError, ImportedWorkflow, import_graph
from clients.comfy.errors import node_error
from clients.comfy.graph import is_link
from clients.core import AdminRefused
from clients.errors import LegoError
from clients.gateway.bodies import MAX_JSON_DEPTH, json_depth
from clients.gateway.comfy_ws import (
    COMFY,
    ComfyState,
    Prompt,
    find_input,
    follow,
    key_folder,
    object_info_of,
    output_images,
    safe_relative,
    websocket,
)
from clients.gateway.config import GatewayConfig
from clients.gateway.errors import ApiError
from clients.gateway.state import ask_broker, gateway_of

log = structlog.get_logger(__name__)

MAX_CACHED_SHAPES = 1024  # graph shapes whose served workflow is remembered (node ids are part of a shape)
COMPILE_NAME = "comfy-prompt"  # the name graphs are compiled under (never submitted: the served twin is)
REGISTERED_PREFIX = "comfy-"  # + a hash of the definition: the name a graph's workflow is registered under
# WorkflowSpec fields that do not change what a request computes: the match ignores them.
NOT_DEFINITION = ("name", "description", "slo_s", "inputs")
# ... and of each input, those that do not either: every request sends every value.
INPUT_NOT_DEFINITION = ("default", "required", "description")



# ---- pure functions


def graph_shape(api: dict) -> str:
    """The SHA-256 of the graph without its literal values: node ids, class types, input
    names and links. Graphs that differ only in literals (prompt, seed, steps, model files)
    share a shape."""
    nodes = {}
    for node_id, node in api.items():
        if not isinstance(node, dict):
            nodes[str(node_id)] = None
            continue
        inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
        nodes[str(node_id)] = [node.get("class_type"), {name: [str(v[0]), v[1]] if is_link(v) else None
                                                        for name, v in inputs.items()}]
    return hashlib.sha256(json.dumps(nodes, sort_keys=True).encode()).hexdigest()


def same_definition(a: WorkflowSpec, b: WorkflowSpec) -> bool:
    """Whether two workflows compute the same thing: the same models in the same roles, the
    same CFG / img2img / ControlNet / guidance / LoRA structure and the same inputs (names,
    types, ranges, choices). Names, descriptions, SLOs and the inputs' defaults, required
    flags and descriptions do not count."""
    for f in fields(WorkflowSpec):
        if f.name not in NOT_DEFINITION and getattr(a, f.name) != getattr(b, f.name):
            return False
    if set(a.inputs) != set(b.inputs):
        return False
    for name, x in a.inputs.items():
        y = b.inputs[name]
        if any(getattr(x, f.name) != getattr(y, f.name) for f in fields(x) if f.name not in INPUT_NOT_DEFINITION):
            return False
    return True


def registrable(imported: ImportedWorkflow) -> tuple[dict, list[str]]:
    """The compiled workflow's catalog table without the graph's literals (the inputs'
    defaults and required flags: every run sends every value), so that graphs of one
    structure register one workflow; and what the graph declares beyond the catalog
    (`models.NAME`, `adapters.NAME`: files the cluster does not serve)."""
    doc = tomllib.loads(imported.toml)
    definition = doc["workflows"][imported.name]
    inputs = {}
    for name, override in definition.get("inputs", {}).items():
        kept = {k: v for k, v in override.items() if k not in ("default", "required")}
        if kept:
            inputs[name] = kept
    definition = {k: v for k, v in definition.items() if k != "inputs"}
    if inputs:
        definition["inputs"] = inputs
    return definition, [f"{table}.{name}" for table in ("models", "adapters") for name in doc.get(table, {})]


def registered_name(definition: dict) -> str:
    """`comfy-` + 16 hex digits of the definition's SHA-256: one name per definition."""
    text = json.dumps(definition, sort_keys=True, separators=(",", ":"))
    return REGISTERED_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:16]


def comfy_error(message: str, details: str = "", type_: str = "invalid_prompt", node_errors: dict | None = None,
                status: int = 400, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": node_error(type_, message, details), "node_errors": node_errors or {}},
                             status=status, headers=headers)


# ---- the state


def load_image(path: Path) -> np.ndarray:
    from PIL import Image  # diffusers' dependency; only LoadImage graphs need it

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _owner(request: web.Request) -> str:
    return request["key"].fingerprint


def _visible(request: web.Request, prompt: Prompt) -> bool:
    return prompt.owner == _owner(request) or request["key"].role == "admin"


# ---- POST /prompt


async def _read_body(request: web.Request):
    try:
        body = json.loads(await request.read() or b"{}")
    except web.HTTPRequestEntityTooLarge as exc:
        return None, comfy_error("Prompt too large", f"the body exceeds {exc.max_size} bytes", status=413)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return None, comfy_error("Invalid JSON", str(exc))
    if json_depth(body, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        return None, comfy_error("Invalid JSON", f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return body, None


def _nodes_of(api: dict, classes: tuple[str, ...]) -> list[str]:
    return sorted((n for n, node in api.items() if node.get("class_type") in classes), key=_node_order)


def _node_order(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _not_served(api: dict, outputs: list[str], details: str) -> ComfyImportError:
    errors = {out: {"errors": [node_error(
        "workflow_not_served", "No served workflow computes this graph",
        f"{details}. Import the graph with `lego workflows import GRAPH --name NAME` and start the cluster "
        "with that catalog (and the gateway with it in comfy_catalog)")],
        "dependent_outputs": list(outputs), "class_type": api[out]["class_type"]} for out in outputs}
    return ComfyImportError(errors)


def _remember(state: ComfyState, shape: str, spec: WorkflowSpec, name: str) -> str:
    while len(state.cache) >= MAX_CACHED_SHAPES and shape not in state.cache:
        del state.cache[next(iter(state.cache))]  # the oldest shape
    state.cache.setdefault(shape, []).append((spec, name))
    return name


async def served_workflow(request: web.Request, shape: str, imported: ImportedWorkflow, outputs: list[str]) -> str:
    """The name of the workflow the broker serves for this graph: a cached match, a served
    one of the same definition, or the compiled one, registered now."""
    gw, state = gateway_of(request), request.app[COMFY]
    spec, api = imported.workflow, imported.api
    for cached, name in state.cache.get(shape, ()):
        if same_definition(cached, spec):
            return name
    infos = await ask_broker(gw, gw.client.workflows())
    for info in sorted(infos, key=lambda i: i.name):
        served = state.catalog.workflows.get(info.name)
        if served is not None and list(info.models) == served.models and same_definition(served, spec):
            return _remember(state, shape, spec, info.name)
    definition, declared = registrable(imported)
    if not declared:  # files the catalog declares: served where an actor runs each (the stats say)
        stats = await ask_broker(gw, gw.client.stats())
        live = {a.model for a in stats.actors if not a.stopping}
        declared = [m for m in spec.models if m not in live]
    if declared:
        raise _not_served(api, outputs, f"the graph compiles to a workflow of models {spec.models} "
                          f"(cfg {spec.cfg}, img2img {spec.img2img}) and the cluster does not serve "
                          f"{', '.join(declared)} (no such catalog model, or no actor runs it); "
                          f"the broker serves {sorted(i.name for i in infos)}")
    name = registered_name(definition)
    listed = {i.name: list(i.models) for i in infos}
    if name in listed and listed[name] != spec.models:  # the name its definition gives, taken by another
        raise _not_served(api, outputs, f"the broker serves another workflow under {name}, the name of its definition")
    if name not in listed:
        refusal = await ask_broker(gw, _register(gw, name, definition))
        if refusal is not None:
            raise _not_served(api, outputs, f"the broker refused to register its workflow {name}: {refusal}")
        log.info("comfy_workflow_registered", workflow=name, models=spec.models, shape=shape[:16])
    try:
        state.catalog.workflows[name] = parse_catalog({"workflows": {name: definition}}, state.catalog).workflows[name]
    except CatalogError as exc:  # the broker took it, so ours should: a catalog that differs from the cluster's
        raise _not_served(api, outputs, f"its workflow {name} does not load here: {exc}") from None
    return _remember(state, shape, spec, name)


async def _register(gw, name: str, definition: dict) -> str | None:
    """None once the broker serves `name`; its refusal otherwise (other errors raise)."""
    try:
        await gw.client.register_workflow(name, definition)
    except AdminRefused as exc:
        return exc.message
    except LegoError as exc:
        if not str(exc).startswith("forbidden"):
            raise
        return "the gateway's broker key may not register workflows (give it an admin key: broker_key_file)"
    return None


def _images(state: ComfyState, owner: str, api: dict, imported) -> dict:
    """The graph's LoadImage files as the run's image tensors, at the request's size."""
    params = dict(imported.defaults)
    tensors = {}
    loaders = {node["inputs"].get("image"): n for n, node in api.items() if node.get("class_type") == "LoadImage"}
    for name, file in imported.images.items():
        node_id = loaders.get(file, "")
        path = find_input(state, owner, file) if isinstance(file, str) else None
        if path is None:
            raise ComfyImportError({node_id: {"errors": [node_error("value_not_in_list", "Invalid image file",
                                                                     f"image: {file!r} is not uploaded", "image", file)],
                                              "dependent_outputs": [], "class_type": "LoadImage"}})
        try:
            tensors[name] = (node_id, load_image(path))
        except OSError as exc:
            raise ComfyImportError({node_id: {"errors": [node_error("invalid_image", "Cannot read the image",
                                                                     str(exc), "image", file)],
                                              "dependent_outputs": [], "class_type": "LoadImage"}}) from None
    if "image" in tensors and "width" not in params and "width" in imported.workflow.inputs:
        params["height"], params["width"] = tensors["image"][1].shape[:2]  # img2img: the image's size, as ComfyUI
    for name, (node_id, array) in tensors.items():
        size = [params.get("height", imported.workflow.inputs["height"].default),
                params.get("width", imported.workflow.inputs["width"].default)]
        if list(array.shape[:2]) != size:
            raise ComfyImportError({node_id: {"errors": [node_error(
                "unsupported_value", "The image's size differs from the image the graph makes",
                f"{name}: {array.shape[1]}x{array.shape[0]}, the graph makes {size[1]}x{size[0]}: resize it first",
                "image", imported.images[name])], "dependent_outputs": [], "class_type": "LoadImage"}})
        params[name] = array
    return params


async def post_prompt(request: web.Request) -> web.Response:
    gw, state = gateway_of(request), request.app[COMFY]
    body, refusal = await _read_body(request)
    if refusal is not None:
        return refusal
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), dict):
        return comfy_error("No prompt provided", "the body must be {\"prompt\": GRAPH, \"client_id\": ...}", "no_prompt")
    graph = body["prompt"]
    client_id = body.get("client_id") if isinstance(body.get("client_id"), str) else ""
    extra = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
    shape = graph_shape(graph)
    kept = copy.deepcopy(graph)
    try:
        imported = import_graph(graph, name=COMPILE_NAME, models_dir=state.models_dir, catalog=state.catalog,
                                replace=True)
        api = imported.api
        outputs = _nodes_of(api, ("SaveImage", "PreviewImage"))
        workflow = await served_workflow(request, shape, imported, outputs)
        params = _images(state, _owner(request), api, imported)
    except ComfyImportError as exc:
        return web.json_response(exc.response(), status=400)
    decoder = str(api[outputs[0]]["inputs"]["images"][0])
    sampler = str(api[decoder]["inputs"]["samples"][0])
    encoder = str(api[sampler]["inputs"]["positive"][0])
    state.prune(time.time())
    state.counter += 1
    prompt = Prompt(str(uuid.uuid4()), state.counter, _owner(request), client_id, kept, extra, outputs, sampler,
                    encoder, decoder, workflow=workflow)
    try:
        (prompt.run,) = await gw.store.start(prompt.owner, [(workflow, params)])
    except ApiError as exc:
        if exc.code == "unknown_workflow":
            state.cache.pop(shape, None)  # the broker was restarted with another catalog
        return comfy_error(exc.message, exc.field or "", exc.code, status=exc.status if exc.status != 500 else 400,
                           headers=exc.headers())
    for node_id in outputs:
        prompt.images[node_id] = output_images(prompt, node_id, api[node_id]["class_type"],
                                               str(api[node_id]["inputs"].get("filename_prefix", "ComfyUI")))
        for image in prompt.images[node_id]:
            state.images[(image["type"], image["subfolder"], image["filename"])] = prompt.id
    state.prompts[prompt.id] = prompt
    log.info("comfy_prompt_queued", prompt_id=prompt.id, request_id=prompt.run.id, workflow=workflow)
    follow(state, prompt)
    state.broadcast_status()
    return web.json_response({"prompt_id": prompt.id, "number": prompt.number, "node_errors": {}})


async def get_prompt(request: web.Request) -> web.Response:
    return web.json_response({"exec_info": {"queue_remaining": request.app[COMFY].queue_remaining()}})


# ---- history, queue, interrupt


def _ids(value) -> set[str]:
    return {v for v in value if isinstance(v, str)} if isinstance(value, list) else set()


def _history_entry(prompt: Prompt) -> dict:
    return {"prompt": prompt.queue_entry(), "outputs": {n: {"images": i} for n, i in prompt.images.items()},
            "status": {"status_str": prompt.status_str, "completed": prompt.status_str == "success",
                       "messages": prompt.messages},
            "meta": {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                     for n in prompt.images}}


async def get_history(request: web.Request) -> web.Response:
    state = request.app[COMFY]
    state.prune(time.time())
    wanted = request.match_info.get("prompt_id")
    done = [p for p in state.prompts.values() if p.done and _visible(request, p) and wanted in (None, p.id)]
    try:
        max_items = int(request.query.get("max_items", len(done)))
    except ValueError:
        max_items = len(done)
    done = done[len(done) - max(0, max_items):] if max_items < len(done) else done
    return web.json_response({p.id: _history_entry(p) for p in done})


async def post_history(request: web.Request) -> web.Response:
    state = request.app[COMFY]
    body, refusal = await _read_body(request)
    if refusal is not None:
        return refusal
    body = body if isinstance(body, dict) else {}
    mine = [p for p in state.prompts.values() if p.done and _visible(request, p)]
    delete = _ids(body.get("delete"))
    for prompt in mine:
        if body.get("clear") or prompt.id in delete:
            state.forget(prompt.id)
    return web.Response(status=200)


async def get_queue(request: web.Request) -> web.Response:
    state = request.app[COMFY]
    mine = [p for p in state.prompts.values() if not p.done and _visible(request, p)]
    return web.json_response({"queue_running": [p.queue_entry() for p in mine if p.running],
                              "queue_pending": [p.queue_entry() for p in mine if not p.running]})


def _cancel(request: web.Request, prompts) -> None:
    gw = gateway_of(request)
    for prompt in prompts:
        if not prompt.done and _visible(request, prompt):
            gw.store.cancel(prompt.run)


async def post_queue(request: web.Request) -> web.Response:
    """{"clear": true} cancels this key's pending prompts; {"delete": [ids]} those named (an admin's: any)."""
    body, refusal = await _read_body(request)
    if refusal is not None:
        return refusal
    body = body if isinstance(body, dict) else {}
    delete = _ids(body.get("delete"))
    pending = [p for p in request.app[COMFY].prompts.values() if not p.running]
    _cancel(request, [p for p in pending if (body.get("clear") and p.owner == _owner(request)) or p.id in delete])
    return web.Response(status=200)


async def interrupt(request: web.Request) -> web.Response:
    """Cancel this key's running prompts (or the one named by {"prompt_id"}: an admin key may name any)."""
    body, refusal = await _read_body(request)
    if refusal is not None:
        return refusal
    wanted = body.get("prompt_id") if isinstance(body, dict) else None
    state = request.app[COMFY]
    _cancel(request, [p for p in state.prompts.values()
                      if (p.id == wanted if wanted else p.running and p.owner == _owner(request))])
    return web.Response(status=200)


# ---- files: /view, /upload/image


async def view(request: web.Request) -> web.StreamResponse:
    state = request.app[COMFY]
    filename, subfolder = request.query.get("filename", ""), request.query.get("subfolder", "")
    kind = request.query.get("type", "output")
    relative = safe_relative(subfolder, filename)
    if relative is None or not filename or "/" in filename or "\\" in filename:
        raise ApiError(403, "forbidden", "filename and subfolder must stay inside their folder", "filename")
    if kind == "input":
        path = find_input(state, _owner(request), relative.as_posix())
        if path is None:
            raise ApiError(404, "not_found", f"no input image {relative.as_posix()!r}", "filename")
        return web.FileResponse(path)
    prompt = state.prompts.get(state.images.get((kind, subfolder, filename), ""))
    if prompt is None or prompt.png is None or not _visible(request, prompt):
        raise ApiError(404, "not_found", f"no {kind} image {relative.as_posix()!r} (images are kept as long as "
                       "their prompt's history)", "filename")
    return web.Response(body=prompt.png, content_type="image/png",
                        headers={"Content-Disposition": f'filename="{filename}"'})


async def upload_image(request: web.Request) -> web.Response:
    """Multipart `image` (a file), optional `subfolder`, `type` (input) and `overwrite`."""
    state = request.app[COMFY]
    try:
        form = await request.post()
    except ValueError as exc:
        raise ApiError(400, "invalid_body", f"expected multipart/form-data: {exc}", "image") from None
    image = form.get("image")
    if not isinstance(image, web.FileField):
        raise ApiError(400, "invalid_param", "image: a file field is required", "image")
    kind = str(form.get("type") or "input")
    if kind != "input":
        raise ApiError(400, "unsupported_value", "type: only input images are uploaded here", "type")
    subfolder = str(form.get("subfolder") or "")
    relative = safe_relative(subfolder, Path(str(image.filename or "")).name)
    if relative is None or not image.filename or not relative.name:
        raise ApiError(400, "invalid_param", "filename and subfolder must stay inside the input folder", "image")
    folder = key_folder(state, _owner(request)) / relative.parent
    folder.mkdir(parents=True, exist_ok=True)
    name, path = relative.name, folder / relative.name
    if str(form.get("overwrite", "")).lower() not in ("true", "1"):
        stem, suffix, i = path.stem, path.suffix, 1
        while path.exists():
            name = f"{stem} ({i}){suffix}"
            path, i = folder / name, i + 1
    path.write_bytes(image.file.read())
    parent = relative.parent.as_posix()
    return web.json_response({"name": name, "subfolder": "" if parent == "." else parent, "type": "input"})


# ---- object_info, system_stats


async def object_info(request: web.Request) -> web.Response:
    info = object_info_of(request.app[COMFY], _owner(request))
    wanted = request.match_info.get("node_class")
    if wanted is not None:
        info = {wanted: info[wanted]} if wanted in info else {}
    return web.json_response(info)


async def system_stats(request: web.Request) -> web.Response:
    memory = psutil.virtual_memory()
    return web.json_response({
        "system": {"os": os.name, "ram_total": memory.total, "ram_free": memory.available,
                   "comfyui_version": "lego-gateway", "python_version": sys.version, "pytorch_version": "",
                   "embedded_python": False, "argv": [], "platform": platform.platform()},
        "devices": [{"name": "lego-cluster (see /metrics)", "type": "cluster", "index": 0, "vram_total": 0,
                     "vram_free": 0, "torch_vram_total": 0, "torch_vram_free": 0}]})


# ---- auth and installation


COMFY_PATHS = ("/prompt", "/history", "/view", "/queue", "/interrupt", "/upload/image", "/object_info",
               "/system_stats", "/ws")


def _is_comfy(path: str) -> bool:
    path = path.removeprefix("/api")
    return any(path == p or path.startswith(p + "/") for p in COMFY_PATHS)


@web.middleware
async def comfy_auth(request: web.Request, handler):
    """On ComfyUI's routes, basic auth (the key as the password) and `/ws?token=KEY` stand for
    `Authorization: Bearer KEY`; the gateway's authentication then applies as everywhere."""
    header = request.headers.get("Authorization", "")
    token = None
    if _is_comfy(request.path):
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                token = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                token = ""
        elif not header and request.path.removeprefix("/api") == "/ws" and request.query.get("token"):
            token = request.query["token"]
    if token is None:
        return await handler(request)
    headers = request.headers.copy()
    headers["Authorization"] = f"Bearer {token}" if token else "Bearer -"
    cloned = request.clone(headers=headers)
    try:
        return await handler(cloned)
    finally:
        if "key" in cloned:
            request["key"] = cloned["key"]  # for the request's log line


ROUTES = [("POST", "/prompt", post_prompt), ("GET", "/prompt", get_prompt), ("GET", "/history", get_history),
          ("GET", "/history/{prompt_id}", get_history), ("POST", "/history", post_history),
          ("GET", "/queue", get_queue), ("POST", "/queue", post_queue), ("POST", "/interrupt", interrupt),
          ("GET", "/view", view), ("POST", "/upload/image", upload_image), ("GET", "/object_info", object_info),
          ("GET", "/object_info/{node_class}", object_info), ("GET", "/system_stats", system_stats),
          ("GET", "/ws", websocket)]


def comfy_state(config: GatewayConfig) -> ComfyState:
    """The catalog (the built-in one and `comfy_catalog`'s files, as the cluster loads them),
    the models folder and the upload folder (`comfy_input_dir`, else a temporary one)."""
    files = [f for f in config.comfy_catalog.split(os.pathsep) if f]
    input_dir = Path(config.comfy_input_dir or tempfile.mkdtemp(prefix="lego-comfy-input-")).expanduser()
    input_dir.mkdir(parents=True, exist_ok=True)
    return ComfyState(Path(config.comfy_models_dir).expanduser(), input_dir, load_catalog(files),
                      config.keep_finished_runs, config.keep_finished_s)


async def _stop(app: web.Application) -> None:
    followers = list(app[COMFY].followers)
    for task in followers:
        task.cancel()
    await asyncio.gather(*followers, return_exceptions=True)


def install(app: web.Application, config: GatewayConfig) -> None:
    """ComfyUI's routes (also under /api/), their auth and state, on the gateway's app:
    called by build_app when `comfy_models_dir` is set. Before the app's own authentication."""
    app[COMFY] = comfy_state(config)
    app.middlewares.insert(len(app.middlewares) - 1, comfy_auth)
    for method, path, handler in ROUTES:
        for prefix in ("", "/api"):
            app.router.add_route(method, prefix + path, handler)
    app.on_cleanup.append(_stop)
