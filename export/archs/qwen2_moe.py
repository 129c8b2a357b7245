"""Qwen2-MoE (Qwen2 attention with q/k/v biases; many small experts, top-k, optional
renormalisation, plus a shared expert scaled by sigmoid(shared_expert_gate x)).

Layers listed in mlp_only_layers (or off the decoder_sparse_step) have a dense MLP
instead; they are found by which tensors the checkpoint holds.
"""
from edgeinfer.export import decoder
from edgeinfer.export.archs import mixtral
from edgeinfer.export.archs.llama import TABLE as _LLAMA
from edgeinfer.export.moe_functions import moe_layer

P = "model.layers.{i}."
TABLE = dict(_LLAMA, **{
    "router": P + "mlp.gate.weight",
    "expert.gate": P + "mlp.experts.{j}.gate_proj.weight",
    "expert.up": P + "mlp.experts.{j}.up_proj.weight",
    "expert.down": P + "mlp.experts.{j}.down_proj.weight",
    "experts.gate_up": P + "mlp.experts.gate_up_proj",
    "experts.down": P + "mlp.experts.down_proj",
    "shared.gate": P + "mlp.shared_expert.gate_proj.weight",
    "shared.up": P + "mlp.shared_expert.up_proj.weight",
    "shared.down": P + "mlp.shared_expert.down_proj.weight",
    "shared_gate": P + "mlp.shared_expert_gate.weight",
})


def ffn(b, cfg, w, i, x, prefix, *, expert_low=None):
    if w.name("router", i) is None:                      # a dense layer (mlp_only_layers)
        return decoder.dense_ffn(b, cfg, w, i, x, prefix)
    shared = shared_gate = None
    if w.name("shared.gate", i) is not None:
        shared = (w.get("shared.gate", i), w.get("shared.up", i), w.get("shared.down", i))
        shared_gate = w.get("shared_gate", i)
    return moe_layer(b, cfg, mixtral.experts(w, cfg, i), w.get("router", i), x, prefix, i,
                     expert_low=expert_low, shared=shared, shared_gate=shared_gate)
