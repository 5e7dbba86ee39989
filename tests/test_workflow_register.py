"""Workflows registered at run time (ADMIN_REGISTER, broker/core/registry.py).

The core's side (sans-IO): a registered workflow is listed, its requests run on its
models' actors and batch with the catalog's workflows; every refusal names its field;
an identical definition registered again is accepted; hostile definitions never make
a handler raise. The journal's side: the table appears in an old file, a registration
is journaled before its reply, and a restarted broker registers it again before it
re-runs the requests that use it (a real broker process killed and started again). The
client library, its asyncio twin and `lego workflows register` drive it; only an
admin key may send it.
"""

from __future__ import annotations

import asyncio
import collections
import sqlite3
import threading
from pathlib import Path

import msgpack
import pytest
import zmq
from broker_helpers import (  # tests/ is on sys.path
    CLIENT,
    batches,
    make_core,
    run,
    standard_actors,
    submit,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from process_helpers import lego_cli  # tests/ is on sys.path

from broker import auth
from broker import protocol as p
from broker.core import registry
from broker.core.outbox import ACCEPTED, Record, Registration
from broker.journal import Journal
from broker.protocol.constants import Command
from broker.server import BrokerConfig, BrokerServer
from clients import Client
from clients.aio import AsyncClient
from clients.bench import fuzz
from clients.core import AdminRefused
from clients.local import free_port

ADMIN = b"admin-1"
MINE = {"text_encoders": ["enc-a"], "denoiser": "den", "vae": "vae", "cfg": False,
        "inputs": {"steps": {"default": 2, "max": 8}, "width": {"default": 64}, "height": {"default": 64}}}
FLUX = {"text_encoders": ["CLIP_Flux", "T5_Flux"], "denoiser": "Flux1Schnell", "vae": "Flux1VAE",
        "description": "a registered twin", "inputs": {"steps": {"default": 4, "max": 8}}}


def register(core, name: str, definition: dict, now: float = 0.0) -> list:
    return core.on_frontend(ADMIN, p.AdminRegister(name, definition, call_id="c"), [], now)


def reply_of(sends) -> p.AdminReply:
    (reply,) = [s.msg for s in sends if not isinstance(s, (Record, Registration))]
    assert isinstance(reply, p.AdminReply) and reply.call_id == "c"
    return reply


# ------------------------------------------------------------------ the core


def test_a_registered_workflow_is_listed_and_its_steps_batch_with_the_catalogs_on_the_same_actors():
    core = make_core()
    reply = reply_of(register(core, "mine", MINE))
    assert reply.ok and "registered mine" in reply.message
    (listing,) = [s.msg for s in core.on_frontend(CLIENT, p.ListWorkflows(), [], 0.0)]
    infos = {w.name: w for w in listing.workflows}
    assert infos["mine"].registered and not infos["plain"].registered
    assert infos["mine"].models == ["enc-a", "den", "vae"]
    assert {i.name: i.max for i in infos["mine"].inputs}["steps"] == 8
    sends = submit(core, "r1", "plain") + submit(core, "r2", "mine")
    assert [s.msg.request_id for s in sends if isinstance(s.msg, p.Accepted)] == ["r1", "r2"]
    sends = run(core, sends + standard_actors(core, den_rows=2), dead=("den-1",))
    (first,) = batches(sends, "den-1")  # both requests' first step: one call on the one denoiser actor
    assert sorted((t.request_id, t.workflow) for t in first.tasks) == [("r1", "plain"), ("r2", "mine")]
    assert {m.model: m.workflows for m in core.snapshot(0.0).models}["den"] == ["mine", "plain"]


def test_the_same_definition_again_is_accepted_and_another_under_a_taken_name_refused():
    core = make_core()
    assert reply_of(register(core, "mine", MINE)).ok
    again = reply_of(register(core, "mine", dict(MINE)))
    assert again.ok and "already" in again.message
    other = reply_of(register(core, "mine", {**MINE, "cfg": True}))
    assert (other.ok, other.field) == (False, "name")
    catalogs = reply_of(register(core, "plain", {**MINE, "inputs": {}}))  # the catalog's name, another definition
    assert (catalogs.ok, catalogs.field) == (False, "name")
    plain = {"text_encoders": ["enc-a"], "denoiser": "den", "vae": "vae", "cfg": False,
             "inputs": {"steps": {"default": 2}, "width": {"default": 64}, "height": {"default": 64}}}
    assert reply_of(register(core, "plain", plain)).ok  # the catalog's own definition: nothing changes
    assert set(core.admin.registered) == {"mine"}


BAD = [
    ("", MINE, "name"),
    ("x" * 129, MINE, "name"),
    ("has space", MINE, "name"),
    ("-dash-first", MINE, "name"),
    ("pipeline/plain", MINE, "name"),
    ("w", {**MINE, "denoiser": "a-new-model"}, "definition.denoiser"),
    ("w", {**MINE, "denoiser": "enc-a"}, "definition.denoiser"),  # declared, of another kind
    ("w", {**MINE, "vae": None}, "definition.vae"),
    ("w", {**MINE, "text_encoders": ["enc-a", "new-encoder"]}, "definition.text_encoders[1]"),
    ("w", {**MINE, "text_encoders": "enc-a"}, "definition.text_encoders"),
    ("w", {**MINE, "controlnets": ["a-controlnet"]}, "definition.controlnets[0]"),
    ("w", {**MINE, "cfg": "yes"}, "definition.cfg"),
    ("w", {**MINE, "slo_s": float("nan")}, "definition.slo_s"),
    ("w", {**MINE, "slo_s": -1}, "definition.slo_s"),
    ("w", {**MINE, "source": "/models/new.safetensors"}, "definition.source"),  # no model files
    ("w", {**MINE, "inputs": []}, "definition.inputs"),
    ("w", {**MINE, "inputs": {"steps": 4}}, "definition.inputs.steps"),
    ("w", {**MINE, "inputs": {"nope": {"default": 1}}}, "definition.inputs.nope"),
    ("w", {**MINE, "inputs": {"steps": {"max": 10**9}}}, "definition.inputs.steps.max"),
    ("w", {**MINE, "inputs": {"steps": {"max": 2**60}}}, "definition.inputs.steps.max"),
    ("w", {**MINE, "inputs": {"steps": {"min": "one"}}}, "definition.inputs.steps.min"),
    ("w", {**MINE, "inputs": {"steps": {"min": 1.5}}}, "definition.inputs.steps.min"),
    ("w", {**MINE, "inputs": {"steps": {"min": 0}}}, "definition.inputs.steps.min"),
    ("w", {**MINE, "inputs": {"width": {"min": 0, "default": 64}}}, "definition.inputs.width.min"),
    ("w", {**MINE, "inputs": {"guidance": {"min": -1.0}}}, "definition.inputs.guidance"),  # no CFG: no guidance
    ("w", {**MINE, "inputs": {"steps": {"min": 9, "max": 4}}}, "definition.inputs.steps.min"),
    ("w", {**MINE, "inputs": {"steps": {"multiple_of": 2}}}, "definition.inputs.steps.multiple_of"),
    ("w", {**MINE, "inputs": {"sampler": {"choices": ["mine"], "default": "mine"}}}, "definition.inputs.sampler.choices"),
    ("w", {**MINE, "inputs": {"sampler": {"choices": "euler"}}}, "definition.inputs.sampler.choices"),
    ("w", {**MINE, "inputs": {"sampler": {"choices": [1, 2], "default": 1}}}, "definition.inputs.sampler.default"),
    ("w", {**MINE, "inputs": {"prompt": {"required": False}}}, "definition.inputs.prompt.required"),
    ("w", {**MINE, "inputs": {"width": {"default": 65}}}, "definition.inputs.width.default"),
    ("w", {**MINE, "description": "x" * 10_000}, "definition.description"),
    ("w", {**MINE, "extra": {"a": {"b": {"c": {"d": 1}}}}}, "definition.extra.a.b.c"),
    ("w", {**MINE, "extra": b"bytes"}, "definition.extra"),
    ("w", {**MINE, 7: "int key"}, "definition"),
    ("w", {**MINE, "cfg": True, "distilled_guidance": True}, "definition.distilled_guidance"),
]


@pytest.mark.parametrize(("name", "definition", "field"), BAD, ids=[f"{i}-{f}" for i, (_, _, f) in enumerate(BAD)])
def test_a_refusal_names_its_field_and_changes_nothing(name, definition, field):
    core = make_core()
    before = dict(core.catalog.workflows)
    reply = reply_of(register(core, name, definition))
    assert (reply.ok, reply.field) == (False, field), reply.message
    assert reply.message.startswith(f"{field}: ")
    assert core.catalog.workflows == before and core.admin.registered == {}


def test_at_most_max_registered_workflows():
    core = make_core()
    for i in range(registry.MAX_REGISTERED):
        assert reply_of(register(core, f"w{i}", MINE)).ok
    refused = reply_of(register(core, "one-more", MINE))
    assert (refused.ok, refused.field) == (False, "name") and str(registry.MAX_REGISTERED) in refused.message
    assert reply_of(register(core, "w0", MINE)).ok  # registered already: no new entry


def test_a_registration_is_journaled_before_its_reply_and_once():
    core = make_core()
    core.out.journaling = True
    sends = register(core, "mine", MINE)
    assert [type(s).__name__ if isinstance(s, Registration) else type(s.msg).__name__ for s in sends] == \
        ["Registration", "AdminReply"]
    assert sends[0] == Registration("mine", MINE)
    assert not any(isinstance(s, Registration) for s in register(core, "mine", MINE))
    assert not any(isinstance(s, Registration) for s in register(core, "bad", {**MINE, "vae": "x"}))


def _keys() -> st.SearchStrategy:
    return st.sampled_from(["text_encoders", "denoiser", "vae", "cfg", "img2img", "inputs", "controlnets", "slo_s",
                            "distilled_guidance", "lora", "description", "steps", "width", "prompt", "sampler",
                            "default", "min", "max", "choices", "required", "enc-a", "den", "vae", "x"])


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(),
                     st.text(max_size=20), st.binary(max_size=8), st.sampled_from(["enc-a", "den", "vae", "plain"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                          st.dictionaries(_keys(), inner, max_size=6)), max_leaves=30)
_DEFINITIONS = st.builds(lambda base, extra: {**base, **extra},
                         st.sampled_from([MINE, {**MINE, "inputs": {}}, {}]), st.dictionaries(_keys(), _VALUES, max_size=6))


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.one_of(st.sampled_from(["mine", "plain", "w"]), st.text(max_size=140)), definition=_DEFINITIONS)
def test_hostile_definitions_are_answered_never_raised(name, definition):
    core = make_core()
    reply = reply_of(register(core, name, definition))
    assert reply.ok or reply.field == "name" or reply.field.startswith("definition")
    p.encode(reply)  # an answer built from hostile input still encodes
    if reply.ok and name in core.admin.registered:  # what it took runs like any workflow
        core.on_frontend(CLIENT, p.Submit("r1", name, {"prompt": "x"}), [], 0.0)


