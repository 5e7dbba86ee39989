"""LoRA adapters in the broker: the registry and request validation, batches that never
mix adapter sets, affinity to an actor with the set applied, switches counted."""

from __future__ import annotations

import pytest

from broker import protocol as p
from broker.catalog import (
    CatalogError,
    ParamError,
    parse_catalog,
    task_adapters,
    unroll,
    validate_params,
)
from broker.core.machine import BrokerCore
from tests.broker_helpers import (
    CATALOG_DOC,
    CLIENT,
    SETTINGS,
    batches,
    done,
    hello,
    of,
    submit,
)

DOC = {
    **CATALOG_DOC,
    "models": {**CATALOG_DOC["models"], "den-2": {"kind": "denoiser"}},
    "workflows": {
        **CATALOG_DOC["workflows"],
        "styled": {**CATALOG_DOC["workflows"]["plain"], "lora": True},
        "styled-cfg": {**CATALOG_DOC["workflows"]["guided"], "lora": True},
    },
    "adapters": {name: {"base": "den"} for name in ("ink", "clay", "neon")} | {"other": {"base": "den-2"}},
}


def make_core(**settings) -> BrokerCore:
    import dataclasses

    return BrokerCore(parse_catalog(DOC), dataclasses.replace(SETTINGS, **settings), broker_id="b", seed=1)


def test_requests_name_registered_adapters_of_their_base_model_with_weights_in_range():
    catalog = parse_catalog(DOC)
    styled = catalog.workflow("styled")
    params = validate_params(styled, {"prompt": "x", "loras": [{"name": "ink", "weight": 0.5}, {"name": "clay"}]},
                             adapters=catalog.adapters)
    assert params["loras"] == [["ink", 0.5], ["clay", 1.0]]
    assert validate_params(styled, {"prompt": "x"}, adapters=catalog.adapters)["loras"] == []
    bad = [
        ([{"name": "nope"}], "loras[0].name"),  # unknown
        ([{"name": "ink"}, {"name": "other"}], "loras[1].name"),  # another base model's
        ([{"name": "ink", "weight": 2.5}], "loras[0].weight"),  # out of range
        ([{"name": "ink", "weight": float("nan")}], "loras[0].weight"),
        ([{"name": "ink", "weight": "high"}], "loras[0].weight"),
        ([{"name": "ink"}, {"name": "ink"}], "loras[1].name"),  # twice
        ([{"name": "ink", "scale": 1}], "loras[0]"),  # unknown key
        ("ink", "loras"),  # not a list
        ([{"name": n} for n in ["ink"] * 9], "loras"),  # too many
    ]
    for loras, field in bad:
        with pytest.raises(ParamError) as err:
            validate_params(styled, {"prompt": "x", "loras": loras}, adapters=catalog.adapters)
        assert err.value.field == field, (loras, err.value)
    with pytest.raises(ParamError) as err:  # a workflow without LoRA has no such input
        validate_params(catalog.workflow("plain"), {"prompt": "x", "loras": []}, adapters=catalog.adapters)
    assert err.value.field == "loras"


def test_the_registry_is_checked_when_the_catalog_loads():
    for adapter, field in [({"base": "vae"}, "adapters.x.base"), ({"base": "den", "rank": 4}, "adapters.x.rank"),
                           ({"base": "den", "load_s": -1}, "adapters.x.load_s")]:
        with pytest.raises(CatalogError) as err:
            parse_catalog({**DOC, "adapters": {"x": adapter}})
        assert err.value.field == field


def test_adapters_reach_the_encoders_and_steps_but_not_the_vae():
    catalog = parse_catalog(DOC)
    workflow = catalog.workflow("styled-cfg")
    params = validate_params(workflow, {"prompt": "x", "loras": [{"name": "neon", "weight": -0.5}]},
                             adapters=catalog.adapters)
    plans = {plan.key: plan for plan in unroll(workflow, params, cfg_split=True)}
    assert task_adapters("encode", plans["encode/enc-a"].params) == (("neon", -0.5),)
    assert task_adapters("denoise_branch", plans["branch/0/1"].params) == (("neon", -0.5),)
    assert task_adapters("denoise", plans["denoise/0"].params) is None  # the combine runs no model
    assert task_adapters("decode", plans["decode"].params) is None
    plain = validate_params(catalog.workflow("plain"), {"prompt": "x"})
    (step,) = [plan for plan in unroll(catalog.workflow("plain"), plain) if plan.key == "denoise/0"]
    assert task_adapters("denoise", step.params) == ()  # no LoRA: an actor must take its set off


