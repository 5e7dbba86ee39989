"""The wire protocol without sockets: codec round trips, tensor payloads, limits, leafness."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch

from broker import protocol as p
from broker.protocol import PROTOCOL_TAG, Command, ErrorCode, Limits, ProtocolError, decode, encode
from broker.protocol.constants import DEFAULT_LIMITS
from broker.protocol.tensors import ITEMSIZE, check_payload, pack_torch, unpack_torch

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ helpers

LATENT = p.TensorDesc(name="latent", dtype="bfloat16", shape=[1, 4, 8, 8], frame=0, where="frame", nbytes=512)
IMAGE = p.TensorDesc(name="image", dtype="uint8", shape=[2, 2, 3], frame=1, nbytes=12)
REF = p.TensorRef(tensor_id="r1/denoise/0@0", holder="den-1", address="tcp://10.0.0.1:5600", nbytes=512)
TASK = p.TaskSpec(
    task_id="r1/denoise/1", request_id="r1", attempt=2, node="denoise/1", kind="denoise",
    model="Flux1Schnell", workflow="flux-schnell-txt2img-cfg", rows=2, shape=[1024, 1024],
    params=p.DenoiseParams(step=1, steps=4, first=False, seed=7, sampler="default", guidance=7.5), inputs=[REF],
    output_id="r1/denoise/1@2", return_output=True,
)
DEVICE = p.DeviceInfo(device="cuda:0", kind="cuda", name="H100", memory_bytes=80 * 2**30, free_bytes=70 * 2**30)
TELEMETRY = p.ActorTelemetry(batches=3, tasks=5, rows=7, busy_s=1.25, fetches=2, fetched_bytes=1024,
                             stored_tensors=1, stored_bytes=512, memory_used_bytes=4096)
STEPS_INPUT = p.InputInfo(name="steps", type="int", required=False, default=20, min=1, max=100,
                          choices=[4, 20], description="denoising steps")
LATENT_FRAME = bytes(range(256)) * 2
IMAGE_FRAME = b"\x01\x02\x03" * 4

# One valid instance of every message class (every list field a list, so that equality is exact),
# with the payload frames it carries.
SAMPLES: dict[type, tuple[p.Message, list]] = {
    p.ActorHello: (p.ActorHello(actor_id="den-1", model="Flux1Schnell", device="cuda:0", host="gpu-7", pid=4242,
                                backend="emulated", max_batch_rows=8, data_address="tcp://10.0.0.1:5600", credits=2,
                                capabilities=["bf16", "cuda_ipc"], memory_bytes=2**34), []),
    p.AgentHello: (p.AgentHello(agent_id="agent-1", host="gpu-7", pid=17, devices=[DEVICE]), []),
    p.Welcome: (p.Welcome(broker_id="broker-1", heartbeat_interval_s=0.5, heartbeat_misses=4), []),
    p.Heartbeat: (p.Heartbeat(sent_at=12.5, telemetry=TELEMETRY), []),
    p.Credit: (p.Credit(credits=3), []),
    p.Tasks: (p.Tasks(batch_id=9, tasks=[TASK]), []),
    p.BatchDone: (p.BatchDone(batch_id=9, results=[p.TaskResult(task_id="r1/decode", attempt=0, output_id="r1/decode@0",
                                                                nbytes=512, tensors=[LATENT])],
                              exec_s=0.25, credits=1), [LATENT_FRAME]),
    p.BatchFailed: (p.BatchFailed(batch_id=9, task_ids=["r1/denoise/1"], attempts=[2], code="input_unavailable",
                                  message="holder gone", credits=1), []),
    p.Free: (p.Free(tensor_ids=["r1/denoise/0@0", "r1/encode/T5@0"]), []),
    p.Disconnect: (p.Disconnect(reason="declared dead"), []),
    p.SpawnActor: (p.SpawnActor(spawn_id="agent-1-1", model="Flux1Schnell", device="cuda:1", backend="diffusers",
                                max_batch_rows=4, options={"compile": 1, "mode": "max"}), []),
    p.StopActor: (p.StopActor(actor_id="den-1"), []),
    p.AgentEvent: (p.AgentEvent(spawn_id="agent-1-1", event="exited", actor_id="den-1", pid=99, returncode=-9,
                                message="killed", devices=[DEVICE]), []),
    p.Fetch: (p.Fetch(tensor_id="r1/denoise/0@0", request_id="r1"), []),
    p.FetchReply: (p.FetchReply(tensor_id="r1/denoise/0@0", tensors=[LATENT, IMAGE]), [LATENT_FRAME, IMAGE_FRAME]),
    p.Submit: (p.Submit(request_id="r1", workflow="sd15-txt2img",
                        params={"prompt": "a lego castle", "steps": 4, "guidance": 7.5}, progress=False), []),
    p.Accepted: (p.Accepted(request_id="r1", nodes=7, steps=4, params={"prompt": "x", "seed": 2**40}), []),
    p.Rejected: (p.Rejected(request_id="r1", code="invalid_param", message="too many", field="params.steps"), []),
    p.Progress: (p.Progress(request_id="r1", node="denoise/1", kind="denoise", step=2, total_steps=4, done_nodes=4,
                            total_nodes=7, actor_id="den-1"), []),
    p.Result: (p.Result(request_id="r1", tensors=[LATENT, IMAGE], latency_s=1.5, attempts=2), [LATENT_FRAME, IMAGE_FRAME]),
    p.Failed: (p.Failed(request_id="r1", code="cancelled", message="cancelled by the client"), []),
    p.Cancel: (p.Cancel(request_id="r1"), []),
    p.ListWorkflows: (p.ListWorkflows(), []),
    p.Workflows: (p.Workflows(workflows=[p.WorkflowInfo(name="sd15-txt2img", description="SD 1.5",
                                                        models=["CLIP_SD15", "StableDiffusion15"],
                                                        inputs=[STEPS_INPUT], output="image")]), []),
    p.GetStats: (p.GetStats(), []),
    p.Stats: (p.Stats(
        time=100.5,
        models=[p.ModelStats(model="den", queue_depth=3, actors=2, tasks_done=10, batches=4,
                             mixed_workflow_batches=1, workflows=["a", "b"])],
        actors=[p.ActorStats(actor_id="den-1", model="den", host="h", device="cuda:0", state="busy", credits=0,
                             in_flight=2, batches=4, tasks=10, mixed_workflow_batches=1, max_batch_rows_seen=3,
                             held_tensors=1, telemetry=TELEMETRY)],
        agents=[p.AgentStats(agent_id="agent-1", host="h", devices=[DEVICE], actors=[["agent-1-1", "started"]])],
        counters={"requests_submitted": 3},
        hop_latency_s={"count": 2, "p50": 0.01, "p99": 0.02, "max": 0.03},
        replica_bounds={"den": {"min": 1, "max": None}}, paused_workflows=["a"],
        recent_outcomes=[p.OutcomeRecord(99.0, "rejected", "r9", "a", "paused", "paused", "workflow")],
        rejections={"paused": 1}, task_latency=[p.Histogram({"model": "den", "mode": "denoise"}, [0.1, 1.0], [1, 0, 2], 5.5, 3)],
        transfers=p.TransferTotals(local_bytes=10, frames_bytes=20, ipc_fallbacks=1),
    ), []),
    p.AdminSpawn: (p.AdminSpawn(model="den", device="cuda:0", backend="emulated", host="gpu-7", count=2,
                                max_batch_rows=4, options={"scale": 0.5}), []),
    p.AdminReply: (p.AdminReply(ok=True, message="asked agent-1", spawn_ids=["agent-1-1", "agent-1-2"]), []),
    p.AdminStop: (p.AdminStop(actor_id="den@h/emu:0#b-1", call_id="c-9"), []),
    p.AdminConfigure: (p.AdminConfigure(settings={"admission": True, "slo_multiple": 2.5},
                                        plan={"targets": {"den": 3}, "decisions": ["up: den"]}), []),
    p.AdminDrain: (p.AdminDrain(actor_id="den-1", drained=False, call_id="c-1"), []),
    p.AdminReplicas: (p.AdminReplicas(model="den", min=1, max=None, call_id="c-2"), []),
    p.AdminPause: (p.AdminPause(workflow="sd15-txt2img", paused=True, call_id="c-3"), []),
    p.AdminRegister: (p.AdminRegister(name="my-sd15", definition={
        "text_encoders": ["CLIP_SD15"], "denoiser": "StableDiffusion15", "vae": "StableDiffusion15VAE", "cfg": True,
        "inputs": {"steps": {"default": 8, "max": 50}, "sampler": {"choices": ["euler", "ddim"]}}}, call_id="c-4"), []),
    p.Error: (p.Error(code="bad_header", message="Credit.credits has type str", field="credits", request_id="r1"), []),
}


def on_wire(frames: list) -> list[bytes]:
    """What a receiver sees: every frame as plain bytes (copies of whatever was sent)."""
    return [bytes(f) for f in frames]


def frames_of(command: Command, header, *payload) -> list[bytes]:
    """Hand-built frames: tag, command, a header (packed unless already bytes), payload."""
    raw = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    return [PROTOCOL_TAG, command.value, raw, *payload]


def decode_error(frames: list, limits: Limits = DEFAULT_LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frames, limits)
    return info.value


def sample_tensor(dtype: str) -> torch.Tensor:
    """A 3x4 tensor of `dtype` whose values are all exactly representable in it."""
    base = torch.arange(12).reshape(3, 4)
    if dtype == "bool":
        return base % 3 == 0
    if dtype.startswith("float") or dtype == "bfloat16":
        t = (base - 6).to(torch.float64) / 4
        t[0, 0] = float("inf")
        return t.to(getattr(torch, dtype))
    if dtype == "uint8":
        return (base * 21).to(torch.uint8)
    return (base - 6).to(getattr(torch, dtype)) * (2 ** (ITEMSIZE[dtype] * 8 - 5))


def wire_round_trip(tensor: torch.Tensor) -> tuple[p.TensorDesc, torch.Tensor]:
    """Pack, send inside a FetchReply as bytes frames, decode, check and unpack."""
    desc, buf = pack_torch("t", tensor, 0)
    frames = encode(p.FetchReply(tensor_id="x", tensors=[desc]), [buf])
    assert len(frames) == 4
    msg, payload = decode(on_wire(frames))
    check_payload(msg.tensors, payload)
    return msg.tensors[0], unpack_torch(msg.tensors[0], payload[0])


# ------------------------------------------------------------------ message round trips


@pytest.mark.parametrize("command", list(Command), ids=lambda c: c.name)
def test_every_message_round_trips(command):
    cls = p.MESSAGE_TYPES[command]
    msg, payload = SAMPLES[cls]
    assert type(msg) is cls

    frames = encode(msg, payload)

    assert len(frames) == 3 + len(payload)
    assert frames[0] == PROTOCOL_TAG
    assert frames[1] == command.value
    decoded, got_payload = decode(on_wire(frames))
    assert type(decoded) is cls
    assert decoded == msg
    assert got_payload == payload


def test_every_command_has_one_sample_and_class():
    assert set(p.MESSAGE_TYPES) == set(Command)
    assert set(SAMPLES) == set(p.MESSAGE_TYPES.values())


def test_payload_frames_pass_through_decode_unopened():
    msg, payload = SAMPLES[p.Result]
    frames = encode(msg, [bytearray(f) for f in payload])
    _, got = decode(frames)
    assert len(got) == 2
    assert all(a is b for a, b in zip(got, frames[3:], strict=True))


def test_nested_structs_come_back_typed():
    decoded, _ = decode(on_wire(encode(*SAMPLES[p.Tasks])))
    task = decoded.tasks[0]
    assert isinstance(task, p.TaskSpec)
    assert isinstance(task.inputs[0], p.TensorRef)
    assert task.inputs[0].address == "tcp://10.0.0.1:5600"
    stats, _ = decode(on_wire(encode(*SAMPLES[p.Stats])))
    assert isinstance(stats.actors[0].telemetry, p.ActorTelemetry)
    assert isinstance(stats.agents[0].devices[0], p.DeviceInfo)


def test_optional_fields_may_be_none():
    msg = p.Error(code="internal", message="boom")
    decoded, _ = decode(on_wire(encode(msg)))
    assert decoded.field is None and decoded.request_id is None
    beat, _ = decode(on_wire(encode(p.Heartbeat(sent_at=1.0))))
    assert beat.telemetry is None


def test_default_constructed_messages_round_trip_equal():
    # list fields left at their defaults must come back equal, not as a different container type
    for msg in (p.AdminReply(ok=True, message="ok"),
                p.BatchDone(batch_id=1, results=[p.TaskResult(task_id="t", attempt=0, output_id="o")]),
                p.AgentEvent(spawn_id="s", event="started")):
        decoded, _ = decode(on_wire(encode(msg)))
        assert decoded == msg


def test_unknown_header_fields_are_ignored():
    frames = frames_of(Command.CREDIT, {"credits": 2, "priority": "high", "future": {"a": [1, 2]}})
    msg, _ = decode(frames)
    assert msg == p.Credit(credits=2)


# ------------------------------------------------------------------ tensors


@pytest.mark.parametrize("dtype", list(ITEMSIZE))
def test_tensor_round_trip_every_dtype(dtype):
    tensor = sample_tensor(dtype)
    assert str(tensor.dtype) == f"torch.{dtype}"

    desc, out = wire_round_trip(tensor)

    assert desc.dtype == dtype
    assert desc.shape == [3, 4]
    assert desc.nbytes == 12 * ITEMSIZE[dtype] == tensor.numel() * tensor.element_size()
    assert out.dtype == tensor.dtype
    assert torch.equal(out, tensor)


@pytest.mark.parametrize("view", ["transpose", "column_slice", "step_slice"])
def test_tensor_round_trip_non_contiguous(view):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    tensor = {"transpose": base.t(), "column_slice": base[:, 3:7], "step_slice": base[::2, ::3]}[view]
    assert not tensor.is_contiguous()

    desc, out = wire_round_trip(tensor)

    assert desc.shape == list(tensor.shape)
    assert desc.nbytes == tensor.numel() * 4
    assert torch.equal(out, tensor)


def test_tensor_round_trip_bfloat16_transposed():
    tensor = (torch.arange(24, dtype=torch.float32) / 8).to(torch.bfloat16).reshape(4, 6).t()
    _, out = wire_round_trip(tensor)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, tensor)


def test_tensor_round_trip_zero_dim():
    tensor = torch.tensor(-2.75, dtype=torch.float64)
    desc, out = wire_round_trip(tensor)
    assert desc.shape == []
    assert desc.nbytes == 8
    assert out.dim() == 0
    assert torch.equal(out, tensor)


def test_tensor_round_trip_empty():
    tensor = torch.empty(0, 3, dtype=torch.int32)
    desc, buf = pack_torch("empty", tensor, 0)
    assert desc.shape == [0, 3]
    assert desc.nbytes == 0
    assert memoryview(buf).nbytes == 0

    _, out = wire_round_trip(tensor)

    assert out.shape == (0, 3)
    assert out.dtype == torch.int32
    assert torch.equal(out, tensor)


def test_pack_contiguous_tensor_does_not_copy():
    tensor = torch.zeros(8, dtype=torch.float32)
    _, buf = pack_torch("t", tensor, 0)
    tensor[2] = 1.5
    assert bytes(memoryview(buf).cast("B")[8:12]) == struct.pack("<f", 1.5)


def test_pack_contiguous_view_with_offset_does_not_copy():
    base = torch.zeros(4, 4, dtype=torch.int16)
    view = base[1:3]  # contiguous, but starts inside its storage
    assert view.is_contiguous()
    desc, buf = pack_torch("t", view, 0)
    base[1, 0] = 7
    assert desc.nbytes == 16
    assert bytes(memoryview(buf).cast("B")[:2]) == struct.pack("<h", 7)


def test_unpack_aliases_an_aligned_frame():
    tensor = torch.arange(4, dtype=torch.int32)
    desc, buf = pack_torch("t", tensor, 0)
    frame = memoryview(torch.zeros(64, dtype=torch.uint8).numpy())[:16]  # torch's allocations: 64-byte aligned
    frame[:] = bytes(buf)
    out = unpack_torch(desc, frame)
    frame[0:4] = struct.pack("<i", 99)
    assert out[0].item() == 99  # no copy (a misaligned frame is copied: tests/test_request_constants.py)


def test_tensor_payload_in_zmq_frames():
    zmq = pytest.importorskip("zmq")
    tensor = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    desc, buf = pack_torch("t", tensor, 0)
    frames = [zmq.Frame(f) for f in on_wire(encode(p.FetchReply(tensor_id="x", tensors=[desc]), [buf]))]
    msg, payload = decode(frames)
    check_payload(msg.tensors, payload)
    assert torch.equal(unpack_torch(msg.tensors[0], payload[0]), tensor)


def test_check_payload_accepts_matching_frames():
    descs = [p.TensorDesc("a", "float32", [2, 3], frame=1), p.TensorDesc("b", "bfloat16", [4], frame=0)]
    check_payload(descs, [b"\0" * 8, bytearray(24)])  # does not raise
    check_payload([p.TensorDesc("e", "int64", [0, 5], frame=0)], [b""])


def test_check_payload_rejects_wrong_size():
    descs = [p.TensorDesc("a", "float32", [2, 3], frame=0)]
    with pytest.raises(ProtocolError) as info:
        check_payload(descs, [b"\0" * 23])
    assert info.value.code is ErrorCode.BAD_FRAMES
    assert info.value.field == "tensors[0]"


@pytest.mark.parametrize("frame", [1, 5, -1])
def test_check_payload_rejects_frame_out_of_range(frame):
    descs = [p.TensorDesc("ok", "uint8", [1], frame=0), p.TensorDesc("a", "uint8", [1], frame=frame)]
    with pytest.raises(ProtocolError) as info:
        check_payload(descs, [b"x"])
    assert info.value.code is ErrorCode.BAD_FRAMES
    assert info.value.field == "tensors[1].frame"


def test_check_payload_rejects_unknown_dtype_and_location():
    with pytest.raises(ProtocolError) as info:
        check_payload([p.TensorDesc("a", "complex64", [1], frame=0)], [b"\0" * 8])
    assert info.value.field == "dtype"
    with pytest.raises(ProtocolError) as info:
        check_payload([p.TensorDesc("a", "uint8", [1], frame=0, where="cuda_ipc")], [b"x"])
    assert info.value.field == "tensors[0].where"


# ------------------------------------------------------------------ limits and malformed input


def test_decode_rejects_fewer_than_three_frames():
    for frames in ([], [PROTOCOL_TAG], [PROTOCOL_TAG, Command.CREDIT.value]):
        err = decode_error(frames)
        assert err.code is ErrorCode.BAD_FRAMES


def test_decode_rejects_too_many_frames():
    limits = Limits(max_frames=5)
    ok = frames_of(Command.CREDIT, {"credits": 1}, b"a", b"b")
    assert decode(ok, limits)[0] == p.Credit(1)
    err = decode_error(frames_of(Command.CREDIT, {"credits": 1}, b"a", b"b", b"c"), limits)
    assert err.code is ErrorCode.TOO_LARGE


def test_decode_rejects_bad_tag():
    frames = frames_of(Command.CREDIT, {"credits": 1})
    frames[0] = b"LEGO/0"
    assert decode_error(frames).code is ErrorCode.BAD_TAG


def test_decode_rejects_unknown_command():
    frames = frames_of(Command.CREDIT, {"credits": 1})
    frames[1] = b"NOPE"
    assert decode_error(frames).code is ErrorCode.UNKNOWN_COMMAND


def test_decode_rejects_header_over_limit():
    header = msgpack.packb({"reason": "x" * 100})
    limits = Limits(max_header_bytes=len(header))
    assert decode(frames_of(Command.DISCONNECT, header), limits)[0] == p.Disconnect("x" * 100)
    err = decode_error(frames_of(Command.DISCONNECT, msgpack.packb({"reason": "x" * 101})), limits)
    assert err.code is ErrorCode.TOO_LARGE


def test_decode_rejects_payload_over_limit():
    limits = Limits(max_payload_bytes=100)
    assert len(decode(frames_of(Command.CREDIT, {"credits": 1}, b"a" * 60, b"b" * 40), limits)[1]) == 2
    err = decode_error(frames_of(Command.CREDIT, {"credits": 1}, b"a" * 60, b"b" * 41), limits)
    assert err.code is ErrorCode.TOO_LARGE


def test_decode_rejects_string_over_limit():
    err = decode_error(frames_of(Command.DISCONNECT, {"reason": "x" * 50}), Limits(max_str_len=10))
    assert err.code is ErrorCode.BAD_HEADER


@pytest.mark.parametrize("raw", [b"\xc1", b"\x82\xa1", b"", b"\x81\xa1a\x01trailing"], ids=["reserved", "truncated", "empty", "extra"])
def test_decode_rejects_garbage_msgpack(raw):
    assert decode_error(frames_of(Command.CREDIT, raw)).code is ErrorCode.BAD_HEADER


@pytest.mark.parametrize("header", [[1, 2], "credits", 3, None])
def test_decode_rejects_header_that_is_not_a_map(header):
    assert decode_error(frames_of(Command.CREDIT, header)).code is ErrorCode.BAD_HEADER


def test_decode_rejects_missing_required_field():
    err = decode_error(frames_of(Command.WELCOME, {"broker_id": "b", "heartbeat_interval_s": 1.0}))
    assert err.code is ErrorCode.BAD_HEADER
    assert err.field == "heartbeat_misses"


def test_decode_names_missing_nested_field():
    wire = SAMPLES[p.Tasks][0].to_wire()
    del wire["tasks"][0]["inputs"][0]["holder"]
    err = decode_error(frames_of(Command.TASKS, wire))
    assert err.code is ErrorCode.BAD_HEADER
    assert err.field == "tasks[0].inputs[0].holder"


@pytest.mark.parametrize(
    ("command", "header", "field"),
    [
        (Command.CREDIT, {"credits": "3"}, "credits"),
        (Command.CREDIT, {"credits": 1.5}, "credits"),
        (Command.DISCONNECT, {"reason": b"bytes"}, "reason"),
        (Command.FREE, {"tensor_ids": "r1/x"}, "tensor_ids"),
        (Command.SUBMIT, {"request_id": "r", "workflow": "w", "params": ["prompt"]}, "params"),
        (Command.HEARTBEAT, {"sent_at": "now"}, "sent_at"),
        (Command.ADMIN_REPLY, {"ok": 1, "message": "m"}, "ok"),
    ],
)
def test_decode_rejects_wrong_type(command, header, field):
    err = decode_error(frames_of(command, header))
    assert err.code is ErrorCode.BAD_HEADER
    assert err.field == field


def test_decode_names_wrong_type_in_nested_field():
    wire = SAMPLES[p.Tasks][0].to_wire()
    wire["tasks"][0]["rows"] = "2"
    err = decode_error(frames_of(Command.TASKS, wire))
    assert err.field == "tasks[0].rows"


@pytest.mark.parametrize(("command", "header", "field"), [
    (Command.CREDIT, {"credits": True}, "credits"),
    (Command.WELCOME, {"broker_id": "b", "heartbeat_interval_s": 1.0, "heartbeat_misses": False}, "heartbeat_misses"),
    (Command.AGENT_EVENT, {"spawn_id": "s", "event": "exited", "returncode": True}, "returncode"),
])
def test_decode_rejects_bool_for_int_field(command, header, field):
    err = decode_error(frames_of(command, header))
    assert err.code is ErrorCode.BAD_HEADER
    assert err.field == field


def test_decode_accepts_bool_for_bool_field():
    assert decode(frames_of(Command.ADMIN_REPLY, {"ok": False, "message": "m"}))[0] == p.AdminReply(False, "m")


def test_decode_rejects_bool_for_float_field():
    err = decode_error(frames_of(Command.HEARTBEAT, {"sent_at": True}))
    assert err.field == "sent_at"


@pytest.mark.parametrize(("command", "header", "field"), [
    # Once accepted, these made the broker's next stats reply or telemetry publish raise
    # OverflowError in msgpack and the broker exit (issue 13).
    (Command.HEARTBEAT, {"telemetry": {"batches": 2**64 - 1}}, "telemetry.batches"),
    (Command.HEARTBEAT, {"telemetry": {"fetched_bytes": 2**63}}, "telemetry.fetched_bytes"),
    (Command.CREDIT, {"credits": 2**63 - 1}, "credits"),
    (Command.CREDIT, {"credits": -1}, "credits"),
    (Command.HEARTBEAT, {"sent_at": float("nan")}, "sent_at"),
    (Command.HEARTBEAT, {"telemetry": {"busy_s": float("inf")}}, "telemetry.busy_s"),
    (Command.AGENT_EVENT, {"spawn_id": "s", "event": "exited", "returncode": -(2**60)}, "returncode"),
])
def test_every_number_a_peer_sends_is_bounded_at_decode(command, header, field):
    err = decode_error(frames_of(command, header))
    assert err.code is ErrorCode.BAD_HEADER and err.field == field
    assert "must be" in err.message


def test_a_seed_may_use_its_whole_range_and_no_more():
    spec = SAMPLES[p.Tasks][0].to_wire()["tasks"][0]
    for seed, ok in ((2**63 - 1, True), (2**63, False), (-1, False)):
        task = {**spec, "kind": "encode_image", "params": {"seed": seed}}
        header = {"batch_id": 1, "tasks": [task]}
        if ok:
            assert decode(frames_of(Command.TASKS, header))[0].tasks[0].params.seed == seed
        else:
            assert decode_error(frames_of(Command.TASKS, header)).field == "tasks[0].params.seed"


def test_decode_accepts_int_for_float_field():
    msg, _ = decode(frames_of(Command.WELCOME, {"broker_id": "b", "heartbeat_interval_s": 2, "heartbeat_misses": 3}))
    assert msg.heartbeat_interval_s == 2


# ------------------------------------------------------------------ the package stays a leaf


def test_protocol_package_is_a_leaf():
    code = (
        "import sys\n"
        "import broker.protocol, broker.protocol.tensors\n"
        "roots = {'torch', 'zmq', 'actors', 'clients', 'scheduler'}\n"
        "mods = {'broker.core.machine', 'broker.core.state', 'broker.catalog', 'broker.server'}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in roots or m in mods)\n"
        "print('loaded:' + ','.join(bad))\n"
        "print('protocol' if 'broker.protocol.codec' in sys.modules else 'missing')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["loaded:", "protocol"]


PICKLERS = r"(?:cPickle|pickle|_pickle|cloudpickle|dill)"
PICKLE_IMPORT = re.compile(
    rf"^[ \t]*(?:import[ \t]+(?:[\w.]+[ \t]*(?:as[ \t]+\w+[ \t]*)?,[ \t]*)*{PICKLERS}\b"
    rf"|from[ \t]+{PICKLERS}(?:\.\w+)*[ \t]+import\b)"
    rf"|(?:import_module|__import__)\(\s*['\"]{PICKLERS}['\"]",
    re.MULTILINE,
)


def test_pickle_pattern_catches_every_import_form():
    for line in ("import pickle", "import os, cloudpickle", "  from dill import dumps",
                 "import cPickle as p", "importlib.import_module('pickle')", "__import__(\"dill\")",
                 "import json as j, pickle"):
        assert PICKLE_IMPORT.search(line), line
    for line in ("import pickleball", "# no pickle here", "x = 'use msgpack, not pickle'", "import dillydally"):
        assert not PICKLE_IMPORT.search(line), line


def test_no_module_imports_pickle():
    files = [f for d in ("broker", "actors", "clients", "scheduler") for f in sorted((REPO / d).rglob("*.py"))]
    assert len(files) >= 12  # the scan really looked at the packages
    offenders = [
        f"{f.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0).strip()}"
        for f in files
        for text in [f.read_text(encoding="utf-8")]
        for m in PICKLE_IMPORT.finditer(text)
    ]
    assert offenders == []


def test_channels_last_and_transposed_tensors_keep_their_layout():
    # Layout matters for exactness: CPU kernels round differently for channels-last input.
    for tensor in (torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last), torch.randn(3, 5).t()):
        desc, buf = pack_torch("t", tensor, 0)
        assert desc.strides == list(tensor.stride())
        assert memoryview(buf).nbytes == tensor.numel() * tensor.element_size()  # sent without a copy
        out = unpack_torch(desc, bytes(buf))
        assert torch.equal(out, tensor) and out.stride() == tensor.stride()
    sliced = torch.randn(4, 6)[:, ::2]  # not dense: sent row-major, no strides
    desc, buf = pack_torch("t", sliced, 0)
    assert desc.strides is None and torch.equal(unpack_torch(desc, bytes(buf)), sliced)


@pytest.mark.parametrize("strides", [[1, 1], [5, 2], [3], [-1, 1]])
def test_strides_that_are_not_a_dense_layout_are_refused(strides):
    from broker.protocol.tensors import check_payload

    desc = p.TensorDesc("t", "float32", [3, 5], 0, nbytes=60, strides=strides)
    with pytest.raises(ProtocolError) as err:
        check_payload([desc], [bytes(60)])
    assert err.value.field == "strides"
