"""Explicit-SIMD GEMV over several 4-bit matrices at once, as a Numba intrinsic: the inner
loop of one MoE expert for one token (edgeinfer/kernels/experts.py).

An expert's nested record (edgeinfer/format/experts.py) holds each matrix as stages whose sum
is the weight, and gate and up read the same x. Here every such matrix is one *stream*:
each 16-byte step loads x once for all streams, so a nested int8 expert (two 4-bit
stages) is one pass over its record, not one pass per stage and matrix.

Decoding: a 4-bit code c becomes the float c - 8 by one vpermps from a 16-entry table
(vpermps reads only an index's low 4 bits, so the high nibble needs just a shift): per
16 bytes, zext + shift + 2 permutes against and + shift + 2 conversions in _simd, and no
zero-point correction afterwards. The vector units bound it, not memory: it runs at the
same rate of codes with the matrices in cache or not (docs/BENCHMARKS.md, "MoE expert
offloading"). AVX-512 only (HAS_AVX512); elsewhere experts take matmul_nbits.

Layout as in _simd: the codes of a row are [nb, blob] with blob = 16 << sh bytes per
block of scales [nb]; byte j holds x element 2j (low nibble) and 2j + 1 (high), so x
is given as its two phases x[0::2], x[1::2] (1-D float32).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from edgeinfer.kernels._simd import (
    _FM,
    _VF,
    _VI8,
    _VI32,
    W,
    _fma,
    _hsum,
    _i64,
    _load_vec,
    _splat,
)

_TABLE = ir.Constant(_VF, [float(c - 8) for c in range(16)])


def _fields(builder, row, offset):
    """The 32 values in the 16 code bytes at row[offset], as (low nibbles, high nibbles)
    <16 x float> with the zero point removed."""
    perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF, _VI32]),
                                          "llvm.x86.avx512.permvar.sf.512")
    codes = builder.zext(_load_vec(builder, row, offset, _VI8, 1), _VI32)
    high = builder.lshr(codes, ir.Constant(_VI32, [4] * W))
    return builder.call(perm, [_TABLE, codes]), builder.call(perm, [_TABLE, high])


def _make_stream_dot(R):
    """Intrinsic (packs, scales, n, x0, x1, sh) -> tuple of T*R float32: rows n..n+R-1 of
    each of the T matrices (packs[i] uint8 [N, nb, blob], scales[i] float32 [N, nb], all
    of one shape) times x; item i*R + r is row n + r of matrix i."""

    @intrinsic
    def stream_dot(typingctx, packs, scales, n, x0, x1, sh):
        if not (isinstance(packs, types.UniTuple) and isinstance(scales, types.UniTuple)
                and packs.count == scales.count):
            return None
        T = packs.count
        sig = types.UniTuple(types.float32, T * R)(packs, scales, n, x0, x1, sh)

        def codegen(context, builder, signature, args):
            pks, scs, n, x0_, x1_, sh = args
            pka = [context.make_array(signature.args[0].dtype)(context, builder, a)
                   for a in cgutils.unpack_tuple(builder, pks, T)]
            sca = [context.make_array(signature.args[1].dtype)(context, builder, a)
                   for a in cgutils.unpack_tuple(builder, scs, T)]
            xs = [context.make_array(signature.args[k])(context, builder, a).data
                  for k, a in ((3, x0_), (4, x1_))]
            _, nb, blob = cgutils.unpack_tuple(builder, pka[0].shape)
            rowbytes = builder.mul(nb, blob)
            rows = [builder.add(n, _i64(r)) for r in range(R)]
            prow = [builder.gep(p.data, [builder.mul(v, rowbytes)]) for p in pka for v in rows]
            srow = [builder.gep(s.data, [builder.mul(v, nb)]) for s in sca for v in rows]
            zero = ir.Constant(_VF, [0.0] * W)
            acc = [cgutils.alloca_once_value(builder, zero) for _ in prow]
            with cgutils.for_range(builder, builder.udiv(rowbytes, _i64(W))) as lp:
                c = lp.index
                g = builder.mul(c, _i64(W))
                xv = [_load_vec(builder, x, g, _VF, 4) for x in xs]
                for j, (p, s) in enumerate(zip(prow, srow)):
                    lo, hi = _fields(builder, p, g)
                    d = _fma(builder, hi, xv[1], builder.fmul(lo, xv[0], flags=_FM))
                    sv = _splat(builder, builder.load(builder.gep(s, [builder.lshr(c, sh)])), _VF)
                    builder.store(_fma(builder, d, sv, builder.load(acc[j])), acc[j])
            outs = [_hsum(builder, builder.load(a)) for a in acc]
            return context.make_tuple(builder, signature.return_type, outs)

        return sig, codegen

    return stream_dot


# One row per matrix for gate and up (their 2 or 4 streams already share each x load);
# two rows for down, whose x is 32 KiB of phases at F = 8192 (measured: four were slower).
stream_dot_1 = _make_stream_dot(1)
stream_dot_2 = _make_stream_dot(2)
