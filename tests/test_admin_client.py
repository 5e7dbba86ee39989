"""The operator calls of `Client` and `AsyncClient` against a local emulated cluster of
real processes: drain / undrain / stop an actor, replica bounds, pause / resume a
workflow, and refusals that name the offending field."""

from __future__ import annotations

import asyncio
import time

import pytest

from clients import AsyncClient, Client, RequestRejected
from clients.core import AdminRefused
from clients.local import LocalCluster, LocalClusterSpec

pytestmark = pytest.mark.cluster

WORKFLOW = "flux-schnell-txt2img"
VAE = "Flux1VAE"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("admin") / "run"
    spec = LocalClusterSpec(workflows=[WORKFLOW], options={"time_scale": 0.02}, run_dir=str(run_dir),
                            log_level="warning")
    with LocalCluster(spec) as running:
        yield running


def actor_of(stats, model):
    (actor,) = [a for a in stats.actors if a.model == model]
    return actor


@pytest.mark.timeout(60)
def test_a_drained_actor_holds_back_requests_until_undrained(cluster):
    with Client(cluster.frontend) as client:
        vae = actor_of(client.stats(), VAE).actor_id
        reply = client.drain_actor(vae)
        assert reply.ok and vae in reply.message
        drained = actor_of(client.stats(), VAE)
        assert (drained.state, drained.stopping) == ("draining", False)
        job = client.submit(WORKFLOW, prompt="held back", steps=2, progress=False)
        time.sleep(1.0)  # far longer than the whole request takes at this time scale
        assert not job.done()
        assert client.undrain_actor(vae).ok
        assert job.result(timeout=20).image is not None
        assert actor_of(client.stats(), VAE).state in ("idle", "busy")


@pytest.mark.timeout(60)
def test_pause_rejects_new_requests_naming_the_workflow_and_resume_admits_again(cluster):
    with Client(cluster.frontend) as client:
        assert client.pause_workflow(WORKFLOW).ok
        assert client.stats().paused_workflows == [WORKFLOW]
        with pytest.raises(RequestRejected) as info:
            client.submit(WORKFLOW, prompt="not now")
        assert (info.value.code, info.value.field) == ("paused", "workflow")
        assert WORKFLOW in info.value.message
        assert client.resume_workflow(WORKFLOW).ok
        client.generate(WORKFLOW, prompt="now", steps=1, timeout=20)
        recent = client.stats().recent_outcomes
        assert [(o.code, o.field, o.workflow) for o in recent if o.kind == "rejected"][-1] == (
            "paused", "workflow", WORKFLOW)


@pytest.mark.timeout(60)
def test_replica_bounds_show_in_the_snapshot(cluster):
    with Client(cluster.frontend) as client:
        assert client.set_replicas(VAE, min=1, max=3).ok
        assert client.stats().replica_bounds == {VAE: {"min": 1, "max": 3}}
        client.set_replicas(VAE)
        assert client.stats().replica_bounds == {}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("call", "field"), [
    (lambda c: c.drain_actor("ghost"), "actor_id"),
    (lambda c: c.undrain_actor("ghost"), "actor_id"),
    (lambda c: c.stop_actor("ghost"), "actor_id"),
    (lambda c: c.set_replicas("NoSuchModel", min=1), "model"),
    (lambda c: c.set_replicas(VAE, min=3, max=2), "min"),
    (lambda c: c.set_replicas(VAE, max=-1), "max"),
    (lambda c: c.set_replicas(VAE, min="2"), "min"),
    (lambda c: c.pause_workflow("no-such-workflow"), "workflow"),
    (lambda c: c.resume_workflow("no-such-workflow"), "workflow"),
], ids=["drain", "undrain", "stop", "model", "min-above-max", "negative", "not-a-number", "pause", "resume"])
def test_refusals_raise_naming_the_field(cluster, call, field):
    with Client(cluster.frontend) as client:
        with pytest.raises(AdminRefused) as info:
            call(client)
        assert info.value.field == field
        assert field in str(info.value)


@pytest.mark.timeout(60)
def test_the_async_client_has_the_same_calls(cluster):
    async def scenario():
        async with AsyncClient(cluster.frontend) as client:
            vae = actor_of(await client.stats(), VAE).actor_id
            assert (await client.drain_actor(vae)).ok
            assert actor_of(await client.stats(), VAE).state == "draining"
            assert (await client.undrain_actor(vae)).ok
            assert (await client.set_replicas(VAE, max=2)).ok
            assert (await client.stats()).replica_bounds == {VAE: {"min": None, "max": 2}}
            assert (await client.set_replicas(VAE)).ok
            assert (await client.pause_workflow(WORKFLOW)).ok
            with pytest.raises(RequestRejected, match="paused"):
                await client.submit(WORKFLOW, prompt="x")
            assert (await client.resume_workflow(WORKFLOW)).ok
            with pytest.raises(AdminRefused) as info:
                await client.set_replicas(VAE, min=-1)
            assert info.value.field == "min"
            with pytest.raises(AdminRefused) as info:
                await client.drain_actor("ghost")
            assert info.value.field == "actor_id"
            # last, since it takes an actor away: a stop drains, then the agent stops it
            assert (await client.stop_actor(vae)).ok
            for _ in range(100):
                if vae not in {a.actor_id for a in (await client.stats()).actors}:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"{vae} was not stopped")

    asyncio.run(scenario())
