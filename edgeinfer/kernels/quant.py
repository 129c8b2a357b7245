"""Matmuls and embedding gathers over quantized (MatMulNBits layout) and float16 weights.

Weights are W [N, K] as nn.Linear stores them; y = x @ W.T. Quantized layout, fixed by
edgeinfer/format/quant.py: packed uint8 [N, K // block, block * bits // 8], scales float32
[N, K // block], symmetric with zero point 2**(bits-1); `edgeinfer.format.quant.dequantize`
is the reference these kernels are tested against.

Two paths, by the number of activation rows M, both fusing the unpack into the
product (explicit SIMD, edgeinfer/kernels/_simd.py), so every weight byte is decoded
in registers and never written out as float32:
- M == 1 (decode, GEMV): memory bound; each weight byte is read once.
- M > 1 (prefill, small batches): 2 weight rows x 8 activation rows per step, each
  decoded weight vector used 8 times; activations go in blocks of rows that stay in L2
  while the weights stream past (_m_block), i.e. M / block passes over the weights.
No BLAS: with Numba's OpenMP threads just released, an OpenBLAS call on the same cores
was measured 100x slower than alone (the two pools fight), and a fused kernel needs
no dequantized copy of the weights. (From kernels.dequant.BLAS_MATMUL_MIN_ROWS rows on, long
prompts, the executor does use chunked dequantization + BLAS: measured faster there.)

Threads: parallel over output rows with numba.get_num_threads() (numba.set_num_threads).
Every output element is computed by one thread in a fixed order, so results do not
depend on the thread count.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgeinfer.format.quant import SUPPORTED_BITS
from edgeinfer.kernels._simd import (
    HAS_VNNI,
    VW,
    W,
    hdot_1x1,
    hdot_2x4,
    hdot_2x8,
    qdot_1x1,
    qdot_4x1,
    qdot_i8_1,
    qdot_i8_4,
    qgemm_2x4,
    qgemm_2x8,
)

# Above this many bytes of activations per row, x stops fitting in L1 next to the
# weights, and the GEMV shares each load of x between 4 weight rows.
_LONG_ROW_BYTES = 24 * 1024
# M > 1: activations are processed in blocks of rows that stay in L2 while the weights
# stream past (so the weights are read ceil(M / block) times).
_L2_BYTES = 512 * 1024
# Activation rows are padded by this many bytes: rows a multiple of 4 KiB apart map to
# the same L1 sets, and 16 such streams (8 rows x 2 phases) thrash L1 (measured 3x).
_ROW_PAD = 64


def _m_block(K):
    return max(8, min(256, _L2_BYTES // (4 * K)) // 8 * 8)


def _padded(shape, dtype):
    """An uninitialised C-contiguous array of `shape` plus _ROW_PAD bytes per row. The
    kernels take row lengths from the weights and row strides from the array, so the
    pad is never read; passing the whole array (not a [..., :n] view) keeps one layout,
    hence one compiled specialization, for M == 1 and M > 1."""
    pad = _ROW_PAD // np.dtype(dtype).itemsize
    return np.empty(shape[:-1] + (shape[-1] + pad,), dtype=dtype)


# ----------------------------------------------------------------------------- kernels

@njit(parallel=True, cache=True)
def _matmul_fused(xs, xcorr, packed, scales, sh, long_rows, m_block, out):
    """out[m, n] = sum_k x[m, k] * deq(W)[n, k]; xs = x split into P phase arrays,
    xcorr the zero point's share per block (see _split_activations).

    One prange per path: Numba compiles every parallel loop as a separate gufunc with
    its own copy of the inlined intrinsics, which made the first-run compile time
    grow with the number of loops; the ragged ends (N % 4, N % 2) are handled inside
    the loop's last item instead, by the same intrinsics as before."""
    M, N = out.shape
    steps = packed.shape[1] * packed.shape[2] // W
    if M == 1:
        g = 4 if long_rows else 1
        for t in prange((N + g - 1) // g):
            n = g * t
            if g == 4 and n + 4 <= N:
                o = qdot_4x1(packed, n, xs, 0, scales, xcorr, 0, steps, sh)
                out[0, n] = o[0]
                out[0, n + 1] = o[1]
                out[0, n + 2] = o[2]
                out[0, n + 3] = o[3]
            else:
                for c in range(n, min(N, n + g)):
                    out[0, c] = qdot_1x1(packed, c, xs, 0, scales, xcorr, 0, steps, sh)[0]
    else:
        for m0 in range(0, M, m_block):
            m1 = min(M, m0 + m_block)
            for t in prange((N + 1) // 2):
                n = 2 * t
                m = m0
                if n + 2 <= N:
                    while m + 8 <= m1:
                        o = qgemm_2x8(packed, n, xs, m, scales, 0, steps, sh)
                        for i in range(8):
                            out[m + i, n] = o[i]
                            out[m + i, n + 1] = o[8 + i]
                        m += 8
                    if m + 4 <= m1:
                        o = qgemm_2x4(packed, n, xs, m, scales, 0, steps, sh)
                        for i in range(4):
                            out[m + i, n] = o[i]
                            out[m + i, n + 1] = o[4 + i]
                        m += 4
                for c in range(n, min(N, n + 2)):
                    for r in range(m, m1):
                        out[r, c] = qdot_1x1(packed, c, xs, r, scales, xcorr, 0, steps, sh)[0]


@njit(cache=True)
def _split_activations(x, block_size, zero_point, phases, xcorr):
    """phases[t] = x[:, t::P] (the x_t of _simd); xcorr[m, b] = -zero_point * (sum of
    block b of row m), which the kernels scale by s[n, b] to undo the zero point."""
    M, K = x.shape
    P = phases.shape[0]
    for m in range(M):
        for t in range(P):
            for j in range(K // P):
                phases[t, m, j] = x[m, j * P + t]
        for b in range(K // block_size):
            total = np.float32(0.0)
            for k in range(b * block_size, (b + 1) * block_size):
                total += x[m, k]
            xcorr[m, b] = -zero_point * total


@njit(parallel=True, cache=True)
def _matmul_int8act(x8, sx, xcorr, packed, scales, lanes_log2, m_block, out):
    """As _matmul_fused, with activations quantized to int8 (see _simd.qdot_i8)."""
    M, N = out.shape
    for m0 in range(0, M, m_block):
        m1 = min(M, m0 + m_block)
        m4 = m1 - (m1 - m0) % 4
        for n in prange(N):
            for m in range(m0, m4, 4):
                o = qdot_i8_4(packed, n, x8, m, scales, sx, xcorr, lanes_log2)
                for i in range(4):
                    out[m + i, n] = o[i]
            for m in range(m4, m1):
                out[m, n] = qdot_i8_1(packed, n, x8, m, scales, sx, xcorr, lanes_log2)[0]


@njit(cache=True)
def _quantize_activations(x, bits, block_size, x8, sx, xcorr):
    M, K = x.shape
    P = 8 // bits
    zp = np.float32(1 << (bits - 1))
    magic = np.float32(12582912.0)     # 1.5 * 2**23: (y + magic) - magic == rint(y)
    q = np.empty(K, dtype=np.int32)
    for m in range(M):
        xm = x[m]
        for b in range(K // block_size):
            k0 = b * block_size
            amax = np.float32(0.0)
            for k in range(k0, k0 + block_size):
                a = abs(xm[k])
                if a > amax:
                    amax = a
            s = amax / np.float32(127.0) if amax > 0 else np.float32(1.0)
            inv = np.float32(1.0) / s
            total = np.int32(0)
            for k in range(k0, k0 + block_size):
                v = np.int32((xm[k] * inv + magic) - magic)
                q[k] = v
                total += v
            sx[m, b] = s
            xcorr[m, b] = -zp * s * np.float32(total)
        for t in range(P):
            x8t = x8[t, m]
            for j in range(K // P):
                x8t[j] = q[j * P + t]


@njit(cache=True)
def _code(byte, bits, t):
    return (np.int32(byte) >> (bits * t)) & ((1 << bits) - 1)


@njit(parallel=True, cache=True)
def _matmul_generic(x, packed, scales, bits, out):
    """Plain-loop fallback for layouts the fused kernel does not cover (blocks of 4
    bytes: 2-bit block 16; or 8-byte blocks in odd number); same result, slower."""
    M, N = out.shape
    _, nb, blob = packed.shape
    per = 8 // bits
    zp = np.int32(1 << (bits - 1))
    bs = blob * per
    for n in prange(N):
        for m in range(M):
            acc = np.float32(0.0)
            for b in range(nb):
                part = np.float32(0.0)
                for j in range(blob):
                    byte = packed[n, b, j]
                    for t in range(per):
                        q = _code(byte, bits, t) - zp
                        part += np.float32(q) * x[m, b * bs + j * per + t]
                acc += part * scales[n, b]
            out[m, n] = acc


@njit(parallel=True, cache=True)
def _dequant_rows(packed, scales, bits, rows, out):
    """out[i] = deq(W)[rows[i]] as float32 [len(rows), K]."""
    _, nb, blob = packed.shape
    per = 8 // bits
    zp = np.int32(1 << (bits - 1))
    mask = np.int32((1 << bits) - 1)
    bs = blob * per
    for i in prange(rows.shape[0]):
        r = rows[i]
        for b in range(nb):
            s = scales[r, b]
            base = b * bs
            if bits == 8:
                for j in range(blob):
                    out[i, base + j] = np.float32(np.int32(packed[r, b, j]) - zp) * s
            else:
                for j in range(blob):
                    v = np.int32(packed[r, b, j])
                    for t in range(per):
                        out[i, base + j * per + t] = np.float32(((v >> (bits * t)) & mask) - zp) * s


@njit(parallel=True, cache=True)
def _matmul_h(x, w16bits, m_block, out):
    M, N = out.shape
    if M == 1:
        for n in prange(N):
            out[0, n] = hdot_1x1(w16bits, n, x, 0)[0]
    else:
        for m0 in range(0, M, m_block):
            m1 = min(M, m0 + m_block)
            for t in prange(N // 2):
                n = 2 * t
                m = m0
                while m + 8 <= m1:
                    o = hdot_2x8(w16bits, n, x, m)
                    for i in range(8):
                        out[m + i, n] = o[i]
                        out[m + i, n + 1] = o[8 + i]
                    m += 8
                if m + 4 <= m1:
                    o = hdot_2x4(w16bits, n, x, m)
                    for i in range(4):
                        out[m + i, n] = o[i]
                        out[m + i, n + 1] = o[4 + i]
                    m += 4
                while m < m1:
                    out[m, n] = hdot_1x1(w16bits, n, x, m)[0]
                    out[m, n + 1] = hdot_1x1(w16bits, n + 1, x, m)[0]
                    m += 1
            if N % 2:
                for m in prange(m0, m1):
                    out[m, N - 1] = hdot_1x1(w16bits, N - 1, x, m)[0]


# ---------------------------------------------------------------------------- wrappers

def _activations(x, K):
    """x [..., K] float32 -> C-contiguous [M, K] (leading dims flattened, as ONNX MatMul)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 1:
        raise TypeError(f"x must be a float32 array [M, K]; got {getattr(x, 'dtype', type(x))} "
                        f"with shape {getattr(x, 'shape', None)}")
    if x.shape[-1] != K:
        raise ValueError(f"x has K={x.shape[-1]} but the weights have K={K}")
    return np.ascontiguousarray(x.reshape(-1, K))


def _output(out, lead, N):
    """The [M, N] array to fill, and the [..., N] array to return."""
    shape = tuple(lead) + (N,)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape
            or not out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
    return out.reshape(-1, N), out


def check_quantized(packed, scales, bits, block_size):
    """Validate a MatMulNBits weight; returns (N, K)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if block_size <= 0 or block_size * bits % 8:
        raise ValueError(f"block_size={block_size} does not fill whole bytes at {bits} bits")
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8 or packed.ndim != 3:
        raise TypeError("packed must be a uint8 array [N, K // block_size, block_size * bits // 8]")
    n, nb, blob = packed.shape
    if blob != block_size * bits // 8:
        raise ValueError(f"packed blocks hold {blob} bytes; bits={bits}, block_size={block_size} "
                         f"needs {block_size * bits // 8}")
    if (not isinstance(scales, np.ndarray) or scales.dtype != np.float32
            or scales.shape != (n, nb)):
        raise TypeError(f"scales must be a float32 array of shape {(n, nb)}")
    if not (packed.flags.c_contiguous and scales.flags.c_contiguous):
        raise ValueError("packed and scales must be C-contiguous")
    return n, nb * block_size


def _fused_layout(blob, nb):
    """How the fused kernel walks blocks of `blob` bytes: (ok, two_blocks, sh)."""
    if blob * 2 == W:            # two 8-byte blocks per 16-byte step
        return nb % 2 == 0, True, 0
    steps = blob // W
    return blob % W == 0 and steps & (steps - 1) == 0, False, steps.bit_length() - 1


def int8_activations_supported(bits, block_size, K):
    """Whether matmul_nbits(..., int8_activations=True) takes the int8 path here."""
    blob = block_size * bits // 8
    return (HAS_VNNI and bits in SUPPORTED_BITS and blob >= 16 and blob & (blob - 1) == 0
            and K * bits // 8 % VW == 0)


def matmul_nbits(x, packed, scales, bits, block_size, out=None, int8_activations=False):
    """y = x @ dequantize(packed, scales, bits).T -> float32 [M, N]; x float32 [M, K].

    int8_activations=True quantizes x per block to int8 (each value off by at most half
    a step of max|x_block| / 127: ~0.5% relative error on random data, as llama.cpp's
    Q8_0 activations), for 1.5-3x speed where the host has AVX512-VNNI; see
    int8_activations_supported. Otherwise, and by default, all arithmetic is float32.
    """
    N, K = check_quantized(packed, scales, bits, block_size)
    if isinstance(x, np.ndarray) and x.ndim and K - block_size < x.shape[-1] < K:
        # MatMulNBits allows K that is not a multiple of the block: the last block is
        # padded, and zero activations make the padding's codes irrelevant.
        x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, K - x.shape[-1])])
    lead = x.shape[:-1] if isinstance(x, np.ndarray) else ()
    x = _activations(x, K)
    M = x.shape[0]
    y, result = _output(out, lead, N)
    if M == 0 or N == 0:
        return result
    blob = packed.shape[2]
    if int8_activations and int8_activations_supported(bits, block_size, K):
        x8, sx, xcorr = quantize_activations(x, bits, block_size)
        # int8 rows are a quarter the size: four times as many fit in L2.
        _matmul_int8act(x8, sx, xcorr, packed, scales, (blob // 4).bit_length() - 1,
                        4 * _m_block(K), y)
    elif not _fused_layout(blob, packed.shape[1])[0]:
        _matmul_generic(x, packed, scales, bits, y)
    else:
        _, two_blocks, sh = _fused_layout(blob, packed.shape[1])
        P = 8 // bits
        phases = _padded((P, M, K // P), np.float32)
        xcorr = np.empty((M, K // block_size), dtype=np.float32)
        _split_activations(x, block_size, np.float32(1 << (bits - 1)), phases, xcorr)
        xs = tuple(phases[t] for t in range(P))
        if two_blocks:           # the scales' shape tells the intrinsics (see _simd)
            scales = scales.reshape(N, -1, 2)
        _matmul_fused(xs, xcorr, packed, scales, sh, K * 4 > _LONG_ROW_BYTES, _m_block(K), y)
    return result


def quantize_activations(x, bits, block_size):
    """x float32 [M, K] -> (x8 phases, block scales sx, zero-point terms xcorr) for
    _simd.qdot_i8: per weight block, x8 = rint(x / s), s = max|x| / 127."""
    M, K = x.shape
    P = 8 // bits
    x8 = _padded((P, M, K // P), np.int8)
    sx = np.empty((M, K // block_size), dtype=np.float32)
    xcorr = np.empty((M, K // block_size), dtype=np.float32)
    _quantize_activations(x, bits, block_size, x8, sx, xcorr)
    return tuple(x8[t] for t in range(P)), sx, xcorr


def matmul_f16(x, w16, out=None):
    """y = x @ w16.T -> float32 [M, N] for float16 weights [N, K]; x float32 [M, K]."""
    if not isinstance(w16, np.ndarray) or w16.dtype != np.float16 or w16.ndim != 2:
        raise TypeError("w16 must be a float16 array [N, K]")
    w16 = np.ascontiguousarray(w16)
    N, K = w16.shape
    lead = x.shape[:-1] if isinstance(x, np.ndarray) else ()
    x = _activations(x, K)
    y, result = _output(out, lead, N)
    if x.shape[0] and N:
        xp = _padded(x.shape, np.float32)
        xp[:, :K] = x
        _matmul_h(xp, w16.view(np.uint16), _m_block(K), y)
    return result


def _ids(ids, N):
    """ids of any shape -> (flat int64 ids, their shape), range-checked."""
    ids = np.asarray(ids)
    if ids.size == 0:
        ids = ids.astype(np.int64)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be integers, got {ids.dtype}")
    flat = ids.reshape(-1).astype(np.int64, copy=False)
    if flat.size and (flat.min() < 0 or flat.max() >= N):
        raise IndexError(f"ids must lie in [0, {N}); got min {flat.min()}, max {flat.max()}")
    return flat, ids.shape


def gather_nbits(packed, scales, ids, bits, block_size):
    """Rows `ids` of the dequantized table -> float32 [len(ids), K] (embedding lookup;
    ids of any shape give ids.shape + (K,), as ONNX Gather)."""
    N, K = check_quantized(packed, scales, bits, block_size)
    flat, shape = _ids(ids, N)
    out = np.empty((flat.shape[0], K), dtype=np.float32)
    if flat.size:
        _dequant_rows(packed, scales, bits, flat, out)
    return out.reshape(shape + (K,))


def dequantize_nbits(packed, scales, bits):
    """packed uint8 [N, nb, blob], scales float32 [N, nb] -> float32 [N, K]: the compiled
    edgeinfer.format.quant.dequantize (same float32 operations, equal bit for bit)."""
    n, nb, blob = packed.shape
    out = np.empty((n, nb * blob * 8 // bits), dtype=np.float32)
    if n:
        scales = np.ascontiguousarray(scales, dtype=np.float32).reshape(n, nb)
        _dequant_rows(packed, scales, bits, np.arange(n, dtype=np.int64), out)
    return out


def gather_f16(w16, ids):
    """Rows `ids` of a float16 table -> float32 [len(ids), K] (any ids shape, as above)."""
    if not isinstance(w16, np.ndarray) or w16.dtype != np.float16 or w16.ndim != 2:
        raise TypeError("w16 must be a float16 array [N, K]")
    flat, shape = _ids(ids, w16.shape[0])
    return w16[flat].astype(np.float32).reshape(shape + (w16.shape[1],))
