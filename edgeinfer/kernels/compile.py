"""The first-run announcement: Numba compiles each kernel on its first call and keeps
the machine code in its cache (cache=True: __pycache__ beside the sources, or
NUMBA_CACHE_DIR), so only a cold cache pays. When that happens edgeinfer says so on
stderr, once per process, with an estimate, instead of sitting silent for seconds.

Loading a model declares which kernels its graph will call (`expect`); the estimate
sums their reference compile times, leaving out kernels whose cache files exist.
The line is printed when the first edgeinfer kernel actually starts compiling, so a
warm run (every kernel loaded from the cache) never prints it.
"""
from __future__ import annotations

import os
import sys
import threading

from numba.core import event

# Seconds to compile each kernel's specialization on a cold cache, measured one process
# alone on a 2-core x86-64 host (benchmarks/cold_start.py, per-kernel numba:compile
# events); the announcement only needs the right magnitude.
COMPILE_SECONDS = {
    "matmul_nbits": 2.6,    # per distinct bits (a phase tuple of 8 // bits arrays)
    "matmul_f16": 1.5,
    "gather_nbits": 0.8,
    "gather_f16": 0.2,
    "rms_norm": 0.3,
    "layer_norm": 0.3,
    "attention": 2.3,       # rotary + attention
    "bundled_ffn": 2.2,
    "moe_expert": 4.0,
}
_DEFAULT_SECONDS = 1.0

ANNOUNCEMENT = "edgeinfer: compiling kernels for this CPU (first run only, about {seconds:.0f} s)"

_lock = threading.Lock()
_expected: dict[str, list] = {}     # kernel key -> the dispatchers whose cache files tell if it is warm
_announced = False


def expect(key: str, *dispatchers) -> None:
    """Declare that the loaded model will call kernel `key` (a COMPILE_SECONDS name, with an
    optional /variant such as matmul_nbits/4) through `dispatchers`."""
    with _lock:
        _expected.setdefault(key, list(dispatchers))


def _cached(dispatcher) -> bool:
    """Whether the dispatcher has compiled code in memory or an index file in the cache."""
    if dispatcher.overloads:
        return True
    cache = getattr(dispatcher, "_cache", None)
    index = getattr(getattr(cache, "_cache_file", None), "_index_path", None)
    return index is not None and os.path.exists(index)


def estimate_seconds() -> float:
    """Reference compile seconds of the expected kernels not found in the cache."""
    with _lock:
        items = list(_expected.items())
    total = 0.0
    for key, dispatchers in items:
        if dispatchers and all(_cached(d) for d in dispatchers):
            continue
        total += COMPILE_SECONDS.get(key.split("/")[0], _DEFAULT_SECONDS)
    return total or _DEFAULT_SECONDS


def announce(stream=None) -> bool:
    """Print the announcement once per process; returns whether this call printed it."""
    global _announced
    with _lock:
        if _announced:
            return False
        _announced = True
    stream = stream if stream is not None else sys.stderr
    print(ANNOUNCEMENT.format(seconds=max(1.0, estimate_seconds())), file=stream, flush=True)
    return True


def _is_ours(dispatcher) -> bool:
    return getattr(getattr(dispatcher, "py_func", None), "__module__", "").startswith("edgeinfer.")


class _CompileListener(event.Listener):
    """Announces at the first compilation of an edgeinfer kernel (cache hits raise no event)."""

    def on_start(self, ev):
        if not _announced and _is_ours(ev.data.get("dispatcher")):
            announce()

    def on_end(self, ev):
        pass


_listener = _CompileListener()
event.register("numba:compile", _listener)
