"""Perplexity over a token sequence in non-overlapping windows (as the fixtures'
metrics were measured: windows of 256 tokens).

stepwise=True feeds each window one token at a time through the KV cache, as
generation does: streaming predictors then choose neurons per token, which a
256-token prefill (whose union of active neurons is nearly the whole FFN) would
hide.
"""
from __future__ import annotations

import math

import numpy as np


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(targets.size), targets].sum())


def perplexity(model, ids, window: int = 256, *, stepwise: bool = False) -> float:
    ids = np.asarray(ids, dtype=np.int64)
    window = min(window, model.max_context)
    nll, count = 0.0, 0
    for start in range(0, ids.size - 1, window):
        chunk = ids[start:start + window]
        if chunk.size < 2:
            break
        if stepwise:
            cache = model.new_cache()
            logits = np.stack([model.forward(chunk[i:i + 1], cache)[-1] for i in range(chunk.size - 1)])
        else:
            logits = model.logits(chunk)[:-1]
        nll += _nll(logits, chunk[1:])
        count += chunk.size - 1
    return math.exp(nll / count)
