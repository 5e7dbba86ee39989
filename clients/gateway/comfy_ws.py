"""ComfyUI's API on the gateway, part one: its state, the prompts it follows and its
WebSocket (`GET /ws?clientId=ID`). Part two, the HTTP routes: clients/gateway/comfy_api.py.

A prompt is one run of the gateway's RunStore (runs.py). A follower task per prompt turns
the run's progress events into the messages ComfyUI's server sends (server.py /
execution.py): `execution_start`, `execution_cached`, `executing` (the node at work),
`progress` (denoising steps), `executed` (each output node's images),
`execution_success` | `execution_error` | `execution_interrupted`, then `executing` with
`"node": null`, then a `status` broadcast with the queue's length. Each socket has a queue
of its own, filled without awaiting, so no socket sees messages out of order; a socket
that connects while its client's prompt runs first gets what that prompt sent so far.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from broker.catalog import Catalog, WorkflowSpec
from clients.comfy.compile import CLIP_TYPES
from clients.comfy.nodes import NODES, SAMPLER_NODES

log = structlog.get_logger(__name__)

MODEL_FOLDERS = {"checkpoints": ("checkpoints",), "diffusion_models": ("diffusion_models", "unet"),
                 "text_encoders": ("text_encoders", "clip"), "vae": ("vae",), "loras": ("loras",),
                 "controlnet": ("controlnet",)}
KEY_FOLDER_PREFIX = "sha256-"  # a key's upload folder: sha256-FINGERPRINT
MAX_SOCKET_BACKLOG = 1000  # messages a slow socket may fall behind by before it is closed


@dataclass
class Prompt:
    """One queued ComfyUI prompt: its run, the graph's nodes that messages name, its results."""

    id: str
    number: int
    owner: str  # the API key's fingerprint
    client_id: str
    graph: dict  # as sent
    extra: dict  # extra_data, as sent
    outputs: list[str]  # output node ids (SaveImage / PreviewImage)
    sampler: str
    encoder: str
    decoder: str
    run: Any = None  # runs.Run
    workflow: str = ""
    sent: list[dict] = field(default_factory=list)  # every WebSocket message of this prompt, in order
    messages: list[list] = field(default_factory=list)  # history's status.messages: [type, data]
    images: dict[str, list[dict]] = field(default_factory=dict)  # output node -> [{filename, subfolder, type}]
    png: bytes | None = None
    status_str: str | None = None  # success | error, once ended
    ended: float | None = None

    @property
    def done(self) -> bool:
        return self.ended is not None

    @property
    def running(self) -> bool:
        return not self.done and self.run is not None and self.run.state == "running"

    def queue_entry(self) -> list:
        """[number, prompt_id, graph, extra_data, outputs_to_execute], as ComfyUI's queue and history hold it."""
        return [self.number, self.id, self.graph, self.extra, list(self.outputs)]


@dataclass
class ComfyState:
    models_dir: Path
    input_dir: Path
    catalog: Catalog
    keep_finished: int
    keep_finished_s: float
    prompts: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # id -> Prompt
    images: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (type, subfolder, filename) -> prompt id
    # graph shape -> [(compiled definition, served workflow)]: one shape may compile to several (cfg 1 or not)
    cache: dict[str, list[tuple[WorkflowSpec, str]]] = field(default_factory=dict)
    sockets: dict[str, set[asyncio.Queue]] = field(default_factory=dict)  # client id -> its sockets' queues
    followers: set = field(default_factory=set)
    counter: int = 0

    def queue_remaining(self) -> int:
        return sum(1 for prompt in self.prompts.values() if not prompt.done)

    def send(self, client_id: str, kind: str, data: dict) -> None:
        for queue in self.sockets.get(client_id, ()):
            _put(queue, {"type": kind, "data": data})

    def broadcast_status(self) -> None:
        message = {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}}
        for queues in self.sockets.values():
            for queue in queues:
                _put(queue, message)

    def prune(self, now: float) -> None:
        finished = [p for p in self.prompts.values() if p.done]
        for prompt in finished[:max(0, len(finished) - self.keep_finished)] + \
                [p for p in finished if now - p.ended > self.keep_finished_s]:
            self.forget(prompt.id)

    def forget(self, prompt_id: str) -> None:
        self.prompts.pop(prompt_id, None)
        for key in [k for k, v in self.images.items() if v == prompt_id]:
            del self.images[key]


COMFY = web.AppKey("comfy", ComfyState)


def _put(queue: asyncio.Queue, message: dict) -> None:
    with contextlib.suppress(asyncio.QueueFull):  # the socket's writer closes it: a client that reads nothing gets nothing
        queue.put_nowait(message)


def _now_ms() -> int:
    return int(time.time() * 1000)


