"""ONNX function bodies for the custom ops of the `edgeinfer` domain.

Each custom op the runtime executes with a fused kernel is also defined here
with standard ONNX ops only, so plain onnxruntime (or any ONNX tool) can run
the same model.onnx, and so the body is the reference the kernels are tested
against. Bodies are generated per model: shape constants are baked in; the
node still carries them as attributes for the runtime.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import FunctionProto, TensorProto, helper, numpy_helper

from edgeinfer.errors import InvalidArgumentError

DOMAIN = "edgeinfer"
OPSET = 18
OPSET_IMPORTS = [helper.make_opsetid("", OPSET)]


class _Body:
    """Tiny helper to write a function body as a sequence of ops."""

    def __init__(self, prefix: str):
        self.nodes = []
        self.prefix = prefix
        self.n = 0

    def const(self, value, dtype=np.int64) -> str:
        name = self._fresh("c")
        arr = np.array(value, dtype=dtype)
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr)))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        name = out or self._fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def _fresh(self, tag: str) -> str:
        self.n += 1
        return f"{self.prefix}_{tag}{self.n}"

    def function(self, name: str, inputs, outputs, attributes=()) -> FunctionProto:
        return helper.make_function(DOMAIN, name, list(inputs), list(outputs), self.nodes, OPSET_IMPORTS,
                                    attributes=list(attributes))


def matmul_f16() -> FunctionProto:
    """MatMulF16(x [.., K] float32, w [N, K] float16) -> x @ w.T in float32."""
    b = _Body("mf")
    wf = b.op("Cast", "w", to=TensorProto.FLOAT)
    wt = b.op("Transpose", wf, perm=[1, 0])
    b.op("MatMul", "x", wt, out="y")
    return b.function("MatMulF16", ["x", "w"], ["y"])


def gather_nbits(bits: int, block_size: int, k: int) -> FunctionProto:
    """GatherNBits(packed [V, K/bs, blob] uint8, scales [V*K/bs] float, ids [..]) -> [.., K] float32.

    Embedding rows from a table stored in MatMulNBits layout (shared with a tied lm_head).
    """
    b = _Body("gn")
    nb = k // block_size
    rows = b.op("Gather", "packed", "ids", axis=0)                        # [.., nb, blob]
    if bits == 8:
        codes = rows
    elif bits == 4:
        lo = b.op("BitwiseAnd", rows, b.const(15, np.uint8))
        hi = b.op("BitShift", rows, b.const(4, np.uint8), direction="RIGHT")
        pair = b.op("Concat", b.op("Unsqueeze", lo, b.const([-1])), b.op("Unsqueeze", hi, b.const([-1])), axis=-1)
        shape = b.op("Concat", b.op("Shape", "ids"), b.const([nb, block_size]), axis=0)
        codes = b.op("Reshape", pair, shape)                             # element 2j low, 2j+1 high
    else:
        raise InvalidArgumentError(f"GatherNBits supports 4 and 8 bits, not {bits}")
    centred = b.op("Sub", b.op("Cast", codes, to=TensorProto.FLOAT), b.const(2.0 ** (bits - 1), np.float32))
    s2 = b.op("Reshape", "scales", b.const([-1, nb]))
    s = b.op("Unsqueeze", b.op("Gather", s2, "ids", axis=0), b.const([-1]))
    w = b.op("Mul", centred, s)
    out_shape = b.op("Concat", b.op("Shape", "ids"), b.const([k]), axis=0)
    b.op("Reshape", w, out_shape, out="y")
    return b.function("GatherNBits", ["packed", "scales", "ids"], ["y"], ["bits", "block_size", "K"])


def rms_norm(eps: float) -> FunctionProto:
    """RMSNorm(x, w) = x / sqrt(mean(x^2, -1) + eps) * w (Llama)."""
    b = _Body("rn")
    ms = b.op("ReduceMean", b.op("Mul", "x", "x"), b.const([-1]), keepdims=1)
    d = b.op("Sqrt", b.op("Add", ms, b.const(eps, np.float32)))
    b.op("Mul", b.op("Div", "x", d), "w", out="y")
    return b.function("RMSNorm", ["x", "w"], ["y"], ["epsilon"])


def attention(num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int, scale: float, *,
              qk_norm_eps: float | None = None, windowed: bool = False) -> FunctionProto:
    """Causal multi-head attention with grouped KV heads, rotary embedding and a KV cache.

    Attention(q [B,S,H*D], k [B,S,KVH*D], v, past_key [B,KVH,P,D], past_value, cos [B,S,R/2], sin,
              q_norm [D]?, k_norm [D]?)
      -> (out [B,S,H*D], present_key [B,KVH,P+S,D], present_value)
    Query s (absolute position P+s) sees keys 0..P+s. Rotary uses the half-rotation
    (rotate_half) convention on the first R dims of each head; R=0 means none (OPT).
    qk_norm_eps: q and k get a per-head RMSNorm (weights q_norm, k_norm) before rotary (Qwen3).
    windowed: the body reads the node's `window` attribute (0: none; else query i sees keys
    i-window+1..i, Mistral's sliding window), so layers with and without a window share it.
    """
    H, KVH, D, R = num_heads, num_kv_heads, head_dim, rotary_dim
    G = H // KVH
    b = _Body("at")

    def heads(x, n):
        return b.op("Transpose", b.op("Reshape", x, b.const([0, 0, n, D])), perm=[0, 2, 1, 3])

    def head_norm(x, w):                               # RMSNorm over each head's D values
        ms = b.op("ReduceMean", b.op("Mul", x, x), b.const([-1]), keepdims=1)
        d = b.op("Sqrt", b.op("Add", ms, b.const(qk_norm_eps, np.float32)))
        return b.op("Mul", b.op("Div", x, d), w)

    q, k, v = heads("q", H), heads("k", KVH), heads("v", KVH)
    if qk_norm_eps is not None:
        q, k = head_norm(q, "q_norm"), head_norm(k, "k_norm")
    if R:
        c = b.op("Unsqueeze", "cos", b.const([1]))
        s = b.op("Unsqueeze", "sin", b.const([1]))
        ax = b.const([3])

        def rotate(x):
            x1 = b.op("Slice", x, b.const([0]), b.const([R // 2]), ax)
            x2 = b.op("Slice", x, b.const([R // 2]), b.const([R]), ax)
            o1 = b.op("Sub", b.op("Mul", x1, c), b.op("Mul", x2, s))
            o2 = b.op("Add", b.op("Mul", x2, c), b.op("Mul", x1, s))
            parts = [o1, o2]
            if R < D:
                parts.append(b.op("Slice", x, b.const([R]), b.const([D]), ax))
            return b.op("Concat", *parts, axis=3)

        q, k = rotate(q), rotate(k)
    pk = b.op("Concat", "past_key", k, axis=2, out="present_key")
    pv = b.op("Concat", "past_value", v, axis=2, out="present_value")
    q5 = b.op("Reshape", q, b.const([0, KVH, G, -1, D]))
    k5 = b.op("Transpose", b.op("Unsqueeze", pk, b.const([2])), perm=[0, 1, 2, 4, 3])
    v5 = b.op("Unsqueeze", pv, b.const([2]))
    scores = b.op("Mul", b.op("MatMul", q5, k5), b.const(scale, np.float32))   # [B,KVH,G,S,T]
    # Causal mask: key j is hidden from query i when j > i + P.
    s_len = b.op("Squeeze", b.op("Shape", q, start=2, end=3), b.const([0]))
    t_len = b.op("Squeeze", b.op("Shape", pk, start=2, end=3), b.const([0]))
    past = b.op("Sub", t_len, s_len)
    zero, one = b.const(0), b.const(1)
    rows = b.op("Unsqueeze", b.op("Add", b.op("Range", zero, s_len, one), past), b.const([1]))
    cols = b.op("Unsqueeze", b.op("Range", zero, t_len, one), b.const([0]))
    hidden = b.op("Greater", cols, rows)
    if windowed:   # also hide key j from query i when i - j >= window > 0
        window = _attr_int(b, "window")
        far = b.op("GreaterOrEqual", b.op("Sub", rows, cols), window)
        hidden = b.op("Or", hidden, b.op("And", far, b.op("Greater", window, zero)))
    mask = b.op("Where", hidden, b.const(-np.inf, np.float32), b.const(0.0, np.float32))
    probs = b.op("Softmax", b.op("Add", scores, mask), axis=-1)
    o = b.op("Reshape", b.op("MatMul", probs, v5), b.const([0, H, -1, D]))
    b.op("Reshape", b.op("Transpose", o, perm=[0, 2, 1, 3]), b.const([0, 0, H * D]), out="out")
    return b.function("Attention", ["q", "k", "v", "past_key", "past_value", "cos", "sin", "q_norm", "k_norm"],
                      ["out", "present_key", "present_value"],
                      ["num_heads", "num_kv_heads", "head_dim", "rotary_dim", "scale", "window",
                       "qk_norm_epsilon"])


def _attr_int(b: _Body, attr: str) -> str:
    """The calling node's integer attribute `attr` as an int64 scalar tensor."""
    name = b._fresh("attr")
    const = helper.make_node("Constant", [], [name])
    const.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name=attr))
    b.nodes.append(const)
    return name


