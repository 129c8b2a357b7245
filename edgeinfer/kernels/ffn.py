"""The sparse bundled FFN kernel: y = sum over chosen neurons i of
act(gate_i . x) * (up_i . x) * down_i, read straight from row-column bundle
records (edgeinfer/format/bundle.py) — the resident bundle or the neuron
window's buffer alike. Neurons whose activation is exactly 0 (ReLU) skip the
down accumulation.

Parallel over chunks of neurons, each chunk with its own accumulator (no write
conflicts), summed at the end. float16 scales/weights are decoded through a
65536-entry lookup table.
"""
from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, prange

from edgeinfer.kernels._simd_bundle import baxpy4, baxpy8, bdot4, bdot8

HALF = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, inline="always")
def _act(v, relu):
    if relu:
        return v if v > 0.0 else 0.0
    return v / (1.0 + np.exp(-v))


@njit(cache=True, fastmath=True, inline="always")
def _scale(rec, pos, half):
    return half[np.uint32(rec[pos]) | (np.uint32(rec[pos + 1]) << 8)]


@njit(cache=True, fastmath=True)
def _q_dot(rec, off, so, xe, xo, xsum, ng, gs, bits, half):
    """dot(dequantized vector at rec[off:], x) using even/odd split x (4 bits) or x (8 bits).

    float32 throughout. The plain loop: it serves the layouts the SIMD intrinsics
    (_simd_bundle) do not cover (blocks of fewer than 16 bytes), and tests."""
    zp = np.float32(2 ** (bits - 1))
    total = np.float32(0.0)
    if bits == 4:
        hb = gs // 2
        for k in range(ng):
            acc = np.float32(0.0)
            base = off + k * hb
            xb = k * hb
            for j in range(hb):
                byte = np.int32(rec[base + j])
                acc += np.float32(byte & 15) * xe[xb + j] + np.float32(byte >> 4) * xo[xb + j]
            total += _scale(rec, so + 2 * k, half) * (acc - zp * xsum[k])
    else:
        for k in range(ng):
            acc = np.float32(0.0)
            base = off + k * gs
            xb = k * gs
            for j in range(gs):
                acc += np.float32(np.int32(rec[base + j])) * xe[xb + j]
            total += _scale(rec, so + 2 * k, half) * (acc - zp * xsum[k])
    return total


@njit(cache=True, fastmath=True)
def _q_axpy(rec, off, so, h, ye, yo, ng, gs, bits, half):
    """y += h * dequantized vector at rec[off:] (even/odd split y for 4 bits)."""
    zp = np.float32(2 ** (bits - 1))
    h = np.float32(h)
    if bits == 4:
        hb = gs // 2
        for k in range(ng):
            s = h * _scale(rec, so + 2 * k, half)
            c = s * zp
            base = off + k * hb
            yb = k * hb
            for j in range(hb):
                byte = np.int32(rec[base + j])
                ye[yb + j] += s * np.float32(byte & 15) - c
                yo[yb + j] += s * np.float32(byte >> 4) - c
    else:
        for k in range(ng):
            s = h * _scale(rec, so + 2 * k, half)
            c = s * zp
            base = off + k * gs
            for j in range(gs):
                ye[k * gs + j] += s * np.float32(np.int32(rec[base + j])) - c


def _ffn_quant(x, records, rows, nids, up_bias, has_bias, d, qb, ng, gs, so, bits, gated, relu, nchunks, half):
    M = x.shape[0]
    m = rows.size
    # split x once: 4-bit codes pair element 2j (low nibble) with x_even[j], 2j+1 with x_odd[j]
    if bits == 4:
        xe = np.ascontiguousarray(x[:, 0::2])
        xo = np.ascontiguousarray(x[:, 1::2])
        half_d = d // 2
    else:
        xe = x
        xo = x
        half_d = d
    xsum = np.zeros((M, ng), np.float32)
    for t in range(M):
        for k in range(ng):
            s = np.float32(0.0)
            for j in range(gs):
                s += x[t, k * gs + j]
            xsum[t, k] = s
    parts = np.zeros((nchunks, M, 2, half_d), np.float32)
    per = (m + nchunks - 1) // nchunks
    sstride = 2 * ng
    for c in prange(nchunks):
        for ii in range(c * per, min(m, (c + 1) * per)):
            rec = records[rows[ii]]
            j = 0
            for t in range(M):
                if gated:
                    g = _q_dot(rec, 0, so, xe[t], xo[t], xsum[t], ng, gs, bits, half)
                    a = _act(g, relu)
                    if a == 0.0:
                        continue
                    u = _q_dot(rec, qb, so + sstride, xe[t], xo[t], xsum[t], ng, gs, bits, half)
                    h = a * u
                    j = 2
                else:
                    u = _q_dot(rec, 0, so, xe[t], xo[t], xsum[t], ng, gs, bits, half)
                    if has_bias:
                        u += up_bias[nids[ii]]
                    h = _act(u, relu)
                    j = 1
                if h != 0.0:
                    _q_axpy(rec, j * qb, so + j * sstride, h, parts[c, t, 0], parts[c, t, 1], ng, gs, bits, half)
    y = np.zeros((M, d), np.float32)
    for c in range(nchunks):
        for t in range(M):
            if bits == 4:
                for j in range(half_d):
                    y[t, 2 * j] += parts[c, t, 0, j]
                    y[t, 2 * j + 1] += parts[c, t, 1, j]
            else:
                for j in range(d):
                    y[t, j] += parts[c, t, 0, j]
    return y


