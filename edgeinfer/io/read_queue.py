"""The asynchronous read queue of a model: one background thread that does every read of
streamed records (FFN neurons, experts), so a layer computes what it holds while what it
misses is read (LLM in a flash §3; HOBBIT's layer-level prefetch).

One thread, so reads never compete with each other for the device, and a layer's own
misses queue behind the prefetch of that same layer (which may be reading the same
records) and ahead of the next layer's. The thread starts at the first read.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
import weakref
from collections.abc import Callable


class PendingRead:
    """A read queued on the ReadQueue. `undo(future)` (optional) runs when the read fails
    or the wait for it is interrupted, once the read has ended: it gives back what the read
    reserved or pinned, so a window or cache never says it holds records that did not
    arrive, nor keeps pins for a call that will not use them."""
    __slots__ = ("future", "undo")

    def __init__(self, future: concurrent.futures.Future,
                 undo: Callable[[concurrent.futures.Future], None] | None):
        self.future = future
        self.undo = undo

    def wait(self):
        """The read's result; on StorageError, ChecksumError or Ctrl-C: wait until the read
        has ended (its slots must not be reused while it writes there), undo, re-raise."""
        try:
            return self.future.result()
        except BaseException:
            concurrent.futures.wait([self.future])
            if self.undo is not None:
                self.undo(self.future)
            raise


class ReadQueue:
    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeinfer-read")
        self._prefetches: dict = {}
        self._lock = threading.Lock()
        # a model dropped without close() still lets its thread end
        self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False)

    def submit(self, fn, *args, undo: Callable[[concurrent.futures.Future], None] | None = None) -> PendingRead:
        """Run fn(*args) on the read thread after what is queued there."""
        return PendingRead(self._pool.submit(fn, *args), undo)

    def prefetch(self, key, fn, *args) -> bool:
        """Run fn(*args) for `key` (a layer) in the background, unless its prefetch is still
        in flight. Its result is dropped: collect() or wait() re-raise its error."""
        with self._lock:
            pending = self._prefetches.get(key)
            if pending is not None and not pending.done():
                return False
            self._prefetches[key] = self._pool.submit(fn, *args)
            return True

    def collect(self, key) -> None:
        """Forget `key`'s prefetch if it is done, re-raising its error; one still reading goes on."""
        with self._lock:
            fut = self._prefetches.get(key)
            if fut is None or not fut.done():
                return
            del self._prefetches[key]
        fut.result()

    def wait(self, key) -> float:
        """Wait for `key`'s prefetch (re-raising its error); returns the seconds waited."""
        with self._lock:
            fut = self._prefetches.pop(key, None)
        if fut is None:
            return 0.0
        t0 = time.perf_counter()
        fut.result()
        return time.perf_counter() - t0

    def close(self) -> None:
        """Drop the prefetches not started, wait for the read in progress, end the thread."""
        with self._lock:
            pending = list(self._prefetches.values())
            self._prefetches.clear()
        for f in pending:
            f.cancel()
        self._pool.shutdown(wait=True)


class OverlapTimer:
    """Splits a streamed layer call's time into I/O wait (what the overlap did not hide)
    and compute: each lap ends with io() or compute() and counts the time since the
    previous lap (or the timer's start) on that side."""
    __slots__ = ("io_seconds", "compute_seconds", "_last")

    def __init__(self):
        self.io_seconds = self.compute_seconds = 0.0
        self._last = time.perf_counter()

    def io(self) -> None:
        now = time.perf_counter()
        self.io_seconds += now - self._last
        self._last = now

    def compute(self) -> None:
        now = time.perf_counter()
        self.compute_seconds += now - self._last
        self._last = now
