"""The sans-IO broker core: events in (message objects, explicit `now`), Send instructions out.

Two small workflows share one denoiser ("den") and one VAE ("vae"): "plain" has one
text encoder and no CFG (1 row per task), "guided" has two text encoders and CFG
(2 rows). Both default to 2 steps at 64x64, so a request is a handful of nodes.
"""

from __future__ import annotations

import dataclasses

import pytest
from broker_helpers import (  # tests/ is on sys.path
    AGENT,
    CATALOG_DOC,
    CLIENT,
    LATER,
    SETTINGS,
    batches,
    beat,
    done,
    failed,
    freed,
    hello,
    hello_agent,
    ident,
    image_of,
    make_core,
    model_stats,
    of,
    only_batch,
    run,
    standard_actors,
    started,
    submit,
    task_ids,
)

from broker import protocol as p
from broker.catalog import parse_catalog, unroll, validate_params
from broker.core.machine import BACKEND, FRONTEND, BrokerCore, BrokerSettings
from broker.core.state import READY, Node, ReadyQueue, Request
from broker.protocol.errors import ErrorCode

# ------------------------------------------------------------------ admission


def test_accepted_carries_the_validated_params():
    core = make_core()
    sends = submit(core, "r1", "guided", seed=5)
    (accepted,) = of(sends, p.Accepted, CLIENT)
    assert accepted.request_id == "r1"
    assert accepted.params == {"prompt": "a lego brick", "steps": 2, "width": 64, "height": 64, "seed": 5,
                               "sampler": "default", "negative_prompt": "", "guidance": 7.0,
                               "output": "image"}
    assert (accepted.nodes, accepted.steps) == (2 + 2 + 1, 2)
    assert "r1" in core.requests


def test_accepted_fills_in_a_seed():
    core = make_core()
    (accepted,) = of(submit(core, "r1"), p.Accepted)
    assert isinstance(accepted.params["seed"], int)


def test_reject_unknown_workflow():
    core = make_core()
    sends = submit(core, "r1", "no-such-workflow")
    assert [(s.socket, s.identity) for s in sends] == [(FRONTEND, CLIENT)]
    (rejected,) = of(sends, p.Rejected)
    assert (rejected.request_id, rejected.code, rejected.field) == ("r1", "unknown_workflow", "workflow")
    assert core.requests == {}
    assert core.counters["requests_rejected"] == 1


@pytest.mark.parametrize(
    ("params", "field"),
    [({"steps": 0}, "params.steps"), ({"width": 72}, "params.width"), ({"scheduler": "euler"}, "params.scheduler"),
     ({"prompt": "  "}, "params.prompt"), ({"guidance": 2.0}, "params.guidance")],
)
def test_reject_bad_param(params, field):
    core = make_core()
    (rejected,) = of(submit(core, "r1", "plain", **params), p.Rejected)
    assert rejected.code == ErrorCode.INVALID_PARAM.value
    assert rejected.field == field
    assert core.requests == {} and core.tasks == {}


def test_reject_duplicate_request_id():
    core = make_core()
    submit(core, "r1")
    (rejected,) = of(submit(core, "r1", "guided"), p.Rejected)
    assert (rejected.code, rejected.field) == ("duplicate_request", "request_id")
    assert core.requests["r1"].workflow == "plain"


@pytest.mark.parametrize("request_id", ["", "a/b", "x" * 129])
def test_reject_bad_request_id(request_id):
    core = make_core()
    (rejected,) = of(submit(core, request_id), p.Rejected)
    assert (rejected.code, rejected.field) == ("invalid_param", "request_id")


def test_reject_when_overloaded():
    core = make_core(BrokerSettings(max_requests_in_flight=1))
    submit(core, "r1")
    (rejected,) = of(submit(core, "r2"), p.Rejected)
    assert rejected.code == "overloaded"


# ------------------------------------------------------------------ ordering


def test_dispatch_is_fcfs_by_request():
    core = make_core()
    for request_id in ("r1", "r2", "r3"):
        submit(core, request_id)
    (enc,) = batches(hello(core, "enc-a-1", "enc-a", max_batch_rows=8), "enc-a-1")
    assert task_ids(enc) == ["r1/encode/enc-a", "r2/encode/enc-a", "r3/encode/enc-a"]

    sends = hello(core, "den-1", "den", credits=1, max_batch_rows=1) + hello(core, "vae-1", "vae")
    sends = run(core, sends + done(core, "enc-a-1", enc))

    den = batches(sends, "den-1")
    assert all(len(b.tasks) == 1 for b in den)
    # r1 finishes its chain before r2 starts, although r2's first step was ready earlier
    assert [task_ids(b)[0] for b in den] == [
        "r1/denoise/0", "r1/denoise/1", "r2/denoise/0", "r2/denoise/1", "r3/denoise/0", "r3/denoise/1"]
    assert [task_ids(b) for b in batches(sends, "vae-1")] == [["r1/decode"], ["r2/decode"], ["r3/decode"]]
    assert [r.request_id for r in of(sends, p.Result)] == ["r1", "r2", "r3"]


