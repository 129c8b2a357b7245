"""One expert over its record (edgeinfer/moe/layout.py): down(silu(gate x) * up x),
each matrix the sum of the record's stages.

Every stage of a record is in MatMulNBits layout, so 8- and 4-bit stages and float16
experts run on the shared kernels (edgeinfer/kernels/quant.py) over zero-copy views of
the cached record. 2-bit stages (low-precision copies; not a width the shared fused
kernel covers) have their own kernel here. All of them release the GIL, so the prefetch
thread's reads overlap them.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels import matmul_f16, matmul_nbits
from .layout import views


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def _matmul2(x, packed, scales, out):
    """out [M, N] += x [M, K] @ deq(W).T for 2-bit MatMulNBits codes [N, nb, blob]
    (byte j of a block holds values 4j .. 4j+3, two bits each)."""
    M = x.shape[0]
    N, nb, blob = packed.shape
    g = 4 * blob
    for n in prange(N):
        w = np.empty(g, np.float32)
        acc = np.zeros((M, g), np.float32)
        for b in range(nb):
            s = scales[n, b]
            for j in range(blob):
                v = packed[n, b, j]
                w[4 * j] = s * (np.float32(v & 3) - 2.0)
                w[4 * j + 1] = s * (np.float32((v >> 2) & 3) - 2.0)
                w[4 * j + 2] = s * (np.float32((v >> 4) & 3) - 2.0)
                w[4 * j + 3] = s * (np.float32(v >> 6) - 2.0)
            base = b * g
            for m in range(M):
                for j in range(g):
                    acc[m, j] += w[j] * x[m, base + j]
        for m in range(M):
            out[m, n] += acc[m].sum()


def linear(x: np.ndarray, stages, group_size: int) -> np.ndarray:
    """x [M, k] @ W.T, W the sum of one matrix's `stages` (from layout.views)."""
    y = None
    for bits, codes, scales in stages:
        if bits == 16:
            part = matmul_f16(x, codes)
        elif bits == 2:
            part = np.zeros((x.shape[0], codes.shape[0]), np.float32)
            _matmul2(x, codes, scales, part)
        else:
            part = matmul_nbits(x, codes, scales, bits, group_size)
        if y is None:
            y = part
        else:
            y += part
    return y


def expert_ffn(x: np.ndarray, record: np.ndarray, fmt, levels: int | None = None) -> np.ndarray:
    """down(silu(gate x) * up x) for x [M, d] float32 over a record's first `levels` stages."""
    gate, up, down = views(fmt, record, levels)
    g = fmt.group_size
    a = linear(x, gate, g)
    h = a / (1.0 + np.exp(-a)) * linear(x, up, g)
    return linear(np.ascontiguousarray(h, dtype=np.float32), down, g)
