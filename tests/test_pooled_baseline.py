"""The pooled baseline (`clients.bench.systems.pooled_system`): the strongest monolith a
practitioner would deploy. One process per GPU hosting every workflow, one copy of each
model resident, one shared queue in deadline order (the broker's `queue_order`, tested
with fake peers in tests/test_broker_core.py), micro-serving's admission and drop rules;
where every model does not fit a GPU, the workflows split into groups that fit.

Checked on the simulator (H800 profiles): the paper's three FLUX.1-schnell workflows on
80 GiB GPUs, and the sharing setting's six SD3 / SD3.5 Large / FLUX.1-dev workflows on
80 and 48 GiB GPUs.
"""

from __future__ import annotations

from collections import Counter

import pytest

from broker.catalog import load_catalog, pipeline_name, validate_params
from broker.config import load_config
from broker.costs.model import CostModel
from broker.server import BrokerConfig, build_parser
from clients.bench.loadgen import Arrival, burst_arrivals
from clients.bench.sim.simulator import Simulation, simulate
from clients.bench.sim.timing import NO_OVERHEADS
from clients.bench.systems import (
    BASELINES,
    GIB,
    MONOLITH_ADMISSION_OVERHEAD_S,
    PAPER_WORKFLOWS,
    SHARING_WORKFLOWS,
    SystemSpec,
    broker_flags,
    lego_system,
    pool_groups,
    pooled_system,
    sharing_systems,
)

WORKFLOWS = list(PAPER_WORKFLOWS.values())
SD3_AND_SD35L, FLUX_DEV = list(SHARING_WORKFLOWS[:4]), list(SHARING_WORKFLOWS[4:])


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def _work_s(catalog, workflow: str) -> float:
    spec = catalog.workflows[workflow]
    return CostModel(catalog).request(spec, validate_params(spec, {"prompt": "x", "seed": 0})).work_s


def _bytes(catalog, models) -> int:
    costs = CostModel(catalog)
    return sum(costs.resident_bytes(m) for m in models)


def test_pooled_is_one_process_per_gpu_hosting_every_workflow_with_micro_servings_rules(catalog):
    pooled, lego = pooled_system(catalog, WORKFLOWS, 8), lego_system(catalog, WORKFLOWS, 8)
    assert "pooled" in BASELINES
    assert pooled.placement == tuple((pipeline_name(WORKFLOWS), f"emu:{g}", "monolith") for g in range(8))
    assert (pooled.serving, pooled.model_cache, pooled.scheduler) == ("monolith", "model", False)
    # the same admission and drop rules as micro-serving, which its scheduler sets from these flags
    args = lego.scheduler_args
    settings = dict(pooled.broker_settings)
    assert (pooled.admission, pooled.drop_late, pooled.drop_hopeless) == (lego.admission, lego.drop_late, lego.drop_hopeless) \
        == (True, True, True)
    assert settings["admission_bound"] == args[args.index("--admission-bound") + 1]
    # the runtime's own time per request is one batch deep for a monolith, about ten micro-served
    assert settings["admission_overhead_s"] == MONOLITH_ADMISSION_OVERHEAD_S < float(args[args.index("--admission-overhead-s") + 1])
    assert settings["queue_order"] == "deadline"
    # a broker of processes (`lego bench cluster`) takes the same settings as flags
    cli = {k: v for k, v in vars(build_parser().parse_args(broker_flags(pooled))).items() if k != "config"}
    config = load_config(BrokerConfig, "broker", None, cli, environ={})
    assert (config.admission_bound, config.admission_overhead_s, config.queue_order) == (
        settings["admission_bound"], settings["admission_overhead_s"], settings["queue_order"])
    # the sharing setting's six workflows (78.7 GiB of models, one copy each) fit 80 GiB GPUs
    (sharing,) = sharing_systems(catalog, 16, names=("pooled",))
    assert sharing.placement == tuple((pipeline_name(list(SHARING_WORKFLOWS)), f"emu:{g}", "monolith") for g in range(16))


