"""CUDA IPC between actors on one GPU (actors/cuda_ipc.py).

Without CUDA: the descriptor's wire round trip, the transport decisions, the
producer's pin bookkeeping and the consumer's copy-out with stand-in handles over CPU
storages, and the runtime's choices end to end (CPU tensors keep travelling by
frames or shared memory; a FETCH without a GPU is served as before; a failing IPC
open or export falls back and is counted). With CUDA (`-m gpu`, scripts/gpu-check.sh):
two real processes, every layout and dtype, 1,000 transfers that leave nothing
pinned, a SIGKILLed consumer that pins nothing after FREE.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import weakref

import msgpack
import pytest

torch = pytest.importorskip("torch")

from actors import cuda_ipc  # noqa: E402
from actors.cuda_ipc import IpcExporter, IpcUnavailable, Share  # noqa: E402
from broker import protocol as p  # noqa: E402
from broker.protocol import PROTOCOL_TAG  # noqa: E402
from clients.bench.gpu_transfers import (  # noqa: E402
    LAYOUT_BUNDLE,
    Consumer,
    PeerProcess,
    compare_bundle,
    make_tensor,
)

EVENT = bytes(range(64))
HANDLE = b"\x01\x00" + bytes(range(255, 191, -1))  # version, type, 64 raw bytes (zeros and high bytes too)
UUID = "5a3c11e4-0b1d-4f6e-9c1a-2f3e4d5c6b7a"


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """ActorRuntime sets one intra-op thread process-wide; the rest of the suite expects its own."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def ipc_desc(**overrides) -> p.TensorDesc:
    fields = dict(name="latents", dtype="bfloat16", shape=[1, 4, 8, 8], where=cuda_ipc.WHERE, nbytes=512,
                  strides=[256, 1, 32, 4], gpu_uuid=UUID, ipc_handle=HANDLE, ipc_offset=2 << 20,
                  ipc_storage_bytes=4096, storage_offset=16, ipc_ref=b"/torch_4242_1906_0", ipc_ref_offset=17,
                  ipc_event=EVENT)
    fields.update(overrides)
    return p.TensorDesc(**fields)


# ------------------------------------------------------------------ the wire


def test_an_ipc_descriptor_round_trips_through_the_codec_as_bytes_ints_and_strings():
    reply = p.FetchReply("r1/denoise/3@0", [ipc_desc(), p.TensorDesc("state/generator", "uint8", [4], 0, nbytes=4)])
    frames = p.encode(reply, [b"\x00\x01\x02\x03"])
    header = msgpack.unpackb(frames[2], raw=False)
    desc = header["tensors"][0]
    assert type(desc["ipc_handle"]) is bytes and type(desc["ipc_event"]) is bytes and type(desc["ipc_ref"]) is bytes
    assert all(type(desc[k]) is int for k in ("ipc_offset", "ipc_storage_bytes", "storage_offset", "ipc_ref_offset"))
    msg, payload = p.decode(frames)
    assert msg == reply and payload == [b"\x00\x01\x02\x03"]


def test_fetch_and_telemetry_from_an_older_peer_decode_with_the_new_fields_empty():
    old_fetch = msgpack.packb({"tensor_id": "t", "request_id": "r", "shm": True}, use_bin_type=True)
    msg, _ = p.decode([PROTOCOL_TAG, p.Command.FETCH.value, old_fetch])
    assert msg == p.Fetch("t", "r", True) and msg.gpu_uuid == ""
    old_desc = {"name": "x", "dtype": "float32", "shape": [2], "frame": 0, "where": "frame", "nbytes": 8}
    assert p.TensorDesc.from_wire(old_desc).ipc_handle == b""
    telemetry = p.ActorTelemetry.from_wire({"fetches": 3, "shm_fetches": 1})
    assert (telemetry.ipc_fetches, telemetry.ipc_fallbacks, telemetry.ipc_pins) == (0, 0, 0)
    new = p.Fetch("t", "r", False, UUID)
    assert p.decode(p.encode(new))[0].gpu_uuid == UUID


