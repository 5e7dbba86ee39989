"""A request's conditioning crosses to each actor once (issue 15).

Every step's bundle carries the request's constants (`cond/...`) unchanged; an actor
that fetched them once keeps them and asks later holders to leave them out.
"""

from __future__ import annotations

import pytest
import zmq

torch = pytest.importorskip("torch")

from actors.fetcher import InputUnavailable  # noqa: E402
from actors.request_constants import RequestConstants  # noqa: E402
from actors.store import RawTensor  # noqa: E402
from broker import protocol as p  # noqa: E402
from clients.bench.gpu_transfers import Consumer  # noqa: E402


def raw(nbytes: int) -> RawTensor:
    return RawTensor("uint8", (nbytes,), bytearray(nbytes))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_cache_keeps_only_constants_of_named_requests():
    cache = RequestConstants(max_bytes=1000)
    cache.keep("r", {"latents": raw(100), "cond/embeds": raw(300), "state/generator": raw(10)})
    cache.keep("", {"cond/embeds": raw(300)})  # no request: nothing to key it by
    assert set(cache.held("r")) == {"cond/embeds"}
    assert cache.held("other") == {}
    assert cache.stats() == (1, 300)


def test_past_its_budget_the_least_recently_used_request_goes_first():
    cache = RequestConstants(max_bytes=1000)
    for request in ("a", "b", "c"):
        cache.keep(request, {"cond/embeds": raw(400)})
    assert cache.held("a") == {} and set(cache.held("b")) == set(cache.held("c")) == {"cond/embeds"}
    cache.held("b")  # b used last: c goes next
    cache.keep("d", {"cond/embeds": raw(400)})
    assert cache.held("c") == {} and cache.held("b") and cache.held("d")
    assert cache.stats() == (2, 800)


def test_a_request_untouched_for_idle_s_is_dropped():
    clock = Clock()
    cache = RequestConstants(max_bytes=10_000, idle_s=5.0, clock=clock)
    cache.keep("old", {"cond/embeds": raw(100)})
    clock.now = 3.0
    cache.keep("new", {"cond/embeds": raw(100)})
    clock.now = 6.0
    assert cache.held("old") == {} and cache.held("new")
    assert cache.stats() == (1, 100)


def test_a_constant_alone_over_the_budget_is_not_kept():
    cache = RequestConstants(max_bytes=100)
    cache.keep("r", {"cond/embeds": raw(101)})
    assert cache.stats() == (0, 0)


def step_bundle(latents: float, cond: dict) -> dict:
    return {"latents": torch.full((1, 4, 64, 64), latents), **cond,
            "state/generator": torch.zeros(5056, dtype=torch.uint8)}


@pytest.fixture
def pair():
    """A holder serving its store and a consumer fetching as a task does, in this process."""
    with Consumer("cpu") as holder, Consumer("cpu") as consumer:
        holder.runtime.start_data_plane()

        def fetch(tensor_id: str, request_id: str, nbytes: int, **force):
            ref = p.TensorRef(tensor_id, "holder", holder.runtime.data_address, nbytes, holder.runtime.host)
            return consumer.runtime.fetcher.fetch(ref, request_id, **force)

        yield holder.runtime, consumer.runtime, fetch


COND = {"cond/embeds": torch.randn(2, 333, 64), "cond/pooled": torch.randn(2, 48)}
COND_BYTES = sum(t.numel() * t.element_size() for t in COND.values())
STEP_BYTES = 4 * 64 * 64 * 4 + 5056


@pytest.mark.parametrize("transport", ["frames", "shm"])
def test_later_steps_of_a_request_move_only_their_latents(pair, transport):
    holder, consumer, fetch = pair
    force = {"shm": transport == "shm"}
    for k in range(3):  # steps 0..2 of request r, each carrying the same conditioning
        holder.store.put(f"step{k}", step_bundle(float(k), COND))
    first = fetch("step0", "r", STEP_BYTES + COND_BYTES, **force)
    assert consumer.telemetry.fetched_bytes == STEP_BYTES + COND_BYTES
    for k in (1, 2):
        got = fetch(f"step{k}", "r", STEP_BYTES + COND_BYTES, **force)
        assert list(got) == ["latents", "state/generator", "cond/embeds", "cond/pooled"]
        assert torch.equal(got["latents"], torch.full((1, 4, 64, 64), float(k)))
        for name, tensor in COND.items():
            assert torch.equal(got[name], tensor)
            assert got[name] is first[name]  # the copy fetched at step 0, not a new one
    t = consumer.telemetry
    assert t.fetched_bytes == 3 * STEP_BYTES + COND_BYTES
    assert t.reused_bytes == 2 * COND_BYTES
    if transport == "shm":  # the holder copied the conditioning out once: for the first fetch
        assert holder.data_server.exporter.count() == 3 * 2 + 2


