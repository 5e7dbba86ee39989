"""Emulated tensors as sizes without bytes, each fetch priced as on a GPU host (issue 14).

An emulated cluster on two cores must not spend its CPU copying latents a GPU would
move; with `payloads = "virtual"` the digest chain (prompt -> embeddings -> latents ->
image) still runs, so the images equal those of real payloads bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from actors.backends import create_backend
from actors.backends.emulated import MEASURED_FETCH_S, measured_fetch_s
from actors.store import VirtualTensor, bundle_nbytes, pack_bundle, unpack_bundle
from broker import protocol as p
from broker.catalog import load_catalog, unroll, validate_params
from broker.protocol.tensors import VIRTUAL, check_payload
from clients.client import Client
from clients.local import LocalCluster, LocalClusterSpec


def test_a_virtual_tensor_travels_as_its_head_and_counts_its_full_size():
    latents = VirtualTensor("bfloat16", (1, 16, 128, 128), b"0123456789abcdef")
    descs, frames = pack_bundle({"latents": latents})
    assert descs[0].where == VIRTUAL and descs[0].nbytes == 16 * 128 * 128 * 2 and len(frames[0]) == 16
    (back,) = unpack_bundle(descs, frames, as_torch=False, virtual=True).values()
    assert back == latents and bundle_nbytes({"x": back}) == latents.nbytes


def test_only_a_peer_fetch_on_an_emulating_actor_accepts_virtual_tensors():
    descs, frames = pack_bundle({"latents": VirtualTensor("float16", (4, 64, 64), b"x" * 16)})
    with pytest.raises(p.ProtocolError, match="unsupported tensor location"):
        check_payload(descs, frames)  # the broker, clients, a task's own tensors
    with pytest.raises(p.ProtocolError, match="unsupported tensor location"):
        unpack_bundle(descs, frames, as_torch=True, virtual=True)  # a real backend's actor
    too_long = [descs[0]], [b"x" * 65]
    with pytest.raises(p.ProtocolError, match="head of 65 bytes"):
        check_payload(*too_long, virtual=True)
    descs[0].nbytes = 7
    with pytest.raises(p.ProtocolError, match="nbytes 7"):
        check_payload(descs, frames, virtual=True)


@pytest.mark.parametrize("path", sorted(MEASURED_FETCH_S))
def test_fetch_prices_pass_through_the_measured_points_and_grow_with_size(path):
    points = MEASURED_FETCH_S[path]
    for nbytes, seconds in points:
        assert measured_fetch_s(nbytes, path) == pytest.approx(seconds)
    assert measured_fetch_s(1, path) == points[0][1]
    last, before = points[-1], points[-2]
    slope = (last[1] - before[1]) / (last[0] - before[0])
    assert measured_fetch_s(2 * last[0], path) == pytest.approx(last[1] + slope * last[0])


def test_the_backend_prices_a_fetch_on_its_time_scale():
    catalog = load_catalog()
    backend = create_backend("emulated", catalog.models["Flux1Schnell"], "emu:0",
                             {"time_scale": 0.5, "payloads": "virtual"})
    assert backend.transfer_s(64 << 20, "host") == pytest.approx(0.5 * 103.773e-3)


def run_request(payloads: str) -> dict:
    catalog = load_catalog()
    workflow = catalog.workflow("flux-schnell-txt2img-cfg")
    options = {"time_scale": 0.0, "payloads": payloads}
    backends = {m: create_backend("emulated", catalog.models[m], "emu:0", options) for m in workflow.models}
    outputs = {}
    params = validate_params(workflow, {"prompt": "a fox", "seed": 3, "steps": 3})
    for plan in unroll(workflow, params):
        task = p.TaskSpec(plan.key, "r", 0, plan.key, plan.kind, plan.model, workflow.name, plan.rows,
                          list(plan.shape), plan.params, [], plan.key, return_output=plan.return_output)
        (outputs[plan.key],) = backends[plan.model].run([task], [[outputs[k] for k in plan.inputs]])
    return outputs


def test_virtual_payloads_give_the_same_image_and_sizes_as_real_ones():
    real, virtual = run_request("real"), run_request("virtual")
    assert isinstance(virtual["denoise/2"]["latents"], VirtualTensor)
    assert bundle_nbytes(virtual["denoise/2"]) == bundle_nbytes(real["denoise/2"])
    assert not isinstance(virtual["decode"]["image"], VirtualTensor)  # the result has its bytes
    assert np.array_equal(np.asarray(virtual["decode"]["image"].buffer), np.asarray(real["decode"]["image"].buffer))


@pytest.mark.cluster
def test_a_cluster_with_virtual_payloads_serves_the_real_payloads_images(tmp_path):
    images = {}
    for payloads in ("real", "virtual"):
        spec = LocalClusterSpec(workflows=["flux-schnell-txt2img"], replicas={"Flux1Schnell": 2}, affinity="avoid",
                                options={"time_scale": 0.02, "payloads": payloads}, emulate_gpus=2,
                                run_dir=str(tmp_path / payloads), log_level="warning",
                                heartbeat_interval_s=0.2, heartbeat_misses=20)
        with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
            result = client.generate("flux-schnell-txt2img", prompt="a fox", seed=5, steps=4, width=512, height=512,
                                     timeout=120)
            images[payloads] = result.image
            stats = client.stats()
        base = [a for a in stats.actors if a.model == "Flux1Schnell"]
        assert all(a.tasks > 0 for a in base)  # `avoid`: the steps moved between the two actors
    assert np.array_equal(images["real"], images["virtual"])