def _make_ffn_simd(bits, gated, parallel):
    """_ffn_quant through the explicit-SIMD record intrinsics (kernels/_simd_bundle.py);
    for layouts whose parts are whole 16-byte steps and whose blocks span 2**sh steps.

    bits and gated are closure constants, not arguments: Numba prunes the branches they
    decide before typing, so a model compiles only its own intrinsics (a quarter of the
    code, a quarter of the first-run compile time). Numba's cache keys a closure by its
    cell values, so each (bits, gated) has its own cache entry."""
    P = 8 // bits
    zp = np.float32(2 ** (bits - 1))

    def ffn_simd(x, records, rows, nids, up_bias, has_bias, d, qb, ng, gs, so, relu, nchunks, sh):
        # `parallel` is read here so that it is a cell too: the serial and the parallel
        # compilation are then two cache entries, not one overwriting the other.
        if not parallel:
            nchunks = 1
        M = x.shape[0]
        m = rows.size
        dp = d // P
        nsteps = qb // 16
        xph = np.empty((M, P, dp), np.float32)
        xcorr = np.empty((M, ng), np.float32)
        for t in range(M):
            for j in range(dp):
                for f in range(P):
                    xph[t, f, j] = x[t, P * j + f]
            for k in range(ng):
                s = np.float32(0.0)
                for j in range(gs):
                    s += x[t, k * gs + j]
                xcorr[t, k] = -zp * s
        parts = np.zeros((nchunks, M, P, dp), np.float32)
        pcorr = np.zeros((nchunks, M, ng), np.float32)
        per = (m + nchunks - 1) // nchunks
        sstride = 2 * ng
        for c in prange(nchunks):
            for ii in range(c * per, min(m, (c + 1) * per)):
                r = rows[ii]
                for t in range(M):
                    if gated:
                        if bits == 4:
                            g = bdot4(records, r, 0, nsteps, so, sh, xph[t], xcorr[t])
                        else:
                            g = bdot8(records, r, 0, nsteps, so, sh, xph[t], xcorr[t])
                        a = _act(g, relu)
                        if a == 0.0:
                            continue
                        if bits == 4:
                            u = bdot4(records, r, qb, nsteps, so + sstride, sh, xph[t], xcorr[t])
                        else:
                            u = bdot8(records, r, qb, nsteps, so + sstride, sh, xph[t], xcorr[t])
                        h = np.float32(a * u)
                        j = 2
                    else:
                        if bits == 4:
                            u = bdot4(records, r, 0, nsteps, so, sh, xph[t], xcorr[t])
                        else:
                            u = bdot8(records, r, 0, nsteps, so, sh, xph[t], xcorr[t])
                        if has_bias:
                            u += up_bias[nids[ii]]
                        h = np.float32(_act(u, relu))
                        j = 1
                    if h != 0.0:
                        if bits == 4:
                            baxpy4(records, r, j * qb, nsteps, so + j * sstride, sh, h, parts[c, t], pcorr[c, t])
                        else:
                            baxpy8(records, r, j * qb, nsteps, so + j * sstride, sh, h, parts[c, t], pcorr[c, t])
        y = np.zeros((M, d), np.float32)
        for t in range(M):
            for c in range(nchunks):
                for j in range(dp):
                    for f in range(P):
                        y[t, P * j + f] += parts[c, t, f, j]
            for k in range(ng):
                s = np.float32(0.0)
                for c in range(nchunks):
                    s += pcorr[c, t, k]
                for j in range(gs):
                    y[t, k * gs + j] -= zp * s
        return y

    return njit(parallel=bool(parallel), cache=True, fastmath=True, nogil=True)(ffn_simd)


