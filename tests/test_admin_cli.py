"""`lego admin ...` and `lego status` against a local emulated cluster of real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients import Client, RequestRejected
from clients.local import LocalCluster, LocalClusterSpec

pytestmark = pytest.mark.cluster

LEGO = str(Path(sys.executable).parent / "lego")
WORKFLOW = "flux-schnell-txt2img"
VAE = "Flux1VAE"


def lego(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LEGO_BROKER"}
    return subprocess.run([LEGO, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    spec = LocalClusterSpec(workflows=[WORKFLOW], options={"time_scale": 0.02},
                            run_dir=str(tmp_path_factory.mktemp("admin-cli") / "run"), log_level="warning")
    with LocalCluster(spec) as running:
        yield running


def vae_id(cluster) -> str:
    with Client(cluster.frontend) as client:
        (actor,) = [a.actor_id for a in client.stats().actors if a.model == VAE]
    return actor


@pytest.mark.timeout(90)
def test_drain_pause_and_scale_show_in_status_and_undo(cluster):
    broker = ["--broker", cluster.frontend]
    actor = vae_id(cluster)
    assert lego("admin", "drain", actor, *broker).stdout.strip() == f"drained {actor}"
    assert lego("admin", "pause", WORKFLOW, *broker).returncode == 0
    scale = lego("admin", "scale", VAE, "--min", "1", "--max", "3", *broker)
    assert scale.returncode == 0 and "min 1, max 3" in scale.stdout
    with Client(cluster.frontend) as client, pytest.raises(RequestRejected):
        client.submit(WORKFLOW, prompt="refused", request_id="refused-while-paused")
    status = lego("status", *broker)
    assert status.returncode == 0, status.stderr
    (row,) = [line for line in status.stdout.splitlines() if line.split()[:1] == [actor]]
    assert row.split()[2] == "drained"
    (model_row,) = [line for line in status.stdout.splitlines() if line.split()[:1] == [VAE]]
    assert "1..3*" in model_row
    assert f"paused workflows: {WORKFLOW}" in status.stdout
    assert "refused-while-paused" in status.stdout and "paused (workflow)" in status.stdout
    stats = json.loads(lego("status", "--json", *broker).stdout)
    assert stats["paused_workflows"] == [WORKFLOW]
    assert stats["replica_bounds"] == {VAE: {"min": 1, "max": 3}}
    assert stats["recent_outcomes"][-1]["request_id"] == "refused-while-paused"
    assert {a["actor_id"]: a["state"] for a in stats["actors"]}[actor] == "draining"

    assert lego("admin", "undrain", actor, *broker).returncode == 0
    assert lego("admin", "resume", WORKFLOW, *broker).returncode == 0
    assert lego("admin", "scale", VAE, "--clear", *broker).returncode == 0
    with Client(cluster.frontend) as client:
        client.generate(WORKFLOW, prompt="served again", steps=1, timeout=30)
        stats = client.stats()
    assert stats.paused_workflows == [] and stats.replica_bounds == {}
    top = lego("top", "--once", *broker)
    assert top.returncode == 0 and actor in top.stdout


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("args", "message"), [
    (("drain", "ghost"), "actor_id: no actor 'ghost'"),
    (("stop", "ghost"), "actor_id: no actor 'ghost'"),
    (("scale", "NoSuchModel", "--min", "1"), "model: unknown model"),
    (("scale", VAE, "--min", "4", "--max", "2"), "min: 4 is above max 2"),
    (("scale", VAE, "--max", "-1"), "max: must be 0.."),
    (("scale", VAE), "--min/--max: give at least one"),
    (("scale", VAE, "--clear", "--min", "1"), "--clear"),
    (("pause", "nope"), "workflow: unknown workflow 'nope'"),
], ids=["drain", "stop", "model", "min-above-max", "negative", "nothing", "clear-and-min", "pause"])
def test_refused_admin_commands_fail_naming_the_field(cluster, args, message):
    proc = lego("admin", *args, "--broker", cluster.frontend)
    assert proc.returncode == 1
    assert message in proc.stderr and proc.stderr.startswith(f"lego admin {args[0]}:")


@pytest.mark.timeout(90)
def test_stop_drains_then_stops_the_actor(cluster):
    actor = vae_id(cluster)
    proc = lego("admin", "stop", actor, "--broker", cluster.frontend)
    assert proc.returncode == 0 and actor in proc.stdout
    with Client(cluster.frontend) as client:
        for _ in range(100):
            if actor not in {a.actor_id for a in client.stats().actors}:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"{actor} still runs")
