"""Long prompts: dequantize weights to float32 in bounded chunks and multiply with numpy
BLAS. The executor (executor/ops.py) routes a float32-activation matmul here from
PREFILL_ROWS rows on; below that the fused kernels of quant.py are faster. Measured
(benchmarks/kernels.py --prefill-only --threads 1 2 --bits 4 --prefill-m ...;
11008 x 4096, 2 cores, both in use), fused against dequantize + BLAS:
  int4     M = 128: 70 / 194 ms; 512: 362 / 408; 768: 584 / 559; 1024: 749 / 646; 2048: 1535 / 1125
  float16  M = 128: 74 / 163 ms; 512: 318 / 319; 768: 509 / 451; 1024: 664 / 539; 2048: 1316 / 970
In the runtime (int4 export, MatMulNBits FFNs, 128-token prompt, 2 threads) time to
first token was 1.7 s fused against 3.8 s with BLAS from 16 rows on (BLAS fights
Numba's threads). int8 activations (RuntimeOptions) stay fused at every M (int4:
250 ms at M = 768, 967 ms at 2048). OpenBLAS uses all cores whatever `threads` says.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


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


CHUNK_BYTES = 32 << 20   # float32 weights dequantized at a time: prefill memory stays bounded
# From this many activation rows on, float32-activation matmuls go through BLAS (see above).
PREFILL_ROWS = 768


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
