"""The first-run announcement (edgeinfer/kernels/compile.py): printed once on a cold
Numba cache, never when every kernel loads from the cache. Not timed."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from edgeinfer.kernels import compile as kernel_compile
from edgeinfer.kernels import ffn, norm

PREFIX = kernel_compile.ANNOUNCEMENT.split("{")[0]

# Two kernels, so a second compilation in the same process must not announce again.
_SCRIPT = """
import numpy as np
from edgeinfer.kernels import layer_norm, rms_norm
x = np.ones((2, 8), np.float32)
w = np.ones(8, np.float32)
rms_norm(x, w, 1e-6)
layer_norm(x, w, w, 1e-6)
"""


def _run(cache_dir) -> str:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_announced_once_on_a_cold_cache_and_never_on_a_warm_one(tmp_path):
    cold = _run(tmp_path)
    assert cold.count(PREFIX) == 1, cold
    assert any(name.endswith(".nbi") for _, _, files in os.walk(tmp_path) for name in files)
    warm = _run(tmp_path)
    assert PREFIX not in warm, warm


def test_estimate_counts_only_kernels_missing_from_the_cache(monkeypatch):
    monkeypatch.setattr(kernel_compile, "_expected", {})
    monkeypatch.setattr(kernel_compile, "_cached", lambda d: d is norm._rms_rows)
    kernel_compile.expect("rms_norm", norm._rms_rows)
    assert kernel_compile.estimate_seconds() == kernel_compile._DEFAULT_SECONDS   # nothing missing
    kernel_compile.expect("attention", ffn.ffn_simd_kernel(4, True, 1))
    kernel_compile.expect("matmul_nbits/4", ffn.ffn_simd_kernel(8, True, 1))
    want = kernel_compile.COMPILE_SECONDS["attention"] + kernel_compile.COMPILE_SECONDS["matmul_nbits"]
    assert kernel_compile.estimate_seconds() == want


def test_simd_ffn_specialisations_are_distinct_dispatchers():
    """One dispatcher per (bits, gated, parallel): each compiles only its own branch and
    has its own cache entry (the cache keys a closure by its cell values)."""
    kernels = {ffn.ffn_simd_kernel(b, g, p) for b in (4, 8) for g in (False, True) for p in (0, 1)}
    assert len(kernels) == 8
    cells = {tuple(c.cell_contents for c in k.py_func.__closure__) for k in kernels}
    assert len(cells) == 8
    assert ffn.ffn_simd_kernel(4, True, 1) is ffn.ffn_simd_kernel(4, True, 1)
    assert np.float32(8.0) in {c.cell_contents for c in ffn.ffn_simd_kernel(4, True, 1).py_func.__closure__}
