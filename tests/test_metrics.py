"""`clients.metrics.render_metrics`: a broker snapshot in the Prometheus text format.

Checked with prometheus_client's own parser: from a sans-IO broker core driven by
message objects (exact values), and from a local emulated cluster of real processes
(counters move when requests run)."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker import protocol as p
from clients.metrics import CONTENT_TYPE, render_metrics
from tests.broker_helpers import CLIENT, hello_agent, make_core, of, run, standard_actors, submit


def samples(stats: p.Stats) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the rendered, re-parsed exposition."""
    text = render_metrics(stats).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels) -> float:
    return found[name, tuple(sorted(labels.items()))]


def test_content_type_is_the_prometheus_text_format():
    assert CONTENT_TYPE.startswith("text/plain") and "version=0.0.4" in CONTENT_TYPE


def test_a_core_snapshot_renders_every_series_with_its_values():
    core = make_core()
    hello_agent(core)
    sends = submit(core, "r1") + submit(core, "r2") + standard_actors(core)
    submit(core, "bad", steps=-1)
    core.on_frontend(CLIENT, p.AdminPause("guided"), [], 0.0)
    submit(core, "g1", "guided")
    assert len(of(run(core, sends, now=0.3), p.Result, CLIENT)) == 2
    core.on_frontend(CLIENT, p.AdminDrain("enc-b-1"), [], 0.3)
    core.on_frontend(CLIENT, p.AdminStop("vae-1"), [], 0.3)
    core.on_frontend(CLIENT, p.AdminReplicas("den", min=1, max=4), [], 0.3)
    submit(core, "r3", now=0.4)  # queued: enc-a-1 has its one credit back, so it runs; den waits
    core.meters.loop_lagged(0.003)
    found = samples(core.snapshot(0.5))

    assert value(found, "lego_requests_completed_total", workflow="plain") == 2
    assert value(found, "lego_slo_attained_total", workflow="plain") == 2
    assert value(found, "lego_slo_missed_total", workflow="plain") == 0
    assert value(found, "lego_rejections_total", reason="invalid_param") == 1
    assert value(found, "lego_rejections_total", reason="paused") == 1
    assert value(found, "lego_workflow_paused", workflow="guided") == 1
    assert value(found, "lego_workflow_paused", workflow="plain") == 0
    # histograms: cumulative buckets ending in +Inf == count
    assert value(found, "lego_task_latency_seconds_count", model="den", mode="denoise") == 4
    assert value(found, "lego_task_latency_seconds_bucket", model="den", mode="denoise", le="+Inf") == 4
    assert value(found, "lego_task_latency_seconds_bucket", model="den", mode="denoise", le="0.001") == 4  # done at once
    assert value(found, "lego_request_latency_seconds_count", workflow="plain") == 2
    assert value(found, "lego_request_latency_seconds_bucket", workflow="plain", le="0.25") == 0
    assert value(found, "lego_request_latency_seconds_bucket", workflow="plain", le="0.5") == 2
    assert value(found, "lego_request_latency_seconds_sum", workflow="plain") == pytest.approx(0.6)
    assert value(found, "lego_broker_loop_lag_seconds_bucket", le="0.005") == 1
    # actors by model and state, zeros included
    assert value(found, "lego_actors", model="enc-b", state="drained") == 1
    assert value(found, "lego_actors", model="enc-b", state="idle") == 0
    assert value(found, "lego_actors", model="vae", state="stopping") == 1
    assert value(found, "lego_actors", model="den", state="idle") == 1
    assert value(found, "lego_replica_bound", model="den", bound="max") == 4
    assert value(found, "lego_queue_depth", model="enc-a") == 0
    assert value(found, "lego_transfer_bytes_total", path="local") == 2 * 64  # step 1 ran where step 0's output was
    assert value(found, "lego_transfer_fallbacks_total", path="cuda_ipc") == 0
    assert value(found, "lego_broker_events_total", event="tasks_done") == core.counters["tasks_done"]
    assert value(found, "lego_requests_in_flight") == 1
    assert value(found, "lego_device_free_bytes", host="host-1", device="cpu") == 2**30


def test_bytes_by_path_come_from_actor_telemetry():
    core = make_core()
    standard_actors(core)
    core.on_backend(b"den-1", p.Heartbeat(1.0, p.ActorTelemetry(fetches=3, fetched_bytes=900, shm_bytes=500,
                                                                ipc_bytes=300, ipc_fallbacks=1), "den-1", "den-1"), [], 1.0)
    found = samples(core.snapshot(1.0))
    assert [value(found, "lego_transfer_bytes_total", path=path) for path in ("cuda_ipc", "shm", "frames")] == [
        300, 500, 100]
    assert value(found, "lego_transfer_fallbacks_total", path="cuda_ipc") == 1
    assert value(found, "lego_fetches_total") == 3


def test_an_empty_snapshot_renders_and_parses():
    stats = p.Stats(0.0, [], [], [], {}, {})
    families = {f.name for f in text_string_to_metric_families(render_metrics(stats).decode())}
    assert {"lego_transfer_bytes", "lego_requests_in_flight", "lego_task_latency_seconds"} <= families


@pytest.mark.cluster
@pytest.mark.timeout(90)
def test_counters_move_when_requests_run_on_a_local_cluster(tmp_path):
    from clients import Client
    from clients.local import LocalCluster, LocalClusterSpec

    workflow = "flux-schnell-txt2img"
    spec = LocalClusterSpec(workflows=[workflow], options={"time_scale": 0.02}, run_dir=str(tmp_path / "run"),
                            log_level="warning")
    with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
        before = samples(client.stats())
        for seed in range(3):
            client.generate(workflow, prompt="a metric", seed=seed, steps=2, timeout=30)
        with pytest.raises(Exception, match="invalid_param"):
            client.submit(workflow, prompt="x", steps=-1)
        time.sleep(0.6)  # the loop-lag meter samples at each tick (every 0.25 s): the requests may beat it
        after = samples(client.stats())

    def moved(name, **labels):
        return after.get((name, tuple(sorted(labels.items()))), 0) - before.get((name, tuple(sorted(labels.items()))), 0)

    assert moved("lego_requests_completed_total", workflow=workflow) == 3
    assert moved("lego_request_latency_seconds_count", workflow=workflow) == 3
    assert moved("lego_task_latency_seconds_count", model="Flux1Schnell", mode="denoise") == 6
    assert moved("lego_rejections_total", reason="invalid_param") == 1
    assert moved("lego_broker_loop_lag_seconds_count") > 0
    moved_bytes = sum(moved("lego_transfer_bytes_total", path=path) for path in ("local", "cuda_ipc", "shm", "frames"))
    assert moved_bytes > 0
    assert after[("lego_actors", (("model", "Flux1Schnell"), ("state", "idle")))] == 1
