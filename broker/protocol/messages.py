"""Every message type on the wire, one class per command.

A message's header is its `to_wire()` map; tensor bytes travel as separate payload
frames referenced by index from `TensorDesc.frame`. Field names ending in `_s` are
seconds, `_bytes` bytes.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, ClassVar

from broker.protocol.constants import MAX_CREDITS, MAX_OMITTED, REQUEST_CONSTANT_PREFIX, Command
from broker.protocol.errors import ErrorCode, ProtocolError
from broker.protocol.structs import Struct, bounded, by_kind, struct
from broker.protocol.tasks import TASK_PARAMS, TaskParams

__all__ = [
    "Message",
    "TensorDesc",
    "TensorRef",
    "TaskSpec",
    "TaskResult",
    "DeviceInfo",
    "InputInfo",
    "WorkflowInfo",
    "ModelStats",
    "WorkflowStats",
    "ActorStats",
    "AgentStats",
    "ActorTelemetry",
    "Histogram",
    "TransferTotals",
    "OutcomeRecord",
    "ActorHello",
    "AgentHello",
    "Welcome",
    "Heartbeat",
    "Credit",
    "Tasks",
    "BatchDone",
    "BatchFailed",
    "Free",
    "Disconnect",
    "SpawnActor",
    "StopActor",
    "AgentEvent",
    "Fetch",
    "FetchReply",
    "Submit",
    "Accepted",
    "Rejected",
    "Progress",
    "Result",
    "Failed",
    "Cancel",
    "ListWorkflows",
    "Workflows",
    "GetStats",
    "Stats",
    "AdminSpawn",
    "AdminReply",
    "AdminStop",
    "AdminConfigure",
    "AdminDrain",
    "AdminReplicas",
    "AdminPause",
    "AdminRegister",
    "Error",
    "MESSAGE_TYPES",
]


class Message(Struct):
    """A struct that is a whole message: it has a command."""

    __slots__ = ()
    COMMAND: ClassVar[Command]


# ---------------------------------------------------------------- nested structs


@struct
class TensorDesc(Struct):
    """One tensor in the payload: raw bytes of `dtype` laid out row-major in `shape`.

    `where` is "frame" (payload frame number `frame`), "shm" (a shared-memory
    segment, `handle`) or "cuda_ipc" (the tensor stays in the holder's GPU memory:
    the `ipc_*` fields, see actors/cuda_ipc.py). Each transport's fields are optional.
    """

    name: str
    dtype: str
    shape: list
    frame: int = -1
    where: str = "frame"
    nbytes: int = 0
    # Element strides when the bytes are a dense layout other than row-major (e.g. a
    # channels-last tensor): kept so the receiver computes with the same layout,
    # since CPU kernels round differently for different layouts. None: row-major.
    strides: list | None = None
    handle: str = ""  # where == "shm": the shared-memory segment holding the bytes
    # where == "cuda_ipc": `strides` are then the view's own (any layout within its
    # storage), and the storage is `ipc_storage_bytes` at `ipc_offset` inside the CUDA
    # allocation that `ipc_handle` opens in another process on the same GPU.
    gpu_uuid: str = ""  # the physical GPU that holds it (device numbers differ per process)
    ipc_handle: bytes = b""
    ipc_offset: int = 0
    ipc_storage_bytes: int = 0
    storage_offset: int = 0  # elements from the storage's start to the view's first element
    # The holder's reference counter for this one share (torch's counter file and slot):
    # the consumer decrements it when it lets go; the holder drops it on FREE regardless.
    ipc_ref: bytes = b""
    ipc_ref_offset: int = 0
    ipc_event: bytes = b""  # recorded after the tensor was produced; empty: the holder synchronized


@struct
class TensorRef(Struct):
    """Where a task's input lives: the output bundle `tensor_id` held by an actor."""

    tensor_id: str
    holder: str
    address: str
    nbytes: int = 0
    host: str = ""  # the holder's host: a peer on the same host may fetch by shared memory
    device: str = ""  # the holder's device (an emulated fetch is priced by path: actors/backends/emulated.py)


@struct
class TaskSpec(Struct):
    """One node task as an actor sees it."""

    task_id: str
    request_id: str
    attempt: int
    node: str
    kind: str  # a TaskKind value (broker/protocol/tasks.py): encode, denoise, decode, ...
    model: str
    workflow: str
    rows: int
    shape: list  # [height, width] of the image this task works on
    # The kind's params struct (TASK_PARAMS[kind]); on the wire, its map. An unknown kind
    # is refused at decode, naming `kind`.
    params: TaskParams = by_kind("kind", TASK_PARAMS)
    inputs: list[TensorRef]
    output_id: str
    return_output: bool = False
    # Tensors the client sent with the request (an img2img image), as payload frames
    # of this TASKS message; forwarded by the broker without reading them.
    tensors: list[TensorDesc] = field(default_factory=list)


