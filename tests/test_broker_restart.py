"""The request journal wired into the broker: no accepted request is lost to a restart.

The core's side (sans-IO): with journaling on, its sends carry journal records in the
order the shell must write them (an accepted record before ACCEPTED, an ended one after
RESULT / FAILED); off, nothing changes. A journaled request re-runs from its validated
params (same seed) for the same client, and a client's repeated SUBMIT is its job again.
The process side: a broker SIGKILLed with 20 requests in flight and started again on
the same ports and journal finishes all 20, with the images a run without the restart
gives; a corrupt journal stops the broker naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
from broker_helpers import (  # tests/ is on sys.path
    CLIENT,
    SETTINGS,
    hello,
    image_of,
    make_core,
    standard_actors,
    submit,
)

from broker import protocol as p
from broker.core.outbox import ACCEPTED, CANCELLED, FAILED, FINISHED, Record
from broker.journal import ENDED, Journal
from broker.protocol.errors import ErrorCode
from broker.server import BrokerConfig, BrokerServer

ROOT = Path(__file__).resolve().parents[1]


def journaled_core():
    core = make_core()
    core.out.journaling = True
    return core


def drive(core, sends, *, dead=()) -> list:
    """Answer every batch in `sends` (and what the answers trigger), records kept in order."""
    seen, todo = [], list(sends)
    while todo:
        send = todo.pop(0)
        seen.append(send)
        if not isinstance(send, Record) and isinstance(send.msg, p.Tasks) and send.identity.decode() not in dead:
            batch = send.msg
            payload: list = []
            results = []
            for task in batch.tasks:
                tensors = []
                if task.return_output:
                    frame = image_of(task.request_id)
                    tensors = [p.TensorDesc("image", "uint8", [len(frame)], frame=len(payload), nbytes=len(frame))]
                    payload.append(frame)
                results.append(p.TaskResult(task.task_id, task.attempt, task.output_id, nbytes=64, tensors=tensors))
            todo.extend(core.on_backend(send.identity, p.BatchDone(batch.batch_id, results, exec_s=0.01), payload, 0.0))
    return seen


def kinds(sends, request_id="r1") -> list[str]:
    """What happened to `request_id`, in order: journal records and the client's messages."""
    out = []
    for s in sends:
        if isinstance(s, Record):
            out.append(f"journal:{s.status}")
        elif isinstance(s.msg, (p.Accepted, p.Result, p.Failed, p.Rejected)) and s.msg.request_id == request_id:
            out.append(type(s.msg).__name__)
    return out


def task_params(sends) -> list:
    return sorted((t.node, repr(t.params)) for s in sends if not isinstance(s, Record) and isinstance(s.msg, p.Tasks)
                  for t in s.msg.tasks)


# ------------------------------------------------------------------ the core's records


def test_without_journaling_the_core_makes_no_records():
    core = make_core()
    sends = drive(core, submit(core, "r1", seed=3) + standard_actors(core))
    assert not any(isinstance(s, Record) for s in sends)
    assert kinds(sends) == ["Accepted", "Result"]


def test_a_request_is_journaled_before_accepted_and_ended_after_its_result():
    core = journaled_core()
    sends = submit(core, "r1", "guided")
    (record,) = [s for s in sends if isinstance(s, Record)]
    (accepted,) = [s.msg for s in sends if not isinstance(s, Record) and isinstance(s.msg, p.Accepted)]
    # The validated params, with the seed drawn at acceptance: the re-run's image is this one's.
    assert record == Record("r1", ACCEPTED, CLIENT, "guided", accepted.params, (), True)
    assert isinstance(record.params["seed"], int)
    sends = drive(core, sends + standard_actors(core))
    assert kinds(sends) == ["journal:accepted", "Accepted", "Result", "journal:finished"]
    assert {ACCEPTED, FINISHED, FAILED, CANCELLED} - {ACCEPTED} == set(ENDED)  # the journal's spelling


