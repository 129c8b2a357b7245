"""Rotary position embedding and causal grouped-query attention over a KV cache."""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

# Reassociation lets LLVM vectorise the dot products; no nnan/ninf: -inf and NaN keep
# their meaning in the softmax.
_FM = {"reassoc", "contract", "nsz"}
# Query rows handled by one parallel work item during prefill.
_QUERY_BLOCK = 16


@njit(cache=True, fastmath=_FM)
def _rotary(x, cos, sin, half):
    S, H, _ = x.shape
    for s in range(S):
        for h in range(H):
            for i in range(half):
                x1 = x[s, h, i]
                x2 = x[s, h, i + half]
                c = cos[s, i]
                n = sin[s, i]
                x[s, h, i] = x1 * c - x2 * n
                x[s, h, i + half] = x2 * c + x1 * n


def apply_rotary(x, cos, sin, rotary_dim):
    """Rotate the first `rotary_dim` dims of every head in place (Llama "rotate_half":
    x1 = x[..., i], x2 = x[..., i + R/2]; x1*cos - x2*sin, x2*cos + x1*sin).

    x float32 [S, H, D]; cos, sin float32 [S, R/2]; dims >= R are left as they are.
    """
    R = int(rotary_dim)
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 3:
        raise TypeError("x must be a float32 array [S, H, D]")
    S, _, D = x.shape
    if R % 2 or not 0 < R <= D:
        raise ValueError(f"rotary_dim must be even and in (0, {D}], got {R}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, np.ndarray) or t.dtype != np.float32 or t.shape != (S, R // 2):
            raise TypeError(f"{name} must be a float32 array of shape {(S, R // 2)}")
    if not x.flags.writeable:
        raise ValueError("x is rotated in place and must be writeable")
    _rotary(x, cos, sin, R // 2)
    return x


@njit(parallel=True, cache=True, fastmath=_FM)
def _attention(q, k_cache, v_cache, past_len, scale, window, heads_per_item, out):
    S, H, D = q.shape
    KVH = k_cache.shape[0]
    rep = H // KVH
    nblk = (S + _QUERY_BLOCK - 1) // _QUERY_BLOCK
    nhc = (rep + heads_per_item - 1) // heads_per_item
    # An item: up to heads_per_item query heads of one kv group, one block of queries.
    # The heads share each key and value row while it is in L1 (GQA reads the cache
    # once per group, not once per head). Head-major order: with causal masking later
    # query blocks cost more, and this gives every thread the same mix.
    for item in prange(KVH * nhc * nblk):
        g = item // (nhc * nblk)
        h0 = g * rep + ((item // nblk) % nhc) * heads_per_item
        h1 = min(g * rep + rep, h0 + heads_per_item)
        s0 = (item % nblk) * _QUERY_BLOCK
        s1 = min(S, s0 + _QUERY_BLOCK)
        p = np.empty((h1 - h0, past_len + s1), dtype=np.float32)
        acc = np.empty((h1 - h0, D), dtype=np.float32)
        for s in range(s0, s1):
            T = past_len + s + 1
            t0 = max(0, T - window) if window > 0 else 0
            for t in range(t0, T):
                for h in range(h0, h1):
                    d = np.float32(0.0)
                    for i in range(D):
                        d += q[s, h, i] * k_cache[g, t, i]
                    p[h - h0, t] = d * scale
            for j in range(h1 - h0):
                top = p[j, t0]
                for t in range(t0 + 1, T):
                    top = max(top, p[j, t])
                total = np.float32(0.0)
                for t in range(t0, T):
                    e = np.exp(p[j, t] - top)
                    p[j, t] = e
                    total += e
                acc[j, :] = 0.0
                inv = np.float32(1.0) / total
                for t in range(t0, T):
                    p[j, t] *= inv
            for t in range(t0, T):
                for j in range(h1 - h0):
                    w = p[j, t]
                    for i in range(D):
                        acc[j, i] += w * v_cache[g, t, i]
            for j in range(h1 - h0):
                for i in range(D):
                    out[s, h0 + j, i] = acc[j, i]


def attention(q, k_cache, v_cache, past_len, scale, window=0):
    """Causal GQA attention -> float32 [S, H, D].

    q float32 [S, H, D]: the new tokens, at absolute positions past_len .. past_len+S-1.
    k_cache, v_cache float32 [KVH, T_max, D], the new tokens' keys and values already
    written at those positions. Query s attends to cache positions 0 .. past_len + s;
    query head h reads kv head h // (H // KVH). window > 0: sliding-window attention
    (Mistral): query i sees only keys i - window + 1 .. i, as transformers' mask does.
    """
    for name, a, nd in (("q", q, 3), ("k_cache", k_cache, 3), ("v_cache", v_cache, 3)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != nd:
            raise TypeError(f"{name} must be a float32 array with {nd} dimensions")
    S, H, D = q.shape
    KVH, T_max, Dk = k_cache.shape
    if v_cache.shape != k_cache.shape or Dk != D:
        raise ValueError(f"caches must both be [KVH, T_max, {D}]; got {k_cache.shape}, {v_cache.shape}")
    if KVH == 0 or H % KVH:
        raise ValueError(f"num heads {H} is not a multiple of kv heads {KVH}")
    past_len, window = int(past_len), int(window)
    if window < 0:
        raise ValueError(f"window must be >= 0 (0: no window), got {window}")
    if past_len < 0 or past_len + S > T_max:
        raise ValueError(f"past_len {past_len} + {S} new tokens exceed the cache length {T_max}")
    out = np.empty((S, H, D), dtype=np.float32)
    if S:
        # Whole kv groups per item unless that leaves threads idle (e.g. decode with
        # one or two kv heads): then split the group's heads over more items.
        rep = H // KVH
        items = KVH * -(-S // _QUERY_BLOCK)
        per = max(1, min(rep, rep * items // (2 * numba.get_num_threads())))
        _attention(np.ascontiguousarray(q), np.ascontiguousarray(k_cache),
                   np.ascontiguousarray(v_cache), past_len, np.float32(scale), window, per, out)
    return out
