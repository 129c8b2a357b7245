"""Byte and request accounting for weight-file reads.

`bench` explains token latency with these counters: bytes the runtime asked
for, bytes the device actually delivered (alignment and coalescing gaps make
that larger), and how many requests became how many system calls.
"""
from __future__ import annotations

import dataclasses
import threading

_FIELDS = ("bytes_requested", "bytes_read", "requests", "read_calls", "retries", "seconds")


@dataclasses.dataclass(eq=False)
class IOStats:
    """Counters of one or more weight files (share one instance to sum a model).

    bytes_requested: bytes callers asked for.
    bytes_read:      bytes the device delivered (after 4 KiB alignment and gap filling).
    requests:        (offset, length) requests callers made.
    read_calls:      read system calls issued (after coalescing; retries included).
    retries:         reads repeated after EIO or a read that made no progress.
    seconds:         wall time spent inside read calls of the storage layer.

    Updates take a lock; WeightFile adds once per batch, not once per syscall.
    """

    bytes_requested: int = 0
    bytes_read: int = 0
    requests: int = 0
    read_calls: int = 0
    retries: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, repr=False, compare=False
    )

    def add(self, *, bytes_requested: int = 0, bytes_read: int = 0, requests: int = 0,
            read_calls: int = 0, retries: int = 0, seconds: float = 0.0) -> None:
        with self._lock:
            self.bytes_requested += int(bytes_requested)
            self.bytes_read += int(bytes_read)
            self.requests += int(requests)
            self.read_calls += int(read_calls)
            self.retries += int(retries)
            self.seconds += float(seconds)

    def snapshot(self) -> IOStats:
        """A consistent copy of the counters now."""
        with self._lock:
            return IOStats(**{name: getattr(self, name) for name in _FIELDS})

    def reset(self) -> None:
        with self._lock:
            for name in _FIELDS:
                setattr(self, name, type(getattr(self, name))(0))

    def delta(self, since: IOStats) -> IOStats:
        """Counters accumulated after `since` (a snapshot taken earlier)."""
        now = self.snapshot()
        return IOStats(**{name: getattr(now, name) - getattr(since, name) for name in _FIELDS})

    def as_dict(self) -> dict[str, float]:
        snap = self.snapshot()
        return {name: getattr(snap, name) for name in _FIELDS}

    @property
    def read_amplification(self) -> float:
        """bytes_read / bytes_requested (1.0 = no byte read in vain)."""
        return self.bytes_read / self.bytes_requested if self.bytes_requested else 0.0

    @property
    def gbps(self) -> float:
        """Delivered bandwidth in GB/s (1e9 bytes/s) over the time spent reading."""
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0
