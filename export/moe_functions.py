"""The MoE layer in the graph: one `edgeinfer.MoE` node per layer and its ONNX function body.

    MoE(x [.., d], router [E, d] float32, experts [E, R], experts_low [E, R_low]?,
        shared [1, R_shared]?, shared_gate [1, d] float32?) -> y [.., d]

    p = softmax(x router^T); top-k of p, renormalised when `norm_topk`;
    y = sum over chosen experts e of p_e * down_e(silu(gate_e x) * up_e x)
        (+ sigmoid(x shared_gate^T) * shared(x), Qwen2-MoE's gated shared expert)

`experts` holds one record per expert (edgeinfer/format/experts.py) in experts.bin, the only
file the runtime streams for MoE models; router, shared expert and its gate stay resident
in weights.bin. The body computes every expert densely and weights it by the routing
weight scattered over [tokens, E]: slow, but standard ops only, so plain onnxruntime runs
the folder and the body is the reference the runtime's kernels are checked against. It
always decodes the full-precision record; which experts run at low precision is a
runtime decision (edgeinfer/streaming/moe/op.py).
"""
from __future__ import annotations

import numpy as np
from edgeinfer.export.functions import DOMAIN, _Body
from onnx import FunctionProto, TensorProto, helper

from edgeinfer.errors import UnsupportedModelError
from edgeinfer.format.checksum import crc32_bytes
from edgeinfer.format.constants import EXPERTS_FILE, WEIGHTS_FILE
from edgeinfer.format.experts import STAGES, ExpertLayout, RecordFormat, encode
from edgeinfer.format.quant import QUANT_NAMES


def moe_layer(b, cfg, experts, router: np.ndarray, x: str, prefix: str, layer: int, *,
              expert_low: str | None, shared=None, shared_gate: np.ndarray | None = None) -> str:
    """Write one layer's expert records and emit its MoE node; returns the output name.

    experts: iterable of (gate [F, d], up [F, d], down [d, F]) per expert, read lazily;
    shared: (gate, up, down) of the shared expert or None.
    """
    from edgeinfer.export.quantize import quantize

    if cfg.activation != "silu":
        raise UnsupportedModelError(f"MoE experts with {cfg.activation} are not supported (silu only)")
    quant = QUANT_NAMES[b.bits or 16]
    layout = ExpertLayout.for_export(cfg.hidden_size, cfg.ffn_dim, cfg.num_experts, b.group_size, quant,
                                     expert_low)
    high, low = layout.high, (layout.low if layout.low_bits and not layout.low_nested else None)
    rows, low_rows, err = [], [], _ErrorSum(len(high.stages))
    for mats in experts:
        mats = [np.asarray(m, np.float32) for m in mats]
        rec, levels = encode(high, mats, quantize)
        rows.append(rec)
        err.add(mats, levels)
        if low is not None:
            lrec, llevels = encode(low, mats, quantize)
            low_rows.append(lrec)
            err.add_low(mats, llevels[-1])
    if len(rows) != cfg.num_experts:
        raise UnsupportedModelError(f"layer {layer}: found {len(rows)} experts, config says {cfg.num_experts}")
    b.quant_report.update({f"{prefix}.experts.{k}": v for k, v in err.report(layout).items()})
    inputs = [x, b.weight(f"{prefix}.router", np.asarray(router, np.float32)),
              b.weight(f"{prefix}.experts", _stack(rows, high), EXPERTS_FILE),
              b.weight(f"{prefix}.experts_low", _stack(low_rows, low), EXPERTS_FILE) if low is not None else ""]
    # One crc32 per (expert, stage) (resident, not in the graph): each streamed read is
    # checked as it arrives, whichever stages it covers (a low prefix, a whole record, the rest).
    b.writer.add_tensor(f"{prefix}.experts.crc32", stage_crcs(rows, high), WEIGHTS_FILE)
    if low is not None:
        b.writer.add_tensor(f"{prefix}.experts_low.crc32", stage_crcs(low_rows, low), WEIGHTS_FILE)
    attrs = dict(layout.to_attrs(), layer=layer, top_k=cfg.experts_per_token, norm_topk=int(cfg.norm_topk_prob),
                 activation="silu", shared_ffn=0)
    shared_fmt = None
    if shared is not None:
        shared_fmt = RecordFormat(cfg.hidden_size, cfg.shared_expert_ffn_dim, STAGES[(quant, None)], b.group_size)
        mats = [np.asarray(m, np.float32) for m in shared]
        rec, _ = encode(shared_fmt, mats, quantize)
        inputs += [b.weight(f"{prefix}.shared", _stack([rec], shared_fmt)),
                   b.weight(f"{prefix}.shared_gate", np.asarray(shared_gate, np.float32).reshape(1, -1))]
        attrs.update(shared_ffn=shared_fmt.ffn, shared_stages=list(shared_fmt.stages))
    b.function("MoE", lambda: moe_body(layout, cfg.experts_per_token, cfg.norm_topk_prob, shared_fmt))
    return b.node("MoE", inputs, f"{prefix}.out", name=prefix, domain=DOMAIN, **attrs)