def test_cancelled_and_failed_requests_are_journaled_as_ended_after_their_answer():
    core = journaled_core()
    submit(core, "r1")
    sends = core.on_frontend(CLIENT, p.Cancel("r1"), [], 1.0)
    assert kinds(sends) == ["Failed", "journal:cancelled"]
    submit(core, "r2")
    sends = drive(core, standard_actors(core), dead=("den-1",))
    (batch,) = [s.msg for s in sends if not isinstance(s, Record) and isinstance(s.msg, p.Tasks)
                and s.identity == b"den-1"]
    failed = p.BatchFailed(batch.batch_id, [t.task_id for t in batch.tasks], [t.attempt for t in batch.tasks],
                           "task_error", "boom")
    assert kinds(core.on_backend(b"den-1", failed, [], 1.0), "r2") == ["Failed", "journal:failed"]


def test_a_refused_submit_is_not_journaled():
    core = journaled_core()
    assert kinds(submit(core, "r1", "nope")) == ["Rejected"]


def test_a_resumed_request_reruns_with_the_same_params_for_the_same_client():
    first = journaled_core()
    sends = submit(first, "r1", "guided")
    (record,) = [s for s in sends if isinstance(s, Record)]
    reference = task_params(drive(first, sends + standard_actors(first)))

    again = journaled_core()
    again.intake.rng = random.Random(99)  # a new broker draws other seeds: this one comes from the record
    sends = again.on_resume(record.request_id, record.client, record.workflow, record.params, [], [],
                            record.progress, 0.0)
    assert kinds(sends) == [] and "r1" in again.requests  # no ACCEPTED, no second accepted record
    sends = drive(again, sends + standard_actors(again))
    assert task_params(sends) == reference
    (result,) = [s for s in sends if not isinstance(s, Record) and isinstance(s.msg, p.Result)]
    assert result.identity == CLIENT and kinds(sends) == ["Result", "journal:finished"]
    assert again.counters["requests_resumed"] == 1


def test_a_resumed_img2img_request_sends_its_actors_the_journaled_image():
    from broker.catalog import load_catalog
    from broker.core.machine import BrokerCore

    def tasks_with_frames(core, sends):
        sends += [s for m in ("CLIP_Flux", "T5_Flux", "Flux1Schnell", "Flux1VAE")
                  for s in hello(core, m, m, max_batch_rows=4)]
        return [(t.node, repr(t.params), [(d.name, d.shape) for d in t.tensors], [bytes(s.payload[d.frame]) for d in t.tensors])
                for s in sends if not isinstance(s, Record) and isinstance(s.msg, p.Tasks) for t in s.msg.tasks]

    image = bytes(range(256)) * 48  # uint8 [64, 64, 3]
    desc = p.TensorDesc("image", "uint8", [64, 64, 3], frame=1, nbytes=len(image))
    first = BrokerCore(load_catalog([]), seed=1)
    first.out.journaling = True
    msg = p.Submit("r1", "flux-schnell-img2img", {"prompt": "p", "width": 64, "height": 64, "strength": 0.5}, True, [desc])
    sends = first.on_frontend(CLIENT, msg, [b"unused", image], 0.0)
    (record,) = [s for s in sends if isinstance(s, Record)]
    assert [(d.frame, bytes(f)) for d, f in record.tensors] == [(0, image)]  # renumbered to its own list
    reference = tasks_with_frames(first, sends)
    assert any(frames == [image] for *_, frames in reference)

    again = BrokerCore(load_catalog([]), seed=2)
    tensors, frames = [d for d, _ in record.tensors], [f for _, f in record.tensors]
    sends = again.on_resume("r1", CLIENT, record.workflow, record.params, tensors, frames, True, 0.0)
    assert tasks_with_frames(again, sends) == reference


def test_a_resumed_request_this_broker_cannot_run_fails_typed():
    core = journaled_core()
    sends = core.on_resume("r1", CLIENT, "gone", {"prompt": "x", "seed": 1}, [], [], True, 0.0)
    (failed,) = [s.msg for s in sends if not isinstance(s, Record)]
    assert failed.code == ErrorCode.UNKNOWN_WORKFLOW.value
    assert kinds(sends) == ["Failed", "journal:failed"] and core.requests == {}


def _monolith_core():
    core = make_core(dataclasses.replace(SETTINGS, serving="monolith", orphan_timeout_s=30.0))
    core.out.journaling = True
    return core


