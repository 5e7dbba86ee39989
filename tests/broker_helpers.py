"""Helpers shared by the broker-core tests: a small catalog, fake actors and clients
driven through BrokerCore with message objects and explicit `now` (no sockets).

Two small workflows share one denoiser ("den") and one VAE ("vae"): "plain" has one
text encoder and no CFG (1 row per task), "guided" has two text encoders and CFG
(2 rows). Both default to 2 steps at 64x64, so a request is a handful of nodes.
"""

from __future__ import annotations

from collections import deque

from broker import protocol as p
from broker.catalog import parse_catalog
from broker.core.machine import BrokerCore, BrokerSettings, Send

LATER = 10.0  # well past heartbeat_interval_s * heartbeat_misses
CLIENT = b"client-1"
AGENT = b"agent-1"
SETTINGS = BrokerSettings(heartbeat_interval_s=1.0, heartbeat_misses=3, max_task_attempts=3, max_request_restarts=3)

_SMALL = {"steps": {"default": 2}, "width": {"default": 64}, "height": {"default": 64}}
CATALOG_DOC = {
    "models": {
        "enc-a": {"kind": "text_encoder"},
        "enc-b": {"kind": "text_encoder"},
        "den": {"kind": "denoiser"},
        "vae": {"kind": "vae"},
    },
    "workflows": {
        "plain": {"text_encoders": ["enc-a"], "denoiser": "den", "vae": "vae", "cfg": False, "inputs": _SMALL},
        "guided": {"text_encoders": ["enc-a", "enc-b"], "denoiser": "den", "vae": "vae", "cfg": True, "inputs": _SMALL},
    },
}




def make_core(settings: BrokerSettings = SETTINGS, broker_id: str = "broker-test") -> BrokerCore:
    return BrokerCore(parse_catalog(CATALOG_DOC), settings, broker_id=broker_id, seed=1)


def ident(peer: str) -> bytes:
    return peer.encode()


def hello(core, actor_id, model, *, credits=1, max_batch_rows=1, now=0.0, identity: bytes | None = None,
          host="host-1", pid=100) -> list[Send]:
    msg = p.ActorHello(actor_id=actor_id, model=model, device="cpu", host=host, pid=pid, backend="emulated",
                       max_batch_rows=max_batch_rows, data_address=f"tcp://{actor_id}:5600", credits=credits)
    return core.on_backend(identity if identity is not None else ident(actor_id), msg, [], now)


def hello_agent(core, *, host="host-1", now=0.0) -> list[Send]:
    device = p.DeviceInfo("cpu", "cpu", "cpu", 2**30, 2**30)
    return core.on_backend(AGENT, p.AgentHello(AGENT.decode(), host, 7, [device]), [], now)


def standard_actors(core, *, den=("den-1",), den_credits=1, den_rows=1, vae_credits=1, now=0.0) -> list[Send]:
    sends = hello(core, "enc-a-1", "enc-a", max_batch_rows=8, now=now)
    sends += hello(core, "enc-b-1", "enc-b", max_batch_rows=8, now=now)
    sends += hello(core, "vae-1", "vae", credits=vae_credits, max_batch_rows=8, now=now)
    for actor_id in den:
        sends += hello(core, actor_id, "den", credits=den_credits, max_batch_rows=den_rows, now=now)
    return sends


def submit(core, request_id, workflow="plain", *, now=0.0, client=CLIENT, progress=True, **params) -> list[Send]:
    params.setdefault("prompt", "a lego brick")
    return core.on_frontend(client, p.Submit(request_id, workflow, params, progress), [], now)


def image_of(request_id: str) -> bytes:
    return f"pixels of {request_id}".encode()


def result_of(task: p.TaskSpec, payload: list) -> p.TaskResult:
    tensors = []
    if task.return_output:
        frame = image_of(task.request_id)
        tensors = [p.TensorDesc("image", "uint8", [len(frame)], frame=len(payload), nbytes=len(frame))]
        payload.append(frame)
    return p.TaskResult(task.task_id, task.attempt, task.output_id, nbytes=64, tensors=tensors)


def done(core, actor_id, batch: p.Tasks, *, now=0.0, identity: bytes | None = None) -> list[Send]:
    payload: list = []
    results = [result_of(task, payload) for task in batch.tasks]
    who = identity if identity is not None else ident(actor_id)
    return core.on_backend(who, p.BatchDone(batch.batch_id, results, exec_s=0.01), payload, now)


def failed(core, actor_id, batch: p.Tasks, code: str, *, now=0.0) -> list[Send]:
    msg = p.BatchFailed(batch.batch_id, [t.task_id for t in batch.tasks], [t.attempt for t in batch.tasks], code, "boom")
    return core.on_backend(ident(actor_id), msg, [], now)


def run(core, sends, *, now=0.0, dead=()) -> list[Send]:
    """Answer every Tasks in `sends` (and what the answers trigger) except to `dead` actors."""
    seen, todo = [], deque(sends)
    while todo:
        send = todo.popleft()
        seen.append(send)
        if isinstance(send.msg, p.Tasks) and send.identity.decode() not in dead:
            todo.extend(done(core, send.identity.decode(), send.msg, now=now, identity=send.identity))
    return seen


def of(sends, cls, to: bytes | None = None) -> list:
    return [s.msg for s in sends if isinstance(s.msg, cls) and (to is None or s.identity == to)]


def batches(sends, actor_id) -> list[p.Tasks]:
    return of(sends, p.Tasks, ident(actor_id))


def only_batch(sends, actor_id) -> p.Tasks:
    found = batches(sends, actor_id)
    assert len(found) == 1, f"{actor_id} got {len(found)} batches"
    return found[0]


def task_ids(batch: p.Tasks) -> list[str]:
    return [t.task_id for t in batch.tasks]


def freed(sends, actor_id) -> list[str]:
    return [tid for msg in of(sends, p.Free, ident(actor_id)) for tid in msg.tensor_ids]


def started(core, request_id="r1", workflow="plain", *, den=("den-1",), **params) -> tuple[list[Send], p.Tasks]:
    """A request whose encoders are done: returns (all sends so far, the first denoise batch)."""
    sends = submit(core, request_id, workflow, **params) + standard_actors(core, den=den)
    sends = run(core, sends, dead=den)
    (first,) = [b for d in den for b in batches(sends, d)]
    return sends, first


def beat(core, actor_ids, now) -> None:
    """Heartbeats from these actors (so that only the others look silent at the next tick)."""
    for actor_id in actor_ids:
        assert core.on_backend(ident(actor_id), p.Heartbeat(sent_at=now), [], now) == []


def model_stats(core, model, now=0.0) -> p.ModelStats:
    (stats,) = [m for m in core.snapshot(now).models if m.model == model]
    return stats
