"""The gateway's pure parts: key file, roles, sessions, request bodies, error mapping, history."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from broker import protocol as p
from clients.errors import Cancelled, RequestFailed, RequestRejected, Timeout
from clients.gateway.auth import Sessions, required_role
from clients.gateway.bodies import ImagesRequest, parse_images, parse_run
from clients.gateway.errors import ApiError, from_client_error
from clients.gateway.keys import KeyFileError, KeyRing, bearer_token, fingerprint
from clients.gateway.observe import History
from clients.gateway.runs import Run, RunStore

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


class _FakeJob:
    """Stands in for AsyncJob: accepted unless its workflow is "refused"; no progress."""

    def __init__(self, workflow: str, request_id: str, params: dict):
        self.workflow, self.request_id, self.params, self.cancelled = workflow, request_id, params, False
        self.outcome = asyncio.Event()

    async def wait_accepted(self, timeout):
        if self.workflow == "refused":
            raise RequestRejected(self.request_id, "invalid_param", "steps: too many", "params.steps")

    async def progress(self):
        await self.outcome.wait()
        return
        yield  # an async generator with nothing to report

    async def result(self):
        raise Cancelled(self.request_id, "cancelled", "cancelled")

    def cancel(self):
        self.cancelled = True
        self.outcome.set()


class _FakeClient:
    submit_timeout_s = 1.0

    def __init__(self):
        self.jobs: list[_FakeJob] = []

    async def submit(self, workflow, *, request_id, wait_accepted, **params):
        self.jobs.append(_FakeJob(workflow, request_id, params))
        return self.jobs[-1]


def test_runs_start_all_or_none_within_the_keys_quota_and_free_it_when_they_end():
    async def scenario():
        client = _FakeClient()
        store = RunStore(client, max_runs_per_key=3, keep_finished_runs=10, keep_finished_s=60)
        with pytest.raises(ApiError) as err:  # one refusal: the accepted sibling is cancelled, nothing is kept
            await store.start("k1", [("wf", {"prompt": "a"}), ("refused", {"prompt": "b"})])
        assert (err.value.status, err.value.field) == (400, "params.steps")
        assert client.jobs[0].cancelled and not store.runs and store.in_flight["k1"] == 0
        runs = await store.start("k1", [("wf", {"prompt": "a"})] * 3)
        with pytest.raises(ApiError) as err:
            await store.start("k1", [("wf", {})])
        assert err.value.status == 429 and err.value.headers() == {"Retry-After": "1"}
        assert len(await store.start("k2", [("wf", {})])) == 1  # quotas are per key
        store.cancel(runs[0])
        await store.wait(runs[0], 5)
        assert runs[0].state == "cancelled" and store.in_flight["k1"] == 2
        assert len(await store.start("k1", [("wf", {})])) == 1
        await store.close()
        assert not client.jobs[1].cancelled  # refused: there is nothing to cancel
        assert all(job.cancelled for job in client.jobs[2:])  # closing cancels what still runs

    asyncio.run(scenario())


def test_finished_runs_are_forgotten_after_a_while_or_beyond_a_count():
    store = RunStore(None, max_runs_per_key=1, keep_finished_runs=2, keep_finished_s=10)
    now = time.time()  # get() prunes by the wall clock too
    for i, ended in enumerate((now - 4, now - 3, now - 2, now - 1)):
        store.runs[str(i)] = Run(str(i), "wf", "k", ended, state="succeeded", ended=ended)
        store.finished[str(i)] = ended
    store.prune(now)
    assert sorted(store.runs) == ["2", "3"]  # the newest two
    store.prune(now + 8.5)
    assert sorted(store.runs) == ["3"]  # and none older than 10 s
    with pytest.raises(ApiError) as err:
        store.get("2", "k")
    assert (err.value.status, err.value.field) == (404, "id")
    with pytest.raises(ApiError):
        store.get("3", "someone else")
    assert store.get("3", "someone else", admin=True).id == "3"


def test_a_run_the_broker_never_ends_is_failed_after_run_timeout_s_and_frees_its_slot():
    async def scenario():
        client = _FakeClient()
        store = RunStore(client, max_runs_per_key=1, keep_finished_runs=10, keep_finished_s=60, run_timeout_s=30)
        (run,) = await store.start("k", [("wf", {})])
        store.prune(run.created + 29)
        assert run.state == "queued" and store.in_flight["k"] == 1
        store.prune(run.created + 31)
        assert run.state == "failed" and run.error["code"] == "timeout" and client.jobs[0].cancelled
        assert store.in_flight["k"] == 0
        await asyncio.sleep(0.01)  # the broker's late "cancelled" reaches the follower: nothing changes
        assert run.state == "failed" and store.in_flight["k"] == 0
        await store.close()

    asyncio.run(scenario())
