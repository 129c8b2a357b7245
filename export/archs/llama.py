"""Llama / Mistral / Qwen2 dense decoders (RMSNorm, rotary, GQA, gated FFN)."""
P = "model.layers.{i}."
TABLE = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": P + "input_layernorm.weight",
    "q": P + "self_attn.q_proj.weight", "q.bias": P + "self_attn.q_proj.bias",
    "k": P + "self_attn.k_proj.weight", "k.bias": P + "self_attn.k_proj.bias",
    "v": P + "self_attn.v_proj.weight", "v.bias": P + "self_attn.v_proj.bias",
    "o": P + "self_attn.o_proj.weight", "o.bias": P + "self_attn.o_proj.bias",
    "ffn_norm": P + "post_attention_layernorm.weight",
    "gate": P + "mlp.gate_proj.weight", "gate.bias": P + "mlp.gate_proj.bias",
    "up": P + "mlp.up_proj.weight", "up.bias": P + "mlp.up_proj.bias",
    "down": P + "mlp.down_proj.weight", "down.bias": P + "mlp.down_proj.bias",
}
