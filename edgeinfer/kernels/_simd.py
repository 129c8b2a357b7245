"""Explicit-SIMD building blocks for the quantized matmul, as Numba intrinsics.

Why not a plain Numba loop: over the MatMulNBits layout (a block of 32 4-bit values
is 16 bytes) LLVM either vectorises the 16-byte inner loop at a width it never
reaches (scalar code) or vectorises across blocks with gathers. Measured here: ~5 GB/s
at best. These intrinsics emit LLVM vector IR directly: one 16-lane vector per 16
bytes of a block, the block's scale applied to the vector, one horizontal sum per
output. The IR is target-neutral (LLVM legalises <16 x float> to AVX-512, AVX2 or
NEON registers); only `qdot_i8` uses an x86 instruction (VNNI) and is offered only
where the host has it.

Bytes and the values they hold (export/quantize.py): a byte carries P = 8 // bits
values, field t (bits t*bits ..) being element P*j + t of the row. If x is split
into P phase arrays x_t = x[t::P], byte g of a row multiplies x_t[g] for every t:
all loads are contiguous.
"""
from __future__ import annotations

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

W = 16  # bytes of packed weights per vector step (one 16-lane float vector per field)

_F32, _I8, _I32, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(32), ir.IntType(64)
_VF, _VI8, _VI32 = ir.VectorType(_F32, W), ir.VectorType(_I8, W), ir.VectorType(_I32, W)
# No nnan/ninf: a NaN or inf in the activations must still show in the output.
_FM = ("reassoc", "contract", "nsz")

def _host_has_vnni():
    # Numba compiles for the host unless NUMBA_CPU_NAME asks for another (e.g. a
    # portable cache); then the x86 instruction may not exist there.
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512vnni") and features.get("avx512bw"))


HAS_VNNI = _host_has_vnni()


def _i64(v):
    return ir.Constant(_I64, v)


def _splat(builder, scalar, ty):
    vec = builder.insert_element(ir.Constant(ty, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, ir.Constant(ty, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, ty.count), [0] * ty.count))


