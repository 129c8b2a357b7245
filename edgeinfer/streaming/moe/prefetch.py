"""Layer-level prefetch (after HOBBIT's layer-level expert prefetching): while layer L
computes, layer L+1's router applied to L's hidden state guesses L+1's experts, and their
reads run on this background thread.
The residual stream changes little from one layer to the next, so the guess is usually
right; a wrong guess costs a read, never a wrong result (layer L+1 routes for itself).

One worker thread, so reads never compete with each other: a layer's own misses are
queued there too (behind its prefetch, ahead of the next layer's), so the layer runs its
cached experts while they are read.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
import weakref


class Prefetcher:
    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeinfer-prefetch")
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False)

    def submit(self, layer: int, fn, *args) -> bool:
        """Run fn(*args) in the background for `layer`, unless a prefetch for it is in flight."""
        with self._lock:
            pending = self._pending.get(layer)
            if pending is not None and not pending.done():
                return False
            self._pending[layer] = self._pool.submit(fn, *args)
            return True

    def run(self, fn, *args) -> concurrent.futures.Future:
        """Run fn(*args) on the prefetch thread after what is queued there (a layer's own reads)."""
        return self._pool.submit(fn, *args)

    def collect(self, layer: int) -> None:
        """Forget `layer`'s prefetch if it is done, re-raising its error; one still reading goes on."""
        with self._lock:
            fut = self._pending.get(layer)
            if fut is None or not fut.done():
                return
            del self._pending[layer]
        fut.result()

    def wait(self, layer: int) -> float:
        """Wait for `layer`'s prefetch (re-raising its error); returns the seconds waited."""
        with self._lock:
            fut = self._pending.pop(layer, None)
        if fut is None:
            return 0.0
        t0 = time.perf_counter()
        fut.result()
        return time.perf_counter() - t0

    def close(self) -> None:
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for f in pending:
            f.cancel()
        self._pool.shutdown(wait=True)
