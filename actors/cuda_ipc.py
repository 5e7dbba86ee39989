"""CUDA IPC between actors on one host and one GPU: tensors move as handles, not bytes.

Runs in actor processes and owns no socket: the producer half (`IpcExporter`, the
holder of a bundle) runs on the actor's data thread, which owns the data ROUTER and
answers FETCH; the consumer half (`open_tensors`) runs on the compute thread, which
owns the fetch DEALERs. Nothing here is reached without CUDA: a consumer advertises a
GPU only when its own device is CUDA (`Fetch.gpu_uuid`), and a producer shares only
tensors that live on that same physical GPU. GPUs are compared by UUID, because
`CUDA_VISIBLE_DEVICES` renumbers devices per process (two actors on one GPU both
call it cuda:0). torch is imported lazily, so emulated actors never load it.

The exchange. The consumer's FETCH carries its GPU's UUID. The producer answers each
CUDA tensor on that GPU with a `TensorDesc(where="cuda_ipc")`: the IPC handle of the
CUDA allocation holding the tensor's storage, the storage's offset and size in it,
the view's storage offset, shape, strides and dtype, a reference-counter slot, and an
IPC event recorded on the producer's stream after the tensor was produced (the data
thread first makes its stream wait on the event the compute thread recorded when it
stored the bundle, so work on any producer stream is covered). Other tensors of the
bundle (CPU-side sampler state) travel as frames in the same reply. The consumer
opens the allocation, waits for the event on its own stream, copies each view into
its own allocation (layout kept), synchronises and closes the mapping, all before the
fetch returns, so before the task runs and long before it reports DONE. Every wire
field is bytes, an int or a string (msgpack; no pickle).

Lifetime rule (who frees what, and when).
1. The producer pins the storage of every tensor it shares (a strong reference in
   `IpcExporter`) from the fetch until the broker FREEs the bundle (or the session
   ends, or the actor stops). FREE drops the pins whatever the consumers did.
2. A consumer never keeps a mapping: it copies out and closes before the fetch
   returns. The broker sends FREE only once every consumer of the bundle has reported
   DONE (or its request ended), so a live consumer has always let go by then.
3. A consumer that dies mid-fetch therefore pins nothing past FREE: its mapping goes
   with its process and the producer's memory goes back to the caching allocator when
   the pins drop. The one overlap is a consumer still copying an input of a request
   that was cancelled or restarted meanwhile: it may read reused memory, and the
   broker drops that task's result anyway (old attempt, or no request).

Why torch's sharing and not cupy's `ipcGetMemHandle`: a tensor lives in a block of
torch's caching allocator, inside a larger cudaMalloc segment; only torch knows the
block's segment and offset (`_share_cuda_`), handles expandable segments, caches
opened segments on the consumer side (`_new_shared_cuda`), and records and waits on
the producer's event; cupy would need the driver's address-range query, fails on
expandable segments, and is not a dependency of actors. What we do not take from torch
is its lifetime rule: torch keeps a shared storage alive until every consumer has
decremented its counter, so a consumer that dies pins the producer's memory for good,
and (its counter being unsigned in most releases) the producer cannot decrement in
its place without risking a wrap-around. So the share is made on a *non-owning alias*
of the storage (same pointer, its own StorageImpl): torch's counter then governs only
the alias, whose release frees nothing, and the memory is governed by rule 1. A dead
consumer leaves one counter slot and one event in torch's limbo, never tensor memory.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.protocol.messages import TensorDesc
from broker.protocol.tensors import ITEMSIZE

WHERE = "cuda_ipc"
EVENT_HANDLE_BYTES = 64  # sizeof(cudaIpcEventHandle_t)


class IpcUnavailable(Exception):
    """A CUDA IPC transfer could not be made or opened; the bytes can still come another way."""


# ---------------------------------------------------------------- which GPU, which transport


def normalise_uuid(text: str) -> str:
    """CUDA prints 'GPU-xxxxxxxx-...', torch's properties 'xxxxxxxx-...': compare the hex part."""
    text = text.strip().lower()
    return text[4:] if text.startswith("gpu-") else text


_UUIDS: dict[int, str] = {}


def gpu_uuid(index: int) -> str:
    """The UUID of this process's CUDA device `index`; "" when there is none."""
    if index not in _UUIDS:
        try:
            import torch

            _UUIDS[index] = normalise_uuid(str(torch.cuda.get_device_properties(index).uuid))
        except Exception:  # no CUDA, no such device, or a torch without `uuid`: no IPC
            _UUIDS[index] = ""
    return _UUIDS[index]


