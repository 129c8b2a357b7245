"""Every kernel against a plain numpy reference, over many shapes, with stated tolerances.

Tolerances. The kernels sum in a different order than numpy (vector lanes, blocks,
threads), so for dot products the error is bounded by the size of the terms, not of
the result: |y - y_ref| <= tol * sum_k |x_k| |w_k| (elementwise), with y_ref computed in
float64. Observed over these shapes (K <= 8192): at most 3.2e-7. tol = 1e-5 leaves a
30x margin and still catches real mistakes: swapped nibbles give 0.26 (see
test_bound_is_not_vacuous), one block's scale off by 1% gives 1.7e-4.
"""
from __future__ import annotations

import zlib

import numba
import numpy as np
import pytest
from edgeinfer.export.quantize import quantize

from edgeinfer.format.quant import dequantize
from edgeinfer.kernels import (
    apply_rotary,
    attention,
    gather_f16,
    gather_nbits,
    layer_norm,
    matmul_f16,
    matmul_nbits,
    quant,
    rms_norm,
)

DOT_TOL = 1e-5          # see the module docstring
ALL_THREADS = numba.config.NUMBA_NUM_THREADS


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def assert_dot_close(y, x, w, tol=DOT_TOL):
    """y ~ x @ w.T with |error| <= tol * (|x| @ |w|.T) elementwise."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = x64 @ w64.T
    bound = tol * (np.abs(x64) @ np.abs(w64).T) + 1e-30
    worst = float(np.max(np.abs(y - ref) / bound))
    assert worst <= 1.0, f"error is {worst:.3g}x the allowed bound"


def random_quantized(rng, N, K, bits, bs):
    w = rng.standard_normal((N, K), dtype=np.float32)
    return quantize(w, bits, bs)


@pytest.fixture
def threads():
    """Restore the Numba thread count after a test that changes it."""
    yield
    numba.set_num_threads(ALL_THREADS)


# ---------------------------------------------------------------------------- quantized

SHAPES = [(N, K) for K in (64, 256, 1024) for N in (7, 64)]


@pytest.mark.parametrize("bits", [4, 8, 2])
@pytest.mark.parametrize("bs", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 3, 13, 64])   # 13 = 8 + 4 + 1: every row-group width
def test_matmul_nbits_matches_dequantize(bits, bs, M):
    for N, K in SHAPES:
        if K % bs:
            continue
        rng = rng_for("mm", bits, bs, M, N, K)
        packed, scales = random_quantized(rng, N, K, bits, bs)
        x = rng.standard_normal((M, K), dtype=np.float32)
        y = matmul_nbits(x, packed, scales, bits, bs)
        assert y.shape == (M, N) and y.dtype == np.float32
        assert_dot_close(y, x, dequantize(packed, scales, bits))


@pytest.mark.parametrize("bits,bs,K", [(4, 16, 128), (2, 32, 128), (8, 16, 128),
                                       (4, 16, 144), (2, 16, 128)])
def test_matmul_nbits_small_blocks(bits, bs, K):
    """8-byte blocks (two per vector step), an odd number of them (K = 144: fallback
    loop), 4-byte blocks (fallback loop); same contract."""
    for M in (1, 5, 13):
        rng = rng_for("small", bits, bs, M, K)
        packed, scales = random_quantized(rng, 9, K, bits, bs)
        x = rng.standard_normal((M, K), dtype=np.float32)
        assert_dot_close(matmul_nbits(x, packed, scales, bits, bs), x,
                         dequantize(packed, scales, bits))


def test_matmul_nbits_long_rows():
    """K large enough for the 4-row GEMV variant (x no longer fits in L1), N % 4 != 0."""
    rng = rng_for("long")
    packed, scales = random_quantized(rng, 30, 8192, 4, 32)
    x = rng.standard_normal((1, 8192), dtype=np.float32)
    # K = 8192 terms: float32 reordering error grows ~sqrt(K); still far under 1e-5.
    assert_dot_close(matmul_nbits(x, packed, scales, 4, 32), x, dequantize(packed, scales, 4))


def test_matmul_nbits_padded_k():
    """MatMulNBits semantics: K not a multiple of the block, the last block padded."""
    rng = rng_for("pad")
    packed, scales = random_quantized(rng, 8, 256, 4, 32)
    x = rng.standard_normal((2, 250), dtype=np.float32)
    y = matmul_nbits(x, packed, scales, 4, 32)
    assert_dot_close(y, x, dequantize(packed, scales, 4)[:, :250])


def test_matmul_nbits_out_and_nan():
    rng = rng_for("out")
    packed, scales = random_quantized(rng, 16, 256, 4, 32)
    x = rng.standard_normal((1, 256), dtype=np.float32)
    out = np.full((1, 16), 7.0, dtype=np.float32)
    assert matmul_nbits(x, packed, scales, 4, 32, out=out) is out
    assert_dot_close(out, x, dequantize(packed, scales, 4))
    x3 = rng.standard_normal((2, 3, 256), dtype=np.float32)   # [..., K] as ONNX MatMul
    np.testing.assert_array_equal(matmul_nbits(x3, packed, scales, 4, 32),
                                  matmul_nbits(x3.reshape(6, 256), packed, scales, 4, 32).reshape(2, 3, 16))
    x[0, 3] = np.nan     # fast-math flags exclude nnan: a NaN must reach every output
    assert np.isnan(matmul_nbits(x, packed, scales, 4, 32)).all()


def test_bound_is_not_vacuous():
    """The tolerance above catches the classic layout mistake (nibbles swapped)."""
    rng = rng_for("swap")
    packed, scales = random_quantized(rng, 16, 256, 4, 32)
    x = rng.standard_normal((1, 256), dtype=np.float32)
    swapped = ((packed << 4) | (packed >> 4)).astype(np.uint8)
    with pytest.raises(AssertionError):
        assert_dot_close(matmul_nbits(x, swapped, scales, 4, 32), x,
                         dequantize(packed, scales, 4))


@pytest.mark.skipif(not quant.HAS_VNNI, reason="int8 activations need AVX512-VNNI")
@pytest.mark.parametrize("bits,bs", [(4, 32), (4, 128), (8, 32), (8, 128), (2, 64)])
@pytest.mark.parametrize("M", [1, 6])
def test_matmul_nbits_int8_activations(bits, bs, M):
    N, K = 37, 1024
    rng = rng_for("i8", bits, bs, M)
    packed, scales = random_quantized(rng, N, K, bits, bs)
    w = dequantize(packed, scales, bits)
    x = rng.standard_normal((M, K), dtype=np.float32)
    assert quant.int8_activations_supported(bits, bs, K)
    y = matmul_nbits(x, packed, scales, bits, bs, int8_activations=True)
    # Exact machinery: against the float reference on the kernel's own int8 activations.
    x8, sx, _ = quant.quantize_activations(x, bits, bs)
    P = 8 // bits
    xq = np.empty((M, K), dtype=np.float32)
    for t in range(P):
        xq[:, t::P] = x8[t][:, : K // P]     # rows are padded (see quant._padded)
    step = np.repeat(sx, bs, axis=1)
    xq *= step
    assert_dot_close(y, xq, w)
    # The rounding itself: each activation is off by at most half its block's step.
    assert np.all(np.abs(xq - x) <= 0.5 * step * (1 + 1e-6))


@pytest.mark.parametrize("M", [1, 3, 13, 64])
def test_matmul_f16(M):
    for N, K in [(7, 64), (64, 256), (33, 1000)]:   # K % 16 != 0 exercises the tail
        rng = rng_for("f16", M, N, K)
        w16 = rng.standard_normal((N, K)).astype(np.float16)
        x = rng.standard_normal((M, K), dtype=np.float32)
        y = matmul_f16(x, w16)
        assert y.shape == (M, N) and y.dtype == np.float32
        assert_dot_close(y, x, w16.astype(np.float32))


@pytest.mark.parametrize("bits,bs", [(4, 32), (8, 64), (2, 128), (2, 32)])
def test_gather(bits, bs):
    rng = rng_for("gather", bits, bs)
    packed, scales = random_quantized(rng, 50, 256, bits, bs)
    ids = np.array([3, 0, 49, 3, 17])
    # Same float32 operations as the reference ((q - zp) * scale): equal bit for bit.
    np.testing.assert_array_equal(gather_nbits(packed, scales, ids, bits, bs),
                                  dequantize(packed, scales, bits)[ids])
    w16 = rng.standard_normal((50, 24)).astype(np.float16)
    np.testing.assert_array_equal(gather_f16(w16, ids), w16[ids].astype(np.float32))
    assert gather_nbits(packed, scales, [], bits, bs).shape == (0, 256)
    ids2 = ids[:4].reshape(2, 2)                     # ONNX Gather: ids.shape + (K,)
    np.testing.assert_array_equal(gather_nbits(packed, scales, ids2, bits, bs),
                                  dequantize(packed, scales, bits)[ids2])
    with pytest.raises(IndexError):
        gather_nbits(packed, scales, [50], bits, bs)


@pytest.mark.parametrize("bits,bs", [(4, 32), (8, 64), (2, 128), (2, 32)])
def test_dequantize_nbits_matches_the_reference(bits, bs):
    """The compiled dequantizer (long-prompt BLAS path) is the reference, bit for bit."""
    from edgeinfer.kernels.quant import dequantize_nbits

    packed, scales = random_quantized(rng_for("deq", bits, bs), 37, 256, bits, bs)
    np.testing.assert_array_equal(dequantize_nbits(packed, scales, bits), dequantize(packed, scales, bits))
    assert dequantize_nbits(packed[:0], scales[:0], bits).shape == (0, 256)


def test_quant_validation():
    packed, scales = random_quantized(rng_for("val"), 8, 64, 4, 32)
    x = np.ones((1, 64), dtype=np.float32)
    with pytest.raises(TypeError):
        matmul_nbits(x.astype(np.float64), packed, scales, 4, 32)
    with pytest.raises(ValueError):
        matmul_nbits(np.ones((1, 16), np.float32), packed, scales, 4, 32)
    with pytest.raises(ValueError):
        matmul_nbits(x, packed, scales, 4, 64)          # block size does not match the blobs
    with pytest.raises(ValueError):
        matmul_nbits(x, packed, scales, 3, 32)
    with pytest.raises(TypeError):
        matmul_nbits(x, packed, scales[:, :1], 4, 32)
    with pytest.raises(ValueError):
        matmul_nbits(x, packed, scales, 4, 32, out=np.empty((1, 9), np.float32))


# -------------------------------------------------------------------------------- norms

def test_rms_norm():
    for M, K in [(1, 64), (3, 256), (64, 1024)]:
        rng = rng_for("rms", M, K)
        x = rng.standard_normal((M, K), dtype=np.float32) * 3
        w = rng.standard_normal(K, dtype=np.float32)
        x64 = x.astype(np.float64)
        ref = x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + 1e-6) * w
        # A handful of float32 roundings per element: 1e-6 relative + tiny absolute.
        np.testing.assert_allclose(rms_norm(x, w, 1e-6), ref, rtol=1e-6, atol=1e-6)


def test_layer_norm():
    for M, K in [(1, 64), (3, 256), (64, 1024)]:
        rng = rng_for("ln", M, K)
        # An offset of 1000 makes a naive float32 E[x^2] - E[x]^2 lose all its digits.
        x = rng.standard_normal((M, K), dtype=np.float32) + 1000
        w = rng.standard_normal(K, dtype=np.float32)
        b = rng.standard_normal(K, dtype=np.float32)
        x64 = x.astype(np.float64)
        mu = x64.mean(axis=1, keepdims=True)
        ref = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(axis=1, keepdims=True) + 1e-5) * w + b
        # x - mean in float32 is exact to ~1000 * 6e-8 = 6e-5 before normalisation (var ~1).
        np.testing.assert_allclose(layer_norm(x, w, b, 1e-5), ref, rtol=1e-5, atol=2e-4)


# ---------------------------------------------------------------------------- attention

def rotary_ref(x, cos, sin, R):
    out = x.astype(np.float64).copy()
    h = R // 2
    x1, x2 = out[..., :h].copy(), out[..., h:R].copy()
    c, s = cos[:, None, :], sin[:, None, :]
    out[..., :h] = x1 * c - x2 * s
    out[..., h:R] = x2 * c + x1 * s
    return out


@pytest.mark.parametrize("S,H,D,R", [(1, 4, 64, 64), (5, 3, 64, 32), (17, 2, 128, 128)])
def test_apply_rotary(S, H, D, R):
    rng = rng_for("rot", S, H, D, R)
    x = rng.standard_normal((S, H, D), dtype=np.float32)
    theta = rng.uniform(0, 100, size=(S, R // 2))
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    ref = rotary_ref(x, cos, sin, R)
    y = x.copy()
    assert apply_rotary(y, cos, sin, R) is y                    # in place
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6)       # two products and a sum
    np.testing.assert_array_equal(y[..., R:], x[..., R:])       # untouched beyond R


def attention_ref(q, kc, vc, past, scale):
    S, H, D = q.shape
    rep = H // kc.shape[0]
    T = past + S
    out = np.empty((S, H, D))
    mask = np.arange(T)[None, :] > (past + np.arange(S))[:, None]
    for h in range(H):
        g = h // rep
        sc = q[:, h].astype(np.float64) @ kc[g, :T].T.astype(np.float64) * scale
        sc[mask] = -np.inf
        p = np.exp(sc - sc.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ vc[g, :T]
    return out


@pytest.mark.parametrize("S,past", [(1, 0), (1, 37), (5, 11), (40, 0), (33, 20)])
@pytest.mark.parametrize("H,KVH", [(8, 2), (4, 4), (6, 1)])
def test_attention(S, past, H, KVH):
    D, T_max = 32, 96
    rng = rng_for("attn", S, past, H, KVH)
    q = rng.standard_normal((S, H, D), dtype=np.float32)
    kc = rng.standard_normal((KVH, T_max, D), dtype=np.float32)
    vc = rng.standard_normal((KVH, T_max, D), dtype=np.float32)
    kc[:, past + S:] = np.nan    # beyond the causal horizon: must never be read
    vc[:, past + S:] = np.nan
    y = attention(q, kc, vc, past, D ** -0.5)
    assert y.shape == (S, H, D) and y.dtype == np.float32
    # Outputs are convex combinations of |v| ~ 1 values; float32 scores and sums of
    # <= 73 terms: 1e-5 absolute is ~100x the observed error.
    np.testing.assert_allclose(y, attention_ref(q, kc, vc, past, D ** -0.5), rtol=0, atol=1e-5)


def test_attention_validation():
    q = np.zeros((2, 4, 8), np.float32)
    kc = np.zeros((2, 10, 8), np.float32)
    with pytest.raises(ValueError):
        attention(q, kc, kc, 9, 1.0)                 # 9 + 2 > T_max
    with pytest.raises(ValueError):
        attention(np.zeros((2, 3, 8), np.float32), kc, kc, 0, 1.0)   # 3 heads over 2 kv heads


# -------------------------------------------------------------------------------- threads

@pytest.mark.skipif(ALL_THREADS < 2, reason="needs more than one thread")
def test_results_do_not_depend_on_thread_count(threads):
    """Each output is computed by one thread in a fixed order: 1 thread == all threads."""
    rng = rng_for("threads")
    packed, scales = random_quantized(rng, 257, 1024, 4, 32)
    p8, s8 = random_quantized(rng, 64, 512, 2, 32)
    p2, s2 = random_quantized(rng, 33, 256, 2, 16)
    w16 = rng.standard_normal((99, 512)).astype(np.float16)
    xs = {M: rng.standard_normal((M, 1024), dtype=np.float32) for M in (1, 3, 64)}
    q = rng.standard_normal((20, 8, 32), dtype=np.float32)
    kc = rng.standard_normal((2, 64, 32), dtype=np.float32)
    vc = rng.standard_normal((2, 64, 32), dtype=np.float32)
    w = rng.standard_normal(1024, dtype=np.float32)

    def run_all():
        out = [matmul_nbits(x, packed, scales, 4, 32) for x in xs.values()]
        out.append(matmul_nbits(xs[3][:, :512], p8, s8, 2, 32))             # 8-byte blocks
        out.append(matmul_nbits(xs[3][:, :256], p2, s2, 2, 16))             # fallback loop
        out.append(matmul_f16(xs[3][:, :512], w16))
        if quant.HAS_VNNI:
            out.append(matmul_nbits(xs[3], packed, scales, 4, 32, int8_activations=True))
        out.append(attention(q, kc, vc, 10, 0.2))
        out.append(rms_norm(xs[64], w, 1e-6))
        out.append(layer_norm(xs[64], w, w, 1e-5))
        return out

    numba.set_num_threads(1)
    single = run_all()
    numba.set_num_threads(ALL_THREADS)
    for a, b in zip(single, run_all()):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ sparse bundled FFN

def _ffn_reference(x, parts, rows, gated, relu, up_bias):
    """float64 numpy FFN over the decoded records `rows` (bundle.decode)."""
    x = x.astype(np.float64)
    p = [v[rows].astype(np.float64) for v in parts]
    act = (lambda z: np.maximum(z, 0)) if relu else (lambda z: z / (1 + np.exp(-z)))
    if gated:
        h = act(x @ p[0].T) * (x @ p[1].T)
    else:
        z = x @ p[0].T + (0 if up_bias is None else up_bias[rows])
        h = act(z)
    return h @ p[-1], np.abs(x) @ np.abs(p[0]).T


@pytest.mark.parametrize("bits,gs", [(4, 32), (4, 64), (4, 16), (8, 32), (8, 128), (16, 32)])
@pytest.mark.parametrize("gated,activation", [(True, "relu"), (True, "silu"), (False, "relu")])
@pytest.mark.parametrize("M", [1, 3, 70])   # 70: the sparse prefill route, in blocks of 64
@pytest.mark.parametrize("simd", [True, False])
def test_bundled_ffn_matches_numpy(bits, gs, gated, activation, M, simd, monkeypatch):
    """The fused kernel (SIMD intrinsics where the layout allows, else the plain loop)
    against numpy over bundle.decode of the same records, on a random subset of rows
    in random order. Tolerance: 2e-5 of the |x| @ |w| scale (float32 accumulation)."""
    from edgeinfer.format import bundle
    from edgeinfer.kernels import ffn
    monkeypatch.setattr(ffn, "SIMD", simd)
    rng = rng_for("ffn", bits, gs, gated, activation, M)
    d, F = 256, 200
    lay = bundle.BundleLayout(d, F, bits, gs, gated)
    gate, up = (rng.standard_normal((F, d), dtype=np.float32) * 0.1 for _ in range(2))
    down = rng.standard_normal((d, F), dtype=np.float32) * 0.1
    records = bundle.encode(lay, gate, up, down, quantize)
    if bits == 16:
        records = records.view(np.uint16).view(np.float16)
    up_bias = None if gated else rng.standard_normal(F, dtype=np.float32)
    rows = rng.permutation(F)[:120].astype(np.int64)
    x = rng.standard_normal((M, d), dtype=np.float32)
    ref, scale = _ffn_reference(x, bundle.decode(lay, records), rows, gated, activation == "relu", up_bias)
    y = ffn.bundled_ffn(x, records, lay, activation, rows=rows, up_bias=up_bias)
    assert y.shape == (M, d)
    err = float(np.abs(y - ref).max())
    assert err <= 2e-5 * float(scale.max()) * np.sqrt(F), (err, float(np.abs(ref).max()))
    assert np.abs(ref).max() > 0.1          # the check is not vacuous


def test_bundled_ffn_simd_is_used():
    """The 4- and 8-bit layouts the exporter writes take the SIMD path."""
    from edgeinfer.format.bundle import BundleLayout
    from edgeinfer.kernels import ffn
    assert ffn._simd_steps_log2(BundleLayout(4096, 16384, 4, 32, True)) == 0
    assert ffn._simd_steps_log2(BundleLayout(4096, 16384, 8, 32, True)) == 1
    assert ffn._simd_steps_log2(BundleLayout(256, 16384, 4, 128, False)) == 2
    assert ffn._simd_steps_log2(BundleLayout(256, 16384, 4, 16, True)) == -1