def output_images(prompt: Prompt, node_id: str, class_type: str, prefix: str) -> list[dict]:
    """The image list of one output node, ComfyUI's file naming: `PREFIX_00001_.png` in the
    output folder (SaveImage), `ComfyUI_temp_xxxxx_00001_.png` in temp (PreviewImage)."""
    if class_type == "PreviewImage":
        return [{"filename": f"ComfyUI_temp_{prompt.id[:5]}_{prompt.number:05d}_.png", "subfolder": "",
                 "type": "temp"}]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in prefix.replace("\\", "/").rsplit("/", 1)[-1])
    return [{"filename": f"{safe.strip('.') or 'ComfyUI'}_{prompt.number:05d}_.png", "subfolder": "",
             "type": "output"}]


# ---- files and nodes


def safe_relative(*parts: str) -> Path | None:
    """A relative path of the given parts, or None if any would leave its folder."""
    path = Path()
    for part in parts:
        if not part:
            continue
        if "\x00" in part or part.startswith(("/", "\\")) or ":" in part:
            return None
        for piece in part.replace("\\", "/").split("/"):
            if piece in ("..",) or (piece.startswith(".") and piece != "."):
                return None
            if piece not in ("", "."):
                path /= piece
    return path


def key_folder(state: ComfyState, owner: str) -> Path:
    """Each key's uploads: a folder of its own under the input folder (the root: shared files)."""
    return state.input_dir / owner.replace("sha256:", KEY_FOLDER_PREFIX)


def find_input(state: ComfyState, owner: str, name: str) -> Path | None:
    name = name.removesuffix(" [input]")
    relative = safe_relative(name)
    if relative is None or not relative.parts:
        return None
    for folder in (key_folder(state, owner), state.input_dir):
        if folder == state.input_dir and relative.parts[0].startswith(KEY_FOLDER_PREFIX):
            continue  # another key's uploads
        path = folder / relative
        if path.is_file():
            return path
    return None


def _files(state: ComfyState, folder: str, owner: str) -> list[str]:
    if folder == "input":
        found = set()
        for root in (key_folder(state, owner), state.input_dir):
            for path in root.rglob("*") if root.is_dir() else ():
                relative = path.relative_to(root)
                if path.is_file() and not (root == state.input_dir and relative.parts[0].startswith(KEY_FOLDER_PREFIX)):
                    found.add(relative.as_posix())
        return sorted(found)
    names = set()
    for sub in MODEL_FOLDERS.get(folder, (folder,)):
        root = state.models_dir / sub
        if root.is_dir():
            names |= {p.name for p in root.iterdir() if not p.name.startswith(".")}
    return sorted(names)


def _input_info(state: ComfyState, spec, owner: str) -> list:
    if spec.is_link:
        return [spec.type, {}]
    if spec.type == "FILE":
        options = {"image_upload": True} if spec.folder == "input" else {}
        return [_files(state, spec.folder, owner), options]
    if spec.type == "COMBO":
        return [list(spec.choices) if spec.choices else list(CLIP_TYPES), {}]
    options = {k: v for k, v in (("min", spec.min), ("max", spec.max)) if v is not None}
    if spec.type == "STRING":
        options["multiline"] = True
    return [spec.type, options]


def object_info_of(state: ComfyState, owner: str) -> dict:
    out = {}
    for name, node in NODES.items():
        required = {k: _input_info(state, s, owner) for k, s in node.inputs.items() if not s.optional}
        optional = {k: _input_info(state, s, owner) for k, s in node.inputs.items() if s.optional}
        description = ("Results equal the diffusers pipeline's with the mapped scheduler (docs/comfy.md), "
                       "not ComfyUI's own k-diffusion sampling" if name in SAMPLER_NODES else "")
        out[name] = {"input": {"required": required, **({"optional": optional} if optional else {})},
                     "input_order": {"required": list(required), **({"optional": list(optional)} if optional else {})},
                     "output": list(node.outputs), "output_is_list": [False] * len(node.outputs),
                     "output_name": list(node.outputs), "name": name, "display_name": name,
                     "description": description, "python_module": "nodes", "category": "lego",
                     "output_node": node.output_node, "deprecated": False, "experimental": False}
    return out