def stage_crcs(rows: list[np.ndarray], fmt: RecordFormat) -> np.ndarray:
    """crc32 of each stage part of each record: uint32 [E, stages]."""
    bounds = fmt.stage_offsets() + [fmt.record_bytes]
    return np.array([[crc32_bytes(r[a:z]) for a, z in zip(bounds[:-1], bounds[1:])] for r in rows], np.uint32)


def _stack(rows: list[np.ndarray], fmt: RecordFormat) -> np.ndarray:
    out = np.stack(rows)
    return out.view(np.float16) if fmt.stages == (16,) else out


class _ErrorSum:
    """||W - deq(W)|| / ||W|| over all of a layer's experts, per precision."""

    def __init__(self, levels: int):
        self.num = np.zeros(levels)
        self.low_num = 0.0
        self.den = 0.0

    def add(self, mats, levels) -> None:
        self.den += sum(float(np.square(m).sum()) for m in mats)
        for j, rec in enumerate(levels):
            self.num[j] += sum(float(np.square(m - r).sum()) for m, r in zip(mats, rec))

    def add_low(self, mats, rec) -> None:
        self.low_num += sum(float(np.square(m - r).sum()) for m, r in zip(mats, rec))

    def report(self, layout: ExpertLayout) -> dict:
        den = max(self.den, 1e-30)
        out = {"high": round(float(np.sqrt(self.num[-1] / den)), 6)}
        if layout.low_bits:
            low = self.num[0] if layout.low_nested else self.low_num
            out["low"] = round(float(np.sqrt(low / den)), 6)
        return out


# -- the function body ---------------------------------------------------------------------
def _fp32_from_bytes(b: _Body, b0: str, b1: str, b2: str, b3: str) -> str:
    """float32 bit patterns given as four uint8 tensors (little-endian) -> float32 values.

    ONNX has no bitcast, so the IEEE single is decoded arithmetically and exactly:
    value = (1 + mantissa * 2**-23) * 2**(exponent - 127); exponent 0 (zero, subnormals)
    gives mantissa * 2**-149. Group scales are never inf or NaN.
    """
    f = TensorProto.FLOAT
    c = lambda v: b.const(v, np.float32)  # noqa: E731
    v0, v1, v2, v3 = (b.op("Cast", x, to=f) for x in (b0, b1, b2, b3))
    sign = b.op("Floor", b.op("Div", v3, c(128.0)))
    e_lo = b.op("Floor", b.op("Div", v2, c(128.0)))
    exp = b.op("Add", b.op("Mul", b.op("Sub", v3, b.op("Mul", sign, c(128.0))), c(2.0)), e_lo)
    m_hi = b.op("Sub", v2, b.op("Mul", e_lo, c(128.0)))
    mant = b.op("Add", b.op("Add", b.op("Mul", m_hi, c(65536.0)), b.op("Mul", v1, c(256.0))), v0)
    frac = b.op("Mul", mant, c(2.0 ** -23))
    normal = b.op("Mul", b.op("Add", frac, c(1.0)), b.op("Pow", c(2.0), b.op("Sub", exp, c(127.0))))
    sub = b.op("Mul", b.op("Mul", frac, c(2.0 ** -63)), c(2.0 ** -63))
    mag = b.op("Where", b.op("Equal", exp, c(0.0)), sub, normal)
    return b.op("Mul", mag, b.op("Sub", c(1.0), b.op("Mul", sign, c(2.0))))


