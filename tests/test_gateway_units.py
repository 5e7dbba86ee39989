"""The gateway's pure parts: key file, roles, sessions, request bodies, error mapping, history."""

from __future__ import annotations

import random

import pytest

from broker import protocol as p
from clients.errors import RequestFailed, RequestRejected, Timeout
from clients.gateway.auth import Sessions, required_role
from clients.gateway.bodies import ImagesRequest, parse_images, parse_run
from clients.gateway.errors import ApiError, from_client_error
from clients.gateway.keys import KeyFileError, KeyRing, bearer_token, fingerprint
from clients.gateway.observe import History

ADMIN, USER = "adm-0123456789abcdef0123", "usr-fedcba9876543210fedc"


def test_the_key_file_gives_roles_and_names_and_unnamed_keys_are_shown_by_fingerprint():
    ring = KeyRing.parse(f"# comment\n\nadmin {ADMIN} ops\nuser {USER}   # no name\n")
    assert len(ring) == 2
    admin, user = ring.lookup(ADMIN), ring.lookup(USER)
    assert (admin.role, admin.name) == ("admin", "ops") and admin.allows("admin") and admin.allows("user")
    assert user.role == "user" and user.name == fingerprint(USER) and not user.allows("admin")
    assert ring.lookup(USER + "x") is None and ring.lookup("") is None
    assert ring.name_of(admin.fingerprint) == "ops"
    assert USER not in fingerprint(USER) and fingerprint(USER) == fingerprint(USER) != fingerprint(ADMIN)


@pytest.mark.parametrize("text, message", [
    (f"root {ADMIN}", "role must be one of"),
    ("user short-key", "at least 16 characters"),
    (f"user {USER}\nadmin {USER}", "line 2: the same key appears twice"),
    (f"user {USER} a b", "expected ROLE KEY [NAME]"),
    ("# nothing here\n", "no keys"),
])
def test_a_bad_key_file_says_which_line_and_never_echoes_the_key(text, message):
    with pytest.raises(KeyFileError) as err:
        KeyRing.parse(text, "keys.txt")
    assert message in str(err.value)
    assert USER not in str(err.value) and ADMIN not in str(err.value)


def test_bearer_tokens_and_the_role_each_path_needs():
    assert bearer_token(f"Bearer {USER}") == USER and bearer_token(f"bearer  {USER} ") == USER
    assert bearer_token(None) is None and bearer_token("Basic abc") is None and bearer_token("Bearer ") is None
    assert [required_role(path) for path in ("/healthz", "/openapi.json", "/admin/login", "/admin/static/admin.js")] \
        == [None] * 4
    assert [required_role(path) for path in ("/v1/runs", "/metrics", "/nowhere")] == ["user"] * 3
    assert [required_role(path) for path in ("/admin", "/admin/api/snapshot", "/admin/logout")] == ["admin"] * 3


def test_console_sessions_expire_and_close():
    now = [100.0]
    sessions = Sessions(ttl_s=60, clock=lambda: now[0])
    key = KeyRing.parse(f"admin {ADMIN} ops").lookup(ADMIN)
    token = sessions.open(key)
    assert ADMIN not in token and sessions.lookup(token) == key and sessions.lookup("forged") is None
    now[0] += 61
    assert sessions.lookup(token) is None
    token = sessions.open(key)
    sessions.close(token)
    assert sessions.lookup(token) is None


