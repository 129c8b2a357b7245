"""What one decode token touches: weight bytes by node, from the graph and manifest.

The physical floor of token latency (LLM in a flash §2) is
bytes from DRAM / DRAM bandwidth + bytes from flash / flash bandwidth. Flash
bytes are measured (storage counters); DRAM bytes are computed here from the
model's shapes and what the streamed layers chose per token: a resident
matmul reads its whole weight, an embedding lookup one row, attention the KV
cache so far, a bundled FFN the first projection of every neuron it considers
and the other projections of the neurons the ReLU leaves active.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgeinfer.format.bundle import BundleLayout
from edgeinfer.format.manifest import Manifest
from edgeinfer.runtime.executor.graph import Graph


@dataclass(frozen=True)
class FFNLayer:
    name: str
    layout: BundleLayout
    bundle_bytes: int
    true_active: float | None        # fraction of neurons the ReLU leaves non-zero (calibration)
    predicted_active: float | None   # fraction the predictor selects (calibration)

    @property
    def part_bytes(self) -> int:
        """Bytes of one projection of one neuron: codes and its scales."""
        lay = self.layout
        return lay.hidden * 2 if lay.bits == 16 else lay.q_bytes + 2 * lay.n_groups

    def touched(self, considered: float, active: float) -> float:
        """Bytes read from memory for `considered` neurons of which `active` are non-zero:
        the first projection of each, the rest only where the activation is non-zero."""
        return self.part_bytes * (considered + (self.layout.parts - 1) * min(active, considered))


@dataclass(frozen=True)
class MoELayer:
    name: str
    experts: int
    top_k: int
    record_bytes: int            # one expert at full precision (one contiguous read)
    low_record_bytes: int        # its low-precision copy or prefix (0: none)
    bits: int                    # bits of the first stage (what the expert kernel reads per weight)


@dataclass
class ModelTraffic:
    """Per-token byte accounting of one model folder."""
    resident_matmul_bytes: int = 0     # attention projections, lm_head: read whole per token
    per_token_bytes: int = 0           # embedding row, norms, rope rows
    kv_bytes_per_position: int = 0     # K and V of all layers for one cached position
    predictor_bytes: int = 0           # low-rank predictors (float16, as stored)
    ffn: list[FFNLayer] = field(default_factory=list)
    moe: list[MoELayer] = field(default_factory=list)
    matmuls: list[tuple[int, int]] = field(default_factory=list)   # (weight bytes, bits) per matmul node
    attention_nodes: int = 0
    nodes: int = 0
    moe_nodes: int = 0

    @property
    def ffn_bytes(self) -> int:
        """Bytes of the streamable part: FFN bundles and expert records."""
        return sum(f.bundle_bytes for f in self.ffn) + sum(m.experts * m.record_bytes for m in self.moe)

    @property
    def true_active(self) -> float | None:
        vals = [f.true_active for f in self.ffn if f.true_active is not None]
        return sum(vals) / len(vals) if vals else None

    @property
    def predicted_active(self) -> float | None:
        vals = [f.predicted_active for f in self.ffn if f.predicted_active is not None]
        return sum(vals) / len(vals) if vals else None

    def ffn_neurons(self) -> int:
        return sum(f.layout.ffn for f in self.ffn)

    def dram_bytes(self, mode: str, context: float, neurons_needed: float | None = None) -> dict:
        """DRAM bytes one decode token reads, by part. `context`: cached positions
        attention reads; `neurons_needed`: neurons the streamed FFNs considered
        (all layers, measured); resident/naive consider every neuron."""
        out = {"weights": self.resident_matmul_bytes + self.per_token_bytes,
               "kv_cache": self.kv_bytes_per_position * context}
        total_neurons = self.ffn_neurons()
        ffn = 0.0
        for f in self.ffn:
            F = f.layout.ffn
            active = (f.true_active if f.true_active is not None else 1.0) * F
            if mode in ("streaming", "oracle") and neurons_needed is not None and total_neurons:
                considered = neurons_needed * F / total_neurons
            else:
                considered = F
            ffn += f.touched(considered, min(active, considered))
        out["ffn"] = ffn + sum(m.top_k * m.record_bytes for m in self.moe)   # experts run: read whole
        if mode == "streaming":
            out["predictors"] = self.predictor_bytes
        out["total"] = sum(out.values())
        return out


def model_traffic(manifest: Manifest, graph: Graph) -> ModelTraffic:
    t = ModelTraffic(nodes=len(graph.nodes))
    sizes = {name: e.nbytes for name, e in manifest.tensors.items()}
    stats = {s.get("layer"): s for s in manifest.raw.get("predictors") or []}
    cfg = manifest.config
    t.kv_bytes_per_position = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    for node in graph.nodes:
        ins = node.inputs
        if node.op_type in ("MatMulNBits", "MatMulF16"):
            nbytes = sum(sizes.get(i, 0) for i in ins[1:3])
            t.resident_matmul_bytes += nbytes
            t.matmuls.append((nbytes, int(node.attrs.get("bits", 16))))
        elif node.op_type == "Attention":
            t.attention_nodes += 1
        elif node.op_type == "GatherNBits":      # one row of the table per token
            packed = manifest.tensors.get(ins[0])
            if packed is not None:
                t.per_token_bytes += (sizes[ins[0]] + sizes.get(ins[1], 0)) // max(packed.shape[0], 1)
        elif node.op_type in ("RMSNorm", "LayerNormalization"):
            t.per_token_bytes += sum(sizes.get(i, 0) for i in ins[1:3])
        elif node.op_type == "BundledFFN":
            lay = BundleLayout.from_attrs(node.attrs)
            st = stats.get(node.name, {})
            t.ffn.append(FFNLayer(node.name, lay, sizes.get(ins[1], lay.ffn * lay.record_bytes),
                                  st.get("true_active"), st.get("predicted_active")))
            if len(ins) > 6 and ins[4]:
                # fp16 on disk and in memory (LowRankPredictor)
                t.predictor_bytes += sum(sizes.get(i, 0) for i in ins[4:7])
        elif node.op_type == "MoE":
            t.moe_nodes += 1
            from edgeinfer.format.experts import ExpertLayout
            lay = ExpertLayout.from_attrs(node.attrs)
            t.moe.append(MoELayer(node.name, lay.num_experts, int(node.attrs["top_k"]), lay.high_bytes,
                                  lay.low_bytes, lay.stages[0]))
            t.resident_matmul_bytes += sizes.get(ins[1], 0)       # the router
    return t
