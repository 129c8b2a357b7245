"""CRC-32 checksums of weight files and byte ranges (zlib, no extra dependency).

The manifest's file table records one per weight file; the loader compares.
"""
from __future__ import annotations

import os
import zlib

import numpy as np

DEFAULT_CHUNK = 4 << 20


def crc32_bytes(data, value: int = 0) -> int:
    """CRC-32 of bytes, a memoryview or a C-contiguous numpy array, continuing `value`."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    return zlib.crc32(memoryview(data), value) & 0xFFFFFFFF


def crc32_file(path: str | os.PathLike, chunk: int = DEFAULT_CHUNK) -> int:
    """CRC-32 of a whole file, read `chunk` bytes at a time (bounded memory)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    value = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return value
            value = zlib.crc32(view[:n], value)
