"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama math with fused projections. qkv_proj holds q, k
and v stacked by rows ([H*D + 2*KVH*D, d]); gate_up_proj holds gate then up ([2F, d]);
the decoder splits them (decoder.attention_weights, decoder.ffn_weights)."""
P = "model.layers.{i}."
TABLE = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": P + "input_layernorm.weight",
    "qkv": P + "self_attn.qkv_proj.weight", "qkv.bias": P + "self_attn.qkv_proj.bias",
    "o": P + "self_attn.o_proj.weight", "o.bias": P + "self_attn.o_proj.bias",
    "ffn_norm": P + "post_attention_layernorm.weight",
    "gate_up": P + "mlp.gate_up_proj.weight",
    "down": P + "mlp.down_proj.weight", "down.bias": P + "mlp.down_proj.bias",
}
