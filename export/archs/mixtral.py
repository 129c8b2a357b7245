"""Mixtral (Llama attention; a sparse MoE FFN: softmax router, top-k, renormalised weights)."""
from edgeinfer.export.archs.llama import TABLE as _LLAMA
from edgeinfer.export.moe_functions import moe_layer

P = "model.layers.{i}."
_ATTENTION = {k: v for k, v in _LLAMA.items() if k not in ("gate", "gate.bias", "up", "up.bias", "down", "down.bias")}
TABLE = dict(_ATTENTION, **{
    "router": (P + "block_sparse_moe.gate.weight", P + "mlp.gate.weight"),
    # one tensor per expert (as save_pretrained writes them) ...
    "expert.gate": (P + "block_sparse_moe.experts.{j}.w1.weight", P + "mlp.experts.{j}.gate_proj.weight"),
    "expert.up": (P + "block_sparse_moe.experts.{j}.w3.weight", P + "mlp.experts.{j}.up_proj.weight"),
    "expert.down": (P + "block_sparse_moe.experts.{j}.w2.weight", P + "mlp.experts.{j}.down_proj.weight"),
    # ... or fused over experts (transformers' in-memory layout): [E, 2F, d] gate then up, [E, d, F]
    "experts.gate_up": P + "mlp.experts.gate_up_proj",
    "experts.down": P + "mlp.experts.down_proj",
})


def experts(w, cfg, i):
    """(gate, up, down) of each expert of layer i, one expert at a time."""
    if w.name("experts.gate_up", i) is not None:
        gate_up, down = w.get("experts.gate_up", i), w.get("experts.down", i)
        f = cfg.ffn_dim
        for e in range(cfg.num_experts):
            yield gate_up[e, :f], gate_up[e, f:], down[e]
        return
    for e in range(cfg.num_experts):
        yield w.get("expert.gate", i, j=e), w.get("expert.up", i, j=e), w.get("expert.down", i, j=e)


def ffn(b, cfg, w, i, x, prefix, *, expert_low=None):
    return moe_layer(b, cfg, experts(w, cfg, i), w.get("router", i), x, prefix, i, expert_low=expert_low)
