"""Deterministic storage faults for tests: short reads, EIO, truncated files.

A WeightFile given `faults=FaultInjector(...)` asks it before every read system
call how many bytes that call may return (`on_read`), and how large the file
looks (`file_size`). Without an injector the read path does not call it at all.
A file with an injector always takes the pure Python read path (the native
helper cannot call back into Python per syscall).

    faults = FaultInjector().short_reads(every=2).eio_on_call(3, times=2)
"""
from __future__ import annotations

import errno
import os
import threading


class FaultInjector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0                # read system calls seen, numbered from 1
        self.injected_eio = 0
        self.injected_short = 0
        self._short: tuple[int, float, int | None, int] | None = None
        self._eio_calls: dict[int, int] = {}            # first call number -> failures
        self._eio_ranges: list[list] = []               # [start, stop, times left or None]
        self._size: int | None = None

    def short_reads(self, *, every: int = 1, fraction: float = 0.5,
                    limit: int | None = None, block: int = 1) -> FaultInjector:
        """Every `every`-th call returns only `fraction` of its bytes, at most `limit`
        times. Short counts are whole `block`s (at least one), as the kernel's are for
        O_DIRECT (pass block=4096 there); calls of one block or less are not shortened."""
        if every < 1 or not 0.0 <= fraction < 1.0 or block < 1:
            raise ValueError("every and block must be >= 1, 0 <= fraction < 1")
        self._short = (every, fraction, limit, block)
        return self

    def eio_on_call(self, n: int, *, times: int = 1) -> FaultInjector:
        """Call number n (1-based) and the `times - 1` calls after it fail with EIO."""
        self._eio_calls[int(n)] = int(times)
        return self

    def eio_on_range(self, start: int, stop: int, *, times: int | None = None) -> FaultInjector:
        """Reads overlapping file bytes [start, stop) fail with EIO, `times` times
        (None: always, a dead sector)."""
        self._eio_ranges.append([int(start), int(stop), times])
        return self

    def truncate(self, size: int) -> FaultInjector:
        """The file looks `size` bytes long: its size reports so, and reads past it
        return nothing."""
        self._size = int(size)
        return self

    # -- hooks called by WeightFile -----------------------------------------

    def file_size(self, real_size: int) -> int:
        return real_size if self._size is None else min(real_size, self._size)

    def on_read(self, offset: int, length: int) -> int:
        """Before one read syscall of `length` bytes at `offset`: the number of bytes
        the call may return, or OSError(EIO)."""
        with self._lock:
            self.calls += 1
            call = self.calls
            for first, times in self._eio_calls.items():
                if first <= call < first + times:
                    self.injected_eio += 1
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
            for rule in self._eio_ranges:
                start, stop, left = rule
                if offset < stop and start < offset + length and (left is None or left > 0):
                    if left is not None:
                        rule[2] = left - 1
                    self.injected_eio += 1
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
            allowed = length
            if self._size is not None:
                allowed = max(0, min(allowed, self._size - offset))
            if self._short is not None:
                every, fraction, limit, block = self._short
                if (allowed > block and call % every == 0
                        and (limit is None or self.injected_short < limit)):
                    self.injected_short += 1
                    allowed = max(block, int(allowed * fraction) // block * block)
            return allowed