@struct
class TaskResult(Struct):
    task_id: str
    attempt: int
    output_id: str
    nbytes: int = 0
    tensors: list[TensorDesc] = field(default_factory=list)  # only for return_output tasks


@struct
class DeviceInfo(Struct):
    device: str  # cpu | cuda:N | emu:N
    kind: str  # cpu | cuda | emulated
    name: str
    memory_bytes: int
    free_bytes: int


@struct
class InputInfo(Struct):
    name: str
    type: str
    required: bool = False
    default: Any = None
    min: Any = None
    max: Any = None
    choices: list | None = None
    description: str = ""


@struct
class WorkflowInfo(Struct):
    name: str
    description: str
    models: list
    inputs: list[InputInfo]
    output: str
    registered: bool = False  # registered at run time (ADMIN_REGISTER), not read from a catalog file


@struct
class ActorTelemetry(Struct):
    """Counters an actor reports with each heartbeat (cumulative since start)."""

    batches: int = 0
    tasks: int = 0
    rows: int = 0
    busy_s: float = 0.0
    fetches: int = 0
    fetched_bytes: int = 0
    shm_fetches: int = 0  # of `fetches`, those answered through shared memory
    fetch_fallbacks: int = 0  # shared-memory fetches that failed and went by frames instead
    shm_segments: int = 0  # segments this actor holds for its peers now
    ipc_fetches: int = 0  # of `fetches`, those answered (at least partly) through CUDA IPC
    ipc_fallbacks: int = 0  # CUDA IPC transfers that failed (either side) and went by shm/frames instead
    ipc_pins: int = 0  # CUDA IPC shares this actor holds for its peers now (dropped on FREE)
    # Of `fetched_bytes`, those that came through shared memory / CUDA IPC (the rest came
    # as frames); an actor that does not count them reports 0.
    shm_bytes: int = 0
    ipc_bytes: int = 0
    stored_tensors: int = 0
    stored_bytes: int = 0
    memory_used_bytes: int = 0
    adapter_switch_s: float = 0.0  # of `busy_s`, the time spent switching LoRA adapter sets
    # Request constants used from this actor's cache instead of fetched again (not in `fetched_bytes`)
    reused_bytes: int = 0


@struct
class ModelStats(Struct):
    model: str
    queue_depth: int
    actors: int
    tasks_done: int
    batches: int
    mixed_workflow_batches: int
    workflows: list
    # Load, in device-seconds from the profile cost model (0 where a model has no profile).
    ready_s: float = 0.0  # of the ready tasks in its queue, at full-batch cost
    pending_s: float = 0.0  # of every unfinished task of live requests
    arrival_rate: float = 0.0  # requests/s that need it (exponentially weighted)
    work_per_request_s: float = 0.0
    min_slack_s: float | None = None  # least time to deadline among requests queued here
    service_s: float = 0.0  # recent mean dispatch-to-done time of a task
    oldest_wait_s: float = 0.0  # how long the longest-waiting ready task has waited


@struct
class WorkflowStats(Struct):
    workflow: str
    submitted: int = 0
    completed: int = 0
    slo_met: int = 0
    rejected: int = 0
    failed: int = 0
    slo_s: float = 0.0  # the objective of a request with default parameters (0: none known)
    solo_s: float = 0.0
    latency_mode: int = 0  # requests that ran their CFG branches on two actors
    paused: bool = False  # an operator paused its admission: new submissions are rejected
    # Lookahead admission's learned factor: its estimates are stretched by this much
    # (1.0: none learned yet, or its requests ran as predicted)
    admission_factor: float = 1.0


@struct
class ActorStats(Struct):
    actor_id: str
    model: str
    host: str
    device: str
    state: str
    credits: int
    in_flight: int
    batches: int
    tasks: int
    mixed_workflow_batches: int
    max_batch_rows_seen: int
    held_tensors: int
    telemetry: ActorTelemetry | None = None
    pid: int = 0
    backend: str = ""
    # state "draining" means no new work: by an operator's drain (kept alive, can be
    # undrained) or on its way out (`stopping`: its agent stops it once it holds nothing).
    stopping: bool = False
    adapter_switches: int = 0  # LoRA adapter-set switches the broker sent it into
    data_address: str = ""  # where peers fetch its outputs (other hosts need it routable)