def test_the_scheduler_plans_a_registered_workflows_load_on_its_models_from_its_own_catalog():
    """The scheduler reads the catalog files, not the broker's registrations: it never looks a
    workflow up by name in the telemetry, so a registered one's queued work counts on its
    models like any workflow's, and a round plans (no error) with a catalog that lacks it."""
    from broker.catalog import load_catalog
    from broker.core.machine import BrokerCore
    from broker.costs.model import CostModel
    from scheduler.plan import PlanSettings, plan_round
    from scheduler.scaling import ScalingMemory
    from scheduler.snapshot import from_stats

    core = BrokerCore(load_catalog(), seed=1)
    assert reply_of(register(core, "my-flux", FLUX)).ok
    device = p.DeviceInfo("emu:0", "emulated", "H800", 80 * 2**30, 80 * 2**30)
    core.on_backend(b"agent", p.AgentHello("agent", "h", 1, [device]), [], 0.0)
    for i in range(4):
        assert isinstance(core.on_frontend(CLIENT, p.Submit(f"r{i}", "my-flux", {"prompt": "x"}), [], 0.5)[0].msg,
                          p.Accepted)
    stats = core.snapshot(1.0)
    assert [w.submitted for w in stats.workflows if w.workflow == "my-flux"] == [4]
    snapshot = from_stats(stats)
    assert snapshot.load("Flux1Schnell").pending_s > 0
    plan = plan_round(snapshot, CostModel(load_catalog()), ScalingMemory(),
                      PlanSettings(workflows=("flux-schnell-txt2img",)))
    assert {a.model for a in plan.actions} == {"CLIP_Flux", "T5_Flux", "Flux1Schnell", "Flux1VAE"}