class Follower:
    """Turns one prompt's run events into ComfyUI's messages, to its client's sockets."""

    def __init__(self, state: ComfyState, prompt: Prompt):
        self.state, self.prompt = state, prompt
        self.current: str | None = None
        self.step = 0
        self.started = False

    def emit(self, kind: str, data: dict, history: bool = False) -> None:
        data = {**data, "prompt_id": self.prompt.id} if kind != "status" else data
        self.prompt.sent.append({"type": kind, "data": data})
        if history:
            self.prompt.messages.append([kind, data])
        self.state.send(self.prompt.client_id, kind, data)

    def executing(self, node: str | None) -> None:
        if node != self.current or node is None:
            self.current = node
            self.emit("executing", {"node": node, "display_node": node})

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.emit("execution_start", {"timestamp": _now_ms()}, history=True)
            self.emit("execution_cached", {"nodes": [], "timestamp": _now_ms()}, history=True)

    def on_progress(self, event: dict) -> None:
        self.start()
        kind, prompt = event.get("kind"), self.prompt
        if kind in ("encode", "encode_image", "control_image"):
            self.executing(prompt.encoder)
        elif kind in ("denoise", "denoise_branch", "control", "pipeline"):
            self.executing(prompt.sampler)
            step = int(event.get("step") or 0)
            if step > self.step and kind in ("denoise", "pipeline"):
                self.step = step
                self.emit("progress", {"value": step, "max": int(event.get("total_steps") or step),
                                       "node": prompt.sampler})
        elif kind == "decode":
            self.executing(prompt.decoder)

    def on_end(self, data: dict) -> None:
        prompt, state = self.prompt, data["state"]
        self.start()
        if state == "succeeded":
            prompt.png = prompt.run.png
            for node_id in prompt.outputs:
                self.executing(node_id)
                self.emit("executed", {"node": node_id, "display_node": node_id,
                                       "output": {"images": prompt.images[node_id]}})
            self.emit("execution_success", {"timestamp": _now_ms()}, history=True)
            prompt.status_str = "success"
        else:
            error = data.get("error") or {}
            node = self.current or prompt.sampler
            class_type = prompt.graph.get(node, {}).get("class_type", "") if isinstance(prompt.graph, dict) else ""
            if state == "cancelled":
                self.emit("execution_interrupted", {"node_id": node, "node_type": class_type, "executed": [],
                                                    "timestamp": _now_ms()}, history=True)
            else:
                self.emit("execution_error", {
                    "node_id": node, "node_type": class_type, "executed": [],
                    "exception_message": error.get("message", ""), "exception_type": error.get("code", ""),
                    "traceback": [], "current_inputs": {}, "current_outputs": {}, "timestamp": _now_ms()},
                    history=True)
            prompt.images = {}
            prompt.status_str = "error"
        prompt.ended = time.time()
        self.executing(None)
        prompt.sent = []  # replayed to sockets that connect while the prompt runs only
        self.state.broadcast_status()

    async def follow(self) -> None:
        run, index = self.prompt.run, 0
        try:
            while True:
                while index < len(run.events):
                    event = run.events[index]
                    index += 1
                    if event["event"] == "progress":
                        self.on_progress(event["data"])
                    elif event["event"] == "end":
                        self.on_end(event["data"])
                        return
                changed = run.changed
                if run.done and index >= len(run.events):
                    self.on_end({"state": run.state, "error": run.error})
                    return
                await changed.wait()
        except Exception:  # the prompt must end for its client whatever became of its run
            log.exception("comfy_follow_failed", prompt_id=self.prompt.id)
            if not self.prompt.done:
                self.on_end({"state": "failed", "error": {"code": "internal", "message": "see the gateway's log"}})


def follow(state: ComfyState, prompt: Prompt) -> None:
    task = asyncio.create_task(Follower(state, prompt).follow())
    state.followers.add(task)
    task.add_done_callback(state.followers.discard)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """GET /ws?clientId=ID: a `status` with the queue's length and this socket's sid, then
    the messages of every prompt queued with this client id (those of a prompt in flight
    from its start). Messages from the client are read and ignored, as ComfyUI does."""
    state = request.app[COMFY]
    client_id = request.query.get("clientId") or uuid.uuid4().hex
    ws = web.WebSocketResponse(heartbeat=30.0)
    await ws.prepare(request)
    queue: asyncio.Queue = asyncio.Queue(MAX_SOCKET_BACKLOG)
    _put(queue, {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": state.queue_remaining()}},
                                            "sid": client_id}})
    for prompt in state.prompts.values():
        if prompt.client_id == client_id and not prompt.done:
            for message in prompt.sent:
                _put(queue, message)
    state.sockets.setdefault(client_id, set()).add(queue)
    writer = asyncio.create_task(_write(ws, queue))
    try:
        async for message in ws:
            if message.type == WSMsgType.ERROR:
                break
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        queues = state.sockets.get(client_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del state.sockets[client_id]
        await ws.close()
    return ws


async def _write(ws: web.WebSocketResponse, queue: asyncio.Queue) -> None:
    with contextlib.suppress(ConnectionResetError, RuntimeError):  # the socket went away while we wrote
        while not ws.closed:
            if queue.full():
                await ws.close(code=1008, message=b"too far behind")
                return
            await ws.send_str(json.dumps(await queue.get()))
