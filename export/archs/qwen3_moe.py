"""Qwen3-MoE: Qwen3 attention (per-head q/k RMSNorm) with Qwen2-MoE's FFN layout minus the
shared expert (softmax router, top-k, optional renormalisation; mlp_only_layers dense)."""
from edgeinfer.export.archs import qwen2_moe
from edgeinfer.export.archs.qwen3 import TABLE as _QWEN3

TABLE = dict(qwen2_moe.TABLE, q_norm=_QWEN3["q_norm"], k_norm=_QWEN3["k_norm"])
ffn = qwen2_moe.ffn
