"""KV cache of one sequence: per layer [kv_heads, capacity, head_dim] float32,
grown in chunks up to the context window (a 4096-token window is not allocated
for a 20-token chat)."""
from __future__ import annotations

import numpy as np

from edgeinfer.errors import ContextLengthError

_CHUNK = 256


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_tokens: int):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.max_tokens = max_tokens
        self.length = 0          # tokens committed (visible to the next forward pass)
        self.capacity = 0
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []

    def reserve(self, new_tokens: int) -> None:
        need = self.length + new_tokens
        if need > self.max_tokens:
            raise ContextLengthError(f"{need} tokens do not fit the context window of {self.max_tokens}")
        if need <= self.capacity:
            return
        cap = min(self.max_tokens, max(need, self.capacity * 2, _CHUNK))
        shape = (self.kv_heads, cap, self.head_dim)
        k_new = [np.zeros(shape, np.float32) for _ in range(self.num_layers)]
        v_new = [np.zeros(shape, np.float32) for _ in range(self.num_layers)]
        for old, new in ((self.k, k_new), (self.v, v_new)):
            for o, n in zip(old, new):
                n[:, :self.length] = o[:, :self.length]
        self.k, self.v, self.capacity = k_new, v_new, cap

    def write(self, layer: int, k: np.ndarray, v: np.ndarray):
        """Store the forward pass's new keys/values [S, KVH, D] after the committed ones;
        returns (k_cache, v_cache, start) for attention."""
        s = k.shape[0]
        start = self.length
        self.k[layer][:, start:start + s] = k.transpose(1, 0, 2)
        self.v[layer][:, start:start + s] = v.transpose(1, 0, 2)
        return self.k[layer], self.v[layer], start

    def commit(self, new_tokens: int) -> None:
        self.length += new_tokens

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)