def _hsum(builder, vec):
    fnty = ir.FunctionType(_F32, [_F32, vec.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty,
                                        f"llvm.vector.reduce.fadd.v{vec.type.count}f32")
    return builder.call(fn, [ir.Constant(_F32, 0.0), vec], fastmath=_FM)


def _fma(builder, a, b, c):
    return builder.fadd(c, builder.fmul(a, b, flags=_FM), flags=_FM)


def _load_vec(builder, base, offset, ty, align):
    return builder.load(builder.bitcast(builder.gep(base, [offset]), ty.as_pointer()), align=align)


def _make_qdot_f32(R, Mt, U):
    """Intrinsic: R weight rows (n..n+R-1) times Mt activation rows (m..m+Mt-1), over
    16-byte steps c0..c1 of the packed rows, float32 arithmetic throughout.

    Returns a tuple of R*Mt float32 (row-major in r). `sh` = log2(steps per block).
    Unsigned codes are used as is and the zero point is removed once per block via
    sum_b s[b] * xsum[b] (cheaper than subtracting it from every element).
    """

    @intrinsic
    def qdot(typingctx, packed, n, xs, m, scales, xsum, c0, c1, sh):
        if not isinstance(xs, types.UniTuple) or 8 % xs.count or xs.count > 4:
            return None
        P = xs.count
        bits = 8 // P
        sig = types.UniTuple(types.float32, R * Mt)(packed, n, xs, m, scales, xsum, c0, c1, sh)

        def codegen(context, builder, signature, args):
            pk, n, xs_, m, sc, xsm, c0, c1, sh = args
            pka = context.make_array(signature.args[0])(context, builder, pk)
            sca = context.make_array(signature.args[4])(context, builder, sc)
            xsma = context.make_array(signature.args[5])(context, builder, xsm)
            xarr = [context.make_array(signature.args[2].dtype)(context, builder, a)
                    for a in cgutils.unpack_tuple(builder, xs_, P)]
            _, nb, blob = cgutils.unpack_tuple(builder, pka.shape)
            rowbytes = builder.mul(nb, blob)   # == K // P == length of each x phase
            rows = [builder.add(n, _i64(r)) for r in range(R)]
            xrows = [builder.add(m, _i64(i)) for i in range(Mt)]
            prow = [builder.gep(pka.data, [builder.mul(v, rowbytes)]) for v in rows]
            srow = [builder.gep(sca.data, [builder.mul(v, nb)]) for v in rows]
            xrow = [[builder.gep(a.data, [builder.mul(v, rowbytes)]) for a in xarr] for v in xrows]
            zero = ir.Constant(_VF, [0.0] * W)
            acc = [[[cgutils.alloca_once_value(builder, zero) for _ in range(Mt)]
                    for _ in range(R)] for _ in range(U)]
            fmask = ir.Constant(_VI32, [(1 << bits) - 1] * W)

            def step(c, u):
                g = builder.mul(c, _i64(W))
                xv = [[_load_vec(builder, xrow[i][t], g, _VF, 4) for t in range(P)]
                      for i in range(Mt)]
                sidx = builder.lshr(c, sh)
                for r in range(R):
                    codes = builder.zext(_load_vec(builder, prow[r], g, _VI8, 1), _VI32)
                    fields = []
                    for t in range(P):
                        f = codes
                        if t:
                            f = builder.lshr(f, ir.Constant(_VI32, [bits * t] * W))
                        if t < P - 1:
                            f = builder.and_(f, fmask)
                        fields.append(builder.sitofp(f, _VF))
                    sv = _splat(builder, builder.load(builder.gep(srow[r], [sidx])), _VF)
                    for i in range(Mt):
                        d = builder.fmul(fields[0], xv[i][0], flags=_FM)
                        for t in range(1, P):
                            d = _fma(builder, fields[t], xv[i][t], d)
                        a = acc[u][r][i]
                        builder.store(_fma(builder, d, sv, builder.load(a)), a)

            nsteps = builder.sub(c1, c0)
            nmain = builder.udiv(nsteps, _i64(U))
            with cgutils.for_range(builder, nmain) as lp:
                base = builder.add(c0, builder.mul(lp.index, _i64(U)))
                for u in range(U):
                    step(builder.add(base, _i64(u)), u)
            with cgutils.for_range(builder, c1, start=builder.add(c0, builder.mul(nmain, _i64(U)))) as lp:
                step(lp.index, 0)

            # zero point: zp * sum over this range's blocks of s[r, b] * xsum[i, b]
            b0, b1 = builder.lshr(c0, sh), builder.lshr(c1, sh)
            corr = [[cgutils.alloca_once_value(builder, zero) for _ in range(Mt)] for _ in range(R)]
            corr1 = [[cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(Mt)]
                     for _ in range(R)]
            xsrow = [builder.gep(xsma.data, [builder.mul(v, nb)]) for v in xrows]
            bvec_end = builder.sub(b1, builder.urem(builder.sub(b1, b0), _i64(W)))
            with cgutils.for_range(builder, builder.udiv(builder.sub(bvec_end, b0), _i64(W))) as lp:
                bb = builder.add(b0, builder.mul(lp.index, _i64(W)))
                xv = [_load_vec(builder, xsrow[i], bb, _VF, 4) for i in range(Mt)]
                for r in range(R):
                    sv = _load_vec(builder, srow[r], bb, _VF, 4)
                    for i in range(Mt):
                        builder.store(_fma(builder, sv, xv[i], builder.load(corr[r][i])), corr[r][i])
            with cgutils.for_range(builder, b1, start=bvec_end) as lp:
                for r in range(R):
                    s = builder.load(builder.gep(srow[r], [lp.index]))
                    for i in range(Mt):
                        xsv = builder.load(builder.gep(xsrow[i], [lp.index]))
                        builder.store(_fma(builder, s, xsv, builder.load(corr1[r][i])), corr1[r][i])

            zp = ir.Constant(_F32, float(1 << (bits - 1)))
            outs = []
            for r in range(R):
                for i in range(Mt):
                    tot = builder.load(acc[0][r][i])
                    for u in range(1, U):
                        tot = builder.fadd(tot, builder.load(acc[u][r][i]), flags=_FM)
                    c = builder.fadd(_hsum(builder, builder.load(corr[r][i])),
                                     builder.load(corr1[r][i]), flags=_FM)
                    outs.append(builder.fsub(_hsum(builder, tot),
                                             builder.fmul(c, zp, flags=_FM), flags=_FM))
            return context.make_tuple(builder, signature.return_type, outs)

        return sig, codegen

    return qdot


# GEMV, 1 row at a time, 2 interleaved accumulators (hides the FMA latency).
qdot_1x1 = _make_qdot_f32(R=1, Mt=1, U=2)
# GEMV for long rows: 4 weight rows share each load of x (x no longer fits in L1).
qdot_4x1 = _make_qdot_f32(R=4, Mt=1, U=1)


def _make_qgemm(Mt):
    """Intrinsic for M > 1: weight row n times activation rows m..m+Mt-1 over steps
    c0..c1. Each 16-byte step is decoded once to float weights, (code - zp) * scale in
    one FMA per field, then used by all Mt rows: 2 FMAs per row per step (4-bit)
    against 3 in qdot_f32, whose per-row zero-point trick only pays off at M = 1."""

    @intrinsic
    def qgemm(typingctx, packed, n, xs, m, scales, c0, c1, sh):
        if not isinstance(xs, types.UniTuple) or 8 % xs.count or xs.count > 4:
            return None
        P = xs.count
        bits = 8 // P
        sig = types.UniTuple(types.float32, Mt)(packed, n, xs, m, scales, c0, c1, sh)

        def codegen(context, builder, signature, args):
            pk, n, xs_, m, sc, c0, c1, sh = args
            pka = context.make_array(signature.args[0])(context, builder, pk)
            sca = context.make_array(signature.args[4])(context, builder, sc)
            xarr = [context.make_array(signature.args[2].dtype)(context, builder, a)
                    for a in cgutils.unpack_tuple(builder, xs_, P)]
            _, nb, blob = cgutils.unpack_tuple(builder, pka.shape)
            rowbytes = builder.mul(nb, blob)
            prow = builder.gep(pka.data, [builder.mul(n, rowbytes)])
            srow = builder.gep(sca.data, [builder.mul(n, nb)])
            xrow = [[builder.gep(a.data, [builder.mul(builder.add(m, _i64(i)), rowbytes)])
                     for a in xarr] for i in range(Mt)]
            zero = ir.Constant(_VF, [0.0] * W)
            acc = [cgutils.alloca_once_value(builder, zero) for _ in range(Mt)]
            fmask = ir.Constant(_VI32, [(1 << bits) - 1] * W)
            negzp = ir.Constant(_F32, -float(1 << (bits - 1)))
            with cgutils.for_range(builder, c1, start=c0) as lp:
                c = lp.index
                g = builder.mul(c, _i64(W))
                s = builder.load(builder.gep(srow, [builder.lshr(c, sh)]))
                sv = _splat(builder, s, _VF)
                zv = _splat(builder, builder.fmul(s, negzp), _VF)
                codes = builder.zext(_load_vec(builder, prow, g, _VI8, 1), _VI32)
                wv = []
                for t in range(P):
                    f = codes
                    if t:
                        f = builder.lshr(f, ir.Constant(_VI32, [bits * t] * W))
                    if t < P - 1:
                        f = builder.and_(f, fmask)
                    wv.append(_fma(builder, builder.sitofp(f, _VF), sv, zv))
                for i in range(Mt):
                    a = builder.load(acc[i])
                    for t in range(P):
                        a = _fma(builder, wv[t], _load_vec(builder, xrow[i][t], g, _VF, 4), a)
                    builder.store(a, acc[i])
            outs = [_hsum(builder, builder.load(a)) for a in acc]
            return context.make_tuple(builder, signature.return_type, outs)

        return sig, codegen

    return qgemm


# M > 1: 8 activation rows per decoded weight vector (8 accumulators, 16 x loads per
# step), and 4 for the remainder.
qgemm_8 = _make_qgemm(8)
qgemm_4 = _make_qgemm(4)


_I16 = ir.IntType(16)
_VI16 = ir.VectorType(_I16, W)
_VH = ir.VectorType(ir.HalfType(), W)


def _make_hdot(Mt, U):
    """Intrinsic: float16 weight row n (given as its uint16 bits) times activation rows
    m..m+Mt-1, float32 accumulation. Returns a tuple of Mt float32."""

    @intrinsic
    def hdot(typingctx, w16, n, x, m):
        sig = types.UniTuple(types.float32, Mt)(w16, n, x, m)

        def codegen(context, builder, signature, args):
            wv, n, xv_, m = args
            wa = context.make_array(signature.args[0])(context, builder, wv)
            xa = context.make_array(signature.args[2])(context, builder, xv_)
            K = cgutils.unpack_tuple(builder, wa.shape)[1]
            wrow = builder.gep(wa.data, [builder.mul(n, K)])
            xrow = [builder.gep(xa.data, [builder.mul(builder.add(m, _i64(i)), K)]) for i in range(Mt)]
            zero = ir.Constant(_VF, [0.0] * W)
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(Mt)] for _ in range(U)]
            tail = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(Mt)]

            def step(k, u):
                wf = builder.fpext(builder.bitcast(_load_vec(builder, wrow, k, _VI16, 2), _VH), _VF)
                for i in range(Mt):
                    a = acc[u][i]
                    builder.store(_fma(builder, wf, _load_vec(builder, xrow[i], k, _VF, 4),
                                       builder.load(a)), a)

            nmain = builder.udiv(K, _i64(W * U))
            with cgutils.for_range(builder, nmain) as lp:
                base = builder.mul(lp.index, _i64(W * U))
                for u in range(U):
                    step(builder.add(base, _i64(W * u)), u)
            kvec = builder.sub(K, builder.urem(K, _i64(W)))
            with cgutils.for_range(builder, builder.udiv(builder.sub(kvec, builder.mul(nmain, _i64(W * U))), _i64(W))) as lp:
                step(builder.add(builder.mul(nmain, _i64(W * U)), builder.mul(lp.index, _i64(W))), 0)
            with cgutils.for_range(builder, K, start=kvec) as lp:
                wf = builder.fpext(builder.bitcast(builder.load(builder.gep(wrow, [lp.index])), ir.HalfType()), _F32)
                for i in range(Mt):
                    xs = builder.load(builder.gep(xrow[i], [lp.index]))
                    builder.store(_fma(builder, wf, xs, builder.load(tail[i])), tail[i])
            outs = []
            for i in range(Mt):
                tot = builder.load(acc[0][i])
                for u in range(1, U):
                    tot = builder.fadd(tot, builder.load(acc[u][i]), flags=_FM)
                outs.append(builder.fadd(_hsum(builder, tot), builder.load(tail[i]), flags=_FM))
            return context.make_tuple(builder, signature.return_type, outs)

        return sig, codegen

    return hdot