def test_an_ipc_handle_that_is_not_bytes_is_refused_by_name():
    bad = ipc_desc().to_wire()
    bad["ipc_handle"] = "not bytes"
    frames = [PROTOCOL_TAG, p.Command.FETCH_REPLY.value,
              msgpack.packb({"tensor_id": "t", "tensors": [bad]}, use_bin_type=True)]
    with pytest.raises(p.ProtocolError) as err:
        p.decode(frames)
    assert err.value.field == "tensors[0].ipc_handle"


# ------------------------------------------------------------------ which transport


@pytest.mark.parametrize(("same_host", "nbytes", "shm", "gpu", "expected"), [
    (False, 1 << 30, True, UUID, (False, "")),  # another host: frames, whatever else
    (True, 1 << 10, True, UUID, (False, UUID)),  # small: no segment, but the GPU is offered
    (True, 1 << 21, True, UUID, (True, UUID)),
    (True, 1 << 21, False, "", (False, "")),  # a CPU consumer with shared memory off
    (True, 1 << 21, True, "", (True, "")),  # a CPU consumer: shared memory only
])
def test_what_a_consumer_asks_for(same_host, nbytes, shm, gpu, expected):
    assert cuda_ipc.fetch_request(same_host=same_host, nbytes=nbytes, shm=shm, shm_min_bytes=1 << 20,
                                  gpu=gpu) == expected


class FakeGpuTensor:
    """Enough of a CUDA tensor for the producer's decision."""

    def __init__(self, index: int, numel: int = 4):
        self.is_cuda, self.device, self._numel = True, torch.device("cuda", index), numel

    def numel(self) -> int:
        return self._numel


def test_the_producer_shares_only_cuda_tensors_on_the_consumers_gpu():
    uuids = {0: "gpu-a", 1: "gpu-b"}
    bundle = {"latents": FakeGpuTensor(0), "other_gpu": FakeGpuTensor(1), "empty": FakeGpuTensor(0, numel=0),
              "state/generator": torch.zeros(8, dtype=torch.uint8), "raw": object()}
    assert cuda_ipc.ipc_candidates(bundle, "gpu-a", uuids.get) == ["latents"]
    assert cuda_ipc.ipc_candidates(bundle, "gpu-b", uuids.get) == ["other_gpu"]
    assert cuda_ipc.ipc_candidates(bundle, "", uuids.get) == []  # a Fetch without a GPU
    assert cuda_ipc.ipc_candidates(bundle, "gpu-c", uuids.get) == []  # another GPU: bytes


def test_gpu_uuids_compare_without_the_nvidia_prefix_and_cpu_actors_have_none():
    assert cuda_ipc.normalise_uuid("GPU-5A3C11E4-0b1d") == cuda_ipc.normalise_uuid("5a3c11e4-0B1D")
    assert cuda_ipc.device_uuid("cpu") == "" and cuda_ipc.device_uuid("emu:0") == ""
    assert cuda_ipc.device_index("cuda:3") == 3 and cuda_ipc.device_index("cuda") == 0
    assert cuda_ipc.device_index("cpu") is None
    if not torch.cuda.is_available():
        assert cuda_ipc.device_uuid("cuda:0") == ""  # no CUDA: the consumer never offers a GPU


def test_bundles_without_cuda_tensors_record_no_events():
    assert cuda_ipc.record_ready({"x": torch.ones(2), "y": object()}) is None
    cuda_ipc.wait_ready(None)  # and waiting on none is free


# ------------------------------------------------------------------ stand-in handles over CPU storages


class FakeIpc:
    """Shares CPU storages through an in-process registry, as torch shares CUDA ones."""

    def __init__(self):
        # Weak, like a real handle: the producer's pins, not the registry, keep memory alive.
        self.storages: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.shared = self.unshared = self.collected = self.opened = self.released = 0
        self.fail_share_after: int | None = None
        self.fail_open = False

    def share(self, storage) -> Share:
        if self.fail_share_after is not None and self.shared >= self.fail_share_after:
            raise RuntimeError("cudaErrorInvalidValue")
        self.shared += 1
        handle = b"h%d" % storage.data_ptr()
        self.storages[handle] = storage
        return Share(handle, 0, storage.nbytes(), b"/torch_fake", self.shared, EVENT)

    def unshare(self, share: Share) -> None:
        self.unshared += 1

    def collect(self) -> None:
        self.collected += 1

    def open(self, desc, index):
        if self.fail_open:
            raise RuntimeError("cudaErrorPeerAccessUnsupported")
        self.opened += 1
        return self.storages[desc.ipc_handle]

    def release(self, desc) -> None:
        self.released += 1

    def exporter(self) -> IpcExporter:
        # Through lambdas, so that a test can swap a method after the exporter exists.
        return IpcExporter(share=lambda s: self.share(s), unshare=lambda s: self.unshare(s),
                           collect=lambda: self.collect(), uuid_of=lambda index: UUID)