def device_index(device: str) -> int | None:
    """'cuda:2' -> 2, 'cuda' -> 0; None for any other device."""
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return None
    return int(index) if index else 0


def device_uuid(device: str) -> str:
    """The UUID of an actor's configured device ('cuda:0'); "" for CPU or without CUDA."""
    index = device_index(device)
    if index is None:
        return ""
    try:
        import torch

        if not torch.cuda.is_available():
            return ""
    except ImportError:
        return ""
    return gpu_uuid(index)


def fetch_request(*, same_host: bool, nbytes: int, shm: bool, shm_min_bytes: int, gpu: str) -> tuple[bool, str]:
    """What a consumer asks for: (shared memory?, GPU UUID to advertise).

    Across hosts neither applies. On one host shared memory pays only for big bundles
    (a segment costs more than sending a small one's bytes); the GPU is advertised
    whatever the size, since IPC also saves the device-to-host-to-device round trip.
    The producer decides per tensor (`ipc_candidates`).
    """
    if not same_host:
        return False, ""
    return shm and nbytes >= shm_min_bytes, gpu


def on_gpu(value: Any) -> bool:
    """A non-empty CUDA torch tensor (RawTensor and CPU tensors are not)."""
    return bool(getattr(value, "is_cuda", False)) and value.numel() > 0


def ipc_candidates(bundle: dict, consumer_gpu: str, uuid_of: Callable[[int], str] = gpu_uuid,
                   is_gpu: Callable[[Any], bool] = on_gpu) -> list[str]:
    """Names of the tensors a producer answers by IPC: CUDA tensors on the consumer's GPU."""
    if not consumer_gpu:
        return []
    return [name for name, value in bundle.items()
            if is_gpu(value) and uuid_of(value.device.index) == consumer_gpu]


# ---------------------------------------------------------------- stream ordering


def record_ready(bundle: dict) -> tuple | None:
    """Compute thread, as a bundle is stored: one event per device its CUDA tensors are on,
    recorded on that device's current stream, i.e. after the work that produced them."""
    devices = {value.device for value in bundle.values() if getattr(value, "is_cuda", False)}
    if not devices:
        return None
    import torch

    events = []
    for device in devices:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        events.append((device, event))
    return tuple(events)


def wait_ready(ready: tuple | None) -> None:
    """Data thread: order its stream after the producing work before sharing or copying."""
    if not ready:
        return
    import torch

    for device, event in ready:
        event.wait(torch.cuda.current_stream(device))


# ---------------------------------------------------------------- producer side


@dataclass(frozen=True)
class Share:
    """What `_share_cuda_` says about one storage (all msgpack-able)."""

    handle: bytes  # the allocator's shareable handle of the segment (version, type, cudaIpcMemHandle)
    offset: int  # the storage's byte offset inside that segment
    storage_bytes: int
    ref: bytes  # torch's reference-counter file and slot for this share
    ref_offset: int
    event: bytes  # IPC event handle, b"" if torch synchronised the stream instead


class _DevicePointer:
    """`__cuda_array_interface__` over raw device bytes: torch wraps it without owning them."""

    def __init__(self, pointer: int, nbytes: int):
        self.__cuda_array_interface__ = {"data": (pointer, False), "shape": (nbytes,), "typestr": "|u1",
                                         "strides": None, "version": 2}


def _alias(storage: Any) -> Any:
    """A storage over the same device memory that does not own it (its own StorageImpl).

    torch's `_construct_storage_from_data_pointer` (what its CUDA-graph trees use)
    makes one with no deleter at all; torch versions without it get a tensor over a
    `__cuda_array_interface__`, whose deleter only drops that small Python object.
    """
    import torch

    construct = getattr(torch._C, "_construct_storage_from_data_pointer", None)
    if construct is not None:
        return construct(storage.data_ptr(), storage.device, storage.nbytes())
    return torch.as_tensor(_DevicePointer(storage.data_ptr(), storage.nbytes()), device=storage.device).untyped_storage()