def _decode_matrix(b: _Body, tensor: str, fmt: RecordFormat, matrix: int, count: int) -> str:
    """[count, n, k] float32: matrix `matrix` of every record of `tensor`, all stages summed."""
    ax = b.const([1])
    total = None
    g = fmt.group_size
    for bits, m, co, so, n, k in fmt.parts():
        if m != matrix:
            continue
        if bits == 16:   # the tensor is float16 [count, R/2]
            cols = b.op("Slice", tensor, b.const([co // 2]), b.const([co // 2 + n * k]), ax)
            w = b.op("Reshape", b.op("Cast", cols, to=TensorProto.FLOAT), b.const([count, n, k]))
        else:            # MatMulNBits codes [n, nb, blob] and float32 scales [n, nb]
            per, nb = 8 // bits, k // g
            codes = b.op("Slice", tensor, b.const([co]), b.const([co + n * k * bits // 8]), ax)
            q = b.op("Reshape", codes, b.const([count, n, nb, g // per]))
            if bits != 8:
                fields = []
                for t in range(per):
                    v = b.op("BitShift", q, b.const(bits * t, np.uint8), direction="RIGHT") if t else q
                    fields.append(b.op("Unsqueeze", b.op("BitwiseAnd", v, b.const((1 << bits) - 1, np.uint8)),
                                       b.const([-1])))
                q = b.op("Reshape", b.op("Concat", *fields, axis=-1), b.const([count, n, nb, g]))  # value per*j + t
            vals = b.op("Sub", b.op("Cast", q, to=TensorProto.FLOAT), b.const(2.0 ** (bits - 1), np.float32))
            sb = b.op("Reshape", b.op("Slice", tensor, b.const([so]), b.const([so + 4 * n * nb]), ax),
                      b.const([count, n, nb, 4]))
            scales = _fp32_from_bytes(b, *(b.op("Gather", sb, b.const(i), axis=3) for i in range(4)))
            w = b.op("Reshape", b.op("Mul", vals, b.op("Unsqueeze", scales, b.const([-1]))),
                     b.const([count, n, k]))
        total = w if total is None else b.op("Add", total, w)
    return total


def _ffn(b: _Body, x: str, tensor: str, fmt: RecordFormat, count: int) -> str:
    """x [1, T, d] -> [count, T, d]: every record's down(silu(gate x) * up x)."""
    def proj(v, matrix):
        w = _decode_matrix(b, tensor, fmt, matrix, count)
        return b.op("MatMul", v, b.op("Transpose", w, perm=[0, 2, 1]))

    g = proj(x, 0)
    h = b.op("Mul", b.op("Mul", g, b.op("Sigmoid", g)), proj(x, 1))
    return proj(h, 2)


def moe_body(layout: ExpertLayout, top_k: int, norm_topk: bool, shared_fmt: RecordFormat | None) -> FunctionProto:
    b = _Body("moe")
    d, E = layout.hidden, layout.num_experts
    xf = b.op("Reshape", "x", b.const([-1, d]))                                   # [T, d]
    probs = b.op("Softmax", b.op("MatMul", xf, b.op("Transpose", "router", perm=[1, 0])), axis=-1)   # [T, E]
    vals, idx = b._fresh("topv"), b._fresh("topi")
    b.nodes.append(helper.make_node("TopK", [probs, b.const([top_k])], [vals, idx], axis=-1, largest=1, sorted=1))
    if norm_topk:
        vals = b.op("Div", vals, b.op("ReduceSum", vals, b.const([-1]), keepdims=1))
    routing = b.op("ScatterElements", b.op("Mul", probs, b.const(0.0, np.float32)), idx, vals, axis=1)
    xe = b.op("Unsqueeze", xf, b.const([0]))                                      # [1, T, d]
    ye = _ffn(b, xe, "experts", layout.high, E)                                   # [E, T, d]
    r = b.op("Unsqueeze", b.op("Transpose", routing, perm=[1, 0]), b.const([-1]))  # [E, T, 1]
    y = b.op("ReduceSum", b.op("Mul", ye, r), b.const([0]), keepdims=0)           # [T, d]
    if shared_fmt is not None:
        sy = b.op("Squeeze", _ffn(b, xe, "shared", shared_fmt, 1), b.const([0]))
        sg = b.op("Sigmoid", b.op("MatMul", xf, b.op("Transpose", "shared_gate", perm=[1, 0])))   # [T, 1]
        y = b.op("Add", y, b.op("Mul", sg, sy))
    b.op("Reshape", y, b.op("Shape", "x"), out="y")
    return b.function("MoE", ["x", "router", "experts", "experts_low", "shared", "shared_gate"], ["y"],
                      ["hidden", "ffn", "num_experts", "group_size", "stages", "low_bits", "low_nested",
                       "record_bytes", "low_record_bytes", "layer", "top_k", "norm_topk", "activation",
                       "shared_ffn", "shared_stages"])
