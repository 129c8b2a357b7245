"""The first-run announcement: Numba compiles each kernel on its first call and keeps
the machine code in its cache (cache=True: __pycache__ beside the sources, or
NUMBA_CACHE_DIR), so only a cold cache pays. When that happens edgeinfer says so on
stderr, once per process, with an estimate, instead of sitting silent for seconds.

Loading a model declares which kernels its graph will call (`expect`); the estimate
sums their reference compile times, leaving out kernels whose cache files exist.
The line is printed when the first edgeinfer kernel actually starts compiling, so a
warm run (every kernel loaded from the cache) never prints it.

At that moment a second process starts compiling the same kernels into the same cache
in the opposite order (a model's kernels are declared in graph order, the first
forward pass calls them in graph order): the main process compiles from the first
layer on, the helper from the last, and each finds in the cache what the other has
finished, so two cores share the first run. Numba writes cache files atomically; a
kernel both happen to compile is only compiled twice.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading

import numpy as np
from numba.core import event

# Approximate seconds to compile one specialization of each kernel on a cold cache, from
# the numba:compile events of a demo run on a 2-core x86-64 host (rounded; the
# announcement only needs the magnitude).
COMPILE_SECONDS = {
    "matmul_nbits": 2.6,    # per distinct bits (a phase tuple of 8 // bits arrays)
    "matmul_f16": 1.5,
    "gather_nbits": 0.8,
    "gather_f16": 0.2,
    "rms_norm": 0.3,
    "layer_norm": 0.3,
    "attention": 2.3,       # rotary + attention
    "bundled_ffn": 2.2,     # per (bits, gated, serial or parallel)
}
_DEFAULT_SECONDS = 1.0

ANNOUNCEMENT = "edgeinfer: compiling kernels for this CPU (first run only, about {seconds:.0f} s)"

# Set in the helper process: it compiles, it does not announce or start helpers.
_WORKER_ENV = "EDGEINFER_COMPILE_WORKER"

_lock = threading.Lock()
_expected: dict[str, list] = {}     # kernel key -> the dispatchers whose cache files tell if it is warm
_warm: dict[str, tuple] = {}        # kernel key -> (function, args, kwargs) that compiles it on small inputs
_later: set[str] = set()            # kernel keys the first token does not need
_announced = False
_worker: subprocess.Popen | None = None


def expect(key: str, *dispatchers, warm: tuple | None = None, later: bool = False) -> None:
    """Declare that the loaded model will call kernel `key` (a COMPILE_SECONDS name, with an
    optional /variant such as matmul_nbits/4) through `dispatchers`. warm = (function,
    args, kwargs), picklable: a call that compiles the same specializations on small
    inputs of the same dtypes and layouts, for the helper process. later=True: only
    decode steps call it, so the helper compiles it after the first token's kernels."""
    with _lock:
        _expected.setdefault(key, list(dispatchers))
        if warm is not None and key not in _warm:
            fn, args, kwargs = warm
            _warm[key] = (fn, tuple(_detached(a) for a in args), kwargs)
        if later:
            _later.add(key)


def _detached(value):
    """A copy of a small array argument, so that this module keeps no model's weights alive;
    read-only stays read-only (Numba types it differently, so the helper must too)."""
    if not isinstance(value, np.ndarray):
        return value
    copy = value.copy()
    copy.flags.writeable = value.flags.writeable
    return copy


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


def start_worker() -> subprocess.Popen | None:
    """Start the helper process on the declared kernels, last declared first (None: there
    is nothing to hand over, or one core only)."""
    global _worker
    with _lock:
        keys = [k for k in reversed(_warm) if k not in _later] + [k for k in _warm if k in _later]
        jobs = [_warm[k] for k in keys if not all(_cached(d) for d in _expected.get(k, ()))]
    if _worker is not None or len(jobs) < 2 or (os.cpu_count() or 1) < 2:
        return None
    env = dict(os.environ, **{_WORKER_ENV: "1"})
    try:
        _worker = subprocess.Popen([sys.executable, "-m", "edgeinfer.kernels.compile", str(os.getpid())],
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=env)
        _worker.stdin.write(pickle.dumps(jobs))
        _worker.stdin.close()
    except OSError:          # no helper: the main process compiles everything, as without it
        _worker = None
    return _worker


def announce(stream=None) -> bool:
    """Print the announcement once per process and start the helper; returns whether this
    call printed it."""
    global _announced
    with _lock:
        if _announced:
            return False
        _announced = True
    seconds = estimate_seconds()
    if start_worker() is not None:
        seconds /= 2
    stream = stream if stream is not None else sys.stderr
    print(ANNOUNCEMENT.format(seconds=max(1.0, seconds)), file=stream, flush=True)
    return True


def _is_ours(dispatcher) -> bool:
    return getattr(getattr(dispatcher, "py_func", None), "__module__", "").startswith("edgeinfer.")


class _CompileListener(event.Listener):
    """Announces at the first compilation of an edgeinfer kernel (cache hits raise no event)."""

    def on_start(self, ev):
        if not _announced and not os.environ.get(_WORKER_ENV) and _is_ours(ev.data.get("dispatcher")):
            announce()

    def on_end(self, ev):
        pass


_listener = _CompileListener()
event.register("numba:compile", _listener)


def _run_jobs(parent: int, jobs) -> None:
    for fn, args, kwargs in jobs:
        if os.getppid() != parent:       # the main process is gone: stop using its CPU
            return
        try:
            fn(*args, **kwargs)
        except Exception:                # noqa: BLE001  the main process compiles what fails here
            continue


if __name__ == "__main__":
    _run_jobs(int(sys.argv[1]), pickle.loads(sys.stdin.buffer.read()))
