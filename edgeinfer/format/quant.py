"""Quantized weights in onnxruntime's MatMulNBits layout: precision names, and the
reference pack, unpack and dequantize every other decoder is tested against.

A weight W of shape [N, K] (output rows, input columns, as Hugging Face stores
nn.Linear) is split along K into blocks of `block_size`, one float32 scale per block;
a value is stored as the code q = round(w / scale) + 2**(bits-1), the default zero
point MatMulNBits assumes when no zero_points input is given.

Packed layout: uint8 [N, K // block_size, block_size * bits // 8].
  bits=8: one byte per value.
  bits=4: two values per byte, element 2j in the low nibble, 2j+1 in the high.
  bits=2: four values per byte, element 4j in bits 0-1, ... 4j+3 in bits 6-7
          (used for low-precision expert copies; not a MatMulNBits width).
Scales: float32 [N, K // block_size] (MatMulNBits wants them flattened).

The Numba kernels (edgeinfer.kernels) decode the same layout on the fast path; the
exporter's scale search is export/quantize.py.
"""
from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (2, 4, 8)
# Precision names (--quant, --expert-low, the manifest's "quantization") -> bits per
# weight; 16 is float16, stored unquantized.
QUANT_BITS = {"f16": 16, "int8": 8, "int4": 4, "int2": 2}
QUANT_NAMES = {bits: name for name, bits in QUANT_BITS.items()}
QUANT_ALIASES = {"fp16": "f16", "float16": "f16"}
WEIGHT_QUANTS = ("f16", "int8", "int4")      # what --quant offers
EXPERT_LOW_QUANTS = ("int4", "int2")         # what --expert-low offers


def zero_point(bits: int) -> int:
    """The code that stands for 0.0 at `bits` bits (symmetric quantization)."""
    return 1 << (bits - 1)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes [..., block] (values < 2**bits) into bytes along the last axis."""
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8)
    per = 8 // bits
    q = q.astype(np.uint8)
    out = np.zeros(q.shape[:-1] + (q.shape[-1] // per,), dtype=np.uint8)
    for j in range(per):
        out |= q[..., j::per] << (bits * j)
    return out


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack: bytes [..., blob] -> unsigned codes [..., blob * 8 // bits]."""
    if bits == 8:
        return packed.astype(np.uint8)
    per = 8 // bits
    mask = (1 << bits) - 1
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * per,), dtype=np.uint8)
    for j in range(per):
        out[..., j::per] = (packed >> (bits * j)) & mask
    return out


def dequantize(packed: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Reference dequantization: packed [N, nb, blob], scales [N, nb] -> float32 [N, nb * block]."""
    n, nb, _ = packed.shape
    q = unpack(packed, bits).astype(np.float32) - zero_point(bits)
    return (q * scales.reshape(n, nb, 1)).reshape(n, -1)