def test_an_openai_request_becomes_n_runs_with_distinct_seeds_and_extra_fields_as_parameters():
    images = parse_images({"model": "wf", "prompt": "a fox", "n": 3, "size": "512x256", "seed": 41, "steps": 2,
                           "user": "ignored", "quality": "hd", "response_format": "b64_json"})
    assert images.workflow == "wf" and images.size_given
    assert [p["seed"] for p in images.params] == [41, 42, 43]
    assert images.params[0] == {"prompt": "a fox", "steps": 2, "width": 512, "height": 256, "seed": 41}
    drawn = parse_images({"model": "wf", "prompt": "x", "n": 2}, random.Random(0))
    assert drawn.params[1]["seed"] == drawn.params[0]["seed"] + 1 and "width" not in drawn.params[0]
    assert parse_images({"model": "wf", "prompt": "x", "size": "auto"}).size_given is False


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x"}, "model"),
    ({"model": "wf"}, "prompt"),
    ({"model": "wf", "prompt": "x", "n": 11}, "n"),
    ({"model": "wf", "prompt": "x", "n": True}, "n"),
    ({"model": "wf", "prompt": "x", "response_format": "url"}, "response_format"),
    ({"model": "wf", "prompt": "x", "size": "512"}, "size"),
    ({"model": "wf", "prompt": "x", "size": "512x512", "width": 64}, "width"),
    ({"model": "wf", "prompt": "x", "seed": -1}, "seed"),
    ({"model": "wf", "prompt": "x", "stream": True}, "stream"),
    ({"model": "wf", "prompt": "x", "output_format": "jpeg"}, "output_format"),
])
def test_bad_openai_fields_are_400_naming_the_field(body, field):
    with pytest.raises(ApiError) as err:
        parse_images(body)
    assert (err.value.status, err.value.field) == (400, field)


def test_broker_fields_read_back_as_the_openai_request_named_them():
    sized, plain = ImagesRequest("wf", [], True), ImagesRequest("wf", [], False)
    assert sized.openai_field("params.width") == "size" and plain.openai_field("params.width") == "width"
    assert sized.openai_field("workflow") == "model" and sized.openai_field("params.steps") == "steps"
    assert sized.openai_field(None) is None


def test_a_native_run_body_is_checked_field_by_field():
    assert parse_run({"workflow": "wf", "params": {"prompt": "x"}}) == ("wf", {"prompt": "x"})
    assert parse_run({"workflow": "wf"}) == ("wf", {})
    for body, field in (({"workflow": "wf", "extra": 1}, "extra"), ({"params": {}}, "workflow"),
                        ({"workflow": "wf", "params": [1]}, "params")):
        with pytest.raises(ApiError) as err:
            parse_run(body)
        assert err.value.field == field


def test_broker_refusals_map_to_statuses_with_retry_after():
    admission = from_client_error(RequestRejected("r", "slo_unattainable", "queue too deep", None, 2.2))
    assert admission.status == 429 and admission.headers() == {"Retry-After": "3"}  # rounded up, whole seconds
    soon = from_client_error(RequestRejected("r", "slo_unattainable", "queue too deep", None, 0.0))
    assert soon.headers() == {"Retry-After": "1"}
    bad = from_client_error(RequestRejected("r", "invalid_param", "steps: must be <= 16", "params.steps"))
    assert (bad.status, bad.field, bad.headers()) == (400, "params.steps", {})
    assert from_client_error(RequestRejected("r", "unknown_workflow", "no", "workflow")).status == 400
    for code in ("paused", "overloaded", "no_capacity"):
        refused = from_client_error(RequestRejected("r", code, "not now", "workflow"))
        assert refused.status == 503 and "Retry-After" in refused.headers()
    assert from_client_error(Timeout("no answer")).status == 503
    assert from_client_error(RequestFailed("r", "client_closed", "closed")).status == 503
    error = ApiError(400, "invalid_param", "bad", "steps")
    assert error.native_body() == {"error": {"code": "invalid_param", "message": "bad", "field": "steps"}}
    assert error.openai_body() == {"error": {"message": "bad", "type": "invalid_request_error", "param": "steps",
                                             "code": "invalid_param"}}


def test_history_keeps_a_sliding_window_of_compact_samples():
    history = History(window_s=10)

    def stats(completed: int) -> p.Stats:
        return p.Stats(0.0, [p.ModelStats("m", 3, 2, 0, 0, 0, [], pending_s=1.5)], [], [], {}, {},
                       workflows=[p.WorkflowStats("wf", completed=completed, slo_met=completed)])

    for t in range(0, 30, 2):
        history.add(stats(t), float(t))
    samples = history.to_json()
    assert [s["t"] for s in samples] == [18.0, 20.0, 22.0, 24.0, 26.0, 28.0]
    assert samples[-1]["models"] == {"m": [3, 1.5, 2]} and samples[-1]["workflows"] == {"wf": [28, 28, 0, 0]}