def test_only_admin_keys_may_register():
    assert auth.may_send(auth.FRONTEND, "admin:ops", Command.ADMIN_REGISTER)
    for role in ("client", "scheduler"):
        assert not auth.may_send(auth.FRONTEND, f"{role}:x", Command.ADMIN_REGISTER)
    assert not auth.may_send(auth.BACKEND, "actor:a", Command.ADMIN_REGISTER)


# ------------------------------------------------------------------ the journal


def test_an_old_journal_file_gets_the_table_and_keeps_its_requests(tmp_path):
    path = tmp_path / "journal.db"
    db = sqlite3.connect(path)  # the schema before keys (no `user`) and before registrations
    db.executescript("""CREATE TABLE requests (seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE,
        client BLOB NOT NULL, workflow TEXT NOT NULL, params BLOB NOT NULL, tensors BLOB NOT NULL,
        progress INTEGER NOT NULL, accepted_at REAL NOT NULL, status TEXT NOT NULL DEFAULT 'accepted', ended_at REAL);""")
    db.execute("INSERT INTO requests (request_id, client, workflow, params, tensors, progress, accepted_at) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)", ("r1", b"c", "plain", msgpack.packb({"seed": 1}), msgpack.packb([]), 1, 0.0))
    db.commit()
    db.close()
    journal = Journal(path)
    assert journal.workflows() == [] and [e.request_id for e in journal.unfinished()] == ["r1"]
    journal.register_workflow("b", {"denoiser": "den"})
    journal.register_workflow("a", MINE)
    journal.register_workflow("b", {"denoiser": "den", "cfg": True})  # replaced, in its place
    journal.prune(now=1e12)
    journal.close()
    again = Journal(path)
    assert again.workflows() == [("a", MINE), ("b", {"denoiser": "den", "cfg": True})]
    again.close()


