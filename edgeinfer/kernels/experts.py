"""One expert over its record (edgeinfer/format/experts.py): down(silu(gate x) * up x),
each matrix the sum of the record's stages.

One token of a record whose stages are all 4-bit (--quant int8 --expert-low int4, as in
benchmarks/moe.py, or --quant int4 alone) takes two fused kernels over
kernels/_simd_stages.py: gate and up of every stage in one pass, silu(g) * u written
straight into the phases the down kernel reads, then down of every stage in one pass,
added into the layer's output with the routing weight. Per expert only x's and h's
phases are allocated (the stage-by-stage path splits x and allocates per matrix and stage).

Otherwise (several tokens, other widths, no AVX-512) every stage of a record is in
MatMulNBits layout, so 8- and 4-bit stages and float16 experts run on the shared kernels
(edgeinfer/kernels/quant.py) over zero-copy views of the cached record. 2-bit stages
(low-precision copies; not a width the shared fused kernel covers) have their own kernel
here. All of them release the GIL, so the prefetch thread's reads overlap them.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgeinfer.format.experts import views
from edgeinfer.kernels import matmul_f16, matmul_nbits
from edgeinfer.kernels._simd import HAS_AVX512
from edgeinfer.kernels._simd_stages import stream_dot_1, stream_dot_2


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


@njit(parallel=True, cache=True, nogil=True)
def _gate_up_1(packs, scales, stages, sh, x0, x1, h):
    """h[n & 1, n >> 1] = silu(gate x)[n] * (up x)[n]; packs/scales: gate's stages, then up's."""
    for n in prange(packs[0].shape[0]):
        o = stream_dot_1(packs, scales, n, x0, x1, sh)
        g = np.float32(0.0)
        u = np.float32(0.0)
        for i in range(stages):
            g += o[i]
            u += o[stages + i]
        h[n & 1, n >> 1] = g / (np.float32(1.0) + np.exp(-g)) * u


@njit(parallel=True, cache=True, nogil=True)
def _down_1(packs, scales, stages, sh, h, weight, y):
    """y += weight * (down h), down the sum of its stages; h as its two phases [2, F/2].
    Rows in pairs: d is a multiple of the group size, so even."""
    for t in prange(packs[0].shape[0] // 2):
        o = stream_dot_2(packs, scales, 2 * t, h[0], h[1], sh)
        for r in range(2):
            v = np.float32(0.0)
            for i in range(stages):
                v += o[2 * i + r]
            y[2 * t + r] += v * weight


def fused_supported(fmt) -> bool:
    """Whether one token of records in `fmt` takes the fused kernels (_gate_up_1, _down_1)."""
    steps = fmt.group_size // 32            # 16-byte steps of 4-bit codes per block of scales
    return (HAS_AVX512 and all(b == 4 for b in fmt.stages) and fmt.group_size % 32 == 0
            and steps & (steps - 1) == 0)


def _expert_1(x: np.ndarray, record: np.ndarray, fmt, weight: float, y: np.ndarray) -> None:
    """y [d] += weight * expert(x [d]) through the fused kernels."""
    gate, up, down = views(fmt, record)
    sh = (fmt.group_size // 32).bit_length() - 1
    xph = np.ascontiguousarray(x.reshape(-1, 2).T)
    h = np.empty((2, fmt.ffn // 2), np.float32)
    _gate_up_1(tuple(c for _, c, _ in gate + up), tuple(s for _, _, s in gate + up), len(gate), sh,
               xph[0], xph[1], h)
    _down_1(tuple(c for _, c, _ in down), tuple(s for _, _, s in down), len(down), sh, h, np.float32(weight), y)


def expert_ffn(x: np.ndarray, record: np.ndarray, fmt, levels: int | None = None) -> np.ndarray:
    """down(silu(gate x) * up x) for x [M, d] float32 over a record's first `levels` stages."""
    gate, up, down = views(fmt, record, levels)
    g = fmt.group_size
    a = linear(x, gate, g)
    h = a / (1.0 + np.exp(-a)) * linear(x, up, g)
    return linear(np.ascontiguousarray(h, dtype=np.float32), down, g)


def add_expert(y: np.ndarray, x: np.ndarray, rows: np.ndarray, weights: np.ndarray, record: np.ndarray,
               fmt) -> None:
    """y[rows] += expert(x[rows]) * weights[:, None]: the layer's output gains one expert's share."""
    if len(rows) == 1 and fused_supported(fmt):
        _expert_1(x[rows[0]], record, fmt, float(weights[0]), y[rows[0]])
    else:
        y[rows] += expert_ffn(x[rows], record, fmt) * weights[:, None]
