"""Perplexity over a token sequence in non-overlapping windows (as the fixtures'
metrics were measured: windows of 256 tokens)."""
from __future__ import annotations

import math

import numpy as np


def perplexity(model, ids, window: int = 256) -> float:
    ids = np.asarray(ids, dtype=np.int64)
    window = min(window, model.max_context)
    nll, count = 0.0, 0
    for start in range(0, ids.size - 1, window):
        chunk = ids[start:start + window]
        if chunk.size < 2:
            break
        logits = model.logits(chunk).astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll -= logp[np.arange(chunk.size - 1), chunk[1:]].sum()
        count += chunk.size - 1
    return math.exp(nll / count)
