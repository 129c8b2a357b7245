"""Which FFN neurons a token needs: the low-rank predictor trained at export
(LLM in a flash §3.1), or, for testing, an oracle that knows the true set."""
from __future__ import annotations

import math

import numpy as np

from edgeinfer.format.bundle import BundleLayout, decode
from edgeinfer.kernels import matmul_f16


class LowRankPredictor:
    """active = sigmoid((x A^T) B^T + c) >= threshold, for any row of x (prefill: the union).

    A [rank, d] and B [F, rank] stay float16 (as exported: half the memory) and go
    through the Numba float16 matmul, not numpy/BLAS: OpenBLAS's threads keep spinning
    after a call and starved the Numba kernels of the same token (measured on 2 cores:
    resident matmuls 3x and attention 20x slower in streaming than in naive mode)."""

    def __init__(self, a: np.ndarray, b: np.ndarray, c: np.ndarray, threshold: float):
        self.a = np.ascontiguousarray(a, dtype=np.float16)        # [rank, d]
        self.b = np.ascontiguousarray(b, dtype=np.float16)        # [F, rank]
        self.c = np.asarray(c, dtype=np.float32)
        t = min(max(float(threshold), 1e-6), 1 - 1e-6)
        self.logit_threshold = math.log(t / (1 - t))

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes + self.c.nbytes

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = matmul_f16(matmul_f16(x, self.a), self.b)
        z += self.c
        return np.flatnonzero((z >= self.logit_threshold).any(axis=0))


class OraclePredictor:
    """The exact active set, from a full in-memory copy of the first projection.
    For tests and measurements only: it holds the whole gate/up matrix in memory."""

    def __init__(self, layout: BundleLayout, records: np.ndarray, up_bias: np.ndarray | None):
        self.first = decode(layout, records)[0]                    # gate rows (gated) or up rows
        self.bias = up_bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = x @ self.first.T
        if self.bias is not None:
            z += self.bias
        return np.flatnonzero((z > 0).any(axis=0))
