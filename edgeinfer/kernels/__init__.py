"""CPU kernels: pure functions over numpy arrays, compiled with Numba (cache=True).

quant      matmul and embedding gather over MatMulNBits-layout and float16 weights
norm       RMSNorm, LayerNorm
attention  rotary embedding, causal GQA attention over a KV cache
ffn        the sparse bundled FFN over row-column bundles (see edgeinfer/sparsity)
compile    the first-run announcement on stderr while Numba fills its cache
"""
import edgeinfer.kernels.compile  # noqa: F401  (registers the first-compile announcement)
from edgeinfer.kernels.attention import apply_rotary, attention
from edgeinfer.kernels.norm import layer_norm, rms_norm
from edgeinfer.kernels.quant import gather_f16, gather_nbits, matmul_f16, matmul_nbits

__all__ = [
    "apply_rotary",
    "attention",
    "gather_f16",
    "gather_nbits",
    "layer_norm",
    "matmul_f16",
    "matmul_nbits",
    "rms_norm",
]
