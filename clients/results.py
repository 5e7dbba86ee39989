"""What a finished request gives back, and PNG encoding without extra dependencies."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_NUMPY_DTYPES = {"uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bool"}


@dataclass
class JobResult:
    request_id: str
    tensors: dict[str, tuple[str, list, bytes]]  # name -> (dtype, shape, raw bytes)
    latency_s: float
    attempts: int = 1
    params: dict = field(default_factory=dict)

    def array(self, name: str) -> np.ndarray:
        dtype, shape, raw = self.tensors[name]
        if dtype not in _NUMPY_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {dtype}, which numpy cannot hold; use .tensors")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    @property
    def image(self) -> np.ndarray:
        """The output image, [height, width, 3] uint8."""
        return self.array("image")

    @property
    def latents(self) -> np.ndarray:
        """The final latents of a request made with output="latents" (float32 models;
        bf16 latents are in .tensors as raw bytes)."""
        return self.array("latents")

    def save_png(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(encode_png(self.image))
        return path


def encode_png(image: np.ndarray) -> bytes:
    """An RGB (or grey) uint8 image as PNG bytes."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(f"image: expected uint8 [H, W] or [H, W, 1|3|4], got {image.dtype} {list(image.shape)}")
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = np.ascontiguousarray(image).reshape(height, width * channels)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
