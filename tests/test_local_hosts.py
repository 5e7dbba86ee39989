"""A local cluster split over emulated hosts (clients/local.py `emulate_hosts`): one node
agent per host, explicit placements mapped onto them, and requests served across them."""

from __future__ import annotations

import pytest

from clients import Client
from clients.errors import LegoError
from clients.local import LocalCluster, LocalClusterSpec

WORKFLOW = "flux-schnell-txt2img"


def test_hosts_must_divide_the_gpus_naming_the_field(tmp_path):
    with pytest.raises(LegoError, match="emulate_hosts"):
        LocalCluster(LocalClusterSpec(emulate_gpus=4, emulate_hosts=3, run_dir=str(tmp_path)))
    with pytest.raises(LegoError, match="emulate_hosts"):
        LocalCluster(LocalClusterSpec(emulate_gpus=4, emulate_hosts=0, run_dir=str(tmp_path)))


def test_a_cluster_wide_gpu_number_names_its_host_and_its_local_gpu(tmp_path):
    cluster = LocalCluster(LocalClusterSpec(emulate_gpus=4, emulate_hosts=2, run_dir=str(tmp_path)))
    assert cluster.hosts == ["host-0", "host-1"]
    assert cluster._host_of("emu:0", 2) == ("host-0", "emu:0")
    assert cluster._host_of("emu:3", 2) == ("host-1", "emu:1")
    assert cluster._host_of("cpu", 2) == ("host-0", "cpu")
    assert LocalCluster(LocalClusterSpec(run_dir=str(tmp_path))).hosts == ["localhost"]


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_two_emulated_hosts_serve_a_request_whose_steps_cross_between_them(tmp_path):
    # the base model on host-1 only, the encoders and the VAE on host-0: every request crosses
    placement = [("CLIP_Flux", "emu:0", "emulated"), ("T5_Flux", "emu:1", "emulated"),
                 ("Flux1Schnell", "emu:2", "emulated"), ("Flux1Schnell", "emu:3", "emulated"),
                 ("Flux1VAE", "emu:0", "emulated")]
    spec = LocalClusterSpec(workflows=[WORKFLOW], options={"time_scale": 0.02}, emulate_gpus=4, emulate_hosts=2,
                            placement=placement, hosted_emulated=True, heartbeat_interval_s=0.2,
                            run_dir=str(tmp_path / "run"), log_level="warning")
    with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
        image = client.generate(WORKFLOW, prompt="two hosts", seed=1, steps=2, width=256, height=256, timeout=60).image
        stats = client.stats()
    assert image.shape[:2] == (256, 256)
    assert sorted(a.host for a in stats.agents) == ["host-0", "host-1"]
    where = sorted((a.model, a.host, a.device) for a in stats.actors)
    assert where == [("CLIP_Flux", "host-0", "emu:0"), ("Flux1Schnell", "host-1", "emu:0"),
                     ("Flux1Schnell", "host-1", "emu:1"), ("Flux1VAE", "host-0", "emu:0"),
                     ("T5_Flux", "host-0", "emu:1")]
    assert set(cluster.processes) >= {"broker", "agent", "agent-1"}
