"""Shared-memory transfers between actors on one host (the CPU data plane).

Runs in actor processes. The producer (holder of a tensor bundle) copies each tensor
once into a POSIX shared-memory segment when a same-host peer first fetches it,
answers with the segments' names instead of bytes, and unlinks them when the broker
frees the bundle (or the actor stops). The consumer maps a segment, copies the bytes
out and unmaps at once, so no segment outlives its producer's FREE, whether or not
the consumer is still alive. Segments are registered with the producer's resource
tracker only: if the producer dies, its tracker unlinks them.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from multiprocessing import resource_tracker, shared_memory
from typing import Any

from actors.store import Bundle, pack_bundle, unpack_bundle
from broker.protocol.messages import TensorDesc

PREFIX = "lego-"  # every segment this project creates starts with it (tests count them)


class ShmUnavailable(Exception):
    """A segment named in a reply could not be mapped; the bytes can still come by socket."""


class ShmExporter:
    """Producer side. Thread-safe: the data thread exports, the compute thread releases."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # tensor_id -> {tensor name: (its descriptor, its segment)}: each tensor is copied
        # once, when a fetch first asks for it (a peer holding the request's constants
        # asks for the latents only)
        self._segments: dict[str, dict[str, tuple[TensorDesc, shared_memory.SharedMemory]]] = {}

    def export(self, tensor_id: str, bundle: Bundle) -> list[TensorDesc]:
        """Descriptors of `bundle`'s tensors in segments (made for those not exported yet)."""
        with self._lock:
            known = self._segments.setdefault(tensor_id, {})
            new = {name: value for name, value in bundle.items() if name not in known}
            descs, buffers = pack_bundle(new)
            made = {}
            try:
                for desc, buf in zip(descs, buffers, strict=True):
                    view = memoryview(buf).cast("B")
                    segment = shared_memory.SharedMemory(name=f"{PREFIX}{uuid.uuid4().hex[:20]}", create=True,
                                                         size=max(1, view.nbytes))
                    segment.buf[: view.nbytes] = view
                    made[desc.name] = (desc, segment)
                    desc.where, desc.handle, desc.frame = "shm", segment.name, -1
            except BaseException:
                _destroy([segment for _, segment in made.values()])
                if not known:
                    del self._segments[tensor_id]
                raise
            known.update(made)
            return [known[name][0] for name in bundle]

    def release(self, tensor_ids: list[str]) -> None:
        with self._lock:
            doomed = [self._segments.pop(t) for t in tensor_ids if t in self._segments]
        for exported in doomed:
            _destroy([segment for _, segment in exported.values()])

    def close(self) -> None:
        self.release(list(self._segments))

    def count(self) -> int:
        with self._lock:
            return sum(len(exported) for exported in self._segments.values())


def _destroy(segments: list[shared_memory.SharedMemory]) -> None:
    for segment in segments:
        segment.close()
        with contextlib.suppress(FileNotFoundError):  # already unlinked: nothing left to free
            segment.unlink()


def attach_bundle(descs: list[TensorDesc], as_torch: bool) -> Bundle:
    """Copy a bundle out of the producer's segments (consumer side); unmaps before returning."""
    frames: list[Any] = []
    local = []
    for desc in descs:
        segment = shared_memory.SharedMemory(name=desc.handle)
        # Only the producer may unlink: keep this process's tracker out of it.
        resource_tracker.unregister(segment._name, "shared_memory")  # noqa: SLF001 (no public API on 3.10-3.12)
        try:
            frames.append(_copy_out(segment.buf[: desc.nbytes], as_torch))
        finally:
            segment.close()
        local.append(TensorDesc(desc.name, desc.dtype, desc.shape, len(frames) - 1, "frame", desc.nbytes, desc.strides))
    return unpack_bundle(local, frames, as_torch)


def _copy_out(view: memoryview, as_torch: bool) -> Any:
    """The segment's bytes in memory of this process. For torch, into a torch allocation,
    aligned as torch aligns its tensors, so that `unpack_torch` need not copy them again
    to align them (broker/protocol/tensors.py)."""
    if not as_torch:
        return bytes(view)
    import torch

    out = torch.empty(len(view), dtype=torch.uint8)
    if len(view):
        out.numpy()[:] = memoryview(view).cast("B")
    return out.numpy()
