"""One unroll and one pricing per request at submit: the request's DAG is unrolled once
and its plans priced once (each node's costs and the request's in one pass); the
shape's solo latency, which the SLO and admission read, comes from the cost model's one
memo, so only a shape's first request unrolls it (the canonical, unsplit DAG)."""

from __future__ import annotations

import pytest

import broker.core.intake
import broker.costs.model
from broker import protocol as p
from broker.catalog import load_catalog
from broker.core.machine import BrokerCore, BrokerSettings
from broker.costs.model import CostModel
from tests.broker_helpers import CLIENT, of

CFG = "flux-schnell-txt2img-cfg"


@pytest.fixture
def calls(monkeypatch):
    """Counts of the submit path's unrolls (for the DAG, inside the cost model) and pricings."""
    counts = {"unroll": 0, "cost_model_unroll": 0, "price": 0, "node_costs": 0, "plan_costs": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(broker.core.intake, "unroll", counting("unroll", broker.core.intake.unroll))
    monkeypatch.setattr(broker.costs.model, "unroll", counting("cost_model_unroll", broker.costs.model.unroll))
    monkeypatch.setattr(CostModel, "price", counting("price", CostModel.price))  # a whole request: the solo memo
    monkeypatch.setattr(CostModel, "node_costs", counting("node_costs", CostModel.node_costs))  # an accepted DAG
    monkeypatch.setattr(CostModel, "plan_costs", counting("plan_costs", CostModel.plan_costs))
    return counts


def core(**settings) -> BrokerCore:
    return BrokerCore(load_catalog(), BrokerSettings(**settings), broker_id="broker-test", seed=1)


def submit(core, request_id, steps=4, accept=True) -> p.Accepted | None:
    sends = core.on_frontend(CLIENT, p.Submit(request_id, CFG, {"prompt": "a brick", "steps": steps}, False), [], 0.0)
    accepted = of(sends, p.Accepted, CLIENT)
    assert len(accepted) == accept
    return accepted[0] if accept else None


@pytest.mark.parametrize("settings", [{}, {"admission": True}, {"cfg_split": "always"}])
def test_a_submit_unrolls_once_and_prices_its_plans_once(calls, settings):
    broker = core(**settings)
    first = submit(broker, "r1")
    # The shape's first request also fills the solo-latency memo: one canonical unroll, priced.
    assert (calls["unroll"], calls["cost_model_unroll"], calls["price"], calls["node_costs"]) == (1, 1, 1, 1)
    if not settings.get("cfg_split"):  # unsplit, the canonical DAG is the request's own
        assert calls["plan_costs"] == 2 * first.nodes
    for key in calls:
        calls[key] = 0
    accepted = submit(broker, "r2")
    assert calls == {"unroll": 1, "cost_model_unroll": 0, "price": 0, "node_costs": 1, "plan_costs": accepted.nodes}


def test_a_shape_is_unrolled_for_its_solo_latency_once(calls):
    broker = core()
    for request_id, steps in (("r1", 4), ("r2", 6), ("r3", 4), ("r4", 6)):  # 6 steps: a new shape
        submit(broker, request_id, steps)
    assert (calls["unroll"], calls["cost_model_unroll"]) == (4, 2)


@pytest.mark.parametrize("bound", ["max", "sum"])
def test_a_refused_request_is_not_unrolled(calls, bound):
    """The queue-work bounds refuse before unrolling (lookahead needs the request's DAG)."""
    broker = core(admission=True, admission_bound=bound)  # no devices yet: the queued work soon exceeds every SLO
    rejected, submitted = [], 0
    while not rejected:
        sends = broker.on_frontend(CLIENT, p.Submit(f"r{submitted}", CFG, {"prompt": "a", "steps": 4}, False), [], 0.0)
        rejected = of(sends, p.Rejected, CLIENT)
        submitted += 1
    assert rejected[0].code == "slo_unattainable"
    assert calls["unroll"] == submitted - 1  # the refused one never was


def test_the_priced_plans_are_the_request_costs_and_slo():
    broker = core()
    submit(broker, "r1")
    request = broker.requests["r1"]
    model = CostModel(broker.catalog)
    workflow = broker.catalog.workflows[CFG]
    expected = model.request(workflow, request.params)
    assert request.min_cost_s == pytest.approx(expected.min_work_s)
    assert request.deadline == pytest.approx(2.0 * expected.solo_s)
    assert sum(n.cost_s for n in request.nodes.values()) == pytest.approx(expected.work_s)
