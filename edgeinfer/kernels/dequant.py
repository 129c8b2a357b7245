"""Long prompts: dequantize weights to float32 in bounded chunks and multiply with numpy
BLAS. The executor (executor/ops.py) routes a float32-activation matmul here from
BLAS_MATMUL_MIN_ROWS rows on: there BLAS overtakes the fused kernels of quant.py
(benchmarks/kernels.py --prefill-only measures both); below it BLAS loses, and it fights
Numba's threads for the cores. int8 activations (RuntimeOptions) stay fused at every M.
OpenBLAS uses all cores whatever `threads` says.
"""
from __future__ import annotations

import numpy as np

from edgeinfer.kernels.quant import dequantize_nbits

CHUNK_BYTES = 32 << 20   # float32 weights dequantized at a time: prefill memory stays bounded
# From this many activation rows on, float32-activation matmuls go through BLAS (see above).
BLAS_MATMUL_MIN_ROWS = 768


def _chunk_rows(k: int) -> int:
    return max(256, CHUNK_BYTES // (4 * k))


def prefill_matmul(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """x [M, K] float32 @ dequantize(packed, scales).T -> [M, N], CHUNK_BYTES of weights at a time."""
    n, nb, blob = packed.shape
    k = nb * blob * 8 // bits
    if x.shape[-1] < k:      # K not a multiple of the block: the padding's codes meet zeros
        x = np.pad(x, ((0, 0), (0, k - x.shape[-1])))
    step = _chunk_rows(k)
    y = np.empty((x.shape[0], n), np.float32)
    for s in range(0, n, step):
        y[:, s:s + step] = x @ dequantize_nbits(packed[s:s + step], scales[s:s + step], bits).T
    return y


def prefill_matmul_f16(x: np.ndarray, w16: np.ndarray) -> np.ndarray:
    """x [M, K] float32 @ w16.T (float16 [N, K]) -> [M, N], CHUNK_BYTES of float32 weights at a time."""
    n, k = w16.shape
    step = _chunk_rows(k)
    y = np.empty((x.shape[0], n), np.float32)
    for s in range(0, n, step):
        y[:, s:s + step] = x @ w16[s:s + step].astype(np.float32).T
    return y