def _ffn_f16(x, records, rows, nids, up_bias, has_bias, d, gated, relu, nchunks, half):
    M = x.shape[0]
    m = rows.size
    parts = np.zeros((nchunks, M, d), np.float32)
    per = (m + nchunks - 1) // nchunks
    for c in prange(nchunks):
        for ii in range(c * per, min(m, (c + 1) * per)):
            rec = records[rows[ii]]
            for t in range(M):
                xt = x[t]
                if gated:
                    g = 0.0
                    for j in range(d):
                        g += half[rec[j]] * xt[j]
                    a = _act(g, relu)
                    if a == 0.0:
                        continue
                    u = 0.0
                    for j in range(d):
                        u += half[rec[d + j]] * xt[j]
                    h = a * u
                    off = 2 * d
                else:
                    u = 0.0
                    for j in range(d):
                        u += half[rec[j]] * xt[j]
                    if has_bias:
                        u += up_bias[nids[ii]]
                    h = _act(u, relu)
                    off = d
                if h != 0.0:
                    acc = parts[c, t]
                    for j in range(d):
                        acc[j] += h * half[rec[off + j]]
    y = np.zeros((M, d), np.float32)
    for c in range(nchunks):
        y += parts[c]
    return y


# Two compilations of each: threads cost tens of microseconds to wake, which a
# small layer (a decode step of a small model) does not repay.
# nogil: a streamed layer computes its cached neurons while another thread reads the missing ones
_QUANT = (njit(cache=True, fastmath=True, nogil=True)(_ffn_quant),
          njit(parallel=True, cache=True, fastmath=True, nogil=True)(_ffn_quant))
_F16 = (njit(cache=True, fastmath=True, nogil=True)(_ffn_f16),
        njit(parallel=True, cache=True, fastmath=True, nogil=True)(_ffn_f16))
PARALLEL_MIN_WORK = 1 << 21   # multiply-adds


@functools.lru_cache(maxsize=None)
def ffn_simd_kernel(bits: int, gated: bool, parallel: int):
    """The SIMD FFN dispatcher for one (bits, gated) and serial (0) or parallel (1)."""
    return _make_ffn_simd(bits, bool(gated), parallel)


