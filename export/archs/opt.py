"""OPT (pre-norm LayerNorm, learned positions offset by 2, biased projections, ReLU FFN)."""
# Some OPT checkpoints omit the "model." prefix.
P = ("model.decoder.layers.{i}.", "decoder.layers.{i}.")
G = ("model.decoder.", "decoder.")


def _alt(prefixes, suffix):
    return tuple(p + suffix for p in prefixes)


TABLE = {
    "embed": _alt(G, "embed_tokens.weight"),
    "pos_embed": _alt(G, "embed_positions.weight"),
    "final_norm": _alt(G, "final_layer_norm.weight"),
    "final_norm.bias": _alt(G, "final_layer_norm.bias"),
    "lm_head": "lm_head.weight",
    "attn_norm": _alt(P, "self_attn_layer_norm.weight"), "attn_norm.bias": _alt(P, "self_attn_layer_norm.bias"),
    "q": _alt(P, "self_attn.q_proj.weight"), "q.bias": _alt(P, "self_attn.q_proj.bias"),
    "k": _alt(P, "self_attn.k_proj.weight"), "k.bias": _alt(P, "self_attn.k_proj.bias"),
    "v": _alt(P, "self_attn.v_proj.weight"), "v.bias": _alt(P, "self_attn.v_proj.bias"),
    "o": _alt(P, "self_attn.out_proj.weight"), "o.bias": _alt(P, "self_attn.out_proj.bias"),
    "ffn_norm": _alt(P, "final_layer_norm.weight"), "ffn_norm.bias": _alt(P, "final_layer_norm.bias"),
    "up": _alt(P, "fc1.weight"), "up.bias": _alt(P, "fc1.bias"),
    "down": _alt(P, "fc2.weight"), "down.bias": _alt(P, "fc2.bias"),
}
POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding adds 2 to every position