def test_another_request_and_a_bundle_without_conditioning_are_fetched_whole(pair):
    holder, consumer, fetch = pair
    holder.store.put("r-step", step_bundle(1.0, COND))
    other = {"cond/embeds": torch.randn(2, 333, 64), "cond/pooled": torch.randn(2, 48)}
    holder.store.put("q-step", step_bundle(2.0, other))
    holder.store.put("r-image", {"control/image": torch.ones(2, 3, 8, 8)})
    fetch("r-step", "r", 0)
    got = fetch("q-step", "q", 0)
    assert torch.equal(got["cond/embeds"], other["cond/embeds"])  # never r's conditioning
    image = fetch("r-image", "r", 0)
    assert list(image) == ["control/image"]  # r's constants are not added where they were not
    assert consumer.telemetry.reused_bytes == 0


def test_a_holder_that_leaves_out_what_was_not_asked_is_refused(pair):
    _, consumer, _ = pair
    ctx = zmq.Context.instance()
    liar = ctx.socket(zmq.ROUTER)
    port = liar.bind_to_random_port("tcp://127.0.0.1")
    try:
        ref = p.TensorRef("t", "liar", f"tcp://127.0.0.1:{port}", 16, "elsewhere")
        import threading

        def answer():
            identity, _, *frames = liar.recv_multipart()
            reply = p.FetchReply("t", [], ["cond/embeds"])
            liar.send_multipart([identity, b"", *p.encode(reply)])

        thread = threading.Thread(target=answer)
        thread.start()
        with pytest.raises(InputUnavailable, match="left out"):
            consumer.fetcher.fetch(ref, "r")
        thread.join(5)
    finally:
        liar.close(linger=0)


@pytest.mark.parametrize("names", [["latents"], ["cond/x"] * 65, [3]])
def test_a_fetch_may_only_leave_out_a_bounded_list_of_constants(names):
    frames = p.encode(p.Fetch("t", "r", omit=names))
    with pytest.raises(p.ProtocolError) as err:
        p.decode(frames)
    assert err.value.field.endswith("omit")


def test_a_task_that_reads_no_conditioning_gets_none(pair):
    holder, consumer, fetch = pair
    holder.store.put("last-step", step_bundle(3.0, COND))
    got = fetch("last-step", "r", STEP_BYTES + COND_BYTES, constants=False)  # the VAE's decode
    assert list(got) == ["latents", "state/generator"]
    assert consumer.telemetry.fetched_bytes == STEP_BYTES and consumer.fetcher.constants.stats() == (0, 0)
    assert list(fetch("last-step", "r", STEP_BYTES + COND_BYTES)) == list(step_bundle(3.0, COND))  # others still get all


def test_conditioning_an_actor_made_itself_is_not_fetched_back(pair):
    """Step 0 builds the conditioning on actor A; step 1 runs on B; step 2 back on A
    must not fetch it again from B's bundle."""
    holder, consumer, fetch = pair
    consumer.fetcher.constants.keep("r", step_bundle(0.0, COND))  # what BatchRunner keeps of its own step 0
    holder.store.put("step1", step_bundle(1.0, COND))
    got = fetch("step1", "r", STEP_BYTES + COND_BYTES)
    assert consumer.telemetry.fetched_bytes == STEP_BYTES and consumer.telemetry.reused_bytes == COND_BYTES
    assert torch.equal(got["cond/embeds"], COND["cond/embeds"])


def test_a_received_tensor_is_aligned_as_torch_aligns_its_own():
    """Where a frame lands depends on the frames before it; kernels round differently
    for differently aligned inputs, so a misaligned frame is computed on from a copy."""
    from broker.protocol.tensors import TORCH_ALIGNMENT, pack_torch, unpack_torch

    tensor = torch.randn(2, 333, 32)
    desc, buf = pack_torch("cond/embeds", tensor, 0)
    raw = bytearray(len(bytes(buf)) + 128)
    for offset in (0, 4, 8, 16):
        start = (-torch.frombuffer(raw, dtype=torch.uint8).data_ptr()) % 64 + offset
        frame = memoryview(raw)[start: start + desc.nbytes]
        frame[:] = bytes(buf)
        got = unpack_torch(desc, frame)
        assert torch.equal(got, tensor) and got.data_ptr() % TORCH_ALIGNMENT == 0