hdot_1 = _make_hdot(Mt=1, U=2)
hdot_4 = _make_hdot(Mt=4, U=1)
hdot_8 = _make_hdot(Mt=8, U=1)


# ---------------------------------------------------------------- int8 activations (VNNI)
# x quantized per weight block to int8 (scale max|x| / 127), products summed exactly in
# int32 by vpdpbusd (unsigned weight codes x signed activations, 4 per 32-bit lane,
# 64 per instruction), then scaled by s_w * s_x in float32: 4x fewer vector operations
# than the float path, the same trade llama.cpp (Q8_0 activations) and onnxruntime
# (MatMulNBits accuracy_level=4) make.
VW = 64                       # packed bytes per int8 step (one 512-bit register)
_VI8x64 = ir.VectorType(_I8, VW)


def _make_qdot_i8(Mt, U):
    """Intrinsic: weight row n times int8 activation rows m..m+Mt-1 -> tuple of Mt float32.

    x8: P phase arrays int8 [M, K/P]; sx: float32 [M, K/P/4], the x scale of each
    32-bit lane; corr: int32 [M, K/P/4] = -zero_point * (sum of the lane's x8 bytes);
    lanes_log2 = log2(blob / 4), the lanes per weight block (blob >= 16, a power of 2).
    """

    @intrinsic
    def qdot(typingctx, packed, n, x8, m, scales, sx, corr, lanes_log2):
        if not isinstance(x8, types.UniTuple) or 8 % x8.count or x8.count > 4:
            return None
        P = x8.count
        bits = 8 // P
        sig = types.UniTuple(types.float32, Mt)(packed, n, x8, m, scales, sx, corr, lanes_log2)

        def codegen(context, builder, signature, args):
            pk, n, x8_, m, sc, sx_, corr_, llog = args
            pka = context.make_array(signature.args[0])(context, builder, pk)
            sca = context.make_array(signature.args[4])(context, builder, sc)
            sxa = context.make_array(signature.args[5])(context, builder, sx_)
            cra = context.make_array(signature.args[6])(context, builder, corr_)
            xarr = [context.make_array(signature.args[2].dtype)(context, builder, a)
                    for a in cgutils.unpack_tuple(builder, x8_, P)]
            _, nb, blob = cgutils.unpack_tuple(builder, pka.shape)
            rowbytes = builder.mul(nb, blob)
            nlanes = builder.udiv(rowbytes, _i64(4))
            prow = builder.gep(pka.data, [builder.mul(n, rowbytes)])
            srow = builder.gep(sca.data, [builder.mul(n, nb)])
            xrows = [builder.add(m, _i64(i)) for i in range(Mt)]
            xrow = [[builder.gep(a.data, [builder.mul(v, rowbytes)]) for a in xarr] for v in xrows]
            sxrow = [builder.gep(sxa.data, [builder.mul(v, nlanes)]) for v in xrows]
            crrow = [builder.gep(cra.data, [builder.mul(v, nlanes)]) for v in xrows]
            dp = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_VI32, [_VI32, _VI32, _VI32]),
                "llvm.x86.avx512.vpdpbusd.512")
            zero = ir.Constant(_VF, [0.0] * W)
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(Mt)] for _ in range(U)]
            fmask = ir.Constant(_VI8x64, [(1 << bits) - 1] * VW)
            nsteps = builder.udiv(rowbytes, _i64(VW))

            def weight_scales(c, lanes_per_block):
                """The weight scale of each 32-bit lane of step c, as a 16-lane vector."""
                if lanes_per_block >= W:     # one block covers the whole step (or more)
                    b = builder.lshr(builder.mul(c, _i64(W)), llog)
                    return _splat(builder, builder.load(builder.gep(srow, [b])), _VF)
                k = W // lanes_per_block
                vt = ir.VectorType(_F32, k)
                few = _load_vec(builder, srow, builder.mul(c, _i64(k)), vt, 4)
                return builder.shuffle_vector(few, ir.Constant(vt, ir.Undefined), ir.Constant(
                    _VI32, [lane // lanes_per_block for lane in range(W)]))

            def step(c, u, lanes_per_block):
                g = builder.mul(c, _i64(VW))
                codes = _load_vec(builder, prow, g, _VI8x64, 1)
                fields = []
                for t in range(P):
                    f = codes
                    if t:
                        f = builder.lshr(f, ir.Constant(_VI8x64, [bits * t] * VW))
                    if t < P - 1:
                        f = builder.and_(f, fmask)
                    fields.append(builder.bitcast(f, _VI32))
                sw = weight_scales(c, lanes_per_block)
                lane0 = builder.mul(c, _i64(W))
                for i in range(Mt):
                    isum = _load_vec(builder, crrow[i], lane0, _VI32, 4)
                    for t in range(P):
                        xv = builder.bitcast(_load_vec(builder, xrow[i][t], g, _VI8x64, 1), _VI32)
                        isum = builder.call(dp, [isum, fields[t], xv])
                    s = builder.fmul(sw, _load_vec(builder, sxrow[i], lane0, _VF, 4), flags=_FM)
                    a = acc[u][i]
                    builder.store(_fma(builder, builder.sitofp(isum, _VF), s, builder.load(a)), a)

            def loop(lanes_per_block):
                nmain = builder.udiv(nsteps, _i64(U))
                with cgutils.for_range(builder, nmain) as lp:
                    base = builder.mul(lp.index, _i64(U))
                    for u in range(U):
                        step(builder.add(base, _i64(u)), u, lanes_per_block)
                with cgutils.for_range(builder, nsteps, start=builder.mul(nmain, _i64(U))) as lp:
                    step(lp.index, 0, lanes_per_block)

            # The lane -> block pattern is a compile-time shuffle: one loop per block size.
            is4 = builder.icmp_unsigned("==", llog, _i64(2))
            is8 = builder.icmp_unsigned("==", llog, _i64(3))
            with builder.if_else(is4) as (then4, other):
                with then4:
                    loop(4)
                with other:
                    with builder.if_else(is8) as (then8, rest):
                        with then8:
                            loop(8)
                        with rest:
                            loop(W)   # lanes_per_block >= 16: broadcast (see weight_scales)
            outs = []
            for i in range(Mt):
                tot = builder.load(acc[0][i])
                for u in range(1, U):
                    tot = builder.fadd(tot, builder.load(acc[u][i]), flags=_FM)
                outs.append(_hsum(builder, tot))
            return context.make_tuple(builder, signature.return_type, outs)

        return sig, codegen

    return qdot


qdot_i8_1 = _make_qdot_i8(Mt=1, U=2)
qdot_i8_4 = _make_qdot_i8(Mt=4, U=1)
