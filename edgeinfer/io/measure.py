"""Measure flash read bandwidth by chunk size, through the same reader the runtime uses.

Chunk size is the lever of LLM in a flash §3.2 (bundling, coalescing): small
random reads pay a fixed latency each, large ones approach the sequential
rate. `edgeinfer devices probe` stores the curve in a device profile; the cost
model interpolates it.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

from edgeinfer.errors import StorageError
from edgeinfer.io.direct import ALIGN, WeightFile, aligned_empty

DEFAULT_CHUNKS = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)


@dataclasses.dataclass(frozen=True)
class ReadBandwidth:
    gbps: dict[int, float]      # chunk bytes -> GB/s (1e9 bytes/s)
    read_mode: str              # "direct", "nocache" or "buffered" (see WeightFile.read_mode)
    native: bool
    threads: int
    file_size: int
    seconds: float              # measuring time per chunk size


def measure_read_bandwidth(directory: str | os.PathLike,
                           chunk_sizes: Sequence[int] = DEFAULT_CHUNKS, *,
                           threads: int = 4, file_size: int = 256 << 20,
                           seconds: float = 0.5,
                           progress: Callable[[int, int, float], None] | None = None
                           ) -> ReadBandwidth:
    """Random, chunk-aligned, uncached reads of a temporary file written in `directory`
    (and deleted): for each chunk size, batches of distinct chunks are read with
    WeightFile.read_batch on `threads` threads for about `seconds`.

    progress(index, chunk_bytes, gbps) is called after each chunk size.
    """
    chunks = sorted({int(c) for c in chunk_sizes})
    if not chunks or chunks[0] < ALIGN or any(c % ALIGN for c in chunks):
        raise ValueError(f"chunk sizes must be positive multiples of {ALIGN}")
    largest = chunks[-1]
    file_size = max(int(file_size), 8 * largest)
    file_size -= file_size % largest
    fd, path = _write_probe_file(directory, file_size)
    try:
        results: dict[int, float] = {}
        with WeightFile(path, threads=threads, max_read=largest) as wf:
            rng = np.random.default_rng()
            for i, chunk in enumerate(chunks):
                results[chunk] = _measure_chunk(wf, rng, chunk, seconds)
                if progress is not None:
                    progress(i, chunk, results[chunk])
            read_mode, native = wf.read_mode, wf.native
    finally:
        os.close(fd)
        os.unlink(path)
    return ReadBandwidth(results, read_mode, native, threads, file_size, seconds)


def _measure_chunk(wf: WeightFile, rng: np.random.Generator, chunk: int,
                   seconds: float) -> float:
    slots = wf.size // chunk
    per_batch = int(min(slots, max(2 * wf.threads, (4 << 20) // chunk)))
    out = aligned_empty(per_batch * chunk)          # aligned: read straight into it
    lengths = np.full(per_batch, chunk, dtype=np.int64)
    wf.read_batch(np.stack([rng.choice(slots, per_batch, replace=False) * chunk,
                            lengths], axis=1), out=out, max_gap=-1)    # warm-up
    before = wf.stats.snapshot()
    t0 = time.perf_counter()
    batches = 0
    while batches < 2 or time.perf_counter() - t0 < seconds:
        # distinct chunks, never merged (max_gap=-1): each read is one chunk
        offsets = rng.choice(slots, per_batch, replace=False) * chunk
        wf.read_batch(np.stack([offsets, lengths], axis=1), out=out, max_gap=-1)
        batches += 1
    elapsed = time.perf_counter() - t0
    return wf.stats.delta(before).bytes_read / elapsed / 1e9


def _write_probe_file(directory: str | os.PathLike, size: int) -> tuple[int, str]:
    """Write `size` random bytes (incompressible: no controller shortcut) and sync."""
    try:
        fd, path = tempfile.mkstemp(prefix=".edgeinfer-probe-", suffix=".bin",
                                    dir=directory)
    except OSError as exc:
        raise StorageError(f"cannot create a probe file in {directory}: "
                           f"{exc.strerror}") from exc
    try:
        rng = np.random.default_rng()
        block = 4 << 20
        for start in range(0, size, block):
            os.write(fd, rng.bytes(min(block, size - start)))
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise StorageError(f"cannot write a {size}-byte probe file in {directory}: "
                           f"{exc.strerror}") from exc
    return fd, path