def cpu_bundle() -> dict:
    return {spec["name"]: make_tensor(spec, "cpu") for spec in LAYOUT_BUNDLE}


def test_views_of_one_storage_share_once_and_come_back_equal_with_their_layout():
    fake = FakeIpc()
    base = torch.randn(3, 4, 8, 8)
    tensors = {"a": base[1:].contiguous(memory_format=torch.channels_last), "b": base[0], "c": base[2, :, ::2],
               "d": base.transpose(-1, -2)}
    descs = fake.exporter().export("t", tensors)
    assert fake.shared == 2  # `a` is a copy; b, c and d are views of `base`
    assert {d.storage_offset for d in descs} == {0, 2 * 4 * 8 * 8}
    got = cuda_ipc.open_tensors(descs, None, UUID, opener=fake.open, releaser=fake.release)
    assert fake.opened == 2  # one open per distinct share
    for name, want in tensors.items():
        assert torch.equal(got[name], want), name
    assert got["a"].stride() == tensors["a"].stride() and got["d"].stride() == tensors["d"].stride()
    assert got["b"].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()  # copies, not views


def test_every_layout_and_dtype_of_a_step_bundle_survives_the_copy_out():
    fake = FakeIpc()
    bundle = cpu_bundle()
    descs = fake.exporter().export("t", bundle)
    assert [d.dtype for d in descs] == [s["dtype"] for s in LAYOUT_BUNDLE]
    got = cuda_ipc.open_tensors(descs, None, UUID, opener=fake.open, releaser=fake.release)
    assert compare_bundle(got, LAYOUT_BUNDLE, "cpu") == []


def test_pins_keep_storages_alive_until_free_and_free_drops_them_whatever_consumers_did():
    fake = FakeIpc()
    exporter = fake.exporter()
    tensor = torch.randn(1024)
    alive = weakref.ref(tensor.untyped_storage())
    for _consumer in range(3):  # three consumers fetch it; one opens, one dies, one never opens
        exporter.export("t", {"x": tensor})
    exporter.export("u", {"y": torch.ones(4)})
    assert exporter.count() == 4 and exporter.pinned("t") == 3
    del tensor  # the store's FREE
    assert alive() is not None  # still pinned: a consumer may be copying
    assert exporter.release(["t", "never-exported"]) == 3
    assert alive() is None and exporter.count() == 1 and fake.collected == 1
    assert exporter.release(["t"]) == 0 and fake.collected == 1  # nothing left: nothing to collect
    exporter.close()
    assert exporter.count() == 0


def test_an_export_that_fails_half_way_gives_back_what_it_shared_and_pins_nothing():
    fake = FakeIpc()
    fake.fail_share_after = 1
    exporter = fake.exporter()
    with pytest.raises(IpcUnavailable, match="cudaErrorInvalidValue"):
        exporter.export("t", {"a": torch.ones(4), "b": torch.zeros(4)})
    assert fake.unshared == 1 and exporter.count() == 0 and exporter.failures == 1


def test_a_failed_open_releases_unopened_shares_and_keeps_nothing():
    fake = FakeIpc()
    zeros = torch.zeros(4)
    descs = fake.exporter().export("t", {"a": torch.ones(4), "b": zeros, "c": zeros[1:]})
    fake.fail_open = True
    with pytest.raises(IpcUnavailable, match="PeerAccess"):
        cuda_ipc.open_tensors(descs, None, UUID, opener=fake.open, releaser=fake.release)
    assert fake.released == 2  # two distinct shares, neither opened