@struct
class AgentStats(Struct):
    agent_id: str
    host: str
    devices: list[DeviceInfo]
    actors: list


@struct
class Histogram(Struct):
    """Cumulative observations of one quantity (seconds) since the broker started.

    `counts[i]` counts observations in (bounds[i-1], bounds[i]]; the last entry, one
    past `bounds`, those above every bound. `labels` say what was observed.
    """

    labels: dict
    bounds: list
    counts: list
    sum: float = 0.0
    count: int = 0


@struct
class TransferTotals(Struct):
    """Bytes task inputs moved by each path since the broker started (cumulative, so
    that they only grow: folded in from each actor's heartbeat telemetry as deltas)."""

    local_bytes: int = 0  # the input was held by the actor that ran the task: no copy
    frames_bytes: int = 0  # fetched as frames over the holder's data socket
    shm_bytes: int = 0  # fetched through shared memory (same host)
    ipc_bytes: int = 0  # opened through CUDA IPC (same host and GPU)
    reused_bytes: int = 0  # request constants an actor had fetched before for the request: not moved again
    fetches: int = 0
    shm_fallbacks: int = 0  # shared-memory fetches that went by frames instead
    ipc_fallbacks: int = 0  # CUDA IPC transfers that went by shared memory or frames instead


@struct
class OutcomeRecord(Struct):
    """A request the broker refused or failed, for operators (`Stats.recent_outcomes`)."""

    time: float  # the broker's clock, as `Stats.time`
    kind: str  # rejected | failed
    request_id: str
    workflow: str
    code: str  # an ErrorCode value: the reason
    message: str
    field: str | None = None


# ------------------------------------------------------- peer <-> broker (backend)


@struct
class ActorHello(Message):
    COMMAND: ClassVar[Command] = Command.ACTOR_HELLO
    actor_id: str
    model: str
    device: str
    host: str
    pid: int
    backend: str
    max_batch_rows: int
    data_address: str
    credits: int
    capabilities: list = field(default_factory=list)
    memory_bytes: int = 0


@struct
class AgentHello(Message):
    COMMAND: ClassVar[Command] = Command.AGENT_HELLO
    agent_id: str
    host: str
    pid: int
    devices: list[DeviceInfo]


@struct
class Welcome(Message):
    COMMAND: ClassVar[Command] = Command.WELCOME
    broker_id: str
    heartbeat_interval_s: float
    heartbeat_misses: int


@struct
class Heartbeat(Message):
    COMMAND: ClassVar[Command] = Command.HEARTBEAT
    sent_at: float = 0.0
    telemetry: ActorTelemetry | None = None
    # Set by an actor, whose pings come from a control socket apart from its work
    # socket; the broker answers each ping with a heartbeat on that socket. `session`
    # is the work socket's routing id: a ping for a session the broker no longer
    # knows is answered with DISCONNECT.
    actor_id: str = ""
    session: str = ""


@struct
class Credit(Message):
    """The actor can take `credits` more batches."""

    COMMAND: ClassVar[Command] = Command.CREDIT
    credits: int = bounded(0, MAX_CREDITS)


@struct
class Tasks(Message):
    """A batch of compatible tasks for one actor; costs the actor one credit."""

    COMMAND: ClassVar[Command] = Command.TASKS
    batch_id: int
    tasks: list[TaskSpec]


@struct
class BatchDone(Message):
    """A batch ran; each output stays in the actor's store unless returned.

    Finishing a batch gives back the credit it took (`credits`, normally 1).
    """

    COMMAND: ClassVar[Command] = Command.BATCH_DONE
    batch_id: int
    results: list[TaskResult]
    exec_s: float = 0.0
    credits: int = 1
    # Tasks not run because an input could not be had (its holder freed or lost it);
    # the rest of the batch ran. `missing_reason` says why, for the log.
    missing: list = field(default_factory=list)
    missing_reason: str = ""


@struct
class BatchFailed(Message):
    COMMAND: ClassVar[Command] = Command.BATCH_FAILED
    batch_id: int
    task_ids: list
    attempts: list
    code: str
    message: str
    credits: int = 1


@struct
class Free(Message):
    COMMAND: ClassVar[Command] = Command.FREE
    tensor_ids: list


@struct
class Disconnect(Message):
    COMMAND: ClassVar[Command] = Command.DISCONNECT
    reason: str