def _server(journal: Path) -> BrokerServer:
    server = BrokerServer(BrokerConfig(journal=str(journal)), zmq.Context.instance())
    server.core = make_core()  # the test catalog
    server.core.out.journaling = True
    return server


def test_a_restarted_broker_registers_before_it_re_runs_and_skips_what_its_catalog_no_longer_takes(tmp_path):
    journal = tmp_path / "journal.db"
    first = _server(journal)
    for name, definition in (("mine", MINE), ("gone", {**MINE, "text_encoders": ["enc-b"]})):
        first._apply([s for s in register(first.core, name, definition) if isinstance(s, Registration)])
    first._apply([Record("r1", ACCEPTED, CLIENT, "mine", {"prompt": "x", "seed": 1, "steps": 2}, (), True),
                  Record("r2", ACCEPTED, CLIENT, "gone", {"prompt": "x", "seed": 1, "steps": 2}, (), True)])
    first.close()
    again = _server(journal)
    del again.core.catalog.models["enc-b"]  # today's catalog lacks a model "gone" used
    sent = []
    again._apply = sent.extend  # no sockets here
    assert again.resume() == 2
    assert "mine" in again.core.catalog.workflows and "gone" not in again.core.catalog.workflows
    assert set(again.core.admin.registered) == {"mine"}
    assert "r1" in again.core.requests  # re-run on the registered workflow
    (failed,) = [s.msg for s in sent if not isinstance(s, Record) and isinstance(s.msg, p.Failed)]
    assert (failed.request_id, failed.code) == ("r2", "unknown_workflow")
    again.close()


# ------------------------------------------------------------------ a broker on sockets


@pytest.fixture
def broker():
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    server = BrokerServer(BrokerConfig(frontend_address=frontend, backend_address=backend))
    server.bind()
    thread = threading.Thread(target=server.serve_forever, name="register-broker", daemon=True)
    thread.start()
    yield server, frontend
    server.stop()
    thread.join(timeout=10)
    server.close()


def test_the_client_and_its_asyncio_twin_register_and_refusals_raise_admin_refused(broker):
    _, frontend = broker
    with Client(frontend) as client:
        assert client.register_workflow("my-flux", FLUX).ok
        assert client.register_workflow("my-flux", FLUX).ok  # again: the same
        with pytest.raises(AdminRefused) as err:
            client.register_workflow("my-flux-2", {**FLUX, "vae": "NewVAE"})
        assert err.value.field == "definition.vae"
        assert {w.name: w.registered for w in client.workflows()}["my-flux"] is True

    async def twin():
        async with AsyncClient(frontend) as aclient:
            reply = await aclient.register_workflow("my-flux-async", FLUX)
            with pytest.raises(AdminRefused) as err:
                await aclient.register_workflow("my flux", FLUX)
            return reply, err.value.field, [w.name for w in await aclient.workflows() if w.registered]

    reply, field, registered = asyncio.run(twin())
    assert reply.ok and field == "name" and sorted(registered) == ["my-flux", "my-flux-async"]