@pytest.mark.parametrize(("overrides", "why"), [
    ({"gpu_uuid": "another-gpu"}, "is on GPU"),
    ({"ipc_storage_bytes": 543}, "past its storage"),  # the view needs 32 + 512 bytes
    ({"storage_offset": 2000}, "past its storage"),
    ({"strides": None}, "strides"),
    ({"strides": [1, 2]}, "strides"),
    ({"ipc_event": b"short"}, "malformed"),
    ({"ipc_handle": b""}, "malformed"),
    ({"dtype": "complex64"}, "dtype"),
    ({"ipc_offset": -1}, "negative"),
])
def test_descriptors_naming_another_gpu_or_reaching_outside_their_storage_are_refused(overrides, why):
    fake = FakeIpc()
    with pytest.raises(IpcUnavailable, match=why):
        cuda_ipc.open_tensors([ipc_desc(**overrides)], 0, cuda_ipc.normalise_uuid(UUID), opener=fake.open,
                              releaser=fake.release)
    assert fake.opened == 0


# ------------------------------------------------------------------ the runtime, end to end on CPU


@pytest.fixture
def producer():
    """A producer peer process serving CPU tensors (its data thread is the real runtime's)."""
    with PeerProcess("cpu") as peer:
        yield peer


@pytest.fixture
def consumer():
    with Consumer("cpu", shm=True) as c:  # shared memory on, as LEGO_SHM=1 turns it on for actors
        yield c


def test_a_consumer_with_default_settings_fetches_even_a_big_bundle_as_frames(producer):
    big_spec = [{"name": "latents", "dtype": "float32", "shape": [1 << 19], "seed": 9}]
    big = producer.put("big", big_spec)
    with Consumer("cpu") as consumer:
        assert compare_bundle(consumer.fetch(producer, "big", big), big_spec, "cpu") == []
        t = consumer.runtime.refresh_telemetry()
    assert (t.fetches, t.shm_fetches) == (1, 0)
    producer.free(["big"])
    assert producer.stats()["segments"] == 0


def test_a_cpu_consumer_never_offers_a_gpu_and_cpu_tensors_keep_their_transports(producer, consumer):
    assert consumer.gpu == "" and producer.gpu == ""
    small = producer.put("small", LAYOUT_BUNDLE)
    assert compare_bundle(consumer.fetch(producer, "small", small), LAYOUT_BUNDLE, "cpu") == []
    big_spec = [{"name": "latents", "dtype": "float32", "shape": [1 << 19], "seed": 9}]
    big = producer.put("big", big_spec)
    assert compare_bundle(consumer.fetch(producer, "big", big), big_spec, "cpu") == []
    t = consumer.runtime.refresh_telemetry()
    assert (t.fetches, t.shm_fetches, t.ipc_fetches, t.ipc_fallbacks) == (2, 1, 0, 0)
    producer.free(["small", "big"])
    assert producer.stats() == {"allocated": 0, "pins": 0, "segments": 0, "stored": 0, "ipc_fallbacks": 0}


def test_a_consumer_offering_a_gpu_gets_cpu_tensors_as_bytes(producer, consumer):
    consumer.runtime.fetcher._gpu = UUID  # as a CUDA actor would: the producer's tensors are on the CPU
    nbytes = producer.put("t", LAYOUT_BUNDLE)
    assert compare_bundle(consumer.fetch(producer, "t", nbytes), LAYOUT_BUNDLE, "cpu") == []
    assert consumer.runtime.telemetry.ipc_fetches == 0 and producer.stats()["pins"] == 0


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make this process's producer and consumer treat CPU tensors as on one fake GPU."""
    fake = FakeIpc()
    monkeypatch.setattr(cuda_ipc, "ipc_candidates", lambda bundle, gpu, uuid_of: [
        name for name, value in bundle.items()
        if gpu == UUID and isinstance(value, torch.Tensor) and value.dtype != torch.uint8])
    monkeypatch.setattr(cuda_ipc, "open_storage", fake.open)
    monkeypatch.setattr(cuda_ipc, "release_unopened", fake.release)
    return fake


