"""Routing: softmax over the router's logits, top-k, optional renormalisation
(Mixtral renormalises the k weights to sum to 1; Qwen2-MoE only when norm_topk_prob)."""
from __future__ import annotations

import numpy as np


def route(x: np.ndarray, router: np.ndarray, top_k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """x [M, d], router [E, d] -> (experts [M, k] int64, weights [M, k] float32), best first."""
    logits = x @ router.T
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    # stable sort of -p: equal probabilities keep the lower expert first, as torch.topk does on CPU
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, idx, axis=-1)
    if normalize:
        w = w / w.sum(axis=-1, keepdims=True)
    return idx, w.astype(np.float32)


def tokens_by_expert(idx: np.ndarray, w: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """expert -> (token rows routed to it, their routing weights), experts in ascending order."""
    flat = idx.reshape(-1)
    rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    order = np.argsort(flat, kind="stable")
    flat, rows, ws = flat[order], rows[order], w.reshape(-1)[order]
    cuts = np.flatnonzero(np.diff(flat)) + 1
    return {int(e[0]): (r, v) for e, r, v in zip(np.split(flat, cuts), np.split(rows, cuts), np.split(ws, cuts))}
