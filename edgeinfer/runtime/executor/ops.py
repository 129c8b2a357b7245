"""The op table: (domain, op_type) -> a factory that turns one graph node into a
callable over numpy arrays, backed by the Numba kernels.

A factory gets the node and a `const(name)` lookup for initializers, so weights
are prepared once at load (reshaped, checked) and the per-token call is a
straight kernel call; factories registered with options=True also get the
RuntimeOptions. Every callable has the signature fn(state, *inputs).

Matmuls run the fused kernels (kernels/quant.py) for decode and prefill alike, up to
kernels.dequant.BLAS_MATMUL_MIN_ROWS rows; from there on (long prompts, float32 activations)
chunked dequantization + numpy BLAS is faster (measurements in kernels/dequant.py).
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from edgeinfer import kernels
from edgeinfer.errors import ModelFormatError
from edgeinfer.format.constants import past_key_layer, past_name
from edgeinfer.kernels import dequant, norm, quant
from edgeinfer.kernels import compile as kernel_compile
from edgeinfer.kernels.attention import _attention as attention_kernel

OPS: dict[tuple[str, str], callable] = {}


def op(domain: str, name: str, *, options: bool = False):
    """Register a factory fn(node, const) -> callable; options=True: fn(node, const, options)."""
    def register(factory):
        factory.takes_options = options
        OPS[(domain, name)] = factory
        return factory
    return register


def _need(const, name: str, node) -> np.ndarray:
    value = const(name)
    if value is None:
        raise ModelFormatError(f"node {node.name}: input {name} must be an initializer")
    return value


# ---- standard ops -----------------------------------------------------------------------
@op("", "Gather")
def _gather(node, const):
    if node.attrs.get("axis", 0) != 0:
        raise ModelFormatError(f"node {node.name}: Gather on axis != 0 is not supported")
    return lambda state, data, idx: data[idx]


@op("", "Cast")
def _cast(node, const):
    dtype = helper.tensor_dtype_to_np_dtype(node.attrs["to"])
    return lambda state, x: x.astype(dtype, copy=False)


@op("", "Add")
def _add(node, const):
    return lambda state, a, b: a + b


@op("", "Mul")
def _mul(node, const):
    return lambda state, a, b: a * b


@op("", "Relu")
def _relu(node, const):
    return lambda state, x: np.maximum(x, 0.0, dtype=np.float32)


@op("", "Sigmoid")
def _sigmoid(node, const):
    return lambda state, x: (1.0 / (1.0 + np.exp(-x))).astype(np.float32, copy=False)


@op("", "LayerNormalization")
def _layer_norm(node, const):
    if node.attrs.get("axis", -1) != -1:
        raise ModelFormatError(f"node {node.name}: LayerNormalization only over the last axis")
    w, b = _need(const, node.inputs[1], node), _need(const, node.inputs[2], node)
    eps = float(node.attrs.get("epsilon", 1e-5))
    kernel_compile.expect("layer_norm", norm._layer_rows,
                          warm=(kernels.layer_norm, (np.zeros((1, w.size), np.float32), w, b, eps), {}))
    return lambda state, x, _w, _b: kernels.layer_norm(x, w, b, eps)


# ---- com.microsoft ----------------------------------------------------------------------
def _nbits_attrs(node):
    a = node.attrs
    return int(a["bits"]), int(a["block_size"]), int(a["N"]), int(a["K"])


def int8_unsupported(node) -> str | None:
    """Why this MatMulNBits node cannot take int8 activations here (None: it can)."""
    from edgeinfer.kernels._simd import HAS_VNNI
    from edgeinfer.kernels.quant import int8_activations_supported

    bits, block, _, k = _nbits_attrs(node)
    if not HAS_VNNI:
        return ("this CPU has no AVX512-VNNI (or NUMBA_CPU_NAME names another target), which the int8 "
                "path needs")
    if not int8_activations_supported(bits, block, -(-k // block) * block):
        return (f"bits={bits}, block_size={block}, K={k}: the int8 path needs blocks of a power of 2 "
                "of at least 16 bytes and K * bits / 8 a multiple of 64")
    return None


@op("com.microsoft", "MatMulNBits", options=True)
def _matmul_nbits(node, const, options):
    if len(node.inputs) > 3 and any(node.inputs[3:]):
        raise ModelFormatError(f"node {node.name}: MatMulNBits with zero points or bias is not supported")
    bits, block, n, k = _nbits_attrs(node)
    packed = _need(const, node.inputs[1], node)
    nb = -(-k // block)
    if packed.shape != (n, nb, block * bits // 8):
        raise ModelFormatError(f"node {node.name}: packed weight shape {packed.shape} does not match N/K/bits")
    scales = _need(const, node.inputs[2], node).reshape(n, nb)
    # activations="int8" where this node supports it; the executor warns about the rest.
    int8 = options.activations == "int8" and int8_unsupported(node) is None
    kernel_compile.expect(f"matmul_nbits/{bits}{'/int8' if int8 else ''}",
                          quant._matmul_int8act if int8 else quant._matmul_fused,
                          warm=(kernels.matmul_nbits, (np.zeros((1, k), np.float32), packed[:2], scales[:2], bits,
                                                       block), {"int8_activations": int8}))

    def run(state, x, _p, _s):
        if not int8 and x.shape[0] >= dequant.BLAS_MATMUL_MIN_ROWS:
            return dequant.prefill_matmul(x, packed, scales, bits)
        return kernels.matmul_nbits(x, packed, scales, bits, block, int8_activations=int8)

    run.int8_activations = int8
    return run


# ---- edgeinfer domain (function bodies in export/functions.py) --------------------------
@op("edgeinfer", "MatMulF16")
def _matmul_f16(node, const):
    w = _need(const, node.inputs[1], node)
    kernel_compile.expect("matmul_f16", quant._matmul_h,
                          warm=(kernels.matmul_f16, (np.zeros((1, w.shape[1]), np.float32), w[:2]), {}))

    def run(state, x, _w):
        if x.shape[0] >= dequant.BLAS_MATMUL_MIN_ROWS:
            return dequant.prefill_matmul_f16(x, w)
        return kernels.matmul_f16(x, w)

    return run


@op("edgeinfer", "GatherNBits")
def _gather_nbits(node, const):
    a = node.attrs
    bits, block = int(a["bits"]), int(a["block_size"])
    packed = _need(const, node.inputs[0], node)
    scales = _need(const, node.inputs[1], node).reshape(packed.shape[0], packed.shape[1])
    kernel_compile.expect("gather_nbits", quant._dequant_rows,
                          warm=(kernels.gather_nbits, (packed[:2], scales[:2], np.zeros(1, np.int64), bits, block), {}))
    return lambda state, _p, _s, ids: kernels.gather_nbits(packed, scales, ids, bits, block)


@op("edgeinfer", "RMSNorm")
def _rms_norm(node, const):
    w = _need(const, node.inputs[1], node)
    eps = float(node.attrs["epsilon"])
    kernel_compile.expect("rms_norm", norm._rms_rows,
                          warm=(kernels.rms_norm, (np.zeros((1, w.size), np.float32), w, eps), {}))
    return lambda state, x, _w: kernels.rms_norm(x, w, eps)


@op("edgeinfer", "Attention")
def _attention(node, const):
    """Causal GQA attention over the state's KV cache (the ONNX past/present
    tensors are that cache: new keys are written in place, nothing is concatenated).
    Optional inputs 7 and 8: per-head RMSNorm weights of q and k (Qwen3), applied
    before rotary; attribute window > 0: sliding-window attention (Mistral)."""
    a = node.attrs
    H, KVH, D, R = int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_dim"]), int(a["rotary_dim"])
    scale = float(a["scale"])
    window = int(a.get("window", 0))
    kernel_compile.expect("attention", attention_kernel,
                          warm=(kernels.attention, (np.zeros((1, H, D), np.float32), np.zeros((KVH, 1, D), np.float32),
                                                    np.zeros((KVH, 1, D), np.float32), 0, scale), {}))
    layer = past_key_layer(node.inputs[3])
    if layer is None:
        raise ModelFormatError(f"node {node.name}: past_key input must be a graph input {past_name('N', 'key')}")
    q_norm = k_norm = None
    if len(node.inputs) > 8 and node.inputs[7] and node.inputs[8]:
        q_norm, k_norm = _need(const, node.inputs[7], node), _need(const, node.inputs[8], node)
        qk_eps = float(a["qk_norm_epsilon"])

    def run(state, q, k, v, _pk, _pv, cos, sin, *_norms):
        s = q.shape[0]
        q3 = q.reshape(s, H, D)
        k3 = k.reshape(s, KVH, D)
        if q_norm is not None:
            q3 = kernels.rms_norm(q3, q_norm, qk_eps)
            k3 = kernels.rms_norm(k3, k_norm, qk_eps)
        if R:
            q3 = np.ascontiguousarray(q3)
            k3 = np.ascontiguousarray(k3)
            kernels.apply_rotary(q3, cos, sin, R)
            kernels.apply_rotary(k3, cos, sin, R)
        kc, vc, start = state.kv.write(layer, k3, v.reshape(s, KVH, D))
        return kernels.attention(q3, kc, vc, start, scale, window).reshape(s, H * D)

    return run


@op("edgeinfer", "BundledFFN")
def _bundled_ffn(node, const):
    """Resident FFN over the whole bundle (streaming replaces this node; see streaming/ffn/op.py)."""
    from edgeinfer.format.bundle import BundleLayout
    from edgeinfer.kernels.ffn import bundled_ffn, compile_simd, ffn_simd_kernel, simd_parallel

    layout = BundleLayout.from_attrs(node.attrs)
    records = _need(const, node.inputs[1], node)
    if records.shape != layout.row_shape:
        raise ModelFormatError(f"node {node.name}: bundle shape {records.shape} does not match {layout.row_shape}")
    up_bias = const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    down_bias = const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
    act = node.attrs["activation"]
    # A prompt runs the parallel compilation; a decode step of a small layer the serial one.
    decode_par = simd_parallel(records.shape[0], layout)
    for par in sorted({1, decode_par}, reverse=True):
        kernel_compile.expect(f"bundled_ffn/{layout.bits}/{int(layout.gated)}/{par}",
                              ffn_simd_kernel(layout.bits, layout.gated, par),
                              warm=(compile_simd, (records[:16], layout, act, par), {}), later=par != 1)

    def run(state, x, *_):
        y = bundled_ffn(x, records, layout, act, up_bias=up_bias)
        return y + down_bias if down_bias is not None else y

    return run

from edgeinfer.streaming.moe import resident as _moe_resident  # noqa: E402,F401  (registers edgeinfer.MoE)
