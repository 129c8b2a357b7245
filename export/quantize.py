"""Group-wise symmetric quantization in onnxruntime's MatMulNBits layout.

A weight W of shape [N, K] (output rows, input columns, as Hugging Face stores
nn.Linear) is split along K into blocks of `block_size`. Each block has one
float32 scale (chosen per block to minimise squared error, and possibly
negative); a value is stored as q = round(w / scale) + 2**(bits-1), the
default zero point MatMulNBits assumes when no zero_points input is given.

Packed layout: uint8 [N, K // block_size, block_size * bits // 8].
  bits=8: one byte per value.
  bits=4: two values per byte, element 2j in the low nibble, 2j+1 in the high.
  bits=2: four values per byte, element 4j in bits 0-1, ... 4j+3 in bits 6-7
          (used for low-precision expert copies; not a MatMulNBits width).
Scales: float32 [N, K // block_size] (MatMulNBits wants them flattened).
"""
from __future__ import annotations

import numpy as np

from edgeinfer.errors import InvalidArgumentError

SUPPORTED_BITS = (2, 4, 8)


def quantize(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize float weights [N, K] -> (packed uint8 [N, nb, blob], scales float32 [N, nb])."""
    if bits not in SUPPORTED_BITS:
        raise InvalidArgumentError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    n, k = w.shape
    if k % block_size:
        raise InvalidArgumentError(f"K={k} is not a multiple of block_size={block_size}: "
                                   f"choose a group size that divides {k}")
    nb = k // block_size
    blocks = np.asarray(w, dtype=np.float32).reshape(n, nb, block_size)
    qmax = 2 ** (bits - 1) - 1
    idx = np.abs(blocks).argmax(axis=-1)[..., None]
    extreme = np.take_along_axis(blocks, idx, axis=-1)[..., 0]
    extreme[extreme == 0] = 1.0
    amax = np.abs(extreme)
    # Search the clipping ratio per block that minimises squared error: at 4 bits
    # and below, clipping the extremes beats mapping them to the top level.
    # Candidates also map the extreme onto the extra negative level -(qmax+1)
    # (a negative scale when the extreme is positive): 2**bits levels, not 2**bits - 1.
    ratios = (1.0,) if bits == 8 else np.linspace(1.0, 0.6 if bits == 4 else 0.4, 13)
    candidates = [amax * r / qmax for r in ratios] + [-extreme * r / (qmax + 1) for r in ratios]
    best_err = np.full(amax.shape, np.inf, dtype=np.float32)
    scales = np.empty(amax.shape, dtype=np.float32)
    for s in candidates:
        s = s.astype(np.float32)
        q = np.clip(np.rint(blocks / s[..., None]), -qmax - 1, qmax)
        err = ((q * s[..., None] - blocks) ** 2).sum(axis=-1)
        better = err < best_err
        best_err[better] = err[better]
        scales[better] = s[better]
    q = np.clip(np.rint(blocks / scales[..., None]), -qmax - 1, qmax).astype(np.int16) + 2 ** (bits - 1)
    return pack(q.astype(np.uint8), bits), scales


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
    """Reference dequantization -> float32 [N, K]. The kernels are tested against this."""
    n, nb, _ = packed.shape
    q = unpack(packed, bits).astype(np.float32) - 2 ** (bits - 1)
    return (q * scales.reshape(n, nb, 1)).reshape(n, -1)


def relative_error(w: np.ndarray, packed: np.ndarray, scales: np.ndarray, bits: int) -> float:
    """||W - deq(W)|| / ||W||, reported per tensor in the manifest."""
    w = np.asarray(w, dtype=np.float32)
    err = np.linalg.norm(w - dequantize(packed, scales, bits))
    return float(err / max(np.linalg.norm(w), 1e-30))