def _queued(request, plans, seq):
    nodes = []
    for i, plan in enumerate(plans):
        node = Node(request, plan, seq + i)
        node.state = READY
        nodes.append(node)
    return nodes


def test_ready_queue_within_a_request_farthest_from_output_first():
    wf = parse_catalog(CATALOG_DOC).workflow("plain")
    plans = unroll(wf, validate_params(wf, {"prompt": "x", "steps": 2}))
    old = Request("old", CLIENT, "plain", {}, seq=1, submitted_at=0.0, progress=False)
    new = Request("new", CLIENT, "plain", {}, seq=100, submitted_at=0.0, progress=False)
    queue = ReadyQueue()
    for node in reversed(_queued(new, plans, 200) + _queued(old, plans, 10)):
        queue.push(node)  # pushed nearest-to-output first, newest request first
    order = []
    while (head := queue.head()) is not None:
        order += [(n.request.request_id, n.key) for n in queue.take_batch(head, max_rows=1)]
    assert order == [(r, k) for r in ("old", "new") for k in ("encode/enc-a", "denoise/0", "denoise/1", "decode")]
    assert queue.depth == 0


def test_ready_queue_in_deadline_order_serves_the_earliest_deadline_first_and_reorders_what_waits():
    wf = parse_catalog(CATALOG_DOC).workflow("plain")
    plans = unroll(wf, validate_params(wf, {"prompt": "x", "steps": 2}))
    requests = [Request(name, CLIENT, "plain", {}, seq=seq, submitted_at=0.0, progress=False)
                for name, seq in (("first", 1), ("urgent", 2), ("open", 3))]
    requests[0].deadline, requests[1].deadline = 9.0, 4.0  # "open" has no SLO: it goes last
    queue = ReadyQueue()
    for request in requests:
        queue.push(_queued(request, plans[:1], 10 * request.seq)[0])
    assert queue.head().request.request_id == "first"  # fcfs: by arrival
    queue.reorder("deadline")
    assert queue.order == "deadline"
    order = []
    while (head := queue.head()) is not None:
        order += [n.request.request_id for n in queue.take_batch(head, max_rows=1)]
    assert order == ["urgent", "first", "open"] and queue.depth == 0
    with pytest.raises(ValueError, match="queue_order"):
        queue.reorder("random")


def _monolith_with_slos(order: str):
    """One pipeline actor hosting both workflows; "plain" may take 10 s, "guided" 3 s."""
    slos = {"plain": 10.0, "guided": 3.0}
    workflows = {name: {**spec, "slo_s": slos[name]} for name, spec in CATALOG_DOC["workflows"].items()}
    catalog = parse_catalog({**CATALOG_DOC, "workflows": workflows})
    settings = dataclasses.replace(SETTINGS, serving="monolith", queue_order=order)
    return BrokerCore(catalog, settings, broker_id="broker-test", seed=1)


@pytest.mark.parametrize(("order", "second"), [("fcfs", "r2"), ("deadline", "r3")])
def test_a_monolith_serves_its_shared_queue_in_the_order_set(order, second):
    """r1 runs; r2 (plain, deadline 10.5) and r3 (guided, deadline 4.0) wait for the one
    pipeline actor: first come first served takes r2 next, deadline order r3."""
    core = _monolith_with_slos(order)
    hello(core, "pipe-1", "pipeline/plain+guided")
    (first,) = batches(submit(core, "r1", "plain"), "pipe-1")
    assert batches(submit(core, "r2", "plain", now=0.5), "pipe-1") == []
    assert batches(submit(core, "r3", "guided", now=1.0), "pipe-1") == []
    (batch,) = batches(done(core, "pipe-1", first, now=2.0), "pipe-1")
    assert [t.request_id for t in batch.tasks] == [second]


# ------------------------------------------------------------------ batching


def _three_requests_waiting_for_the_denoiser(den_rows: int):
    """r1 plain (1 row), r2 guided (2 rows), r3 plain (1 row); the denoiser has no credit yet."""
    core = make_core()
    submit(core, "r1", "plain")
    submit(core, "r2", "guided")
    submit(core, "r3", "plain")
    sends = run(core, standard_actors(core, den_credits=0, den_rows=den_rows))
    assert batches(sends, "den-1") == []
    assert model_stats(core, "den").queue_depth == 3
    return core


def test_tasks_of_different_workflows_share_a_batch():
    core = _three_requests_waiting_for_the_denoiser(den_rows=3)

    batch = only_batch(core.on_backend(ident("den-1"), p.Credit(1), [], 1.0), "den-1")

    assert task_ids(batch) == ["r1/denoise/0", "r2/denoise/0"]
    assert [t.rows for t in batch.tasks] == [1, 2]
    assert [t.workflow for t in batch.tasks] == ["plain", "guided"]
    stats = model_stats(core, "den", 1.0)
    assert stats.mixed_workflow_batches == 1
    assert stats.batches == 1
    assert stats.workflows == ["guided", "plain"]
    (actor,) = [a for a in core.snapshot(1.0).actors if a.actor_id == "den-1"]
    assert actor.max_batch_rows_seen == 3