def test_a_resumed_monolith_request_waits_for_its_pipeline_actor_to_come_back():
    # Before: at a restart no actor is back yet, so a monolith request failed no_capacity at once.
    core = _monolith_core()
    assert core.on_resume("r1", CLIENT, "plain", {"prompt": "x", "seed": 1}, [], [], True, 0.0) == []
    assert core.on_tick(1.0) == [] and core.requests == {}  # parked: no pipeline actor yet
    hello(core, "pipe-1", "pipeline/plain", now=2.0)
    sends = core.on_tick(2.25)
    (batch,) = [s.msg for s in sends if isinstance(s.msg, p.Tasks)]
    assert [t.request_id for t in batch.tasks] == ["r1"] and "r1" in core.requests


def test_a_resumed_monolith_request_no_pipeline_serves_fails_no_capacity_after_the_grace():
    core = _monolith_core()
    core.on_resume("r1", CLIENT, "plain", {"prompt": "x", "seed": 1}, [], [], True, 0.0)
    assert core.on_tick(29.0) == []
    sends = core.on_tick(30.0)
    (failed,) = [s.msg for s in sends if not isinstance(s, Record)]
    assert failed.code == ErrorCode.NO_CAPACITY.value and "pipeline" in failed.message
    assert kinds(sends) == ["Failed", "journal:failed"]


def test_the_same_clients_repeated_submit_is_its_job_again():
    core = journaled_core()
    first = [s.msg for s in submit(core, "r1", "guided") if not isinstance(s, Record) and isinstance(s.msg, p.Accepted)]
    sends = submit(core, "r1", "guided")  # no seed: the retry means the one drawn for it
    assert kinds(sends) == ["Accepted"]  # no second request, nothing journaled twice
    assert [s.msg for s in sends] == first and len(core.requests) == 1
    assert core.counters["submits_repeated"] == 1
    sends = submit(core, "r1", "guided", seed=first[0].params["seed"])
    assert kinds(sends) == ["Accepted"]


@pytest.mark.parametrize("change", [{"client": b"client-2"}, {"prompt": "another"}, {"seed": -1}, {"steps": 3}])
def test_another_clients_or_another_requests_submit_under_the_same_id_is_a_duplicate(change):
    core = journaled_core()
    (accepted,) = [s.msg for s in submit(core, "r1") if not isinstance(s, Record) and isinstance(s.msg, p.Accepted)]
    if change.get("seed") == -1:
        change = {"seed": accepted.params["seed"] + 1}
    sends = submit(core, "r1", **change)
    (rejected,) = [s.msg for s in sends]
    assert (rejected.code, rejected.field) == ("duplicate_request", "request_id")


def test_the_shell_journals_tensor_inputs_as_the_re_run_needs_them(tmp_path):
    server = BrokerServer(BrokerConfig(journal=str(tmp_path / "journal.db")), zmq.Context.instance())
    frame = zmq.Frame(bytes(range(12)))
    desc = p.TensorDesc("image", "uint8", [2, 2, 3], frame=0, nbytes=12)
    server._apply([Record("r1", ACCEPTED, CLIENT, "wf", {"seed": 1}, ((desc, frame),), True)])
    (entry,) = server.journal.unfinished()
    assert entry.tensors == [(desc.to_wire(), bytes(range(12)))]
    assert p.TensorDesc.from_wire(entry.tensors[0][0]) == desc
    server._apply([Record("r1", FINISHED)])
    assert server.journal.status("r1") == "finished" and server.journal.unfinished() == []
    server._apply([Record("r1", ACCEPTED, CLIENT, "wf", {"seed": 2}, (), True)])  # an id used again after it ended
    assert server.journal.unfinished()[0].params == {"seed": 2}
    server.close()


def test_a_restarted_broker_gives_a_journaled_clients_routing_id_back_to_its_key_only(tmp_path):
    # Keys on: the journal keeps the key that submitted; after a restart another key must
    # not claim the routing id first and receive the re-run's answer.
    journal = str(tmp_path / "journal.db")
    first = BrokerServer(BrokerConfig(journal=journal), zmq.Context.instance())
    first.routing_owners.claim(CLIENT, "client:owner")  # what the keyed frontend did at its SUBMIT
    first._apply([Record("r1", ACCEPTED, CLIENT, "plain", {"prompt": "x", "seed": 1}, (), True)])
    assert first.journal.unfinished()[0].user == "client:owner"
    first.close()
    again = BrokerServer(BrokerConfig(journal=journal), zmq.Context.instance())
    again.core = make_core()  # the test catalog, which has "plain"
    again.core.out.journaling = True
    again._apply = lambda sends: None  # no sockets here: only the binding matters
    assert again.resume() == 1
    assert not again.routing_owners.claim(CLIENT, "client:someone-else")
    assert again.routing_owners.claim(CLIENT, "client:owner")
    again.close()


