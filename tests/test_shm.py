"""Shared-memory transfers between actors on one host: lifetimes and fallbacks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from actors.shm import PREFIX, ShmExporter, attach_bundle  # noqa: E402
from actors.store import RawTensor  # noqa: E402

SHM_DIR = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs POSIX shared memory in /dev/shm")


def ours() -> set[str]:
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(PREFIX)}


def test_a_thousand_transfers_leave_no_segment_behind():
    exporter = ShmExporter()
    made: set[str] = set()  # by name: other processes on the machine may make and drop segments meanwhile
    bundle = {"latents": torch.randn(1, 4, 16, 16).contiguous(memory_format=torch.channels_last),
              "raw": RawTensor("bfloat16", (3, 5), bytearray(30))}
    for i in range(1000):
        descs = exporter.export(f"t{i}", bundle)
        assert all(d.where == "shm" and d.handle.startswith(PREFIX) for d in descs)
        made |= {d.handle for d in descs}
        got = attach_bundle(descs, as_torch=True)
        assert torch.equal(got["latents"], bundle["latents"])
        assert got["latents"].stride() == bundle["latents"].stride()  # layout kept
        assert exporter.export(f"t{i}", bundle) == descs  # a second fetch reuses the segments
        exporter.release([f"t{i}"])
    assert exporter.count() == 0
    assert len(made) >= 1000 and not made & ours()


def test_a_consumer_that_dies_does_not_pin_the_producers_memory():
    exporter = ShmExporter()
    (desc,) = exporter.export("t", {"x": torch.arange(1 << 20, dtype=torch.float32)})
    # A consumer maps the segment and is killed while holding it.
    code = ("import sys, time; from multiprocessing import shared_memory as s; "
            "m = s.SharedMemory(name=sys.argv[1]); print('mapped', flush=True); time.sleep(60)")
    consumer = subprocess.Popen([sys.executable, "-c", code, desc.handle], stdout=subprocess.PIPE, text=True)
    assert consumer.stdout.readline().strip() == "mapped"
    os.kill(consumer.pid, signal.SIGKILL)
    consumer.wait(10)
    exporter.release(["t"])  # the broker's FREE
    assert desc.handle not in ours()  # unlinked: the memory goes back when the last mapping does


def test_a_segment_gone_before_the_consumer_maps_it_is_an_error_the_runtime_falls_back_on():
    exporter = ShmExporter()
    descs = exporter.export("t", {"x": torch.ones(4)})
    exporter.release(["t"])
    with pytest.raises(FileNotFoundError):
        attach_bundle(descs, as_torch=True)


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_actors_on_one_host_fetch_through_shared_memory(tmp_path, monkeypatch):
    from clients import Client
    from clients.local import LocalCluster, LocalClusterSpec

    monkeypatch.setenv("LEGO_SHM", "1")  # off by default (actors/runtime.py): the actors inherit this
    before = ours()
    spec = LocalClusterSpec(workflows=["flux-schnell-txt2img"], replicas={"Flux1Schnell": 2},
                            options={"time_scale": 0.02}, affinity="avoid", heartbeat_interval_s=0.2,
                            run_dir=str(tmp_path / "run"), log_level="warning")
    with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
        for seed in range(4):
            client.generate("flux-schnell-txt2img", prompt="shm", seed=seed, steps=3, width=256, height=256, timeout=60)
        time.sleep(0.6)  # a heartbeat carries the telemetry
        actors = client.stats().actors
    telemetry = [a.telemetry for a in actors if a.telemetry]
    assert sum(t.shm_fetches for t in telemetry) > 0
    assert sum(t.fetch_fallbacks for t in telemetry) == 0
    assert sum(t.shm_segments for t in telemetry) == 0  # all freed once consumed
    assert ours() == before  # machine-wide: assumes no other cluster runs on this machine meanwhile