@pytest.fixture
def pair(fake_gpu):
    """A producer runtime (data thread serving) and a consumer runtime, in this process."""
    from broker.protocol.messages import TensorRef

    with Consumer("cpu") as producer, Consumer("cpu") as consumer:
        producer.runtime.data_server.ipc = fake_gpu.exporter()
        producer.runtime.start_data_plane()
        consumer.runtime.fetcher._gpu = UUID

        def fetch(tensor_id: str, **force):
            ref = TensorRef(tensor_id, "producer", producer.runtime.data_address, 64, producer.runtime.host)
            return consumer.runtime.fetcher.fetch(ref, **force)

        yield producer.runtime, consumer.runtime, fetch


def test_ipc_replies_carry_the_rest_of_the_bundle_as_frames_and_free_drops_the_pins(pair, fake_gpu):
    producer, consumer, fetch = pair
    bundle = cpu_bundle()
    producer.store.put("t", bundle)
    got = fetch("t")
    assert compare_bundle(got, LAYOUT_BUNDLE, "cpu") == []
    assert fake_gpu.shared == len(LAYOUT_BUNDLE) - 1  # all but the uint8 generator state
    assert consumer.telemetry.ipc_fetches == 1 and producer.data_server.ipc.count() == len(LAYOUT_BUNDLE) - 1
    producer.free(["t"])
    assert producer.data_server.ipc.count() == 0 and producer.store.get("t") is None


def test_an_ipc_open_that_fails_falls_back_to_bytes_and_is_counted(pair, fake_gpu):
    producer, consumer, fetch = pair
    producer.store.put("t", cpu_bundle())
    fake_gpu.fail_open = True
    assert compare_bundle(fetch("t"), LAYOUT_BUNDLE, "cpu") == []
    t = consumer.refresh_telemetry()
    assert (t.fetches, t.ipc_fetches, t.ipc_fallbacks) == (1, 0, 1)
    assert fake_gpu.released == fake_gpu.shared  # the consumer gave back every share it could not open


def test_an_export_that_fails_is_answered_with_bytes_and_counted_by_the_producer(pair, fake_gpu):
    producer, consumer, fetch = pair
    producer.store.put("t", cpu_bundle())
    fake_gpu.fail_share_after = 0
    assert compare_bundle(fetch("t"), LAYOUT_BUNDLE, "cpu") == []
    assert producer.refresh_telemetry().ipc_fallbacks == 1 and producer.data_server.ipc.count() == 0
    assert consumer.telemetry.ipc_fetches == 0


def test_a_free_that_races_an_export_leaves_no_pin(pair, fake_gpu):
    producer, consumer, fetch = pair
    producer.store.put("t", cpu_bundle())
    share = fake_gpu.share

    def share_then_free(storage):  # the compute thread's FREE lands while the data thread shares
        if producer.store.get("t") is not None:
            producer.free(["t"])
        return share(storage)

    fake_gpu.share = share_then_free
    from actors.fetcher import InputUnavailable

    with pytest.raises(InputUnavailable, match="freed"):
        fetch("t")
    assert producer.data_server.ipc.count() == 0


def test_a_fetch_without_a_gpu_uuid_is_served_as_before(pair):
    producer, consumer, _ = pair
    producer.store.put("t", cpu_bundle())
    import zmq

    sock = consumer.context.socket(zmq.DEALER)
    try:
        sock.connect(producer.data_address)
        old = msgpack.packb({"tensor_id": "t", "request_id": "r"}, use_bin_type=True)  # an older peer's FETCH
        sock.send_multipart([b"", PROTOCOL_TAG, p.Command.FETCH.value, old])
        assert sock.poll(5000)
        msg, payload = p.decode(sock.recv_multipart()[1:])
    finally:
        sock.close(linger=0)
    assert isinstance(msg, p.FetchReply) and {d.where for d in msg.tensors} == {"frame"}
    assert producer.data_server.ipc.count() == 0


# ------------------------------------------------------------------ on a GPU (scripts/gpu-check.sh)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda:0"


@pytest.fixture
def gpu_pair():
    with PeerProcess(DEVICE) as peer, Consumer(DEVICE) as consumer:
        assert peer.gpu and peer.gpu == consumer.gpu, "both processes must see the same GPU"
        yield peer, consumer