def test_batch_rows_stay_within_max_batch_rows():
    core = _three_requests_waiting_for_the_denoiser(den_rows=2)
    sends = run(core, core.on_backend(ident("den-1"), p.Credit(1), [], 1.0))
    den = batches(sends, "den-1")
    assert all(sum(t.rows for t in b.tasks) <= 2 for b in den)
    assert sorted(tid for b in den for tid in task_ids(b)) == sorted(
        f"{r}/denoise/{k}" for r in ("r1", "r2", "r3") for k in (0, 1))
    assert {r.request_id for r in of(sends, p.Result)} == {"r1", "r2", "r3"}


def test_different_shapes_never_share_a_batch():
    core = make_core()
    submit(core, "r1", "plain", width=64)
    submit(core, "r2", "plain", width=128)
    submit(core, "r3", "plain", width=64)
    sends = run(core, standard_actors(core, den_credits=0, den_rows=8))

    sends = core.on_backend(ident("den-1"), p.Credit(2), [], 1.0)

    den = batches(sends, "den-1")
    assert [task_ids(b) for b in den] == [["r1/denoise/0", "r3/denoise/0"], ["r2/denoise/0"]]
    for batch in den:
        assert len({tuple(t.shape) for t in batch.tasks}) == 1


def test_a_batch_of_decodes_returns_each_client_its_own_image():
    core = make_core()
    submit(core, "r1", "plain", client=b"alice")
    submit(core, "r2", "guided", client=b"bob")
    sends = run(core, standard_actors(core, den_rows=8, vae_credits=0))

    sends = run(core, core.on_backend(ident("vae-1"), p.Credit(1), [], 2.0))

    assert task_ids(only_batch(sends, "vae-1")) == ["r1/decode", "r2/decode"]
    results = {s.identity: s for s in sends if isinstance(s.msg, p.Result)}
    assert set(results) == {b"alice", b"bob"}
    assert results[b"alice"].payload == [image_of("r1")]
    assert results[b"bob"].payload == [image_of("r2")]
    assert results[b"bob"].msg.tensors[0].frame == 0


# ------------------------------------------------------------------ affinity and the tensor directory


def test_next_step_goes_to_the_actor_holding_the_previous_one():
    core = make_core()
    sends, step0 = started(core, den=("den-a", "den-b"), steps=3)
    assert batches(sends, "den-a") == [step0]  # a tie on load: the first actor
    core.on_backend(ident("den-b"), p.Credit(5), [], 0.0)  # den-b now looks far less loaded

    step1 = only_batch(done(core, "den-a", step0), "den-a")
    step2 = only_batch(done(core, "den-a", step1), "den-a")

    assert task_ids(step1) == ["r1/denoise/1"] and task_ids(step2) == ["r1/denoise/2"]
    (ref,) = step1.tasks[0].inputs
    assert (ref.tensor_id, ref.holder, ref.address) == (step0.tasks[0].output_id, "den-a", "tcp://den-a:5600")
    assert ref.nbytes == 64
    (den_b,) = [a for a in core.snapshot(0.0).actors if a.actor_id == "den-b"]
    assert den_b.tasks == 0


def test_task_inputs_name_every_holder():
    core = make_core()
    _, step0 = started(core, "r1", "guided")
    refs = {r.holder: r for r in step0.tasks[0].inputs}
    assert set(refs) == {"enc-a-1", "enc-b-1"}
    assert refs["enc-b-1"].address == "tcp://enc-b-1:5600"
    assert refs["enc-a-1"].tensor_id == "r1/encode/enc-a@0"


