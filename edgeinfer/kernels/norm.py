"""Row normalisations: RMSNorm (Llama, Mistral, Qwen2) and LayerNorm (OPT).

Statistics are accumulated in float64: one row is at most a few thousand values, so
it costs nothing measurable, and the result matches the float32 reference to rounding
whatever the row's mean (a float32 E[x^2] - E[x]^2 would cancel badly)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

# Rows per call below which the work is too small to be worth waking threads.
_PARALLEL_ROWS = 8
# Reassociation lets LLVM vectorise the sums; no nnan/ninf, so NaN/inf propagate.
_FM = {"reassoc", "contract", "nsz"}


@njit(cache=True, fastmath=_FM)
def _rms_rows(x, w, eps, out, r0, r1):
    K = x.shape[1]
    for m in range(r0, r1):
        ss = 0.0
        for k in range(K):
            v = np.float64(x[m, k])
            ss += v * v
        inv = np.float32(1.0 / np.sqrt(ss / K + eps))
        for k in range(K):
            out[m, k] = x[m, k] * inv * w[k]


@njit(cache=True, fastmath=_FM)
def _layer_rows(x, w, b, eps, out, r0, r1):
    K = x.shape[1]
    for m in range(r0, r1):
        s = 0.0
        for k in range(K):
            s += x[m, k]
        mean = s / K
        ss = 0.0
        for k in range(K):
            d = x[m, k] - mean
            ss += d * d
        inv = 1.0 / np.sqrt(ss / K + eps)
        mean32, inv32 = np.float32(mean), np.float32(inv)
        for k in range(K):
            out[m, k] = (x[m, k] - mean32) * inv32 * w[k] + b[k]


@njit(parallel=True, cache=True)
def _rms_parallel(x, w, eps, out):
    for m in prange(x.shape[0]):
        _rms_rows(x, w, eps, out, m, m + 1)


@njit(parallel=True, cache=True)
def _layer_parallel(x, w, b, eps, out):
    for m in prange(x.shape[0]):
        _layer_rows(x, w, b, eps, out, m, m + 1)


def _check(x, *vectors):
    """x [..., K] -> (C-contiguous [M, K] view or copy, output [M, K])."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 1:
        raise TypeError("x must be a float32 array [M, K]")
    K = x.shape[-1]
    for v in vectors:
        if not isinstance(v, np.ndarray) or v.dtype != np.float32 or v.shape != (K,):
            raise TypeError(f"weights must be float32 arrays of shape ({K},)")
    x2 = np.ascontiguousarray(x.reshape(-1, K))
    return x2, np.empty_like(x2)


def rms_norm(x, w, eps):
    """x / sqrt(mean(x^2) + eps) * w over the last axis; x float32 [M, K] (or [..., K]), w [K]."""
    x2, out = _check(x, w)
    if x2.shape[0] >= _PARALLEL_ROWS:
        _rms_parallel(x2, w, float(eps), out)
    else:
        _rms_rows(x2, w, float(eps), out, 0, x2.shape[0])
    return out.reshape(x.shape)


def layer_norm(x, w, b, eps):
    """(x - mean) / sqrt(var + eps) * w + b over the last axis (biased variance, as
    torch.nn.LayerNorm); x float32 [M, K], w and b [K]."""
    x2, out = _check(x, w, b)
    if x2.shape[0] >= _PARALLEL_ROWS:
        _layer_parallel(x2, w, b, float(eps), out)
    else:
        _layer_rows(x2, w, b, float(eps), out, 0, x2.shape[0])
    return out.reshape(x.shape)
