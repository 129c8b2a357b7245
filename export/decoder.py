"""The decoder graph every family shares: embeddings, N x (attention + FFN), head.

Graph interface (what edgeinfer's executor and plain onnxruntime both run):
  inputs  input_ids [batch, seq] int64, position_ids [batch, seq] int64,
          past_key_values.{i}.key / .value [batch, kv_heads, past_seq, head_dim] float32
  outputs logits [batch, seq, vocab] float32,
          present.{i}.key / .value [batch, kv_heads, past_seq + seq, head_dim]
"""
from __future__ import annotations

import math

import numpy as np
from edgeinfer.export import functions
from edgeinfer.export.graph import GraphBuilder
from onnx import TensorProto

from edgeinfer.format.checksum import crc32_bytes
from edgeinfer.format.config import ModelConfig
from edgeinfer.format.constants import (
    FFN_FILE,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    WEIGHTS_FILE,
    past_name,
    present_name,
)


def rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, rotary_dim/2] float32, rope scaling applied at export."""
    r = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, r, 2, dtype=np.float64) / r))
    sc = cfg.rope_scaling
    kind = sc.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":  # Llama 3.1 frequency-dependent scaling
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    attention_factor = 1.0
    if kind == "longrope":  # LongRoPE (Phi-3): per-frequency factors; cos/sin scaled by the attention factor
        # Only the short factors: config.py caps the context at the original length, where
        # transformers uses them too.
        inv = inv / np.asarray(sc["short_factor"], dtype=np.float64)
        factor, old = float(sc["factor"]), float(sc["original_max_position_embeddings"])
        attention_factor = sc.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
    pos = np.arange(cfg.max_position_embeddings, dtype=np.float64)[:, None]
    ang = pos * inv[None, :]
    a = float(attention_factor)
    return (a * np.cos(ang)).astype(np.float32), (a * np.sin(ang)).astype(np.float32)


def activation(b: GraphBuilder, x: str, kind: str, name: str) -> str:
    if kind == "relu":
        return b.node("Relu", [x], f"{name}.out", name=name)
    sig = b.node("Sigmoid", [x], f"{name}.sigmoid", name=f"{name}.sigmoid")
    return b.node("Mul", [x, sig], f"{name}.out", name=name)   # silu


def _rows(w, role: str, i: int, sizes: list[int]):
    """A fused projection (and its bias, if any) split by output rows, e.g. Phi-3's qkv_proj."""
    fused, bias = w.get(role, i), w.get(f"{role}.bias", i, optional=True)
    if fused.shape[0] != sum(sizes):
        from edgeinfer.errors import CheckpointError
        raise CheckpointError(f"{w.name(role, i)} has {fused.shape[0]} rows; expected {sum(sizes)} ({sizes})")
    cuts = np.cumsum(sizes)[:-1]
    weights = np.split(fused, cuts)
    biases = np.split(bias, cuts) if bias is not None else [None] * len(sizes)
    return list(zip(weights, biases))


def attention_weights(w, cfg: ModelConfig, i: int):
    """[(weight, bias or None)] of q, k and v (separate tensors or one fused qkv)."""
    if w.name("qkv", i) is not None:
        D = cfg.head_dim
        return _rows(w, "qkv", i, [cfg.num_heads * D, cfg.num_kv_heads * D, cfg.num_kv_heads * D])
    return [(w.get(r, i), w.get(f"{r}.bias", i, optional=True)) for r in ("q", "k", "v")]


def ffn_weights(w, cfg: ModelConfig, i: int):
    """(gate, up) as (weight, bias or None) pairs (gate is None for ungated FFNs)."""
    if cfg.gated and w.name("gate_up", i) is not None:
        gate, up = _rows(w, "gate_up", i, [cfg.ffn_dim, cfg.ffn_dim])
        return gate, up
    up = (w.get("up", i), w.get("up.bias", i, optional=True))
    gate = (w.get("gate", i), w.get("gate.bias", i, optional=True)) if cfg.gated else None
    return gate, up