def _fp16_from_bytes(b: _Body, lo: str, hi: str) -> str:
    """float16 bit patterns given as two uint8 tensors -> float32 values.

    ONNX has no bitcast, so the IEEE half is decoded arithmetically:
    sign = hi >> 7, exponent = (hi >> 2) & 31, mantissa = (hi & 3) << 8 | lo.
    """
    f = TensorProto.FLOAT
    hi_f, lo_f = b.op("Cast", hi, to=f), b.op("Cast", lo, to=f)
    c = lambda v: b.const(v, np.float32)  # noqa: E731
    sign = b.op("Floor", b.op("Div", hi_f, c(128.0)))
    e_hi = b.op("Floor", b.op("Div", hi_f, c(4.0)))
    exp = b.op("Sub", e_hi, b.op("Mul", sign, c(32.0)))
    mant = b.op("Add", b.op("Mul", b.op("Sub", hi_f, b.op("Mul", e_hi, c(4.0))), c(256.0)), lo_f)
    normal = b.op("Mul", b.op("Add", mant, c(1024.0)), b.op("Pow", c(2.0), b.op("Sub", exp, c(25.0))))
    sub = b.op("Mul", mant, c(2.0 ** -24))
    mag = b.op("Where", b.op("Equal", exp, c(0.0)), sub, normal)
    return b.op("Mul", mag, b.op("Sub", c(1.0), b.op("Mul", sign, c(2.0))))