def test_outputs_are_freed_once_consumed_and_the_result_is_forwarded():
    core = make_core()
    sends = submit(core, "r1", "guided", now=1.0) + standard_actors(core, now=1.0)
    enc_a, enc_b = only_batch(sends, "enc-a-1"), only_batch(sends, "enc-b-1")
    sends = done(core, "enc-a-1", enc_a, now=1.1) + done(core, "enc-b-1", enc_b, now=1.2)
    assert of(sends, p.Free) == []  # nothing consumed yet
    step0 = only_batch(sends, "den-1")

    sends = done(core, "den-1", step0, now=1.3)  # consumes both encodings
    assert freed(sends, "enc-a-1") == [enc_a.tasks[0].output_id]
    assert freed(sends, "enc-b-1") == [enc_b.tasks[0].output_id]
    step1 = only_batch(sends, "den-1")

    sends = done(core, "den-1", step1, now=1.4)
    assert freed(sends, "den-1") == [step0.tasks[0].output_id]
    decode = only_batch(sends, "vae-1")
    assert decode.tasks[0].return_output is True

    image = bytearray(b"\x00\x01" * 8)
    result = p.TaskResult(decode.tasks[0].task_id, 0, decode.tasks[0].output_id, nbytes=16,
                          tensors=[p.TensorDesc("image", "uint8", [4, 4], frame=1, nbytes=16)])
    sends = core.on_backend(ident("vae-1"), p.BatchDone(decode.batch_id, [result]), [b"unrelated", image], 5.0)

    assert freed(sends, "den-1") == [step1.tasks[0].output_id]
    assert freed(sends, "vae-1") == []  # the image was returned, not stored
    (send,) = [s for s in sends if isinstance(s.msg, p.Result)]
    assert (send.socket, send.identity) == (FRONTEND, CLIENT)
    assert send.payload[0] is image
    assert send.msg.tensors == [p.TensorDesc("image", "uint8", [4, 4], frame=0, nbytes=16)]
    assert send.msg.latency_s == pytest.approx(4.0)
    assert send.msg.attempts == 1
    assert core.requests == {} and core.tasks == {}
    assert all(a.held_tensors == 0 for a in core.snapshot(5.0).actors)
    assert core.counters["requests_completed"] == 1


def test_progress_for_every_node():
    core = make_core()
    sends = run(core, submit(core, "r1", "guided") + standard_actors(core))
    progress = of(sends, p.Progress, CLIENT)
    assert [(e.node, e.kind, e.step) for e in progress] == [
        ("encode/enc-a", "encode", 0), ("encode/enc-b", "encode", 0),
        ("denoise/0", "denoise", 1), ("denoise/1", "denoise", 2), ("decode", "decode", 0)]
    assert [e.done_nodes for e in progress] == [1, 2, 3, 4, 5]
    assert {(e.total_nodes, e.total_steps, e.request_id) for e in progress} == {(5, 2, "r1")}
    assert [e.actor_id for e in progress] == ["enc-a-1", "enc-b-1", "den-1", "den-1", "vae-1"]
    client_msgs = [type(s.msg) for s in sends if s.identity == CLIENT]
    assert client_msgs[0] is p.Accepted and client_msgs[-1] is p.Result


def test_no_progress_when_not_asked():
    core = make_core()
    sends = run(core, submit(core, "r1", progress=False) + standard_actors(core))
    assert of(sends, p.Progress) == []
    assert len(of(sends, p.Result, CLIENT)) == 1


# ------------------------------------------------------------------ cancel


def test_cancel_removes_queued_tasks_and_frees_held_outputs():
    core = make_core()
    submit(core, "r1", "guided")
    sends = run(core, standard_actors(core, den_credits=0))
    enc_ids = {a: only_batch(sends, a).tasks[0].output_id for a in ("enc-a-1", "enc-b-1")}
    assert model_stats(core, "den").queue_depth == 1

    sends = core.on_frontend(CLIENT, p.Cancel("r1"), [], 1.0)

    (failed_msg,) = of(sends, p.Failed, CLIENT)
    assert (failed_msg.request_id, failed_msg.code) == ("r1", "cancelled")
    assert {a: freed(sends, a) for a in enc_ids} == {a: [i] for a, i in enc_ids.items()}
    assert model_stats(core, "den", 1.0).queue_depth == 0
    assert "r1" not in core.requests and core.tasks == {}
    assert core.counters["requests_cancelled"] == 1
    assert batches(core.on_backend(ident("den-1"), p.Credit(1), [], 2.0), "den-1") == []


def test_late_result_of_a_cancelled_request_is_stale_and_freed():
    core = make_core()
    submit(core, "r1")
    enc = only_batch(standard_actors(core), "enc-a-1")
    core.on_frontend(CLIENT, p.Cancel("r1"), [], 1.0)

    sends = done(core, "enc-a-1", enc, now=2.0)

    assert freed(sends, "enc-a-1") == [enc.tasks[0].output_id]
    assert of(sends, p.Progress) == [] and of(sends, p.Tasks) == []
    assert core.counters["stale_results"] == 1
    assert core.counters["tasks_done"] == 0


def test_cancel_of_unknown_or_foreign_request_is_an_error():
    core = make_core()
    submit(core, "r1", client=b"alice")
    for client, request_id in ((b"bob", "r1"), (b"alice", "nope")):
        (err,) = of(core.on_frontend(client, p.Cancel(request_id), [], 1.0), p.Error, client)
        assert (err.code, err.request_id) == ("unknown_request", request_id)
    assert "r1" in core.requests


# ------------------------------------------------------------------ lost actors


def _den_a_silent_while_running_step0():
    """den-a took r1's first step and then went silent; den-b is fresh and idle."""
    core = make_core()
    sends, step0 = started(core, den=("den-a", "den-b"))
    assert batches(sends, "den-a") == [step0]
    beat(core, ["enc-a-1", "enc-b-1", "vae-1", "den-b"], LATER)
    return core, step0, core.on_tick(LATER)