@struct
class SpawnActor(Message):
    COMMAND: ClassVar[Command] = Command.SPAWN_ACTOR
    spawn_id: str
    model: str
    device: str
    backend: str
    max_batch_rows: int = 8
    options: dict | None = None  # backend-specific settings (strings/numbers only)


@struct
class StopActor(Message):
    COMMAND: ClassVar[Command] = Command.STOP_ACTOR
    actor_id: str


@struct
class AgentEvent(Message):
    """started | exited | refused, for an actor process the agent manages."""

    COMMAND: ClassVar[Command] = Command.AGENT_EVENT
    spawn_id: str
    event: str
    actor_id: str = ""
    pid: int = 0
    returncode: int | None = None
    message: str = ""
    devices: list[DeviceInfo] = field(default_factory=list)


# ------------------------------------------------------------ actor <-> actor (data)


@struct
class Fetch(Message):
    COMMAND: ClassVar[Command] = Command.FETCH
    tensor_id: str
    request_id: str = ""
    shm: bool = False  # same host: answer with shared-memory segments instead of frames
    # The consumer's GPU (CUDA UUID), sent by a CUDA actor on the holder's host: CUDA
    # tensors held on that same GPU are answered with IPC handles instead of bytes.
    gpu_uuid: str = ""
    # Request constants (REQUEST_CONSTANT_PREFIX) of this request the asker holds already:
    # the holder leaves them out and names what it left out in `FetchReply.omitted`.
    omit: list = field(default_factory=list)
    # False: the asker's task reads no request constant (KINDS_WITHOUT_CONSTANTS), so the
    # holder leaves every one out (named in `omitted` as well).
    constants: bool = True

    def check(self, where: str) -> None:
        _check_constant_names(self.omit, where + "omit")


@struct
class FetchReply(Message):
    COMMAND: ClassVar[Command] = Command.FETCH_REPLY
    tensor_id: str
    tensors: list[TensorDesc]
    omitted: list = field(default_factory=list)  # of the bundle's tensors, those left out (`Fetch.omit`)

    def check(self, where: str) -> None:
        _check_constant_names(self.omitted, where + "omitted")


def _check_constant_names(names: list, where: str) -> None:
    if len(names) > MAX_OMITTED:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"at most {MAX_OMITTED} names", where)
    if any(n.__class__ is not str or not n.startswith(REQUEST_CONSTANT_PREFIX) for n in names):
        raise ProtocolError(ErrorCode.BAD_HEADER, f"names of request constants ({REQUEST_CONSTANT_PREFIX}...) only",
                            where)


# ----------------------------------------------------- client <-> broker (frontend)


@struct
class Submit(Message):
    COMMAND: ClassVar[Command] = Command.SUBMIT
    request_id: str
    workflow: str
    params: dict
    progress: bool = True
    tensors: list[TensorDesc] = field(default_factory=list)  # tensor inputs, in payload frames


@struct
class Accepted(Message):
    COMMAND: ClassVar[Command] = Command.ACCEPTED
    request_id: str
    nodes: int
    steps: int
    params: dict  # the validated parameters, defaults filled in


@struct
class Rejected(Message):
    COMMAND: ClassVar[Command] = Command.REJECTED
    request_id: str
    code: str
    message: str
    field: str | None = None
    retry_after_s: float = 0.0  # admission refusals: when the queued work should have drained


@struct
class Progress(Message):
    COMMAND: ClassVar[Command] = Command.PROGRESS
    request_id: str
    node: str
    kind: str
    step: int
    total_steps: int
    done_nodes: int
    total_nodes: int
    actor_id: str = ""


@struct
class Result(Message):
    COMMAND: ClassVar[Command] = Command.RESULT
    request_id: str
    tensors: list[TensorDesc]
    latency_s: float
    attempts: int = 1


@struct
class Failed(Message):
    COMMAND: ClassVar[Command] = Command.FAILED
    request_id: str
    code: str
    message: str


@struct
class Cancel(Message):
    COMMAND: ClassVar[Command] = Command.CANCEL
    request_id: str


@struct
class ListWorkflows(Message):
    COMMAND: ClassVar[Command] = Command.LIST_WORKFLOWS
    call_id: str = ""  # echoed in the reply, so a client routes answers by it


@struct
class Workflows(Message):
    COMMAND: ClassVar[Command] = Command.WORKFLOWS
    workflows: list[WorkflowInfo]
    call_id: str = ""


@struct
class GetStats(Message):
    COMMAND: ClassVar[Command] = Command.GET_STATS
    call_id: str = ""