def dense_ffn(b: GraphBuilder, cfg: ModelConfig, w, i: int, x: str, prefix: str) -> str:
    opt = {"optional": True}
    gate_pair, (up_w, up_b) = ffn_weights(w, cfg, i)
    up = b.linear(f"{prefix}.up", x, up_w, up_b, file=FFN_FILE)
    if cfg.gated:
        gate = b.linear(f"{prefix}.gate", x, *gate_pair, file=FFN_FILE)
        act = activation(b, gate, cfg.activation, f"{prefix}.act")
        mid = b.node("Mul", [act, up], f"{prefix}.mul.out", name=f"{prefix}.mul")
    else:
        mid = activation(b, up, cfg.activation, f"{prefix}.act")
    return b.linear(f"{prefix}.down", mid, w.get("down", i), w.get("down.bias", i, **opt), file=FFN_FILE)


def build_decoder(b: GraphBuilder, cfg: ModelConfig, w, ffn=dense_ffn, progress=None) -> None:
    opt = {"optional": True}
    ids = b.input(INPUT_IDS, TensorProto.INT64, ["batch", "seq"])
    pos = b.input(POSITION_IDS, TensorProto.INT64, ["batch", "seq"])
    head_bits = None if b.bits is None else 8   # embeddings and lm_head stay at 8 bits
    embed = w.get("embed")
    h, embed_tensors = b.embedding("embed", ids, embed, head_bits)
    if cfg.position == "learned":
        from edgeinfer.export.archs.opt import POSITION_OFFSET
        table = w.get("pos_embed")[POSITION_OFFSET:POSITION_OFFSET + cfg.max_position_embeddings]
        pw = b.weight("pos_embed.weight", table.astype(np.float16))
        g = b.node("Gather", [pw, pos], "pos_embed.f16", name="pos_embed", axis=0)
        pe = b.node("Cast", [g], "pos_embed.out", name="pos_embed.cast", to=TensorProto.FLOAT)
        h = b.node("Add", [h, pe], "embed.sum", name="embed.add_pos")
    cos = sin = ""
    if cfg.rotary_dim:
        ct, st = rope_tables(cfg)
        cw, sw = b.weight("rope.cos", ct), b.weight("rope.sin", st)
        cos = b.node("Gather", [cw, pos], "rope.cos.out", name="rope.cos", axis=0)
        sin = b.node("Gather", [sw, pos], "rope.sin.out", name="rope.sin", axis=0)
    H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    scale = 1.0 / math.sqrt(D)
    qk_eps = cfg.norm_eps if cfg.qk_norm else None
    b.function("Attention", lambda: functions.attention(H, KVH, D, cfg.rotary_dim, scale, qk_norm_eps=qk_eps,
                                                        windowed=cfg.sliding_window > 0))
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        x = b.norm(f"{p}.attn_norm", h, cfg.norm, w.get("attn_norm", i), w.get("attn_norm.bias", i, **opt),
                   cfg.norm_eps)
        q, k, v = (b.linear(f"{p}.attn.{r}", x, wt, bias)
                   for r, (wt, bias) in zip("qkv", attention_weights(w, cfg, i)))
        if w.name("q_proj_norm", i) is not None:   # OLMoE: RMSNorm over the whole projection
            q = b.norm(f"{p}.attn.q_norm", q, "rmsnorm", w.get("q_proj_norm", i), None, cfg.norm_eps)
            k = b.norm(f"{p}.attn.k_norm", k, "rmsnorm", w.get("k_proj_norm", i), None, cfg.norm_eps)
        pk = b.input(past_name(i, "key"), TensorProto.FLOAT, ["batch", KVH, "past_seq", D])
        pv = b.input(past_name(i, "value"), TensorProto.FLOAT, ["batch", KVH, "past_seq", D])
        inputs, extra = [q, k, v, pk, pv, cos, sin], {}
        if cfg.qk_norm:
            inputs += [b.weight(f"{p}.attn.{r}_norm.weight", w.get(f"{r}_norm", i).astype(np.float32))
                       for r in "qk"]
            extra["qk_norm_epsilon"] = cfg.norm_eps
        if cfg.sliding_window:
            extra["window"] = cfg.window(i)
        att = b.node("Attention", inputs,
                     [f"{p}.attn.out", present_name(i, "key"), present_name(i, "value")], name=f"{p}.attn",
                     domain=functions.DOMAIN, num_heads=H, num_kv_heads=KVH, head_dim=D,
                     rotary_dim=cfg.rotary_dim, scale=scale, **extra)
        for kv in ("key", "value"):
            b.output(present_name(i, kv), TensorProto.FLOAT, ["batch", KVH, "total_seq", D])
        o = b.linear(f"{p}.attn.o", att[0], w.get("o", i), w.get("o.bias", i, **opt))
        h = b.node("Add", [h, o], f"{p}.attn_residual.out", name=f"{p}.attn_residual")
        x = b.norm(f"{p}.ffn_norm", h, cfg.norm, w.get("ffn_norm", i), w.get("ffn_norm.bias", i, **opt),
                   cfg.norm_eps)
        f = ffn(b, cfg, w, i, x, f"{p}.ffn")
        h = b.node("Add", [h, f], f"{p}.ffn_residual.out", name=f"{p}.ffn_residual")
        if progress:
            progress.update(1, f"layer {i}")
    x = b.norm("final_norm", h, cfg.norm, w.get("final_norm"), w.get("final_norm.bias", **opt), cfg.norm_eps)
    if cfg.tie_word_embeddings or w.name("lm_head") is None:
        b.linear("lm_head", x, embed, None, bits=head_bits, tensors=embed_tensors, out=LOGITS)
    else:
        b.linear("lm_head", x, w.get("lm_head"), None, bits=head_bits, out=LOGITS)
    b.outputs.insert(0, _logits_info(cfg))