def test_silent_actor_is_declared_lost():
    core, _, sends = _den_a_silent_while_running_step0()
    (disconnect,) = of(sends, p.Disconnect, ident("den-a"))
    assert "den-a" not in core.actors
    assert set(core.actors) == {"enc-a-1", "enc-b-1", "vae-1", "den-b"}
    assert core.counters["actors_lost"] == 1
    assert "declared dead" in disconnect.reason


def test_task_of_a_lost_actor_is_redispatched_with_the_next_attempt():
    core, step0, sends = _den_a_silent_while_running_step0()
    retry = only_batch(sends, "den-b")
    assert task_ids(retry) == task_ids(step0) == ["r1/denoise/0"]
    assert retry.tasks[0].attempt == step0.tasks[0].attempt + 1 == 1
    assert retry.tasks[0].output_id != step0.tasks[0].output_id
    assert retry.tasks[0].inputs == step0.tasks[0].inputs  # the encodings are still held
    assert core.counters["tasks_requeued"] == 1


def test_late_result_from_a_lost_actor_is_refused():
    core, step0, sends = _den_a_silent_while_running_step0()
    retry = only_batch(sends, "den-b")

    late = done(core, "den-a", step0, now=LATER + 1)

    assert [(s.identity, type(s.msg)) for s in late] == [(ident("den-a"), p.Disconnect)]
    assert core.counters["tasks_done"] == 1  # the encoding only
    assert core.requests["r1"].nodes["denoise/0"].state == "running"
    sends = run(core, done(core, "den-b", retry, now=LATER + 2), now=LATER + 2)
    (result,) = of(sends, p.Result, CLIENT)
    assert result.attempts == 1


def test_lost_intermediate_restarts_the_request():
    core = make_core()
    _, step0 = started(core, den=("den-a", "den-b"))
    step1 = only_batch(done(core, "den-a", step0), "den-a")
    assert task_ids(step1) == ["r1/denoise/1"]  # den-a holds step 0's output and runs step 1
    beat(core, ["enc-a-1", "enc-b-1", "vae-1", "den-b"], LATER)

    sends = core.on_tick(LATER)

    assert core.counters["requests_restarted"] == 1
    assert core.counters["tasks_requeued"] == 0
    (enc,) = batches(sends, "enc-a-1")
    assert enc.tasks[0].attempt == 1
    sends = run(core, sends, now=LATER, dead={"den-a"})
    assert batches(sends, "den-a") == []
    den_b = [t for b in batches(sends, "den-b") for t in b.tasks]
    assert [(t.node, t.attempt) for t in den_b] == [("denoise/0", 1), ("denoise/1", 1)]
    (result,) = of(sends, p.Result, CLIENT)
    assert result.attempts == 2
    assert core.requests == {}


def test_a_task_whose_actor_dies_twice_running_it_alone_is_quarantined():
    # Issue 13: a poison input (one that crashes its actor every time) costs two actors,
    # not max_task_attempts (3) of them.
    core = make_core()
    _, step0 = started(core, den=("den-a",))
    survivors = ["enc-a-1", "enc-b-1", "vae-1"]
    beat(core, survivors, LATER)
    assert of(core.on_tick(LATER), p.Failed) == [], "failed after 1 loss"
    retry = only_batch(hello(core, "den-b", "den", now=LATER), "den-b")
    assert [t.attempt for t in (step0.tasks[0], retry.tasks[0])] == [0, 1]
    beat(core, survivors, LATER * 2)

    sends = core.on_tick(LATER * 2)  # den-b is lost too, running the same step alone

    (failed_msg,) = of(sends, p.Failed, CLIENT)
    assert failed_msg.code == "attempts_exhausted" and "quarantined" in failed_msg.message
    assert freed(sends, "enc-a-1") == ["r1/encode/enc-a@0"]
    assert core.requests == {}
    assert core.counters["requests_failed"] == 1 and core.counters["tasks_quarantined"] == 1


def test_a_task_sent_to_an_actor_already_silent_is_not_blamed_for_its_loss():
    # Found by `lego bench chaos` (agent-kill): a restarted request's task went to a second
    # actor of the dead agent, not yet declared lost, and was quarantined as a poison.
    core = make_core()
    sends = submit(core, "r1") + standard_actors(core, den=("den-a", "den-b"))
    sends = run(core, sends, dead=("den-a", "den-b"))
    (first,) = [b for d in ("den-a", "den-b") for b in batches(sends, d)]
    ran_on = "den-a" if batches(sends, "den-a") else "den-b"
    other = "den-b" if ran_on == "den-a" else "den-a"
    survivors = ["enc-a-1", "enc-b-1", "vae-1"]
    beat(core, survivors + [other], 1.0)  # both die at once just after 1.0 (their host went down)
    beat(core, survivors, 3.5)
    sends = core.on_tick(3.5)  # the first is declared lost (silent 3.5 s); its step goes to the other one
    (retry,) = batches(sends, other)
    beat(core, survivors, 4.5)
    assert of(core.on_tick(4.5), p.Failed) == []  # the other is lost too: the step is not blamed
    assert core.counters["tasks_quarantined"] == 0
    again = only_batch(hello(core, "den-c", "den", now=5.0), "den-c")
    assert [t.task_id for t in again.tasks] == [t.task_id for t in first.tasks]


