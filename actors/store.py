"""The actor's tensor store and bundle packing.

An output bundle (a node's outputs: name -> tensor) stays in the producing actor's
memory until the broker sends FREE. Tensors are `RawTensor` (bytes plus dtype and
shape: the emulated backend, which never imports torch), `VirtualTensor` (the emulated
backend's, when its payloads are virtual: a size without the bytes) or torch tensors (the
diffusers backend, on the CPU or a GPU). The store is shared by the compute thread
(put, free) and the data thread (get for peers), so it takes a lock. A bundle of CUDA
tensors is stored with `ready`: events recorded after the work that produced it,
which the data thread waits on before it copies or shares the tensors
(actors/cuda_ipc.py), since that work may still be queued on the GPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from broker.protocol.messages import TensorDesc
from broker.protocol.tensors import (
    ITEMSIZE,
    VIRTUAL,
    check_payload,
    expected_nbytes,
    pack_torch,
    raw_desc,
    unpack_torch,
)


@dataclass(frozen=True)
class RawTensor:
    """Row-major bytes of `dtype` in `shape`; `buffer` is any buffer-protocol object."""

    dtype: str
    shape: tuple
    buffer: Any

    @property
    def nbytes(self) -> int:
        return memoryview(self.buffer).nbytes


@dataclass(frozen=True)
class VirtualTensor:
    """An emulated tensor of `dtype` in `shape` whose bytes do not exist: only its first
    bytes (`buffer`, the emulated backend's content digest) do. It counts, is stored and
    is fetched as its full size, and a fetch costs the time moving that size would
    take on the emulated hardware (actors/backends/emulated.py `transfer_s`), but no
    CPU copies it: an emulated cluster on a few cores spends its CPU as a GPU cluster's
    hosts would, not on bytes that a GPU moves."""

    dtype: str
    shape: tuple
    buffer: bytes

    @property
    def nbytes(self) -> int:
        return expected_nbytes(self.dtype, list(self.shape))


Bundle = dict[str, Any]


def value_nbytes(value: Any) -> int:
    if isinstance(value, (RawTensor, VirtualTensor)):
        return value.nbytes
    return value.numel() * value.element_size()  # torch


def virtual_nbytes(bundle: Bundle) -> int:
    return sum(v.nbytes for v in bundle.values() if isinstance(v, VirtualTensor))


def bundle_nbytes(bundle: Bundle) -> int:
    return sum(value_nbytes(v) for v in bundle.values())


def pack_bundle(bundle: Bundle, first_frame: int = 0) -> tuple[list[TensorDesc], list[Any]]:
    """Descriptors and zero-copy buffers for every tensor of a bundle."""
    descs, buffers = [], []
    for name, value in bundle.items():
        frame = first_frame + len(buffers)
        if isinstance(value, VirtualTensor):
            desc = TensorDesc(name=name, dtype=value.dtype, shape=list(value.shape), frame=frame, where=VIRTUAL,
                              nbytes=value.nbytes)
            buf = value.buffer
        elif isinstance(value, RawTensor):
            desc, buf = raw_desc(name, value.dtype, list(value.shape), value.buffer, frame), value.buffer
        else:
            desc, buf = pack_torch(name, value, frame)
        descs.append(desc)
        buffers.append(buf)
    return descs, buffers


def unpack_bundle(descs: list[TensorDesc], frames: list[Any], as_torch: bool, virtual: bool = False) -> Bundle:
    """Rebuild a bundle over received frames (no copy). Raises ProtocolError if they
    disagree. `virtual`: virtual tensors are accepted (from peers, on a raw backend)."""
    check_payload(descs, frames, virtual=virtual and not as_torch)
    out = {}
    for desc in descs:
        frame = frames[desc.frame]
        if desc.where == VIRTUAL:
            buf = frame.bytes if hasattr(frame, "bytes") else bytes(frame)
            out[desc.name] = VirtualTensor(desc.dtype, tuple(desc.shape), buf)
        elif as_torch:
            out[desc.name] = unpack_torch(desc, frame)
        else:
            buf = frame.buffer if hasattr(frame, "buffer") and not isinstance(frame, memoryview) else frame
            out[desc.name] = RawTensor(desc.dtype, tuple(desc.shape), buf)
    return out


def raw_zeros(dtype: str, shape: tuple) -> RawTensor:
    n = ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return RawTensor(dtype, tuple(shape), bytearray(n))


class TensorStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bundles: dict[str, Bundle] = {}
        self._ready: dict[str, Any] = {}  # tensor_id -> CUDA events, for bundles that have them
        self._bytes = 0
        self._epoch = 0

    def put(self, tensor_id: str, bundle: Bundle, epoch: int | None = None, ready: Any = None) -> bool:
        """Store a bundle made in session `epoch`; refused (False) if that session ended."""
        with self._lock:
            if epoch is not None and epoch != self._epoch:
                return False
            old = self._bundles.pop(tensor_id, None)
            if old is not None:
                self._bytes -= bundle_nbytes(old)
            self._ready.pop(tensor_id, None)
            self._bundles[tensor_id] = bundle
            if ready is not None:
                self._ready[tensor_id] = ready
            self._bytes += bundle_nbytes(bundle)
            return True

    def get(self, tensor_id: str) -> Bundle | None:
        with self._lock:
            return self._bundles.get(tensor_id)

    def entry(self, tensor_id: str) -> tuple[Bundle, Any] | None:
        """(bundle, its ready events or None), or None if not held."""
        with self._lock:
            bundle = self._bundles.get(tensor_id)
            return None if bundle is None else (bundle, self._ready.get(tensor_id))

    def free(self, tensor_ids: list[str]) -> int:
        freed = 0
        with self._lock:
            for tensor_id in tensor_ids:
                bundle = self._bundles.pop(tensor_id, None)
                self._ready.pop(tensor_id, None)
                if bundle is not None:
                    self._bytes -= bundle_nbytes(bundle)
                    freed += 1
        return freed

    def clear(self, epoch: int = 0) -> None:
        """Drop everything; later puts must come from session `epoch`."""
        with self._lock:
            self._epoch = epoch
            self._bundles.clear()
            self._ready.clear()
            self._bytes = 0

    def stats(self) -> tuple[int, int]:
        with self._lock:
            return len(self._bundles), self._bytes