def test_a_corrupt_journal_stops_the_broker_with_a_message_naming_the_file(tmp_path):
    path = tmp_path / "journal.db"
    path.write_bytes(b"this is not a database" * 100)
    proc = subprocess.run([sys.executable, "-m", "broker.server", "--journal", str(path), "--frontend",
                           "tcp://127.0.0.1:0", "--backend", "tcp://127.0.0.1:0"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=_env())
    assert proc.returncode != 0
    assert str(path) in proc.stderr and "unreadable" in proc.stderr


# ------------------------------------------------------------------ a broker process restarted

WORKFLOW = "flux-schnell-txt2img"
MODELS = ["CLIP_Flux", "T5_Flux", "Flux1Schnell", "Flux1VAE"]
SIZE = {"steps": 4, "width": 128, "height": 128}


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")


class BrokerProcess:
    def __init__(self, frontend: str, backend: str, journal: Path, log: Path):
        self.args = [sys.executable, "-m", "broker.server", "--frontend", frontend, "--backend", backend,
                     "--journal", str(journal), "--heartbeat-interval-s", "0.2", "--heartbeat-misses", "5",
                     "--log-level", "info"]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_a_broker_killed_with_20_requests_in_flight_finishes_them_all_after_a_restart(tmp_path):
    from actors.runtime import ActorConfig, ActorRuntime
    from clients import Client
    from clients.local import free_port

    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    journal = tmp_path / "journal.db"
    broker = BrokerProcess(frontend, backend, journal, tmp_path / "broker.log")
    broker.start()
    # Slow enough that 20 requests are still running when the broker dies.
    actors = [ActorRuntime(ActorConfig(model=m, broker_backend=backend, options={"time_scale": 0.02},
                                       heartbeat_interval_s=0.2, heartbeat_misses=5, reconnect_max_s=0.5))
              for m in MODELS]
    threads = [threading.Thread(target=a.run, daemon=True) for a in actors]
    for t in threads:
        t.start()
    params = [dict(prompt=f"brick {i}", seed=1000 + i, **SIZE) for i in range(20)]
    try:
        with Client(frontend, admin_timeout_s=2.0) as client:
            _wait(lambda: len(client.stats(timeout=2.0).actors) == len(MODELS), 60, "the actors to join")
            # A run without a restart: the reference images.
            reference = [job.result(timeout=60).image
                         for job in [client.submit(WORKFLOW, request_id=f"ref-{i}", **kw) for i, kw in enumerate(params)]]
            jobs = [client.submit(WORKFLOW, request_id=f"job-{i}", **kw) for i, kw in enumerate(params)]
            running = sum(not job.done() for job in jobs)
            broker.kill()
            assert running >= 10, f"only {running} of 20 requests were in flight when the broker died"
            broker.start()  # same ports, same journal; the actors and this client reconnect
            results = [job.result(timeout=90) for job in jobs]
            for i, result in enumerate(results):
                assert (result.image == reference[i]).all(), f"job-{i}: another image after the restart"
            assert [r.params["seed"] for r in results] == [kw["seed"] for kw in params]
            # The new broker ran what the journal held open and nothing else (no request
            # came twice: the client would have kept the first answer only).
            counters = client.stats(timeout=5.0).counters
            assert 1 <= counters["requests_resumed"] <= 20
            assert counters["requests_completed"] == counters["requests_resumed"]
        broker.stop()
        reopened = Journal(journal)
        assert reopened.unfinished() == []
        assert all(reopened.status(f"job-{i}") == "finished" for i in range(20))
        reopened.close()
    finally:
        for a in actors:
            a.stop()
        for t in threads:
            t.join(5)
        broker.stop()