def test_a_task_lost_in_batches_max_task_attempts_times_fails_the_request():
    core = make_core(dataclasses.replace(SETTINGS, max_task_attempts=1))
    _, step0 = started(core, den=("den-a",))
    beat(core, ["enc-a-1", "enc-b-1", "vae-1"], LATER)
    (failed_msg,) = of(core.on_tick(LATER), p.Failed, CLIENT)  # the first loss is the last allowed
    assert failed_msg.code == "attempts_exhausted" and "lost 1 times" in failed_msg.message


def test_an_actor_dying_under_a_batch_reruns_its_tasks_alone_so_only_the_poison_fails():
    core = make_core()
    sends = submit(core, "good") + submit(core, "poison") + standard_actors(core, den=("den-a",), den_rows=2)
    sends = run(core, sends, dead=("den-a",))
    (batch,) = batches(sends, "den-a")
    assert len(batch.tasks) == 2  # both requests' step 0 in one call
    survivors = ["enc-a-1", "enc-b-1", "vae-1"]
    beat(core, survivors, LATER)
    core.on_tick(LATER)  # den-a dies under the batch: each task runs alone next, one at a time per actor
    sends = hello(core, "den-b", "den", credits=2, max_batch_rows=2, now=LATER)
    (first,) = batches(sends, "den-b")
    assert [t.request_id for t in first.tasks] == ["good"]  # first come; the credit to spare stays unused
    sends += hello(core, "den-c", "den", credits=2, max_batch_rows=2, now=LATER)
    (second,) = batches(sends, "den-c")
    assert [t.request_id for t in second.tasks] == ["poison"]  # alone on an idle actor
    sends = run(core, sends, now=LATER + 1, dead=("den-c",))
    assert [r.request_id for r in of(sends, p.Result, CLIENT)] == ["good"]  # the good one went on

    beat(core, survivors + ["den-b"], LATER * 2)
    failures = of(core.on_tick(LATER * 2), p.Failed, CLIENT)  # den-c dies running the poison alone
    assert [(f.request_id, f.code) for f in failures] == [("poison", "attempts_exhausted")]
    assert core.counters["tasks_quarantined"] == 1


def test_a_task_beside_another_batch_on_its_actor_is_not_blamed_as_alone():
    """Two single-task batches in flight on one actor (credits to spare) when it dies:
    neither ran alone there, so neither is quarantined; each reruns alone."""
    core = make_core()
    sends = submit(core, "a") + submit(core, "b") + standard_actors(core, den=("den-a",), den_credits=2)
    sends = run(core, sends, dead=("den-a",))
    assert sorted(len(b.tasks) for b in batches(sends, "den-a")) == [1, 1]
    for node in (core.requests["a"].nodes["denoise/0"], core.requests["b"].nodes["denoise/0"]):
        node.losses = 1  # each lost once already: a second loss alone would quarantine it
    beat(core, ["enc-a-1", "enc-b-1", "vae-1"], LATER)
    assert of(core.on_tick(LATER), p.Failed) == []
    assert core.counters["tasks_quarantined"] == 0
    assert all(core.requests[r].nodes["denoise/0"].solo for r in ("a", "b"))


def test_a_batch_whose_send_failed_counts_no_loss():
    """The send of a batch finds the actor's connection gone: the actor is lost, the
    batch never reached it, so its tasks count no loss (a poison suspect stays a suspect)."""
    core = make_core()
    sends = submit(core, "r1") + standard_actors(core, den=("den-a", "den-b"))
    sends = run(core, sends, dead=("den-a", "den-b"))
    (batch,) = [b for actor in ("den-a", "den-b") for b in batches(sends, actor)]
    holder = "den-a" if batches(sends, "den-a") else "den-b"
    node = core.requests["r1"].nodes["denoise/0"]
    node.losses = 1
    core.on_unreachable(BACKEND, ident(holder), 1.0, batch.batch_id)
    assert node.losses == 1 and "r1" in core.requests
    assert core.counters["tasks_quarantined"] == 0


def test_disconnect_from_an_actor_requeues_its_work():
    core = make_core()
    _, step0 = started(core, den=("den-a", "den-b"))
    sends = core.on_backend(ident("den-a"), p.Disconnect(reason="shutting down"), [], 1.0)
    assert "den-a" not in core.actors
    assert task_ids(only_batch(sends, "den-b")) == task_ids(step0)