def _logits_info(cfg):
    from onnx import helper
    return helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size])


def bundled_ffn(b: GraphBuilder, cfg: ModelConfig, w, i: int, x: str, prefix: str) -> str:
    """The layer's FFN as one BundledFFN node over a row-column bundle in ffn.bin."""
    from edgeinfer.export.quantize import quantize

    from edgeinfer.format.bundle import BundleLayout, encode
    bits = 16 if b.bits is None else b.bits
    layout = BundleLayout(cfg.hidden_size, cfg.ffn_dim, bits, b.group_size, cfg.gated)
    gate_pair, (up, up_bias) = ffn_weights(w, cfg, i)
    gate, gate_bias = gate_pair if cfg.gated else (None, None)
    down = w.get("down", i)
    if cfg.gated and (gate_bias is not None or up_bias is not None):
        from edgeinfer.errors import UnsupportedModelError
        raise UnsupportedModelError("gated FFNs with biases cannot be bundled yet")
    records = encode(layout, gate, up, down, quantize)
    bundle = b.weight(f"{prefix}.bundle", records, FFN_FILE)
    # One crc32 per neuron record (resident, not part of the graph): streamed reads are
    # checked record by record as they arrive.
    raw = records.view(np.uint8).reshape(layout.ffn, -1)
    crcs = np.array([crc32_bytes(r) for r in raw], dtype=np.uint32)
    b.writer.add_tensor(f"{prefix}.bundle.crc32", crcs, WEIGHTS_FILE)
    up_b, down_b = up_bias, w.get("down.bias", i, optional=True)
    inputs = [x, bundle,
              b.weight(f"{prefix}.up_bias", up_b.astype(np.float32)) if up_b is not None else "",
              b.weight(f"{prefix}.down_bias", down_b.astype(np.float32)) if down_b is not None else ""]
    b.function("BundledFFN", lambda: functions.bundled_ffn(layout, cfg.activation, up_b is not None,
                                                           down_b is not None))
    return b.node("BundledFFN", inputs, f"{prefix}.out", name=prefix, domain=functions.DOMAIN,
                  **layout.to_dict(), activation=cfg.activation,
                  threshold=0.5)
