"""Rotary position embedding and causal grouped-query attention over a KV cache."""
from __future__ import annotations

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
def _attention(q, k_cache, v_cache, past_len, scale, out):
    S, H, D = q.shape
    rep = H // k_cache.shape[0]
    nblk = (S + _QUERY_BLOCK - 1) // _QUERY_BLOCK
    # Head-major items: with causal masking later query blocks cost more, and this
    # order gives every thread whole heads, i.e. the same mix of cheap and dear blocks.
    for item in prange(H * nblk):
        h = item // nblk
        s0 = (item % nblk) * _QUERY_BLOCK
        s1 = min(S, s0 + _QUERY_BLOCK)
        g = h // rep
        p = np.empty(past_len + s1, dtype=np.float32)
        acc = np.empty(D, dtype=np.float32)
        for s in range(s0, s1):
            T = past_len + s + 1
            top = -np.inf
            for t in range(T):
                d = np.float32(0.0)
                for i in range(D):
                    d += q[s, h, i] * k_cache[g, t, i]
                d *= scale
                p[t] = d
                top = max(top, d)
            total = np.float32(0.0)
            for t in range(T):
                e = np.exp(p[t] - top)
                p[t] = e
                total += e
            acc[:] = 0.0
            for t in range(T):
                w = p[t]
                for i in range(D):
                    acc[i] += w * v_cache[g, t, i]
            inv = np.float32(1.0) / total
            for i in range(D):
                out[s, h, i] = acc[i] * inv


def attention(q, k_cache, v_cache, past_len, scale):
    """Causal GQA attention -> float32 [S, H, D].

    q float32 [S, H, D]: the new tokens, at absolute positions past_len .. past_len+S-1.
    k_cache, v_cache float32 [KVH, T_max, D], the new tokens' keys and values already
    written at those positions. Query s attends to cache positions 0 .. past_len + s;
    query head h reads kv head h // (H // KVH).
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
    past_len = int(past_len)
    if past_len < 0 or past_len + S > T_max:
        raise ValueError(f"past_len {past_len} + {S} new tokens exceed the cache length {T_max}")
    out = np.empty((S, H, D), dtype=np.float32)
    if S:
        _attention(np.ascontiguousarray(q), np.ascontiguousarray(k_cache),
                   np.ascontiguousarray(v_cache), past_len, np.float32(scale), out)
    return out