def share_storage(storage: Any) -> Share:
    """Export one CUDA storage through a non-owning alias (see the module docstring)."""
    alias = _alias(storage)
    if alias.data_ptr() != storage.data_ptr() or alias.nbytes() != storage.nbytes():
        raise IpcUnavailable("could not alias the storage without copying it")
    _device, handle, size, offset, ref, ref_offset, event, sync = alias._share_cuda_()
    return Share(bytes(handle), int(offset), int(size), bytes(ref), int(ref_offset), bytes(event) if sync else b"")


def unshare(share: Share) -> None:
    """Give back the counter slot of a share that never reached a consumer."""
    import torch

    torch.UntypedStorage._release_ipc_counter_cuda(share.ref, share.ref_offset)


def collect() -> None:
    """Let torch drop alias records whose consumers have let go (frees no tensor memory)."""
    import torch

    torch.cuda.ipc_collect()


def _dtype_name(tensor: Any) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in ITEMSIZE:
        raise IpcUnavailable(f"dtype {tensor.dtype} cannot travel")
    return name


@dataclass
class _Pin:
    storage: Any  # a strong reference: the memory stays allocated until FREE drops it
    share: Share


class IpcExporter:
    """Producer side: shares tensors and pins their storages until FREE.

    Thread-safe: the data thread exports, the compute thread releases (FREE, a new
    session, shutdown). `share`, `unshare` and `collect` are the torch calls; tests on
    machines without CUDA pass stand-ins.
    """

    def __init__(self, share: Callable[[Any], Share] = share_storage, unshare: Callable[[Share], None] = unshare,
                 collect: Callable[[], None] = collect, uuid_of: Callable[[int], str] = gpu_uuid):
        self._share, self._unshare, self._collect, self.uuid_of = share, unshare, collect, uuid_of
        self._lock = threading.Lock()
        self._pins: dict[str, list[_Pin]] = {}
        self.failures = 0  # exports that failed (the fetch went by bytes); data thread only

    def export(self, tensor_id: str, tensors: dict[str, Any]) -> list[TensorDesc]:
        """Descriptors for `tensors` (CUDA views); each distinct storage is shared once per fetch."""
        shares: dict[int, _Pin] = {}
        descs = []
        try:
            for name, tensor in tensors.items():
                storage = tensor.untyped_storage()
                pin = shares.get(storage.data_ptr())
                if pin is None:
                    pin = shares[storage.data_ptr()] = _Pin(storage, self._share(storage))
                s = pin.share
                descs.append(TensorDesc(
                    name=name, dtype=_dtype_name(tensor), shape=list(tensor.shape), where=WHERE,
                    nbytes=tensor.numel() * tensor.element_size(), strides=list(tensor.stride()),
                    gpu_uuid=self.uuid_of(tensor.device.index), ipc_handle=s.handle, ipc_offset=s.offset,
                    ipc_storage_bytes=s.storage_bytes, storage_offset=tensor.storage_offset(), ipc_ref=s.ref,
                    ipc_ref_offset=s.ref_offset, ipc_event=s.event))
        except Exception as exc:
            self.failures += 1
            for pin in shares.values():  # made, never sent: no consumer will release these
                self._unshare(pin.share)
            raise IpcUnavailable(f"{type(exc).__name__}: {exc}") from None
        with self._lock:
            self._pins.setdefault(tensor_id, []).extend(shares.values())
        return descs

    def release(self, tensor_ids: list[str]) -> int:
        """FREE: drop the pins of these bundles, whatever their consumers did; returns how many."""
        with self._lock:
            doomed = [self._pins.pop(t) for t in tensor_ids if t in self._pins]
        count = sum(len(pins) for pins in doomed)
        if count:
            doomed.clear()  # the storages go back to the caching allocator here (if the store let go)
            self._collect()
        return count

    def close(self) -> None:
        with self._lock:
            ids = list(self._pins)
        self.release(ids)

    def count(self) -> int:
        with self._lock:
            return sum(len(pins) for pins in self._pins.values())

    def pinned(self, tensor_id: str) -> int:
        with self._lock:
            return len(self._pins.get(tensor_id, ()))


# ---------------------------------------------------------------- consumer side


