"""Qwen3 dense decoders: Llama layout plus a per-head RMSNorm of q and k before rotary
(q_norm, k_norm; weights [head_dim] shared by every head)."""
from edgeinfer.export.archs.llama import TABLE as _LLAMA

P = "model.layers.{i}."
TABLE = dict(_LLAMA, **{
    "q_norm": P + "self_attn.q_norm.weight",
    "k_norm": P + "self_attn.k_norm.weight",
})
