"""The HTTP gateway in front of an emulated cluster of real processes: auth, bad input,
the runs API with server-sent events and cancellation, limits, metrics, the OpenAPI
document, and that no key ever reaches a log."""

from __future__ import annotations

import base64
import json
import re
import time

import pytest
from gateway_helpers import (  # tests/ is on sys.path
    Gateway,
    app_routes,
    request,
    sse_events,
    write_keys,
)

from clients import Client
from clients.local import LocalCluster, LocalClusterSpec, free_port

WORKFLOW = "flux-schnell-txt2img"
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An emulated cluster (two base-model replicas), a gateway with 3 runs per key."""
    tmp = tmp_path_factory.mktemp("gateway")
    spec = LocalClusterSpec(workflows=[WORKFLOW], replicas={"Flux1Schnell": 2}, options={"time_scale": 0.1},
                            run_dir=str(tmp / "run"), log_level="warning")
    keys = write_keys(tmp / "keys.txt")
    with LocalCluster(spec) as cluster:
        gateway = Gateway(cluster.frontend, tmp / "keys.txt", tmp / "gateway.log", "--max-runs-per-key", "3",
                          "--max-body-bytes", "4096")
        try:
            yield cluster, gateway, keys
        finally:
            gateway.stop()


def test_no_key_is_401_a_wrong_key_is_401_a_user_key_on_an_admin_route_is_403(setup):
    _, gateway, keys = setup
    status, headers, body = request(gateway, "GET", "/v1/workflows")
    assert status == 401 and body["error"]["field"] == "Authorization"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, body = request(gateway, "GET", "/v1/workflows", key="usr-not-a-key-of-this-gateway")
    assert (status, body["error"]["code"]) == (401, "invalid_key")
    status, _, body = request(gateway, "GET", "/admin/api/snapshot", key=keys["alice"])
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, _, body = request(gateway, "POST", "/admin/api/actors/x/drain", {}, key=keys["alice"])
    assert status == 403
    status, _, _ = request(gateway, "GET", "/metrics")
    assert status == 401
    status, headers, _ = request(gateway, "GET", "/admin")  # a browser without a session: to the login form
    assert status == 303 and headers["Location"] == "/admin/login"
    assert request(gateway, "GET", "/v1/workflows", key=keys["alice"])[0] == 200
    assert request(gateway, "GET", "/admin/api/snapshot", key=keys["ops"])[0] == 200


def test_workflows_list_each_workflows_declared_inputs(setup):
    _, gateway, keys = setup
    status, _, body = request(gateway, "GET", "/v1/workflows", key=keys["alice"])
    assert status == 200
    flux = next(w for w in body["workflows"] if w["name"] == WORKFLOW)
    inputs = {i["name"]: i for i in flux["inputs"]}
    assert inputs["prompt"]["required"] is True
    assert inputs["steps"]["max"] >= 4 and inputs["width"]["type"] == "int"


def test_a_batch_of_bad_requests_each_names_its_field_and_a_good_one_then_succeeds(setup):
    _, gateway, keys = setup
    key = keys["alice"]
    images = "/v1/images/generations"
    good = {"model": WORKFLOW, "prompt": "a lighthouse", "size": "256x256", "response_format": "b64_json", "steps": 2}
    bad = [
        # (path, body or raw bytes, headers, status, field)
        (images, b'{"model": "x", "prompt": ', {"Content-Type": "application/json"}, 400, "body"),
        (images, b"[1, 2]", {"Content-Type": "application/json"}, 400, "body"),
        (images, b"model=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
        (images, {**good, "model": "no-such-workflow"}, None, 400, "model"),
        (images, {**good, "steps": 10_000}, None, 400, "steps"),
        (images, {**good, "size": "256x1000000"}, None, 400, "size"),
        (images, {**good, "size": "big"}, None, 400, "size"),
        (images, {**good, "n": 0}, None, 400, "n"),
        (images, {**good, "n": "two"}, None, 400, "n"),
        (images, {**good, "prompt": 7}, None, 400, "prompt"),
        (images, {**good, "response_format": "url"}, None, 400, "response_format"),
        (images, {**good, "no_such_input": 1}, None, 400, "no_such_input"),
        (images, {**good, "padding": "x" * 5000}, None, 413, "body"),
        (images, {**good, "request_id": "mine"}, None, 400, "request_id"),
        # Nesting past the interpreter's recursion limit (once a 500 with a traceback) and past MAX_JSON_DEPTH.
        (images, b"[" * 2000 + b"]" * 2000, {"Content-Type": "application/json"}, 400, "body"),
        (images, json.dumps({**good, "extra": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}).encode(),
         {"Content-Type": "application/json"}, 400, "body"),
        ("/v1/runs", {"workflow": WORKFLOW, "params": {"prompt": "x", "guidance": "high"}}, None, 400, "params.guidance"),
        ("/v1/runs", {"workflow": WORKFLOW, "params": "prompt=x"}, None, 400, "params"),
        ("/v1/runs", {"workflow": 3}, None, 400, "workflow"),
        ("/v1/runs", {"workflow": "no-such-workflow", "params": {"prompt": "x"}}, None, 400, "workflow"),
        ("/v1/runs", {"workflow": WORKFLOW, "params": {}}, None, 400, "params.prompt"),
        ("/v1/runs", {"workflow": WORKFLOW, "params": {"prompt": "x", "progress": False}}, None, 400, "params.progress"),
    ]
    for path, body, headers, status, field in bad:
        raw = body if isinstance(body, bytes) else None
        got, _, answer = request(gateway, "POST", path, None if raw else body, key=key, headers=headers, raw=raw)
        assert got == status, (path, body if raw else field, answer)
        error = answer["error"]
        if path == images:  # OpenAI's error shape
            assert set(error) == {"message", "type", "param", "code"} and error["param"] == field, error
            assert error["type"] == "invalid_request_error"
        else:
            assert set(error) == {"code", "message", "field"} and error["field"] == field, error
        assert error["message"]
    status, _, body = request(gateway, "POST", images, good, key=key)
    assert status == 200, body
    assert base64.b64decode(body["data"][0]["b64_json"]).startswith(b"\x89PNG")
    assert key not in gateway.log() and "Traceback" not in gateway.log()


def test_a_run_streams_its_progress_as_server_sent_events_and_keeps_its_result(setup):
    _, gateway, keys = setup
    status, headers, run = request(gateway, "POST", "/v1/runs", {"workflow": WORKFLOW, "params": {
        "prompt": "a fox", "steps": 3, "width": 128, "height": 128, "seed": 5}}, key=keys["alice"])
    assert status == 201 and headers["Location"] == f"/v1/runs/{run['id']}"
    assert run["params"]["seed"] == 5 and run["state"] in ("queued", "running")
    events = sse_events(gateway, f"/v1/runs/{run['id']}/events", keys["alice"])
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "end" and events[-1][1]["state"] == "succeeded"
    progress = [data for kind, data in events if kind == "progress"]
    assert [p["step"] for p in progress if p["kind"] == "denoise"] == [1, 2, 3]
    assert progress[-1]["done_nodes"] == progress[-1]["total_nodes"]
    status, _, done = request(gateway, "GET", f"/v1/runs/{run['id']}", key=keys["alice"])
    assert status == 200 and done["state"] == "succeeded" and done["progress"]["done_nodes"] == progress[-1]["total_nodes"]
    png = base64.b64decode(done["result"]["image_png_b64"])
    assert png.startswith(b"\x89PNG") and int.from_bytes(png[16:20], "big") == 128  # IHDR width
    # Replayed in full to a late subscriber, or from after the last event it saw; invisible to another user's key.
    assert sse_events(gateway, f"/v1/runs/{run['id']}/events", keys["alice"]) == events
    assert sse_events(gateway, f"/v1/runs/{run['id']}/events", keys["alice"], last_event_id=len(events) - 3) \
        == events[-2:]
    assert request(gateway, "GET", f"/v1/runs/{run['id']}", key=keys["bob"])[0] == 404
    assert request(gateway, "GET", f"/v1/runs/{run['id']}", key=keys["ops"])[0] == 200


def test_a_subscriber_that_leaves_mid_stream_leaves_the_run_and_the_gateway_going(setup):
    _, gateway, keys = setup
    _, _, run = request(gateway, "POST", "/v1/runs", {"workflow": WORKFLOW, "params": {"prompt": "x", "steps": 8}},
                        key=keys["alice"])
    assert len(sse_events(gateway, f"/v1/runs/{run['id']}/events", keys["alice"], stop_after=1)) == 1
    assert sse_events(gateway, f"/v1/runs/{run['id']}/events", keys["alice"])[-1][1]["state"] == "succeeded"
    assert request(gateway, "GET", "/healthz")[0] == 200


def test_delete_cancels_a_run_in_flight(setup):
    _, gateway, keys = setup
    _, _, run = request(gateway, "POST", "/v1/runs", {"workflow": WORKFLOW, "params": {
        "prompt": "a long one", "steps": 16}}, key=keys["bob"])
    status, _, answer = request(gateway, "DELETE", f"/v1/runs/{run['id']}", key=keys["bob"])
    assert status == 202 and answer["cancel_requested"] is True
    events = sse_events(gateway, f"/v1/runs/{run['id']}/events", keys["bob"])
    assert events[-1] == ("end", {"state": "cancelled", "error": {"code": "cancelled", "message": "cancelled"}})
    steps = [data["step"] for kind, data in events if kind == "progress" and data["kind"] == "denoise"]
    assert len(steps) < 16
    status, _, answer = request(gateway, "DELETE", f"/v1/runs/{run['id']}", key=keys["bob"])
    assert (status, answer["error"]["code"]) == (409, "already_ended")


def test_runs_in_flight_per_key_are_limited_with_429_and_retry_after(setup):
    _, gateway, keys = setup
    body = {"workflow": WORKFLOW, "params": {"prompt": "x", "steps": 16}}
    ids = [request(gateway, "POST", "/v1/runs", body, key=keys["alice"])[2]["id"] for _ in range(3)]
    status, headers, answer = request(gateway, "POST", "/v1/runs", body, key=keys["alice"])
    assert (status, answer["error"]["code"]) == (429, "too_many_runs") and int(headers["Retry-After"]) >= 1
    # The quota is per key: another key still gets through.
    status, _, other = request(gateway, "POST", "/v1/runs", body, key=keys["bob"])
    assert status == 201
    for run_id, key in [*((i, keys["alice"]) for i in ids), (other["id"], keys["bob"])]:
        request(gateway, "DELETE", f"/v1/runs/{run_id}", key=key)
        sse_events(gateway, f"/v1/runs/{run_id}/events", key)  # until it ended: the slot is free again
    assert request(gateway, "POST", "/v1/runs", {**body, "params": {"prompt": "x", "steps": 1}},
                   key=keys["alice"])[0] == 201


def test_admission_refusal_is_429_with_the_brokers_retry_after(setup):
    cluster, gateway, keys = setup
    with Client(cluster.frontend) as client:
        client.configure({"admission": True, "slo_multiple": 1.0})  # the SLO is the solo latency: no room to queue
        try:
            body = {"model": WORKFLOW, "prompt": "a crowd", "n": 3, "steps": 4, "response_format": "b64_json"}
            status, headers, answer = request(gateway, "POST", "/v1/images/generations", body, key=keys["ops"])
        finally:
            client.configure({"admission": False, "slo_multiple": 5.0})
    assert status == 429, answer
    assert answer["error"]["code"] == "slo_unattainable" and answer["error"]["type"] == "rate_limit_error"
    assert int(headers["Retry-After"]) >= 1


def test_a_paused_workflow_is_503_until_resumed_through_the_admin_api(setup):
    _, gateway, keys = setup
    body = {"workflow": WORKFLOW, "params": {"prompt": "x", "steps": 1}}
    status, _, answer = request(gateway, "POST", f"/admin/api/workflows/{WORKFLOW}/pause", {}, key=keys["ops"])
    assert status == 200 and answer["ok"]
    try:
        status, headers, answer = request(gateway, "POST", "/v1/runs", body, key=keys["alice"])
        assert (status, answer["error"]["code"], answer["error"]["field"]) == (503, "paused", "workflow")
        assert "Retry-After" in headers
        snapshot = request(gateway, "GET", "/admin/api/snapshot", key=keys["ops"])[2]
        assert WORKFLOW in snapshot["stats"]["paused_workflows"]
    finally:
        assert request(gateway, "POST", f"/admin/api/workflows/{WORKFLOW}/resume", {}, key=keys["ops"])[0] == 200
    status, _, run = request(gateway, "POST", "/v1/runs", body, key=keys["alice"])
    assert status == 201
    assert sse_events(gateway, f"/v1/runs/{run['id']}/events", keys["alice"])[-1][1]["state"] == "succeeded"


def test_admin_actions_name_the_field_they_refuse(setup):
    _, gateway, keys = setup
    status, _, answer = request(gateway, "POST", "/admin/api/actors/no-such-actor/drain", {}, key=keys["ops"])
    assert (status, answer["error"]["field"]) == (404, "actor_id")
    status, _, answer = request(gateway, "POST", "/admin/api/actors/x/explode", {}, key=keys["ops"])
    assert (status, answer["error"]["field"]) == (404, "action")
    status, _, answer = request(gateway, "POST", "/admin/api/models/Flux1Schnell/replicas", {"min": 3, "max": 1},
                                key=keys["ops"])
    assert (status, answer["error"]["field"]) == (400, "min")
    status, _, answer = request(gateway, "POST", "/admin/api/models/Flux1Schnell/replicas", {"max": -1},
                                key=keys["ops"])
    assert (status, answer["error"]["field"]) == (400, "max")
    status, _, answer = request(gateway, "POST", "/admin/api/actors/x/drain", None, key=keys["ops"], raw=b"{}",
                                headers={"Content-Type": "text/plain"})  # a cross-site form cannot send JSON
    assert (status, answer["error"]["field"]) == (415, "Content-Type")
    status, _, answer = request(gateway, "POST", "/admin/api/models/Flux1Schnell/replicas", {"min": 1, "max": 4},
                                key=keys["ops"])
    assert status == 200, answer
    snapshot = request(gateway, "GET", "/admin/api/snapshot", key=keys["ops"])[2]
    assert snapshot["stats"]["replica_bounds"]["Flux1Schnell"] == {"min": 1, "max": 4}


def test_metrics_parse_as_prometheus_text_and_the_counters_move(setup):
    from prometheus_client.parser import text_string_to_metric_families

    _, gateway, keys = setup

    def sample(text: str, name: str, **labels) -> float:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def scrape() -> str:
        status, headers, body = request(gateway, "GET", "/metrics", key=keys["alice"])
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        return body.decode()

    before = scrape()
    body = {"model": WORKFLOW, "prompt": "a counter", "size": "128x128", "steps": 1, "n": 2}
    assert request(gateway, "POST", "/v1/images/generations", body, key=keys["alice"])[0] == 200
    assert request(gateway, "POST", "/v1/images/generations", {**body, "n": 0}, key=keys["alice"])[0] == 400
    after = scrape()
    route = {"route": "/v1/images/generations", "method": "POST"}
    for status in ("200", "400"):
        assert (sample(after, "lego_gateway_http_requests_total", status=status, **route)
                == sample(before, "lego_gateway_http_requests_total", status=status, **route) + 1)
    runs = {"workflow": WORKFLOW, "state": "succeeded"}
    assert sample(after, "lego_gateway_runs_total", **runs) == sample(before, "lego_gateway_runs_total", **runs) + 2
    assert sample(after, "lego_gateway_http_request_seconds_count", route="/v1/images/generations") > 0
    assert sample(after, "lego_gateway_broker_up") == 1.0
    # The cluster's own metrics come along, from the broker's snapshot.
    workflow = {"workflow": WORKFLOW}
    assert (sample(after, "lego_requests_completed_total", **workflow)
            >= sample(before, "lego_requests_completed_total", **workflow) + 2)
    assert 'lego_queue_depth{model="Flux1Schnell"}' in after


def test_the_openapi_document_covers_every_route(setup):
    from clients.gateway.app import build_app
    from clients.gateway.config import GatewayConfig
    from clients.gateway.keys import KeyRing

    _, gateway, _ = setup
    status, _, document = request(gateway, "GET", "/openapi.json")  # public
    assert status == 200 and document["openapi"].startswith("3.1")
    app = build_app(GatewayConfig(), KeyRing.parse("admin 0123456789abcdef0123"))
    routes = app_routes(app)
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert routes == documented
    assert len(routes) >= 16


def test_the_broker_unreachable_is_503_and_the_gateway_stays_up(tmp_path):
    keys = write_keys(tmp_path / "keys.txt")
    gateway = Gateway(f"tcp://127.0.0.1:{free_port()}", tmp_path / "keys.txt", tmp_path / "gateway.log",
                      "--broker-timeout-s", "0.5")
    try:
        status, headers, answer = request(gateway, "POST", "/v1/runs", {"workflow": WORKFLOW, "params": {"prompt": "x"}},
                                          key=keys["alice"])
        assert (status, answer["error"]["code"]) == (503, "broker_unavailable") and "Retry-After" in headers
        assert request(gateway, "GET", "/v1/workflows", key=keys["alice"])[0] == 503
        status, _, text = request(gateway, "GET", "/metrics", key=keys["alice"])
        assert status == 200 and b"lego_gateway_broker_up 0.0" in text
        assert request(gateway, "GET", "/healthz")[0] == 200
    finally:
        gateway.stop()


def test_no_key_ever_reaches_the_logs(setup, tmp_path):
    cluster, gateway, keys = setup
    wrong = "usr-" + "f" * 32
    request(gateway, "GET", "/v1/workflows", key=wrong)
    request(gateway, "GET", "/v1/workflows", key=keys["alice"])
    request(gateway, "GET", "/admin/api/snapshot", key=keys["bob"])
    request(gateway, "POST", "/admin/login", raw=f"key={keys['ops']}".encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"})
    request(gateway, "POST", "/admin/login", raw=f"key={wrong}".encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"})
    time.sleep(0.2)
    logs = gateway.log() + "".join(p.read_text(errors="replace") for p in (cluster.run_dir / "logs").glob("*.log"))
    assert re.search(r"http_request .*key=alice", logs) and re.search(r"console_login .*key=ops", logs)  # names only
    # Each request's lines share its http_id, answered as X-Request-Id; its run's lines carry it too.
    _, headers, run = request(gateway, "POST", "/v1/runs", {"workflow": WORKFLOW, "params": {"prompt": "x", "steps": 1}},
                              key=keys["alice"])
    sse_events(gateway, f"/v1/runs/{run['id']}/events", keys["alice"])
    time.sleep(0.2)
    lines = [line for line in gateway.log().splitlines() if f"http_id={headers['X-Request-Id']}" in line]
    assert [re.search(r"\] (\w+)", line).group(1) for line in lines] == ["run_submitted", "http_request", "run_ended"]
    for secret in [*keys.values(), wrong]:
        assert secret not in logs
        assert secret[4:20] not in logs  # not even a piece of it