def test_pooled_holds_one_copy_of_the_shared_base_model_and_never_loads_while_serving(catalog):
    sim = Simulation(pooled_system(catalog, WORKFLOWS, 8), catalog, gpus=8, overheads=NO_OVERHEADS)
    outcomes, stats = sim.run([Arrival(5.0 * i, wf, i) for i, wf in enumerate(WORKFLOWS)])
    once = _bytes(catalog, {m for wf in WORKFLOWS for m in catalog.workflows[wf].models})
    per_workflow = _bytes(catalog, [m for wf in WORKFLOWS for m in catalog.workflows[wf].models])
    assert once < 35 * GIB and per_workflow > 80 * GIB  # a copy of FLUX.1-schnell per workflow would not fit
    assert all(d.memory_bytes - d.free_bytes == once for d in sim.cluster.devices())
    assert stats["monolith_loads"] == 8  # one per process, at its start
    for outcome in outcomes:  # every workflow resident: each request takes its work alone
        assert outcome.status == "ok" and outcome.latency_s == pytest.approx(_work_s(catalog, outcome.workflow), abs=1e-6)


def test_pooled_drops_what_cannot_make_its_deadline_instead_of_running_it_late(catalog):
    outcomes, stats = simulate(pooled_system(catalog, WORKFLOWS, 8), burst_arrivals(24, WORKFLOWS), catalog, 8,
                               overheads=NO_OVERHEADS)
    codes = Counter(o.code for o in outcomes if o.status != "ok")
    # refused at arrival (lookahead sees the queue) or dropped before running late
    assert set(codes) <= {"slo_unattainable", "deadline_exceeded"} and 8 <= sum(o.status == "ok" for o in outcomes) < 24
    assert all(o.slo_met for o in outcomes if o.status == "ok")
    assert stats["monolith_loads"] == 8


def test_on_48_gib_gpus_pooled_splits_the_sharing_workflows_into_groups_that_fit(catalog):
    memory = 48 * GIB
    assert pool_groups(catalog, list(SHARING_WORKFLOWS), memory) == [SD3_AND_SD35L, FLUX_DEV]
    lego, pooled = sharing_systems(catalog, 16, names=("lego", "pooled"), gpu_memory_gib=48)
    # GPUs in proportion to each group's device time (equal request mix)
    groups = Counter(m for m, _, _ in pooled.placement)
    assert groups == {pipeline_name(SD3_AND_SD35L): 10, pipeline_name(FLUX_DEV): 6}
    assert sorted(int(d[4:]) for _, d, _ in pooled.placement) == list(range(16))  # one process per GPU
    sim = Simulation(pooled, catalog, gpus=16, hosts=2, gpu_memory_gib=48, overheads=NO_OVERHEADS)
    arrivals = [Arrival(10.0 * i, wf, i) for i, wf in enumerate(SHARING_WORKFLOWS)]
    outcomes, stats = sim.run(arrivals)
    for outcome in outcomes:  # every workflow is served, from models resident since the start
        assert outcome.status == "ok" and outcome.latency_s == pytest.approx(_work_s(catalog, outcome.workflow), abs=1e-6)
    assert stats["monolith_loads"] == 16
    assert max(d.memory_bytes - d.free_bytes for d in sim.cluster.devices()) <= memory
    # micro-serving splits its base models over the GPUs where all three do not fit one
    assert Counter(m for m, _, _ in lego.placement if catalog.models[m].kind == "denoiser") == {
        "StableDiffusion35Large": 8, "Flux1Dev": 6, "StableDiffusion3": 2}
    outcomes, _ = simulate(lego, arrivals, catalog, 16, hosts=2, gpu_memory_gib=48, workflows=list(SHARING_WORKFLOWS))
    assert all(o.status == "ok" for o in outcomes)
    # the 80 GiB plan on 48 GiB GPUs is refused, not silently loaded on demand
    (big,) = sharing_systems(catalog, 16, names=("pooled",))
    with pytest.raises(ValueError, match="did not start"):
        simulate(big, [], catalog, 16, hosts=2, gpu_memory_gib=48)


def test_pooled_refuses_a_workflow_no_gpu_holds_and_a_cluster_smaller_than_its_groups(catalog):
    with pytest.raises(ValueError, match=r"sd35l-canny-cfg needs 33.8 GiB, more than a 30 GiB GPU"):
        pooled_system(catalog, list(SHARING_WORKFLOWS), 16, gpu_memory_gib=30)
    with pytest.raises(ValueError, match="2 groups of workflows fit 48 GiB GPUs, a cluster of 1"):
        pooled_system(catalog, list(SHARING_WORKFLOWS), 1, gpu_memory_gib=48)
    with pytest.raises(ValueError, match="model_cache"):
        SystemSpec("x", "monolith", (), model_cache="lru")
