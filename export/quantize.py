"""The exporter's group-wise symmetric quantizer: chooses each block's scale and writes
the codes in the MatMulNBits layout (edgeinfer/format/quant.py describes the layout and
holds the reference pack, unpack and dequantize).
"""
from __future__ import annotations

import numpy as np

from edgeinfer.errors import InvalidArgumentError
from edgeinfer.format.quant import SUPPORTED_BITS, dequantize, pack, zero_point


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
    q = np.clip(np.rint(blocks / scales[..., None]), -qmax - 1, qmax).astype(np.int16) + zero_point(bits)
    return pack(q.astype(np.uint8), bits), scales


def relative_error(w: np.ndarray, packed: np.ndarray, scales: np.ndarray, bits: int) -> float:
    """||W - deq(W)|| / ||W||, reported per tensor in the manifest."""
    w = np.asarray(w, dtype=np.float32)
    err = np.linalg.norm(w - dequantize(packed, scales, bits))
    return float(err / max(np.linalg.norm(w), 1e-30))