def _first_steps(core, requests: list[tuple[str, list]]) -> list:
    """Submit requests, finish their encodes: the sends that dispatch their first steps."""
    sends = []
    for request_id, loras in requests:
        sends += submit(core, request_id, "styled", loras=loras)
    pending = hello(core, "enc-a-1", "enc-a", max_batch_rows=64)
    while pending:  # encodes batch by adapter set too (text-encoder LoRA): one batch at a time
        sends += pending
        pending = [s for batch in batches(pending, "enc-a-1") for s in done(core, "enc-a-1", batch)]
    return sends


def test_requests_with_different_adapter_sets_never_share_a_batch():
    core = make_core()
    ink, clay = [{"name": "ink", "weight": 1.0}], [{"name": "clay", "weight": 1.0}]
    sends = _first_steps(core, [("r1", ink), ("r2", clay), ("r3", ink), ("r4", [{"name": "ink", "weight": 0.5}]),
                                ("r5", [])])
    sends += hello(core, "den-1", "den", credits=8, max_batch_rows=8)
    got = batches(sends, "den-1")
    sets = [{task_adapters(t.kind, t.params) for t in batch.tasks} for batch in got]
    assert all(len(s) == 1 for s in sets), sets  # one adapter set per batch
    grouped = sorted(sorted(t.request_id for t in batch.tasks) for batch in got)
    assert grouped == [["r1", "r3"], ["r2"], ["r4"], ["r5"]]  # same name, other weight: apart too


def test_affinity_sends_a_set_to_the_actor_that_has_it_and_switches_are_counted():
    placed = {}
    for affinity in (True, False):
        core = make_core(adapter_affinity=affinity)
        sends = hello(core, "den-1", "den", credits=1) + hello(core, "den-2", "den", credits=1)
        core.actors["den-1"].adapters = (("ink", 1.0),)  # what earlier batches left applied
        core.actors["den-2"].adapters = (("clay", 1.0),)
        sends += _first_steps(core, [("r1", [{"name": "clay"}])])
        (actor,) = [a for a in ("den-1", "den-2") if batches(sends, a)]
        placed[affinity] = (actor, core.actors[actor].adapter_switches, core.actors[actor].adapters)
        assert of(sends, p.Rejected, CLIENT) == []
    assert placed[True] == ("den-2", 0, (("clay", 1.0),))  # where clay is applied: no switch
    assert placed[False] == ("den-1", 1, (("clay", 1.0),))  # the first idle actor: it switches
    assert placed[False][2] == placed[True][2]


def test_affinity_outranks_the_free_gpu_preference():
    """The actor with the set shares its GPU with a busy encoder; another idle actor has
    a GPU to itself: the set wins (a switch costs more than sharing for a few ms)."""
    core = make_core()
    sends = hello(core, "den-1", "den", credits=1)
    core.actors["den-1"].adapters = (("clay", 1.0),)
    core.actors["den-1"].device = "gpu-1"
    sends += hello(core, "den-2", "den", credits=1)
    core.actors["den-2"].device = "gpu-2"
    sends += hello(core, "enc-b-1", "enc-b", credits=1)
    core.actors["enc-b-1"].device = "gpu-1"
    core.actors["enc-b-1"].in_flight[99] = []  # busy on den-1's GPU
    core.actors_by_device = {}
    for actor in core.actors.values():
        core.actors_by_device.setdefault((actor.host, actor.device), []).append(actor)
    sends += _first_steps(core, [("r1", [{"name": "clay"}])])
    assert batches(sends, "den-1") and not batches(sends, "den-2")


def test_an_actor_takes_a_task_of_its_own_set_before_a_slightly_older_head():
    for bypass_s, expected in ((2.5, "r2"), (0.0, "r1")):
        core = make_core(adapter_bypass_s=bypass_s)
        sends = hello(core, "den-1", "den", credits=0)
        core.actors["den-1"].adapters = (("clay", 1.0),)
        sends += submit(core, "r1", "styled", loras=[{"name": "ink"}], now=0.0)
        sends += submit(core, "r2", "styled", loras=[{"name": "clay"}], now=1.0)
        encoded = hello(core, "enc-a-1", "enc-a", max_batch_rows=64)
        while encoded:
            encoded = [s for b in batches(encoded, "enc-a-1") for s in done(core, "enc-a-1", b)]
        sends = core.on_backend(b"den-1", p.Credit(1), [], 2.0)  # the actor frees up: r1's step is the head
        (batch,) = batches(sends, "den-1")
        assert [t.request_id for t in batch.tasks] == [expected], bypass_s


def test_a_request_without_adapters_takes_the_set_off_an_actor():
    core = make_core()
    sends = hello(core, "den-1", "den", credits=1)
    core.actors["den-1"].adapters = (("ink", 1.0),)
    sends += _first_steps(core, [("r1", [])])
    (batch,) = batches(sends, "den-1")
    assert task_adapters(batch.tasks[0].kind, batch.tasks[0].params) == ()
    assert core.actors["den-1"].adapters == () and core.actors["den-1"].adapter_switches == 1