def _hostile_registrations(words) -> st.SearchStrategy:
    """Typed ADMIN_REGISTER headers whose definitions reach into the parser, and the fuzz
    package's hostile messages for a port that reads ADMIN_REGISTER."""
    headers = st.builds(lambda name, definition: {"name": name, "definition": definition, "call_id": "f"},
                        st.one_of(st.sampled_from(words), st.text(max_size=40)), _DEFINITIONS)
    typed = headers.map(_packed).filter(lambda header: header is not None).map(
        lambda header: [b"", p.PROTOCOL_TAG, Command.ADMIN_REGISTER.value, header])
    return st.one_of(typed, fuzz.port_messages((Command.ADMIN_REGISTER,), words))


def _packed(header: dict) -> bytes | None:
    try:
        return msgpack.packb(header)
    except (OverflowError, ValueError, TypeError):
        return None


def test_hostile_registrations_on_the_wire_leave_the_broker_serving(broker):
    server, frontend = broker
    words = tuple([*server.core.catalog.workflows, *server.core.catalog.models][:50])
    codes: collections.Counter = collections.Counter()
    context = zmq.Context()

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(batch=st.lists(_hostile_registrations(words), min_size=1, max_size=8))
    def send(batch):
        fuzz.fuzz_socket(frontend, batch, context=context, quiet_s=0.005, codes=codes)

    try:
        send()
    finally:
        context.destroy(linger=0)
    assert codes["internal"] == 0, "a handler raised on a hostile registration (handler_failed in the log)"
    assert server.core.counters.get("encode_errors", 0) == 0
    with Client(frontend, admin_timeout_s=5.0) as client:
        assert client.workflows() and client.stats() is not None
        assert len(server.core.admin.registered) <= registry.MAX_REGISTERED


# ------------------------------------------------------------------ a broker process restarted


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_a_workflow_registered_by_the_cli_survives_a_broker_restart_with_its_request_in_flight(tmp_path):
    from test_broker_restart import BrokerProcess, _wait

    from actors.runtime import ActorConfig, ActorRuntime

    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = BrokerProcess(frontend, backend, tmp_path / "journal.db", tmp_path / "broker.log")
    broker.start()
    catalog = tmp_path / "mine.toml"
    catalog.write_text('[workflows.my-flux]\ntext_encoders = ["CLIP_Flux", "T5_Flux"]\ndenoiser = "Flux1Schnell"\n'
                       'vae = "Flux1VAE"\ninputs.steps = { default = 4, max = 8 }\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.NewVAE]\nkind = "vae"\n\n[workflows.x]\ndenoiser = "Flux1Schnell"\nvae = "NewVAE"\n')
    models = ["CLIP_Flux", "T5_Flux", "Flux1Schnell", "Flux1VAE"]
    actors = [ActorRuntime(ActorConfig(model=m, broker_backend=backend, options={"time_scale": 1.0},
                                       heartbeat_interval_s=0.2, heartbeat_misses=5, reconnect_max_s=0.5))
              for m in models]
    threads = [threading.Thread(target=a.run, daemon=True) for a in actors]
    for t in threads:
        t.start()
    try:
        with Client(frontend, admin_timeout_s=2.0) as client:
            _wait(lambda: len(client.stats(timeout=2.0).actors) == len(models), 60, "the actors to join")
            done = lego_cli("workflows", "register", str(catalog), "--broker", frontend)
            assert done.returncode == 0 and "registered my-flux" in done.stdout, done.stderr
            refused = lego_cli("workflows", "register", str(bad), "--broker", frontend)
            assert refused.returncode == 2 and "models.NewVAE" in refused.stderr
            # 1024x1024 on emulated H800s at full time: about a second, so the request is in flight at the kill
            reference = client.generate("my-flux", timeout=60, prompt="a brick", seed=5)
            job = client.submit("my-flux", request_id="job-1", prompt="a brick", seed=5)
            broker.kill()
            assert not job.done()
            broker.start()  # same journal: the workflow is back before the request re-runs
            result = job.result(timeout=90)
            assert (result.image == reference.image).all()
            infos = {w.name: w for w in client.workflows(timeout=5.0)}
            assert infos["my-flux"].registered and infos["my-flux"].models == models
            assert client.stats(timeout=5.0).counters["requests_resumed"] == 1
            listed = lego_cli("workflows", "--broker", frontend)
            assert any(line.startswith("my-flux ") and "(registered at run time)" in line
                       for line in listed.stdout.splitlines()), listed.stdout
    finally:
        for a in actors:
            a.stop()
        for t in threads:
            if t.is_alive():
                t.join(5)
        broker.stop()
    assert "workflow_not_restored" not in (tmp_path / "broker.log").read_text()
