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


def check_payload(descs: list[TensorDesc], payload: list[Any]) -> None:
    """Every described tensor points at a payload frame of exactly its size."""
    for i, d in enumerate(descs):
        if d.where != "frame":
            raise ProtocolError(ErrorCode.BAD_HEADER, f"unsupported tensor location {d.where!r}", f"tensors[{i}].where")
        if not 0 <= d.frame < len(payload):
            raise ProtocolError(ErrorCode.BAD_FRAMES, f"tensor {d.name!r} names frame {d.frame}", f"tensors[{i}].frame")
        need = expected_nbytes(d.dtype, d.shape)
        have = memoryview(_buffer(payload[d.frame])).nbytes
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
    flat = tensor.contiguous().reshape(-1)
    buf = flat.view(torch.uint8).numpy() if flat.numel() else b""
    return TensorDesc(name=name, dtype=dtype, shape=shape, frame=frame, nbytes=len(memoryview(buf).cast("B"))), buf


def unpack_torch(desc: TensorDesc, frame: Any) -> Any:
    """A torch tensor over the frame's memory (no copy; read-only frames stay read-only)."""
    import warnings

    import torch

    dtype = getattr(torch, desc.dtype)
    if math.prod(desc.shape) == 0:
        return torch.empty(desc.shape, dtype=dtype)
    with warnings.catch_warnings():
        # zmq frames are read-only buffers; torch warns that it cannot protect them.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(_buffer(frame), dtype=torch.uint8)
    return flat.view(dtype).reshape(desc.shape)