@struct
class Stats(Message):
    """The broker's telemetry snapshot."""

    COMMAND: ClassVar[Command] = Command.STATS
    time: float
    models: list[ModelStats]
    actors: list[ActorStats]
    agents: list[AgentStats]
    counters: dict
    hop_latency_s: dict  # {"p50": .., "p99": .., "count": ..} over recent tasks
    call_id: str = ""
    workflows: list[WorkflowStats] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # the broker's live policy knobs
    plan: dict | None = None  # what the scheduler last posted (targets, recent decisions)
    # Operator settings: model -> {"min": n | None, "max": n | None} replicas (the
    # scheduler honours them over its own flags); workflows whose admission is paused.
    replica_bounds: dict = field(default_factory=dict)
    paused_workflows: list = field(default_factory=list)
    recent_outcomes: list[OutcomeRecord] = field(default_factory=list)  # newest last, bounded
    # Cumulative, for metrics: rejections / failures by reason (ErrorCode value),
    # task latency (dispatch to done) by model and mode (the task kind), request latency by workflow,
    # bytes moved by transfer path, and the broker loop's lag behind its timer.
    rejections: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)
    task_latency: list[Histogram] = field(default_factory=list)
    request_latency: list[Histogram] = field(default_factory=list)
    transfers: TransferTotals | None = None
    loop_lag: Histogram | None = None


@struct
class AdminSpawn(Message):
    """Ask the agent on `host` (any agent if empty) to start actors."""

    COMMAND: ClassVar[Command] = Command.ADMIN_SPAWN
    model: str
    device: str
    backend: str
    host: str = ""
    count: int = 1
    max_batch_rows: int = 8
    options: dict | None = None
    call_id: str = ""


@struct
class AdminReply(Message):
    COMMAND: ClassVar[Command] = Command.ADMIN_REPLY
    ok: bool
    message: str
    spawn_ids: list = field(default_factory=list)
    call_id: str = ""
    field: str | None = None  # a refusal: the offending field of the request


@struct
class AdminStop(Message):
    """Drain an actor (no new work; its held outputs stay served) and then stop it."""

    COMMAND: ClassVar[Command] = Command.ADMIN_STOP
    actor_id: str
    call_id: str = ""


@struct
class AdminConfigure(Message):
    """Set the broker's live policy knobs (`settings`: admission, slo_multiple,
    cfg_split) and/or post the scheduler's plan for `lego status` (`plan`)."""

    COMMAND: ClassVar[Command] = Command.ADMIN_CONFIGURE
    settings: dict = field(default_factory=dict)
    plan: dict | None = None
    call_id: str = ""


@struct
class AdminDrain(Message):
    """Stop (`drained`) or resume dispatching to an actor; it stays alive either way."""

    COMMAND: ClassVar[Command] = Command.ADMIN_DRAIN
    actor_id: str
    drained: bool = True
    call_id: str = ""


@struct
class AdminReplicas(Message):
    """Set a model's replica bounds for the scheduler; None: no operator bound (the
    scheduler's own flags apply)."""

    COMMAND: ClassVar[Command] = Command.ADMIN_REPLICAS
    model: str
    min: int | None = None
    max: int | None = None
    call_id: str = ""


@struct
class AdminPause(Message):
    """Pause (`paused`) or resume admission of a workflow's new requests."""

    COMMAND: ClassVar[Command] = Command.ADMIN_PAUSE
    workflow: str
    paused: bool = True
    call_id: str = ""


@struct
class AdminRegister(Message):
    """Register a workflow at run time: `definition` is the table a catalog file holds
    under `[workflows.NAME]` (broker/catalog/files.py parses both), over models the
    broker's catalog declares already. Registering an identical definition again is a
    no-op; the broker journals what it registers and restores it when it restarts."""

    COMMAND: ClassVar[Command] = Command.ADMIN_REGISTER
    name: str
    definition: dict
    call_id: str = ""


@struct
class Error(Message):
    COMMAND: ClassVar[Command] = Command.ERROR
    code: str
    message: str
    field: str | None = None
    request_id: str | None = None


MESSAGE_TYPES: dict[Command, type[Message]] = {
    cls.COMMAND: cls
    for cls in globals().copy().values()
    if isinstance(cls, type) and issubclass(cls, Message) and cls is not Message
}
if len(MESSAGE_TYPES) != len(Command):  # a programming error, caught at import
    raise RuntimeError("every protocol command needs exactly one message class")