# ------------------------------------------------------------------ failed batches


def test_input_unavailable_restarts_the_request():
    core = make_core()
    _, step0 = started(core)
    step1 = only_batch(done(core, "den-1", step0), "den-1")

    sends = failed(core, "den-1", step1, ErrorCode.INPUT_UNAVAILABLE.value, now=1.0)

    assert core.counters["requests_restarted"] == 1
    assert freed(sends, "den-1") == [step0.tasks[0].output_id]
    assert only_batch(sends, "enc-a-1").tasks[0].attempt == 1
    (result,) = of(run(core, sends, now=1.0), p.Result, CLIENT)
    assert result.attempts == 2


def test_other_batch_failure_fails_the_request():
    core = make_core()
    _, step0 = started(core)
    step1 = only_batch(done(core, "den-1", step0), "den-1")

    sends = failed(core, "den-1", step1, "out_of_memory", now=1.0)

    (failed_msg,) = of(sends, p.Failed, CLIENT)
    assert failed_msg.code == ErrorCode.TASK_ERROR.value
    assert "out_of_memory" in failed_msg.message
    assert freed(sends, "den-1") == [step0.tasks[0].output_id]
    assert core.requests == {}
    assert core.counters["requests_failed"] == 1
    assert core.actors["den-1"].credits == 1  # the credit came back


# ------------------------------------------------------------------ heartbeats


def test_tick_sends_heartbeats_to_agents_every_interval():
    core = make_core()
    hello_agent(core, now=0.0)

    def beats(now):
        sends = core.on_tick(now)
        assert all(isinstance(s.msg, p.Heartbeat) and s.socket == BACKEND for s in sends)
        assert all(s.msg.sent_at == now for s in sends)
        return [s.identity for s in sends]

    assert beats(0.5) == []
    assert beats(1.0) == [AGENT]
    assert beats(1.5) == []
    assert beats(2.0) == [AGENT]
    assert AGENT in core.agents


def test_actor_ping_is_answered_on_the_socket_it_came_from():
    core = make_core()
    hello(core, "den-1", "den", now=0.0)
    telemetry = p.ActorTelemetry(batches=2)

    sends = core.on_backend(b"den-1-control", p.Heartbeat(sent_at=2.5, telemetry=telemetry, actor_id="den-1"), [], 2.5)

    assert [(s.identity, type(s.msg)) for s in sends] == [(b"den-1-control", p.Heartbeat)]
    assert core.actors["den-1"].last_seen == 2.5
    (stats,) = core.snapshot(2.5).actors
    assert stats.telemetry == telemetry


def test_actor_pinging_keeps_it_alive():
    core = make_core()
    hello(core, "den-1", "den", now=0.0)
    hello(core, "den-2", "den", now=0.0)
    for now in (2.0, 4.0, 6.0):
        core.on_backend(b"den-1-control", p.Heartbeat(sent_at=now, actor_id="den-1"), [], now)
        core.on_tick(now)
    assert set(core.actors) == {"den-1"}  # den-2 never pinged: lost after 3 intervals


def test_hello_is_welcomed_with_the_heartbeat_settings():
    core = make_core()
    (welcome,) = of(hello(core, "den-1", "den"), p.Welcome, ident("den-1"))
    assert welcome == p.Welcome("broker-test", 1.0, 3)


def test_silent_agent_is_forgotten():
    core = make_core()
    hello_agent(core, now=0.0)
    core.on_tick(LATER)
    assert core.agents == {}


def test_heartbeat_from_unknown_peer_is_answered_with_disconnect():
    core = make_core()
    sends = core.on_backend(b"ghost", p.Heartbeat(sent_at=1.0), [], 1.0)
    assert [(s.identity, type(s.msg)) for s in sends] == [(b"ghost", p.Disconnect)]


# ------------------------------------------------------------------ protocol errors


def test_protocol_error_is_answered_and_the_core_keeps_working():
    core = make_core()
    err = p.ProtocolError(ErrorCode.BAD_HEADER, "Credit.credits has type str", "credits")

    (send,) = core.on_protocol_error(BACKEND, b"peer", err)

    assert (send.socket, send.identity) == (BACKEND, b"peer")
    assert send.msg == p.Error(code="bad_header", message="Credit.credits has type str", field="credits")
    assert core.counters["protocol_errors"] == 1
    assert len(of(run(core, submit(core, "r1") + standard_actors(core)), p.Result, CLIENT)) == 1


def test_client_command_on_the_backend_is_an_error():
    core = make_core()
    (send,) = core.on_backend(b"peer", p.Submit("r1", "plain", {"prompt": "x"}), [], 0.0)
    assert (send.socket, send.identity) == (BACKEND, b"peer")
    assert send.msg.code == "unknown_command"
    assert core.requests == {}


def test_backend_command_on_the_frontend_is_an_error():
    core = make_core()
    (send,) = core.on_frontend(CLIENT, p.Credit(1), [], 0.0)
    assert (send.socket, send.identity, send.msg.code) == (FRONTEND, CLIENT, "unknown_command")