def check_desc(desc: TensorDesc) -> None:
    """A cuda_ipc descriptor must describe a view inside the storage it names."""
    if desc.where != WHERE:
        raise IpcUnavailable(f"tensor {desc.name!r} is not a CUDA IPC descriptor ({desc.where!r})")
    if desc.dtype not in ITEMSIZE:
        raise IpcUnavailable(f"tensor {desc.name!r}: unsupported dtype {desc.dtype!r}")
    if not desc.ipc_handle or not desc.ipc_ref or len(desc.ipc_event) not in (0, EVENT_HANDLE_BYTES):
        raise IpcUnavailable(f"tensor {desc.name!r}: malformed IPC handles")
    ints = [*desc.shape, *(desc.strides or ()), desc.ipc_offset, desc.ipc_storage_bytes, desc.storage_offset,
            desc.ipc_ref_offset]
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ints):
        raise IpcUnavailable(f"tensor {desc.name!r}: negative or non-integer geometry")
    if desc.strides is None or len(desc.strides) != len(desc.shape):
        raise IpcUnavailable(f"tensor {desc.name!r}: strides {desc.strides!r} do not fit shape {desc.shape!r}")
    itemsize = ITEMSIZE[desc.dtype]
    if math.prod(desc.shape) and desc.storage_offset * itemsize + itemsize * (
            1 + sum((n - 1) * s for n, s in zip(desc.shape, desc.strides, strict=True))) > desc.ipc_storage_bytes:
        raise IpcUnavailable(f"tensor {desc.name!r} reaches past its storage of {desc.ipc_storage_bytes} bytes")


def open_storage(desc: TensorDesc, index: int) -> Any:
    """Map the producer's storage on device `index`; this stream then waits on its event."""
    import torch

    return torch.UntypedStorage._new_shared_cuda(index, desc.ipc_handle, desc.ipc_storage_bytes, desc.ipc_offset,
                                                 desc.ipc_ref, desc.ipc_ref_offset, desc.ipc_event,
                                                 bool(desc.ipc_event))


def release_unopened(desc: TensorDesc) -> None:
    """Give back the counter slot of a share this consumer will not open (torch's deleter
    does it for opened ones when their storage is dropped)."""
    import torch

    torch.UntypedStorage._release_ipc_counter_cuda(desc.ipc_ref, desc.ipc_ref_offset)


def _share_key(desc: TensorDesc) -> tuple:
    return desc.ipc_handle, desc.ipc_offset, desc.ipc_ref, desc.ipc_ref_offset


def open_tensors(descs: list[TensorDesc], index: int | None, local_gpu: str, *,
                 opener: Callable[[TensorDesc, int | None], Any] | None = None,
                 releaser: Callable[[TensorDesc], None] | None = None) -> dict[str, Any]:
    """Copy the described tensors out of the producer's memory into this process's own.

    Raises IpcUnavailable (nothing is kept open then) if a descriptor is malformed,
    names another GPU, or the allocation cannot be opened (e.g. another GPU after all,
    a peer-access error, a handle the driver refuses). `opener` and `releaser` default
    to the torch calls, looked up when called (tests without CUDA replace them).
    """
    import torch

    opener = opener or open_storage
    releaser = releaser or release_unopened

    for desc in descs:
        check_desc(desc)
        if not local_gpu or normalise_uuid(desc.gpu_uuid) != local_gpu:
            raise IpcUnavailable(f"tensor {desc.name!r} is on GPU {desc.gpu_uuid!r}, this actor on {local_gpu!r}")
    storages: dict[tuple, Any] = {}
    try:
        out = {}
        for desc in descs:
            key = _share_key(desc)
            if key not in storages:  # views of one storage share one handle: open it once
                storages[key] = opener(desc, index)
            storage = storages[key]
            view = torch.empty(0, dtype=getattr(torch, desc.dtype), device=storage.device)
            view.set_(storage, desc.storage_offset, desc.shape, desc.strides)
            out[desc.name] = view.clone(memory_format=torch.preserve_format)
        if storages:
            # Our copies must be complete before the mappings close (torch's deleter also
            # synchronises; doing it here keeps the rule visible and the timing honest).
            first = next(iter(storages.values()))
            if first.device.type == "cuda":
                torch.cuda.current_stream(first.device).synchronize()
    except Exception as exc:
        unopened = {}
        for desc in descs:
            if _share_key(desc) not in storages:
                unopened[_share_key(desc)] = desc
        storages.clear()  # drop what was opened now: torch releases those slots itself
        for desc in unopened.values():
            try:
                releaser(desc)
            except Exception:  # best effort: the producer's FREE drops its pins regardless
                break
        raise IpcUnavailable(f"{type(exc).__name__}: {exc}") from None
    storages.clear()  # close the mappings: the producer may free on FREE from here on
    return out
