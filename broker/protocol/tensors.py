"""Tensor payloads: raw bytes described by a TensorDesc (dtype name, shape).

Packing never copies a contiguous tensor: the returned buffer aliases its memory and
keeps it alive until ZeroMQ has sent it (`copy=False` holds a reference). bf16 and
other dtypes numpy lacks travel as raw bytes. torch is imported only when a torch
tensor is packed or unpacked, so processes that never touch torch (the emulated
backend, the broker) never load it.
"""

from __future__ import annotations

import math
from typing import Any

from broker.protocol.errors import ErrorCode, ProtocolError
from broker.protocol.messages import TensorDesc

ITEMSIZE = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
}


def expected_nbytes(dtype: str, shape: list) -> int:
    if dtype not in ITEMSIZE:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"unsupported dtype {dtype!r}", "dtype")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(ErrorCode.BAD_HEADER, f"bad shape {shape!r}", "shape")
    return ITEMSIZE[dtype] * math.prod(shape)


def raw_desc(name: str, dtype: str, shape: list, buffer: Any, frame: int) -> TensorDesc:
    """Describe a raw buffer (already laid out row-major) as payload frame `frame`."""
    nbytes = expected_nbytes(dtype, list(shape))
    actual = memoryview(buffer).nbytes
    if actual != nbytes:
        raise ValueError(f"tensor {name!r}: buffer has {actual} bytes, {dtype}{list(shape)} needs {nbytes}")
    return TensorDesc(name=name, dtype=dtype, shape=list(shape), frame=frame, nbytes=nbytes)


def check_strides(shape: list, strides: list | None) -> None:
    """`strides` must lay `shape` out densely: a permutation of a row-major layout."""
    if strides is None:
        return
    if len(strides) != len(shape) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in strides):
        raise ProtocolError(ErrorCode.BAD_HEADER, f"strides {strides!r} do not fit shape {shape!r}", "strides")
    expected = 1
    for dim in sorted(range(len(shape)), key=lambda d: (strides[d], shape[d])):
        if shape[dim] != 1 and strides[dim] != expected:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"strides {strides!r} are not a dense layout of {shape!r}", "strides")
        expected *= shape[dim]


# An emulated tensor's bytes are not sent: only its first bytes are (the emulated
# backend's content digest), and its frame is that head. Only between actors that
# emulate, by descriptor `where`; every other receiver refuses it (`check_payload`).
VIRTUAL = "virtual"
MAX_VIRTUAL_HEAD = 64


def check_payload(descs: list[TensorDesc], payload: list[Any], virtual: bool = False) -> None:
    """Every described tensor points at a payload frame of exactly its size (with
    `virtual`, a virtual tensor's frame is its head: at most MAX_VIRTUAL_HEAD bytes)."""
    for i, d in enumerate(descs):
        if d.where != "frame" and not (virtual and d.where == VIRTUAL):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"unsupported tensor location {d.where!r}", f"tensors[{i}].where")
        if not 0 <= d.frame < len(payload):
            raise ProtocolError(ErrorCode.BAD_FRAMES, f"tensor {d.name!r} names frame {d.frame}", f"tensors[{i}].frame")
        check_strides(d.shape, d.strides)
        need = expected_nbytes(d.dtype, d.shape)
        have = memoryview(_buffer(payload[d.frame])).nbytes
        if d.where == VIRTUAL:
            if have > min(need, MAX_VIRTUAL_HEAD) or d.nbytes != need:
                raise ProtocolError(ErrorCode.BAD_FRAMES, f"virtual tensor {d.name!r}: head of {have} bytes, "
                                    f"nbytes {d.nbytes} for {need}", f"tensors[{i}]")
            continue
        if have != need:
            raise ProtocolError(
                ErrorCode.BAD_FRAMES, f"tensor {d.name!r} frame has {have} bytes, needs {need}", f"tensors[{i}]"
            )


def _buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") and not isinstance(frame, memoryview) else frame


def pack_torch(name: str, tensor: Any, frame: int) -> tuple[TensorDesc, Any]:
    """(desc, buffer) for a CPU torch tensor; the buffer shares its memory when contiguous."""
    import torch

    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in ITEMSIZE:
        raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot travel")
    shape = list(tensor.shape)
    strides = None
    if not tensor.is_contiguous() and _dense(tensor):
        # Send the memory as laid out (no copy) and say how: see TensorDesc.strides.
        order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), -tensor.shape[d]))
        flat = tensor.permute(order).reshape(-1)
        strides = list(tensor.stride())
    else:
        flat = tensor.contiguous().reshape(-1)
    buf = flat.view(torch.uint8).numpy() if flat.numel() else b""
    nbytes = len(memoryview(buf).cast("B"))
    return TensorDesc(name=name, dtype=dtype, shape=shape, frame=frame, nbytes=nbytes, strides=strides), buf


def _dense(tensor: Any) -> bool:
    """Non-overlapping and dense: some permutation of the dims is row-major contiguous."""
    if tensor.numel() == 0:
        return False
    order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), -tensor.shape[d]))
    return tensor.permute(order).is_contiguous()


TORCH_ALIGNMENT = 64  # bytes: what torch's CPU allocator gives every tensor


def unpack_torch(desc: TensorDesc, frame: Any) -> Any:
    """A torch tensor over the frame's memory (no copy, unless the frame is not aligned as
    torch aligns its tensors; read-only frames stay read-only)."""
    import warnings

    import torch

    dtype = getattr(torch, desc.dtype)
    if math.prod(desc.shape) == 0:
        return torch.empty(desc.shape, dtype=dtype)
    with warnings.catch_warnings():
        # zmq frames are read-only buffers; torch warns that it cannot protect them.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(_buffer(frame), dtype=torch.uint8)
    if flat.data_ptr() % TORCH_ALIGNMENT:
        # Where a frame lands in memory depends on the frames before it in the stream, and
        # CPU kernels round differently for differently aligned inputs (SD3's transformer
        # differs in the last bit when its sequence is 4 or 8 bytes off a 16-byte boundary:
        # measured). Computing on a copy aligned as torch aligns its own tensors keeps
        # results bit-identical to the pipeline's wherever the bytes came from.
        flat = flat.clone()
    values = flat.view(dtype)
    if desc.strides is not None:
        return values.as_strided(desc.shape, desc.strides)
    return values.reshape(desc.shape)
