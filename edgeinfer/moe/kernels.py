"""Numba kernels for one expert over its record (edgeinfer/moe/layout.py).

`expert_ffn(x, record, fmt)` = down(silu(gate x) * up x), each matrix the sum of the
record's stages. One decode token (or a few) runs fused mat-vec kernels straight off
the record bytes; longer inputs (prefill) dequantize each matrix once to float32 and
use BLAS. All kernels release the GIL (nogil), so expert reads on the prefetch thread
overlap them.

The mat-vec keeps one float32 lane per value of a group and applies the group's scale
inside the loop (acc[j] += s * q[j] * x[j]); the zero point is folded into one
correction per group (s * zp * sum(x_group)). This shape vectorises: the alternative
(a horizontal sum per group) measured 4x slower here.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import njit, prange

HALF = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
FUSED_MAX_TOKENS = 4       # up to this many rows of x: fused mat-vecs; beyond: dequantize + BLAS
ROWS_PER_TASK = 32
PARALLEL_MIN = 1 << 20     # matrices with fewer values run on the calling thread only


@njit(cache=True, inline="always")
def _scale(rec, at, half):
    return half[np.uint32(rec[at]) | (np.uint32(rec[at + 1]) << 8)]


@njit(cache=True)
def _group_sums(x, g, zp):
    nb = x.size // g
    out = np.empty(nb, np.float32)
    for b in range(nb):
        s = np.float32(0.0)
        for j in range(g):
            s += x[b * g + j]
        out[b] = zp * s
    return out


def _matvec8(rec, co, so, n, k, g, x, y, half):
    nb = k // g
    zx = _group_sums(x, g, np.float32(128.0))
    for c in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        acc = np.empty(g, np.float32)
        for r in range(c * ROWS_PER_TASK, min(n, (c + 1) * ROWS_PER_TASK)):
            acc[:] = 0.0
            corr = np.float32(0.0)
            for b in range(nb):
                s = _scale(rec, so + 2 * (r * nb + b), half)
                base = co + r * k + b * g
                xb = b * g
                for j in range(g):
                    acc[j] += s * (np.float32(rec[base + j]) * x[xb + j])
                corr += s * zx[b]
            y[r] += acc.sum() - corr


def _matvec4(rec, co, so, n, k, g, x, y, half):
    nb = k // g
    h = g // 2
    zx = _group_sums(x, g, np.float32(8.0))
    for c in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        acc = np.empty(g, np.float32)
        for r in range(c * ROWS_PER_TASK, min(n, (c + 1) * ROWS_PER_TASK)):
            acc[:] = 0.0
            corr = np.float32(0.0)
            for b in range(nb):
                s = _scale(rec, so + 2 * (r * nb + b), half)
                base = co + r * (k // 2) + b * h
                xb = b * g
                for j in range(h):
                    v = rec[base + j]
                    acc[j] += s * (np.float32(v & 15) * x[xb + j])
                    acc[h + j] += s * (np.float32(v >> 4) * x[xb + h + j])
                corr += s * zx[b]
            y[r] += acc.sum() - corr


def _matvec2(rec, co, so, n, k, g, x, y, half):
    nb = k // g
    q = g // 4
    zx = _group_sums(x, g, np.float32(2.0))
    for c in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        acc = np.empty(g, np.float32)
        for r in range(c * ROWS_PER_TASK, min(n, (c + 1) * ROWS_PER_TASK)):
            acc[:] = 0.0
            corr = np.float32(0.0)
            for b in range(nb):
                s = _scale(rec, so + 2 * (r * nb + b), half)
                base = co + r * (k // 4) + b * q
                xb = b * g
                for j in range(q):
                    v = rec[base + j]
                    acc[j] += s * (np.float32(v & 3) * x[xb + j])
                    acc[q + j] += s * (np.float32((v >> 2) & 3) * x[xb + q + j])
                    acc[2 * q + j] += s * (np.float32((v >> 4) & 3) * x[xb + 2 * q + j])
                    acc[3 * q + j] += s * (np.float32(v >> 6) * x[xb + 3 * q + j])
                corr += s * zx[b]
            y[r] += acc.sum() - corr


def _dequant(rec, co, so, n, k, g, bits, out, half):
    """out [n, k] += the stage's matrix (float32)."""
    nb = k // g
    per = 8 // bits
    gp = g // per
    mask = (1 << bits) - 1
    zp = np.float32(2 ** (bits - 1))
    rowb = k * bits // 8
    for r in prange(n):
        for b in range(nb):
            s = _scale(rec, so + 2 * (r * nb + b), half)
            base = co + r * rowb + b * gp
            for t in range(per):
                sh = bits * t
                o = b * g + t * gp
                for j in range(gp):
                    out[r, o + j] += s * (np.float32((rec[base + j] >> sh) & mask) - zp)


def _compile(fn):
    """(serial, parallel) builds of one kernel: a small matrix is not worth waking threads for."""
    return (njit(cache=True, fastmath=True, nogil=True)(fn),
            njit(parallel=True, cache=True, fastmath=True, nogil=True)(fn))


_MATVEC = {8: _compile(_matvec8), 4: _compile(_matvec4), 2: _compile(_matvec2)}
_DEQUANT = _compile(_dequant)


@lru_cache(maxsize=64)
def _parts(fmt, levels):
    by_matrix = [[], [], []]
    for p in fmt.parts(levels):
        by_matrix[p[1]].append(p)
    return tuple(tuple(m) for m in by_matrix)


def linear(x: np.ndarray, record: np.ndarray, parts, g: int) -> np.ndarray:
    """x [M, k] @ W.T where W is the sum of `parts` (one matrix's stages) of `record`."""
    _, _, _, _, n, k = parts[0]
    m = x.shape[0]
    if m <= FUSED_MAX_TOKENS and parts[0][0] != 16:
        y = np.zeros((m, n), np.float32)
        par = n * k >= PARALLEL_MIN
        for b, _, co, so, _, _ in parts:
            for t in range(m):
                _MATVEC[b][par](record, co, so, n, k, g, x[t], y[t], HALF)
        return y
    w = dequantize(record, parts, g)
    return x @ w.T


def dequantize(record: np.ndarray, parts, g: int) -> np.ndarray:
    """One matrix of a record as float32 [n, k] (the sum of its stages)."""
    _, _, _, _, n, k = parts[0]
    w = np.zeros((n, k), np.float32)
    for b, _, co, so, _, _ in parts:
        if b == 16:
            w += record[co:co + 2 * n * k].view(np.float16).reshape(n, k)
        else:
            _DEQUANT[n * k >= PARALLEL_MIN](record, co, so, n, k, g, b, w, HALF)
    return w


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    return g / (1.0 + np.exp(-g)) * u


def expert_ffn(x: np.ndarray, record: np.ndarray, fmt, levels: int | None = None) -> np.ndarray:
    """down(silu(gate x) * up x) for x [M, d] float32 over a record's first `levels` stages."""
    gate, up, down = _parts(fmt, levels)
    g = fmt.group_size
    h = silu_mul(linear(x, record, gate, g), linear(x, record, up, g))
    return linear(np.ascontiguousarray(h, dtype=np.float32), record, down, g)