def test_hello_with_no_batch_rows_is_refused():
    core = make_core()
    (send,) = hello(core, "den-1", "den", max_batch_rows=0)
    assert send.msg.code == "bad_header"
    assert core.actors == {}


# ------------------------------------------------------------------ admin


def test_admin_spawn_without_an_agent_names_the_host():
    core = make_core()
    (send,) = core.on_frontend(CLIENT, p.AdminSpawn(model="den", device="cpu", backend="emulated"), [], 0.0)
    assert send.identity == CLIENT
    assert send.msg.ok is False
    assert send.msg.message.startswith("host")


def test_admin_spawn_asks_the_agent():
    core = make_core()
    hello_agent(core, host="host-1")

    sends = core.on_frontend(CLIENT, p.AdminSpawn(model="den", device="cpu", backend="emulated", host="host-1",
                                                  count=2, max_batch_rows=4), [], 0.0)

    spawns = of(sends, p.SpawnActor, AGENT)
    assert [(s.model, s.device, s.backend, s.max_batch_rows) for s in spawns] == [("den", "cpu", "emulated", 4)] * 2
    (reply,) = of(sends, p.AdminReply, CLIENT)
    assert reply.ok is True
    assert reply.spawn_ids == [s.spawn_id for s in spawns]
    assert len(set(reply.spawn_ids)) == 2


def test_admin_spawn_on_another_host_or_unknown_model_is_refused():
    core = make_core()
    hello_agent(core, host="host-1")
    (other_host,) = of(core.on_frontend(CLIENT, p.AdminSpawn("den", "cpu", "emulated", host="host-2"), [], 0.0), p.AdminReply)
    (bad_model,) = of(core.on_frontend(CLIENT, p.AdminSpawn("nope", "cpu", "emulated"), [], 0.0), p.AdminReply)
    assert (other_host.ok, other_host.message.split(":")[0]) == (False, "host")
    assert (bad_model.ok, bad_model.message.split(":")[0]) == (False, "model")


# ------------------------------------------------------------------ suspected bugs


def test_task_missing_from_batch_done_is_not_left_hanging():
    core = make_core()
    submit(core, "r1")
    enc = only_batch(standard_actors(core), "enc-a-1")

    sends = core.on_backend(ident("enc-a-1"), p.BatchDone(enc.batch_id, []), [], 1.0)

    retried = [t for b in batches(sends, "enc-a-1") for t in b.tasks]
    assert of(sends, p.Failed, CLIENT) or [t.task_id for t in retried] == ["r1/encode/enc-a"]


def test_actor_reconnecting_with_the_same_identity_is_not_told_to_disconnect():
    core = make_core()
    hello(core, "den-1", "den")
    sends = hello(core, "den-1", "den", now=1.0)
    assert of(sends, p.Welcome, ident("den-1"))
    assert of(sends, p.Disconnect, ident("den-1")) == []


# ------------------------------------------------------------------ split CFG (parallel branches)


def test_split_cfg_sends_the_two_branches_of_a_step_to_two_actors_and_completes():
    core = make_core(BrokerSettings(heartbeat_interval_s=1.0, heartbeat_misses=3, cfg_split="always"))
    sends = standard_actors(core, den=("den-1", "den-2"), den_credits=2, den_rows=4)
    sends += submit(core, "r1", "guided")
    request = core.requests["r1"]
    assert [k for k in request.nodes if k.startswith("branch/")] == ["branch/0/0", "branch/0/1", "branch/1/0", "branch/1/1"]
    combine = request.nodes["denoise/0"]
    assert [n.key for n in combine.inputs] == ["branch/0/0", "branch/0/1", "encode/enc-a", "encode/enc-b"]
    seen = run(core, sends)
    branch_batches = [(s.identity, t.node) for s in seen if isinstance(s.msg, p.Tasks)
                      for t in s.msg.tasks if t.kind == "denoise_branch"]
    for step in ("0", "1"):
        actors = {identity for identity, node in branch_batches if node.split("/")[1] == step}
        assert actors == {ident("den-1"), ident("den-2")}, f"step {step}: both branches went to {actors}"
    for s in seen:  # siblings never share a batch, even with rows to spare
        if isinstance(s.msg, p.Tasks):
            assert len({t.node.rsplit("/", 1)[0] for t in s.msg.tasks if t.kind == "denoise_branch"}) == \
                len([t for t in s.msg.tasks if t.kind == "denoise_branch"])
    (result,) = of(seen, p.Result, CLIENT)
    assert result.request_id == "r1"
    freed = [tid for s in seen if isinstance(s.msg, p.Free) for tid in s.msg.tensor_ids]
    assert len(freed) == len(set(freed)) == len(request.nodes) - 1  # every output but the image, once
    assert all(not a.held for a in core.actors.values())
