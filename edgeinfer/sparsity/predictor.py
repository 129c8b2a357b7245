"""Which FFN neurons a token needs: the low-rank predictor trained at export
(LLM in a flash §3.1), or, for testing, an oracle that knows the true set."""
from __future__ import annotations

import math

import numpy as np

from .bundle import BundleLayout, decode


class LowRankPredictor:
    """active = sigmoid((x A^T) B^T + c) >= threshold, for any row of x (prefill: the union)."""

    def __init__(self, a: np.ndarray, b: np.ndarray, c: np.ndarray, threshold: float):
        self.a = np.ascontiguousarray(a, dtype=np.float32)        # [rank, d]
        self.b_t = np.ascontiguousarray(b.T, dtype=np.float32)    # [rank, F]
        self.c = np.asarray(c, dtype=np.float32)
        t = min(max(float(threshold), 1e-6), 1 - 1e-6)
        self.logit_threshold = math.log(t / (1 - t))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = (x @ self.a.T) @ self.b_t + self.c
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
