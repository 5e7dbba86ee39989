"""A localhost cluster of real processes: broker, node agent, emulated actors.

Two workflows (FLUX.1-schnell with and without true CFG) share their base model,
text encoders and VAE. Heartbeats are fast so a killed actor is noticed in well under
a second. Timings are scaled down (time_scale) so the suite stays quick; the data
plane still moves tensors of the real sizes for the requested resolution.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from clients import Client, RequestRejected
from clients.local import LocalCluster, LocalClusterSpec

pytestmark = pytest.mark.cluster

WORKFLOWS = ["flux-schnell-txt2img", "flux-schnell-txt2img-cfg"]
SIZE = {"width": 256, "height": 256}


def _spec(tmp_path, time_scale: float) -> LocalClusterSpec:
    return LocalClusterSpec(
        workflows=WORKFLOWS, replicas={"Flux1Schnell": 2}, options={"time_scale": time_scale},
        max_batch_rows=8, emulate_gpus=2, heartbeat_interval_s=0.2, heartbeat_misses=3,
        run_dir=str(tmp_path / "run"), log_level="warning",
        # FLUX's profile says batching does not pay; these tests are about batching
        # across workflows itself, so fill batches to max_batch_rows regardless.
        batch_by_profile=False,
    )


def _submit_all(client: Client, n: int, steps: int = 4) -> list:
    return [client.submit(WORKFLOWS[i % 2], prompt=f"prompt {i}", seed=i, steps=steps, progress=False, **SIZE)
            for i in range(n)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(_spec(tmp_path_factory.mktemp("shared"), time_scale=0.05)) as running:
        yield running


def test_fifty_concurrent_requests_complete_and_share_the_base_model(cluster):
    with Client(cluster.frontend) as client:
        jobs = _submit_all(client, 50)
        results = [job.result(timeout=120) for job in jobs]
        stats = client.stats()
    assert len(results) == 50
    for result in results:
        assert result.image.shape == (256, 256, 3)
    base = next(m for m in stats.models if m.model == "Flux1Schnell")
    assert sorted(base.workflows) == WORKFLOWS
    assert base.actors == 2
    # Telemetry, not logs: the shared base-model actors ran batches mixing both workflows.
    assert base.mixed_workflow_batches > 0
    mixing = [a for a in stats.actors if a.model == "Flux1Schnell" and a.mixed_workflow_batches > 0]
    assert mixing, "no base-model actor reported a batch mixing both workflows"
    assert max(a.max_batch_rows_seen for a in stats.actors if a.model == "Flux1Schnell") > 1
    # every intermediate tensor was freed once consumed
    time.sleep(0.5)
    assert all(a.held_tensors == 0 for a in client_stats(cluster).actors)


def client_stats(cluster):
    with Client(cluster.frontend) as client:
        return client.stats()


def test_same_inputs_give_the_same_image_and_progress_is_reported(cluster):
    with Client(cluster.frontend) as client:
        first = client.submit("flux-schnell-txt2img", prompt="a red fox", seed=11, steps=3, **SIZE)
        events = list(first.progress(timeout=60))
        image_a = first.result(timeout=60).image
        image_b = client.generate("flux-schnell-txt2img", prompt="a red fox", seed=11, steps=3, timeout=60, **SIZE).image
        image_c = client.generate("flux-schnell-txt2img", prompt="a red fox", seed=12, steps=3, timeout=60, **SIZE).image
    assert (image_a == image_b).all()
    assert not (image_a == image_c).all()
    steps = [e.step for e in events if e.kind == "denoise"]
    assert steps == [1, 2, 3]
    assert events[-1].node == "decode" and events[-1].done_nodes == events[-1].total_nodes


def test_bad_parameter_is_rejected_naming_the_field(cluster):
    with Client(cluster.frontend) as client:
        with pytest.raises(RequestRejected) as err:
            client.submit("flux-schnell-txt2img", prompt="x", steps=0)
        assert err.value.field == "params.steps"
        with pytest.raises(RequestRejected) as err:
            client.submit("flux-schnell-txt2img", prompt="x", scheduler="ddim")
        assert err.value.field == "params.scheduler"
        with pytest.raises(RequestRejected) as err:
            client.submit("no-such-workflow", prompt="x")
        assert err.value.field == "workflow"
        assert [w.name for w in client.workflows() if w.name in WORKFLOWS] == WORKFLOWS


def test_sigkill_of_a_base_model_actor_loses_no_request(tmp_path):
    with LocalCluster(_spec(tmp_path, time_scale=0.5)) as cluster, Client(cluster.frontend) as client:
        jobs = _submit_all(client, 24)
        victim = next(a for a in client.stats().actors if a.model == "Flux1Schnell")
        time.sleep(0.6)  # mid-run: both base-model actors hold latents and run batches
        os.kill(victim.pid, signal.SIGKILL)
        results = [job.result(timeout=180) for job in jobs]
        stats = client.stats()
        # Recomputed work is identical: the same requests again, on the surviving actor.
        with ThreadPoolExecutor(4) as pool:
            again = list(pool.map(lambda i: client.generate(
                WORKFLOWS[i % 2], prompt=f"prompt {i}", seed=i, steps=4, timeout=120, **SIZE), range(24)))
    assert len(results) == 24
    assert stats.counters["actors_lost"] >= 1
    assert stats.counters["tasks_requeued"] + stats.counters["requests_restarted"] > 0
    assert stats.counters["requests_failed"] == 0
    assert victim.actor_id not in {a.actor_id for a in stats.actors}
    for before, after in zip(results, again, strict=True):
        assert (before.image == after.image).all()


def test_heartbeat_keeps_beating_while_a_long_batch_computes(tmp_path):
    # One denoise step at 1024x1024 takes 0.22 s x time_scale 5 = 1.1 s, longer than the
    # 0.6 s the broker waits for a heartbeat (0.2 s x 3 misses).
    spec = _spec(tmp_path, time_scale=5.0)
    spec.workflows, spec.replicas = ["flux-schnell-txt2img"], {}
    with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
        result = client.generate("flux-schnell-txt2img", prompt="slow", seed=1, steps=2, timeout=60)
        stats = client.stats()
    assert result.image.shape == (1024, 1024, 3)
    assert result.latency_s > 2.0  # the steps really were long
    assert stats.counters["actors_lost"] == 0
    assert stats.counters["tasks_requeued"] == 0


def test_broker_answers_protocol_violations_and_keeps_serving(cluster):
    import msgpack
    import zmq

    from broker import protocol as p

    ctx = zmq.Context.instance()
    bad_messages = [
        [b"", b"NOT-LEGO", b"SUBM", msgpack.packb({})],  # wrong protocol tag
        [b"", p.PROTOCOL_TAG, b"WHAT", msgpack.packb({})],  # unknown command
        [b"", p.PROTOCOL_TAG, b"SUBM", b"\xc1garbage"],  # header is not msgpack
        [b"", p.PROTOCOL_TAG, b"SUBM", msgpack.packb({"request_id": 5})],  # wrong field type
        [b"", p.PROTOCOL_TAG],  # too few frames
        [b"no delimiter"],
    ]
    codes = []
    for address in (cluster.frontend, cluster.backend):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        for frames in bad_messages:
            sock.send_multipart(frames)
            assert sock.poll(5000), f"no answer from {address} to {frames!r}"
            msg, _ = p.decode(sock.recv_multipart()[1:])
            assert isinstance(msg, p.Error)
            codes.append(msg.code)
        sock.close()
    assert codes[:5] == ["bad_tag", "unknown_command", "bad_header", "bad_header", "bad_frames"]
    with Client(cluster.frontend) as client:  # still serving
        assert client.generate("flux-schnell-txt2img", prompt="after", steps=1, timeout=60, **SIZE).image.shape == (256, 256, 3)
        assert client.stats().counters["protocol_errors"] >= 2 * len(bad_messages)


def test_a_cluster_that_fails_to_start_leaves_no_process_behind(tmp_path):
    import psutil

    from clients.errors import LegoError

    # The built-in FLUX models have no weights to load: diffusers actors exit at start.
    spec = LocalClusterSpec(workflows=["flux-schnell-txt2img"], backend="diffusers",
                            run_dir=str(tmp_path / "run"), log_level="warning")
    cluster = LocalCluster(spec)
    with pytest.raises(LegoError, match="exited before joining"):
        cluster.start(timeout_s=30)
    started = [proc.pid for proc in cluster.processes.values()]
    assert started and all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                           for pid in started)
    assert not list((tmp_path / "run" / "pids").glob("*.pid"))
    actor_logs = list((tmp_path / "run" / "logs").glob("actor-*.log"))
    assert actor_logs and any("source" in log.read_text() for log in actor_logs)