def _simd_steps_log2(layout) -> int:
    """log2 of the 16-byte steps per quantization block, or -1 where the SIMD kernel
    does not apply (the plain loop then serves)."""
    if not SIMD or layout.bits not in (4, 8) or layout.q_bytes % 16:
        return -1
    block_bytes = layout.group_size * layout.bits // 8
    if block_bytes % 16 or (block_bytes // 16) & (block_bytes // 16 - 1):
        return -1
    return (block_bytes // 16).bit_length() - 1


SIMD = True   # tests switch it off to compare against the plain loop


def simd_parallel(neuron_tokens: int, layout) -> int:
    """1 where a call over this many (neuron, token) pairs runs on threads, else 0."""
    return int(neuron_tokens * layout.hidden * layout.parts >= PARALLEL_MIN_WORK and numba.get_num_threads() > 1)


def compile_simd(records: np.ndarray, layout, activation: str, parallel: int) -> None:
    """Compile (or load from the cache) the SIMD FFN specialization bundled_ffn takes for
    these records, on a few of them (kernels/compile.py's helper process)."""
    sh = _simd_steps_log2(layout)
    if sh < 0 or layout.bits not in (4, 8):
        return
    rows = np.arange(min(16, records.shape[0]), dtype=np.int64)
    x = np.zeros((1, layout.hidden), np.float32)
    ffn_simd_kernel(layout.bits, layout.gated, parallel)(
        x, records, rows, rows, np.zeros(1, np.float32), False, layout.hidden, layout.q_bytes, layout.n_groups,
        layout.group_size, layout.scale_offset, activation == "relu", 1, sh)


def bundled_ffn(x: np.ndarray, records: np.ndarray, layout, activation: str, rows: np.ndarray | None = None,
                neuron_ids: np.ndarray | None = None, up_bias: np.ndarray | None = None) -> np.ndarray:
    """FFN over the bundle records `records[rows]` (default: all) for x [M, d] float32.

    neuron_ids[i] is the neuron held by records[rows[i]] (for up_bias); defaults to rows.
    The down bias is not added here (it is per layer, not per neuron).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if rows is None:
        rows = np.arange(records.shape[0], dtype=np.int64)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    nids = rows if neuron_ids is None else np.ascontiguousarray(neuron_ids, dtype=np.int64)
    if x.shape[0] >= DENSE_FFN_MIN_ROWS and not (activation == "relu" and _simd_steps_log2(layout) >= 0):
        return _dense_ffn(x, records, layout, activation, rows, nids, up_bias)
    if x.shape[0] > SPARSE_BLOCK_ROWS:       # bounded per-chunk accumulators
        return np.concatenate([bundled_ffn(x[s:s + SPARSE_BLOCK_ROWS], records, layout, activation, rows,
                                           nids, up_bias) for s in range(0, x.shape[0], SPARSE_BLOCK_ROWS)])
    has_bias = up_bias is not None
    ub = up_bias if has_bias else np.zeros(1, np.float32)
    relu = activation == "relu"
    par = simd_parallel(rows.size * x.shape[0], layout)
    nchunks = max(1, min(numba.get_num_threads() * 4, rows.size // 16 or 1)) if par else 1
    if layout.bits == 16:
        recs = records.view(np.uint16)
        return _F16[par](x, recs, rows, nids, ub, has_bias, layout.hidden, layout.gated, relu, nchunks, HALF)
    sh = _simd_steps_log2(layout)
    if sh >= 0:
        kernel = ffn_simd_kernel(layout.bits, layout.gated, par)
        return kernel(x, records, rows, nids, ub, has_bias, layout.hidden, layout.q_bytes, layout.n_groups,
                      layout.group_size, layout.scale_offset, relu, nchunks, sh)
    return _QUANT[par](x, records, rows, nids, ub, has_bias, layout.hidden, layout.q_bytes, layout.n_groups,
                      layout.group_size, layout.scale_offset, layout.bits, layout.gated, relu, nchunks, HALF)


@njit(parallel=True, cache=True)
def _decode_quant(records, rows, parts, d, qb, ng, gs, so, bits, half):
    n = rows.size
    out = np.empty((parts, n, d), np.float32)
    zp = np.float32(2.0 ** (bits - 1))
    for ii in prange(n):
        rec = records[rows[ii]]
        for p in range(parts):
            sbase = so + p * 2 * ng
            for k in range(ng):
                s = half[np.uint32(rec[sbase + 2 * k]) | (np.uint32(rec[sbase + 2 * k + 1]) << 8)]
                if bits == 4:
                    base = p * qb + k * (gs // 2)
                    for j in range(gs // 2):
                        byte = rec[base + j]
                        out[p, ii, k * gs + 2 * j] = s * (np.float32(byte & 15) - zp)
                        out[p, ii, k * gs + 2 * j + 1] = s * (np.float32(byte >> 4) - zp)
                else:
                    base = p * qb + k * gs
                    for j in range(gs):
                        out[p, ii, k * gs + j] = s * (np.float32(rec[base + j]) - zp)
    return out


@njit(parallel=True, cache=True)
def _decode_f16(records, rows, parts, d, half):
    n = rows.size
    out = np.empty((parts, n, d), np.float32)
    for ii in prange(n):
        rec = records[rows[ii]]
        for p in range(parts):
            for j in range(d):
                out[p, ii, j] = half[rec[p * d + j]]
    return out


def decode_rows(records: np.ndarray, layout, rows: np.ndarray) -> np.ndarray:
    """Records -> float32 [parts, n, d] (gate?, up, down columns) for a batched prefill."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if layout.bits == 16:
        return _decode_f16(records.view(np.uint16), rows, layout.parts, layout.hidden, HALF)
    return _decode_quant(records, rows, layout.parts, layout.hidden, layout.q_bytes, layout.n_groups,
                         layout.group_size, layout.scale_offset, layout.bits, HALF)


# From this many tokens on, a non-ReLU FFN decodes the records once and uses BLAS. A ReLU
# FFN stays on the sparse kernel for any number of tokens: it skips the up and down
# rows of every (token, neuron) whose gate is zero (80-90% of them), decodes nothing,
# and does not contend with OpenBLAS's threads. Measured: 128-token prefill of the
# 7b-wide-sparse synthetic (8 layers, streaming at 432 MiB) 8.8 s with BLAS, 5.6 s sparse.
DENSE_FFN_MIN_ROWS = 8
SPARSE_BLOCK_ROWS = 64   # tokens per sparse-kernel call (its accumulators are per chunk x token)


DECODE_CHUNK_BYTES = 32 << 20   # float32 decoded at a time: prefill memory stays bounded


def _dense_ffn(x, records, layout, activation, rows, nids, up_bias):
    step = max(64, DECODE_CHUNK_BYTES // (4 * layout.parts * layout.hidden))
    y = np.zeros((x.shape[0], layout.hidden), np.float32)
    for s in range(0, rows.size, step):
        w = decode_rows(records, layout, rows[s:s + step])
        z = x @ w[0].T
        if layout.gated:
            a = np.maximum(z, 0) if activation == "relu" else z / (1 + np.exp(-z))
            h = a * (x @ w[1].T)
        else:
            if up_bias is not None:
                z += up_bias[nids[s:s + step]]
            h = np.maximum(z, 0) if activation == "relu" else z / (1 + np.exp(-z))
        y += h @ w[-1]
    return y
