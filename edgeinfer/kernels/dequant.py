"""Dequantize a MatMulNBits-layout matrix to float32, for prefill: with many
tokens a matmul is compute-bound, and one dequantization followed by BLAS beats
fused unpacking per token (the decode kernels in quant.py are for few rows)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

PREFILL_ROWS = 16


@njit(parallel=True, cache=True)
def _dequant(packed, scales, bits):
    n, nb, blob = packed.shape
    per = 8 // bits
    bs = blob * per
    mask = (1 << bits) - 1
    zp = np.float32(2 ** (bits - 1))
    out = np.empty((n, nb * bs), np.float32)
    for r in prange(n):
        for b in range(nb):
            s = scales[r, b]
            base = b * bs
            for j in range(blob):
                byte = packed[r, b, j]
                for t in range(per):
                    out[r, base + j * per + t] = s * (np.float32((byte >> (bits * t)) & mask) - zp)
    return out


def dequantize_nbits(packed: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """packed uint8 [N, nb, blob], scales float32 [N, nb] -> float32 [N, K]."""
    n, nb, _ = packed.shape
    return _dequant(packed, np.ascontiguousarray(scales, dtype=np.float32).reshape(n, nb), bits)


CHUNK_BYTES = 32 << 20   # float32 dequantized at a time: prefill memory stays bounded


def prefill_matmul(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    n, nb, blob = packed.shape
    k = nb * blob * 8 // bits
    step = max(256, CHUNK_BYTES // (4 * k))
    y = np.empty((x.shape[0], n), np.float32)
    for s in range(0, n, step):
        y[:, s:s + step] = x @ dequantize_nbits(packed[s:s + step], scales[s:s + step], bits).T
    return y