@pytest.mark.gpu
@needs_cuda
def test_gpu_every_layout_and_dtype_arrives_equal_by_ipc(gpu_pair):
    peer, consumer = gpu_pair
    baseline = peer.stats()["allocated"]
    nbytes = peer.put("t", LAYOUT_BUNDLE)
    got = consumer.fetch(peer, "t", nbytes)
    assert all(v.is_cuda for k, v in got.items() if k != "state/generator")
    assert not got["state/generator"].is_cuda  # CPU-side state came as frames in the same reply
    assert compare_bundle(got, LAYOUT_BUNDLE, DEVICE) == []
    assert consumer.runtime.telemetry.ipc_fetches == 1
    assert peer.stats()["pins"] > 0
    peer.free(["t"])
    stats = peer.stats()
    assert stats["pins"] == 0 and stats["allocated"] == baseline


@pytest.mark.gpu
@needs_cuda
def test_gpu_a_thousand_transfers_between_two_processes_leave_nothing_pinned(gpu_pair):
    peer, consumer = gpu_pair
    spec = [{"name": "latents", "dtype": "float16", "shape": [2, 4, 64, 64], "seed": 7, "layout": "channels_last"},
            {"name": "cond/embeds", "dtype": "bfloat16", "shape": [2, 77, 2048], "seed": 8}]
    consumer_baseline = torch.cuda.memory_allocated(DEVICE)
    producer_baseline = peer.stats()["allocated"]
    for i in range(1000):
        nbytes = peer.put(f"t{i}", spec)
        got = consumer.fetch(peer, f"t{i}", nbytes)
        if i % 100 == 0:
            assert compare_bundle(got, spec, DEVICE) == [], i
        del got
        peer.free([f"t{i}"])
    stats = peer.stats()
    assert stats["pins"] == 0 and stats["stored"] == 0
    assert stats["allocated"] == producer_baseline
    assert torch.cuda.memory_allocated(DEVICE) == consumer_baseline
    t = consumer.runtime.refresh_telemetry()
    assert (t.ipc_fetches, t.ipc_fallbacks, t.fetch_fallbacks) == (1000, 0, 0)


@pytest.mark.gpu
@needs_cuda
def test_gpu_a_sigkilled_consumer_pins_nothing_after_free(gpu_pair):
    peer, _ = gpu_pair
    baseline = peer.stats()["allocated"]
    peer.put("t", [{"name": "latents", "dtype": "float32", "shape": [16, 1024, 1024], "seed": 3}])  # 64 MiB
    holder = subprocess.Popen([sys.executable, "-m", "clients.bench.gpu_check", "hold", "--address", peer.address,
                               "--tensor-id", "t", "--device", DEVICE], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert json.loads(holder.stdout.readline()) == {"held": 1}  # mapped, never released
        assert peer.stats()["pins"] == 1
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    peer.free(["t"])  # the broker's FREE: the consumer never said it let go
    stats = peer.stats()
    assert stats["pins"] == 0 and stats["allocated"] == baseline


@pytest.mark.gpu
@needs_cuda
def test_gpu_an_open_that_fails_falls_back_to_bytes(gpu_pair, monkeypatch):
    peer, consumer = gpu_pair

    def refuse(desc, index):
        raise RuntimeError("cudaErrorPeerAccessUnsupported")

    monkeypatch.setattr(cuda_ipc, "open_storage", refuse)
    nbytes = peer.put("t", LAYOUT_BUNDLE)
    assert compare_bundle(consumer.fetch(peer, "t", nbytes), LAYOUT_BUNDLE, DEVICE) == []
    t = consumer.runtime.refresh_telemetry()
    assert (t.ipc_fetches, t.ipc_fallbacks) == (0, 1)
    peer.free(["t"])
    assert peer.stats()["pins"] == 0


@pytest.mark.gpu
@needs_cuda
def test_gpu_a_consumer_on_another_gpu_gets_bytes(gpu_pair):
    peer, consumer = gpu_pair
    consumer.runtime.fetcher._gpu = "00000000-0000-0000-0000-000000000000"
    nbytes = peer.put("t", LAYOUT_BUNDLE)
    assert compare_bundle(consumer.fetch(peer, "t", nbytes), LAYOUT_BUNDLE, DEVICE) == []
    assert consumer.runtime.telemetry.ipc_fetches == 0 and peer.stats()["pins"] == 0
