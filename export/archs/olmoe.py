"""OLMoE: Llama attention with an RMSNorm over the whole q and k projections (q_norm over
H*D, k_norm over KVH*D, before the heads split), and a softmax top-k MoE FFN without a
shared expert (Qwen2-MoE's tensor names)."""
from edgeinfer.export.archs import qwen2_moe

P = "model.layers.{i}."
TABLE = dict(qwen2_moe.TABLE, **{
    "q_proj_norm": P + "self_attn.q_norm.weight",
    "k_proj_norm": P + "self_attn.k_norm.weight",
})
ffn = qwen2_moe.ffn
