"""Explicit-SIMD dot and axpy over one part of a row-column bundle record
(edgeinfer/format/bundle.py), as Numba intrinsics: the inner loops of the
sparse bundled FFN (kernels/ffn.py).

Same reason as kernels/_simd.py: a plain Numba loop over 16-byte blocks of 4-bit
codes is vectorised badly by LLVM (measured 1.4 GB/s of records on one core here);
emitting one 16-lane vector per 16 bytes of codes directly is several times faster.
Differences from _simd: the codes and their float16 scales live in the same record
(scales are decoded with fpext from half), and rows are records picked by index.

A part is `nsteps` 16-byte steps of codes at byte `qoff` of the record, its block
scales float16 at byte `soff`; step c belongs to block c >> sh. A byte holds
P = 8 // bits codes, field t multiplying x[t::P] (x given as phases xph[t]).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from edgeinfer.kernels._simd import (
    _F32,
    _FM,
    _I16,
    _VF,
    _VH,
    _VI16,
    W,
    _fma,
    _hsum,
    _i64,
    _load_vec,
    _splat,
    code_fields,
)


def _rec_ptr(builder, arr, row):
    """uint8* to record `row` of a 2-D uint8 array (by its row stride)."""
    stride = cgutils.unpack_tuple(builder, arr.strides)[0]
    return builder.gep(arr.data, [builder.mul(row, stride)])


def _phase_ptrs(builder, arr, P):
    stride = cgutils.unpack_tuple(builder, arr.strides)[0]
    base = builder.bitcast(arr.data, ir.IntType(8).as_pointer())
    return [builder.bitcast(builder.gep(base, [builder.mul(_i64(t), stride)]), arr.data.type) for t in range(P)]


def _half_at(builder, rec, byte_off):
    """float32 value of the float16 at rec[byte_off] (any alignment)."""
    p = builder.bitcast(builder.gep(rec, [byte_off]), _I16.as_pointer())
    return builder.fpext(builder.bitcast(builder.load(p, align=1), ir.HalfType()), _F32)


def _halves_at(builder, rec, byte_off):
    """<16 x float> of the 16 float16 at rec[byte_off]."""
    p = builder.bitcast(builder.gep(rec, [byte_off]), _VI16.as_pointer())
    return builder.fpext(builder.bitcast(builder.load(p, align=1), _VH), _VF)


def _blocks_dot(builder, rec, soff, vals, nblocks):
    """sum over blocks b of half(rec[soff + 2b]) * vals[b] (vals float32*)."""
    acc = cgutils.alloca_once_value(builder, ir.Constant(_VF, [0.0] * W))
    tail = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
    nvec = builder.udiv(nblocks, _i64(W))
    with cgutils.for_range(builder, nvec) as lp:
        b = builder.mul(lp.index, _i64(W))
        sv = _halves_at(builder, rec, builder.add(soff, builder.mul(b, _i64(2))))
        builder.store(_fma(builder, sv, _load_vec(builder, vals, b, _VF, 4), builder.load(acc)), acc)
    with cgutils.for_range(builder, nblocks, start=builder.mul(nvec, _i64(W))) as lp:
        s = _half_at(builder, rec, builder.add(soff, builder.mul(lp.index, _i64(2))))
        v = builder.load(builder.gep(vals, [lp.index]))
        builder.store(_fma(builder, s, v, builder.load(tail)), tail)
    return builder.fadd(_hsum(builder, builder.load(acc)), builder.load(tail), flags=_FM)


def _make_bdot(bits, U=2):
    P = 8 // bits

    @intrinsic
    def bdot(typingctx, records, row, qoff, nsteps, soff, sh, xph, xcorr):
        """dot(dequantized part of records[row], x) -> float32. xph [P, d/P] float32
        phases of x; xcorr[b] = -zero_point * sum(x in block b) restores the zero
        point once per block (cheaper than subtracting it from every code)."""
        sig = types.float32(records, row, qoff, nsteps, soff, sh, xph, xcorr)

        def codegen(context, builder, signature, args):
            ra, row, qoff, nsteps, soff, sh, xa, xc = args
            rarr = context.make_array(signature.args[0])(context, builder, ra)
            xarr = context.make_array(signature.args[6])(context, builder, xa)
            carr = context.make_array(signature.args[7])(context, builder, xc)
            rec = _rec_ptr(builder, rarr, row)
            codes = builder.gep(rec, [qoff])
            xs = _phase_ptrs(builder, xarr, P)
            zero = ir.Constant(_VF, [0.0] * W)
            acc = [cgutils.alloca_once_value(builder, zero) for _ in range(U)]

            def step(c, u):
                g = builder.mul(c, _i64(W))
                f = code_fields(builder, codes, g, P, bits)
                d = builder.fmul(f[0], _load_vec(builder, xs[0], g, _VF, 4), flags=_FM)
                for t in range(1, P):
                    d = _fma(builder, f[t], _load_vec(builder, xs[t], g, _VF, 4), d)
                s = _splat(builder, _half_at(builder, rec, builder.add(soff, builder.shl(builder.lshr(c, sh), _i64(1)))), _VF)
                builder.store(_fma(builder, d, s, builder.load(acc[u])), acc[u])

            nmain = builder.udiv(nsteps, _i64(U))
            with cgutils.for_range(builder, nmain) as lp:
                base = builder.mul(lp.index, _i64(U))
                for u in range(U):
                    step(builder.add(base, _i64(u)), u)
            with cgutils.for_range(builder, nsteps, start=builder.mul(nmain, _i64(U))) as lp:
                step(lp.index, 0)
            tot = builder.load(acc[0])
            for u in range(1, U):
                tot = builder.fadd(tot, builder.load(acc[u]), flags=_FM)
            nblocks = builder.lshr(nsteps, sh)
            corr = _blocks_dot(builder, rec, soff, carr.data, nblocks)
            return builder.fadd(_hsum(builder, tot), corr, flags=_FM)

        return sig, codegen

    return bdot


def _make_baxpy(bits):
    P = 8 // bits

    @intrinsic
    def baxpy(typingctx, records, row, qoff, nsteps, soff, sh, h, yph, ycorr):
        """yph[t] += h * (codes field t) * scale for the part of records[row];
        ycorr[b] += h * scale[b] (the caller subtracts zero_point * ycorr[b] from
        block b of y once at the end)."""
        sig = types.void(records, row, qoff, nsteps, soff, sh, h, yph, ycorr)

        def codegen(context, builder, signature, args):
            ra, row, qoff, nsteps, soff, sh, h, ya, yc = args
            rarr = context.make_array(signature.args[0])(context, builder, ra)
            yarr = context.make_array(signature.args[7])(context, builder, ya)
            carr = context.make_array(signature.args[8])(context, builder, yc)
            h = context.cast(builder, h, signature.args[6], types.float32)
            rec = _rec_ptr(builder, rarr, row)
            codes = builder.gep(rec, [qoff])
            ys = _phase_ptrs(builder, yarr, P)
            with cgutils.for_range(builder, nsteps) as lp:
                c = lp.index
                g = builder.mul(c, _i64(W))
                sc = _half_at(builder, rec, builder.add(soff, builder.shl(builder.lshr(c, sh), _i64(1))))
                s = _splat(builder, builder.fmul(sc, h, flags=_FM), _VF)
                f = code_fields(builder, codes, g, P, bits)
                for t in range(P):
                    p = builder.bitcast(builder.gep(ys[t], [g]), _VF.as_pointer())
                    builder.store(_fma(builder, f[t], s, builder.load(p, align=4)), p, align=4)
            nblocks = builder.lshr(nsteps, sh)
            hv = _splat(builder, h, _VF)
            nvec = builder.udiv(nblocks, _i64(W))
            with cgutils.for_range(builder, nvec) as lp:
                b = builder.mul(lp.index, _i64(W))
                sv = _halves_at(builder, rec, builder.add(soff, builder.mul(b, _i64(2))))
                p = builder.bitcast(builder.gep(carr.data, [b]), _VF.as_pointer())
                builder.store(_fma(builder, sv, hv, builder.load(p, align=4)), p, align=4)
            with cgutils.for_range(builder, nblocks, start=builder.mul(nvec, _i64(W))) as lp:
                s = _half_at(builder, rec, builder.add(soff, builder.mul(lp.index, _i64(2))))
                p = builder.gep(carr.data, [lp.index])
                builder.store(_fma(builder, s, h, builder.load(p)), p)
            return context.get_dummy_value()

        return sig, codegen

    return baxpy


bdot4, bdot8 = _make_bdot(4), _make_bdot(8)
baxpy4, baxpy8 = _make_baxpy(4), _make_baxpy(8)
