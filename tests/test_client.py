"""The client library (sync and asyncio) against a real in-process broker and real
actor runtimes running in threads (emulated backend, no simulated compute time).

The cluster is shared by the module; every test uses its own Client(s) and its own
request ids, so tests do not depend on each other's order.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
import zlib

import numpy as np
import pytest

from actors.runtime import ActorConfig, ActorRuntime
from broker import protocol as p
from broker.catalog import load_catalog
from broker.server import BrokerConfig, BrokerServer
from clients import (
    AsyncClient,
    AsyncJob,
    Cancelled,
    Client,
    Job,
    JobResult,
    LegoError,
    RequestFailed,
    RequestRejected,
    Timeout,
)
from clients.core import DEFAULT_ADDRESS
from clients.local import free_port
from clients.results import encode_png

WORKFLOW = "flux-schnell-txt2img"
MODELS = ["CLIP_Flux", "T5_Flux", "Flux1Schnell", "Flux1VAE"]
SMALL = {"width": 128, "height": 128, "steps": 2}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cluster():
    """A broker and one actor per model of flux-schnell-txt2img, all threads of this process."""
    frontend = f"tcp://127.0.0.1:{free_port()}"
    backend = f"tcp://127.0.0.1:{free_port()}"
    server = BrokerServer(BrokerConfig(frontend_address=frontend, backend_address=backend, heartbeat_interval_s=0.2, heartbeat_misses=5))
    server.bind()
    broker_thread = threading.Thread(target=server.serve_forever, name="test-broker", daemon=True)
    broker_thread.start()
    runtimes, threads = [], []
    try:
        for model in MODELS:
            runtime = ActorRuntime(ActorConfig(model=model, broker_backend=backend, backend="emulated",
                                               options={"time_scale": 0.0}, max_batch_rows=8))
            thread = threading.Thread(target=runtime.run, name=f"test-actor-{model}", daemon=True)
            thread.start()
            runtimes.append(runtime)
            threads.append(thread)
        with Client(frontend, admin_timeout_s=2.0) as client:
            deadline = time.monotonic() + 30
            while True:
                stats = client.stats()
                if len(stats.actors) == len(MODELS):
                    break
                assert time.monotonic() < deadline, f"actors did not join: {[a.actor_id for a in stats.actors]}"
                time.sleep(0.05)
        assert sorted(a.model for a in stats.actors) == sorted(MODELS)
        yield frontend
    finally:
        for runtime in runtimes:
            runtime.stop()
        for thread in threads:
            thread.join(timeout=10)
        server.stop()
        broker_thread.join(timeout=10)
        server.close()
    assert not any(t.is_alive() for t in threads), "an actor runtime thread did not stop"
    assert not broker_thread.is_alive(), "the broker thread did not stop"


@pytest.fixture
def client(cluster):
    with Client(cluster, submit_timeout_s=10.0, admin_timeout_s=10.0) as c:
        yield c


def _png_ihdr(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, checking its CRC."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:16 + length]
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", body)
    return width, height, depth, colour


def _decode_png_rgb(data: bytes) -> np.ndarray:
    """Decode an 8-bit RGB PNG with filter 0 rows (what encode_png writes)."""
    width, height, depth, colour = _png_ihdr(data)
    assert (depth, colour) == (8, 2)
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * 3)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(height, width, 3)


# ---------------------------------------------------------------- sync client


@pytest.mark.timeout(60)
def test_submit_progress_result_and_png(client, tmp_path):
    job = client.submit(WORKFLOW, prompt="a lighthouse at dusk", **SMALL)
    assert isinstance(job, Job)
    params = job.params
    # the broker's validated parameter set: what we gave, defaults and a seed filled in
    assert params["prompt"] == "a lighthouse at dusk"
    assert (params["width"], params["height"], params["steps"]) == (128, 128, 2)
    assert isinstance(params["seed"], int) and params["seed"] >= 0
    assert set(params) == {"prompt", "steps", "width", "height", "seed", "sampler", "output"}

    events = list(job.progress(timeout=30))
    assert events and all(isinstance(e, p.Progress) for e in events)
    assert all(e.request_id == job.request_id for e in events)
    assert events[-1].node == "decode"
    assert events[-1].done_nodes == events[-1].total_nodes == 2 + 2 + 1  # 2 encoders, 2 steps, decode
    assert [e.step for e in events if e.kind == "denoise"] == [1, 2]
    assert [e.done_nodes for e in events] == sorted(e.done_nodes for e in events)

    result = job.result(timeout=30)
    assert job.done()
    assert isinstance(result, JobResult)
    assert result.request_id == job.request_id
    assert result.params["seed"] == params["seed"]
    image = result.image
    assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
    assert image.std() > 0  # not a blank frame

    path = result.save_png(tmp_path / "out.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height, _, _ = _png_ihdr(data)
    assert (width, height) == (128, 128)
    assert (_decode_png_rgb(data) == image).all()


@pytest.mark.timeout(60)
def test_explicit_seed_is_kept_and_reproduces_the_image(client):
    a = client.generate(WORKFLOW, timeout=30, prompt="a red fox", seed=42, **SMALL)
    b = client.generate(WORKFLOW, timeout=30, prompt="a red fox", seed=42, **SMALL)
    c = client.generate(WORKFLOW, timeout=30, prompt="a red fox", seed=43, **SMALL)
    assert a.params["seed"] == b.params["seed"] == 42 and c.params["seed"] == 43
    assert (a.image == b.image).all()
    assert not (a.image == c.image).all()


@pytest.mark.timeout(30)
def test_workflows_lists_builtin_workflows_with_inputs(client):
    infos = client.workflows()
    by_name = {w.name: w for w in infos}
    expected = set(load_catalog().workflows)
    assert expected <= set(by_name)
    assert {"flux-schnell-txt2img", "flux-dev-txt2img", "sd15-txt2img", "sdxl-txt2img"} <= set(by_name)
    flux = by_name[WORKFLOW]
    assert flux.models == MODELS
    inputs = {i.name: i for i in flux.inputs}
    assert set(inputs) == {"prompt", "steps", "width", "height", "seed", "sampler", "output"}
    assert inputs["prompt"].required is True
    assert inputs["steps"].default == 4 and inputs["steps"].max == 16
    # CFG workflows have the extra inputs
    cfg_inputs = {i.name for i in by_name["sd15-txt2img"].inputs}
    assert {"negative_prompt", "guidance"} <= cfg_inputs


# ---------------------------------------------------------------- typed errors


@pytest.mark.timeout(30)
def test_bad_param_raises_request_rejected_at_submit(client):
    with pytest.raises(RequestRejected) as err:
        client.submit(WORKFLOW, prompt="x", width=130, height=128, steps=2)
    assert err.value.field == "params.width"
    assert err.value.code == "invalid_param"
    assert isinstance(err.value, LegoError)

    with pytest.raises(RequestRejected) as err:
        client.submit(WORKFLOW, prompt="x", steps=0)
    assert err.value.field == "params.steps"

    with pytest.raises(RequestRejected) as err:
        client.submit(WORKFLOW, steps=2)  # prompt is required
    assert err.value.field == "params.prompt"

    with pytest.raises(RequestRejected) as err:
        client.submit("no-such-workflow", prompt="x")
    assert err.value.field == "workflow"
    assert err.value.code == "unknown_workflow"


@pytest.mark.timeout(30)
def test_result_timeout_then_cancel_raises_cancelled(client):
    # Flux1Dev has no actor here: the request is accepted and queues forever.
    job = client.submit("flux-dev-txt2img", prompt="never runs", **SMALL)
    assert job.params["steps"] == 2
    started = time.monotonic()
    with pytest.raises(Timeout):
        job.result(timeout=0.001)
    assert time.monotonic() - started < 1.0
    assert not job.done()
    job.cancel()
    with pytest.raises(Cancelled) as err:
        job.result(timeout=10)
    assert isinstance(err.value, RequestFailed)
    assert err.value.code == "cancelled"
    assert err.value.request_id == job.request_id
    assert job.done()
    # progress ends once the request has ended; only the text encoders (which have
    # actors) can have reported before the cancel
    leftover = list(job.progress(timeout=5))
    assert all(e.kind == "encode" for e in leftover)
    assert not any(e.node == "decode" for e in leftover)


@pytest.mark.timeout(30)
def test_cancel_of_a_running_request_raises_cancelled(client):
    job = client.submit("flux-dev-txt2img", prompt="cancel me", **SMALL)
    job.cancel()
    with pytest.raises(RequestFailed) as err:
        job.result(timeout=10)
    assert type(err.value) is Cancelled and err.value.code == "cancelled"
    stats = client.stats()
    assert stats.counters["requests_cancelled"] >= 1


@pytest.mark.timeout(30)
def test_duplicate_request_id_is_rejected_without_orphaning_the_first_job(client):
    first = client.submit("flux-dev-txt2img", request_id="test-dup-id", prompt="queued", **SMALL)
    with pytest.raises(RequestRejected) as err:
        client.submit("flux-dev-txt2img", request_id="test-dup-id", prompt="again", **SMALL)
    assert err.value.field == "request_id" and err.value.code == "duplicate_request"
    first.cancel()
    with pytest.raises(Cancelled):
        first.result(timeout=2)


@pytest.mark.timeout(60)
def test_one_client_shared_by_threads(client):
    from concurrent.futures import ThreadPoolExecutor

    def work(i):
        if i % 3 == 0:
            return client.stats()
        return client.generate(WORKFLOW, timeout=30, prompt=f"thread {i}", seed=100 + i, **SMALL)

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(work, range(12)))
    for i, outcome in enumerate(outcomes):
        if i % 3 == 0:
            assert isinstance(outcome, p.Stats)
        else:
            assert isinstance(outcome, JobResult) and outcome.params["seed"] == 100 + i
            assert outcome.image.shape == (128, 128, 3)


@pytest.mark.timeout(30)
def test_submit_to_an_address_with_no_broker_times_out():
    address = f"tcp://127.0.0.1:{free_port()}"
    with Client(address, submit_timeout_s=0.5, admin_timeout_s=0.5) as client:
        started = time.monotonic()
        with pytest.raises(Timeout):
            client.submit(WORKFLOW, prompt="nobody listens", **SMALL)
        elapsed = time.monotonic() - started
        assert 0.4 <= elapsed < 3.0
        with pytest.raises(Timeout):
            client.stats()
    assert issubclass(Timeout, TimeoutError)


def test_lego_broker_env_is_the_default_address(monkeypatch):
    monkeypatch.setenv("LEGO_BROKER", "tcp://127.0.0.1:6123")
    with Client() as client:
        assert client.address == "tcp://127.0.0.1:6123"
    with Client("tcp://127.0.0.1:7000") as client:  # an explicit address wins
        assert client.address == "tcp://127.0.0.1:7000"
    monkeypatch.delenv("LEGO_BROKER")
    with Client() as client:
        assert client.address == DEFAULT_ADDRESS


def test_lego_broker_env_is_honoured_by_the_async_client(monkeypatch):
    monkeypatch.setenv("LEGO_BROKER", "tcp://127.0.0.1:6124")

    async def main():
        async with AsyncClient() as client:
            return client.address

    assert asyncio.run(main()) == "tcp://127.0.0.1:6124"


# ---------------------------------------------------------------- asyncio client


@pytest.mark.timeout(60)
def test_async_submit_progress_and_result(cluster):
    async def main():
        async with AsyncClient(cluster) as client:
            job = await client.submit(WORKFLOW, prompt="an async otter", seed=5, **SMALL)
            assert isinstance(job, AsyncJob)
            assert job.params["seed"] == 5 and job.params["steps"] == 2
            events = [event async for event in job.progress()]
            result = await job.result(timeout=30)
            return job, events, result

    job, events, result = asyncio.run(main())
    assert all(isinstance(e, p.Progress) for e in events)
    assert events[-1].node == "decode"
    assert [e.step for e in events if e.kind == "denoise"] == [1, 2]
    assert job.done()
    assert isinstance(result, JobResult)
    assert result.image.shape == (128, 128, 3) and result.image.dtype == np.uint8
    assert result.params["seed"] == 5


@pytest.mark.timeout(60)
def test_async_concurrent_requests_all_complete(cluster):
    n = 8

    async def main():
        async with AsyncClient(cluster) as client:
            jobs = await asyncio.gather(*(client.submit(WORKFLOW, prompt=f"p{i}", seed=i, progress=False, **SMALL)
                                          for i in range(n)))
            results = await asyncio.gather(*(job.result(timeout=30) for job in jobs))
            stats = await client.stats()
            return jobs, results, stats

    jobs, results, stats = asyncio.run(main())
    assert len({job.request_id for job in jobs}) == n
    assert [r.request_id for r in results] == [job.request_id for job in jobs]
    assert [r.params["seed"] for r in results] == list(range(n))
    for r in results:
        assert r.image.shape == (128, 128, 3)
    # different seeds give different images
    assert len({r.image.tobytes() for r in results}) == n
    assert stats.counters["requests_submitted"] >= n


@pytest.mark.timeout(30)
def test_async_rejection_and_timeout(cluster):
    async def main():
        async with AsyncClient(cluster) as client:
            with pytest.raises(RequestRejected) as err:
                await client.submit(WORKFLOW, prompt="x", steps=17, width=128, height=128)
            assert err.value.field == "params.steps"
            job = await client.submit("flux-dev-txt2img", prompt="queued forever", **SMALL)
            with pytest.raises(Timeout):
                await job.result(timeout=0.01)
            job.cancel()
            with pytest.raises(Cancelled) as cancelled:
                await job.result(timeout=10)
            assert cancelled.value.code == "cancelled"
            workflows = await client.workflows()
            return [w.name for w in workflows]

    names = asyncio.run(main())
    assert WORKFLOW in names


@pytest.mark.timeout(30)
def test_async_submit_with_no_broker_times_out():
    address = f"tcp://127.0.0.1:{free_port()}"

    async def main():
        async with AsyncClient(address, submit_timeout_s=0.3) as client:
            with pytest.raises(Timeout):
                await client.submit(WORKFLOW, prompt="x", **SMALL)

    asyncio.run(main())


# ---------------------------------------------------------------- PNG encoding


def test_encode_png_rejects_float_and_wrong_shapes():
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4,), dtype=np.uint8))
    with pytest.raises(ValueError):
        encode_png(np.zeros((2, 4, 4, 3), dtype=np.uint8))


def test_encode_png_round_trips_rgb():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    data = encode_png(image)
    assert _png_ihdr(data) == (7, 5, 8, 2)
    assert (_decode_png_rgb(data) == image).all()
    assert data.endswith(b"IEND" + struct.pack(">I", zlib.crc32(b"IEND") & 0xFFFFFFFF))
