"""Runtime counters beyond I/O: what the neuron windows and expert caches did.

One RuntimeStats per loaded model, shared by its streaming ops; `bench` takes
snapshots around each token and reports the deltas.
"""
from __future__ import annotations

import threading
from collections import Counter

from edgeinfer.errors import InternalError
from edgeinfer.io import IOStats

COUNTERS = (
    "tokens",                 # forward-pass tokens that went through streamed layers
    "ffn_calls",              # streamed FFN layer calls
    "neurons_needed",         # neurons the predictor (or oracle) chose
    "neurons_hit",            # ... already in the window
    "neurons_loaded",         # ... read from flash
    "neurons_evicted",
    "experts_needed", "experts_hit", "experts_loaded", "experts_evicted",
    "experts_low_precision",  # misses served with the low-precision copy
    "prefetch_issued", "prefetch_hits",
    "compute_seconds",        # time in streamed-layer kernels
    "io_wait_seconds",        # time a streamed layer waited for its reads
)


class RuntimeStats:
    def __init__(self):
        self.io = IOStats()
        self._c: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                if k not in COUNTERS:
                    raise InternalError(f"unknown runtime counter {k}: a bug in edgeinfer; please report it")
                self._c[k] += v

    def snapshot(self) -> dict:
        with self._lock:
            d = {k: self._c.get(k, 0) for k in COUNTERS}
        d.update({f"io_{k}": v for k, v in self.io.as_dict().items()})
        return d

    @staticmethod
    def delta(after: dict, before: dict) -> dict:
        return {k: after[k] - before.get(k, 0) for k in after}

    def reset(self) -> None:
        with self._lock:
            self._c.clear()
        self.io.reset()