def bundled_ffn(layout, activation: str, has_up_bias: bool, has_down_bias: bool) -> FunctionProto:
    """BundledFFN(x [.., d], bundle [F, R], up_bias [F]?, down_bias [d]?, predictor_a?, predictor_b?) -> [.., d]

    y = down(act(gate(x)) * up(x)) for gated FFNs, down(act(up(x) + up_bias)) + down_bias
    otherwise, with the weights decoded from the row-column bundle (edgeinfer/format/bundle.py).
    The predictor inputs only tell the runtime which neurons to load; the result is the dense FFN.
    """
    b = _Body("bf")
    d, F = layout.hidden, layout.ffn
    ax = b.const([1])

    def cols(start, stop):
        return b.op("Slice", "bundle", b.const([start]), b.const([stop]), ax)

    def vector(j):                                   # -> [F, d] float32
        if layout.bits == 16:
            return b.op("Cast", cols(j * d, (j + 1) * d), to=TensorProto.FLOAT)
        q = cols(j * layout.q_bytes, (j + 1) * layout.q_bytes)
        if layout.bits == 4:
            lo = b.op("BitwiseAnd", q, b.const(15, np.uint8))
            hi = b.op("BitShift", q, b.const(4, np.uint8), direction="RIGHT")
            pair = b.op("Concat", b.op("Unsqueeze", lo, b.const([-1])), b.op("Unsqueeze", hi, b.const([-1])),
                        axis=-1)
            q = b.op("Reshape", pair, b.const([F, d]))
        vals = b.op("Sub", b.op("Cast", q, to=TensorProto.FLOAT), b.const(2.0 ** (layout.bits - 1), np.float32))
        so = layout.scale_offset + j * 2 * layout.n_groups
        sb = b.op("Reshape", cols(so, so + 2 * layout.n_groups), b.const([F, layout.n_groups, 2]))
        lo_b = b.op("Gather", sb, b.const(0), axis=2)
        hi_b = b.op("Gather", sb, b.const(1), axis=2)
        scales = b.op("Unsqueeze", _fp16_from_bytes(b, lo_b, hi_b), b.const([-1]))
        grouped = b.op("Reshape", vals, b.const([F, layout.n_groups, layout.group_size]))
        return b.op("Reshape", b.op("Mul", grouped, scales), b.const([F, d]))

    def act(v):
        if activation == "relu":
            return b.op("Relu", v)
        return b.op("Mul", v, b.op("Sigmoid", v))

    def proj(w):
        return b.op("MatMul", "x", b.op("Transpose", w, perm=[1, 0]))

    j = 0
    if layout.gated:
        g = act(proj(vector(0)))
        j = 1
    up = proj(vector(j))
    if has_up_bias:
        up = b.op("Add", up, "up_bias")
    h = b.op("Mul", g, up) if layout.gated else act(up)
    y = b.op("MatMul", h, vector(j + 1))
    if has_down_bias:
        b.op("Add", y, "down_bias", out="y")
    else:
        b.op("Identity", y, out="y")
    return b.function("BundledFFN", ["x", "bundle", "up_bias", "down_bias", "predictor_a", "predictor_b"], ["y"],
                      ["hidden", "ffn", "bits", "group_size", "gated", "activation", "threshold"])
