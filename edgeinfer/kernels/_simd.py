"""Explicit-SIMD building blocks for the quantized matmul, as Numba intrinsics.

Why not a plain Numba loop: over the MatMulNBits layout (a block of 32 4-bit values
is 16 bytes) LLVM either vectorises the 16-byte inner loop at a width it never
reaches (scalar code) or vectorises across blocks with gathers. Measured here: ~5 GB/s
at best. These intrinsics emit LLVM vector IR directly: one 16-lane vector per 16
bytes of a block, the block's scale applied to the vector, one horizontal sum per
output. The IR is target-neutral (LLVM legalises <16 x float> to AVX-512, AVX2 or
NEON registers); only `qdot_i8` uses an x86 instruction (VNNI) and is offered only
where the host has it.

Bytes and the values they hold (edgeinfer/format/quant.py): a byte carries P = 8 // bits
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

def _host_has(*names):
    # Numba compiles for the host unless NUMBA_CPU_NAME asks for another (e.g. a
    # portable cache); then the x86 instruction may not exist there.
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    features = llvm.get_host_cpu_features()
    return all(features.get(n) for n in names)


HAS_VNNI = _host_has("avx512vnni", "avx512bw")
HAS_AVX512 = _host_has("avx512f")      # vpermps over 16 lanes (kernels/_simd_stages.py)


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


def _row(builder, arr, row):
    """Pointer to row `row` of a 2-D array, by its own row stride: activations may be
    padded so that rows are not a multiple of 4 KiB apart (see quant._activation_rows)."""
    stride = cgutils.unpack_tuple(builder, arr.strides)[0]
    base = builder.bitcast(arr.data, ir.IntType(8).as_pointer())
    return builder.bitcast(builder.gep(base, [builder.mul(row, stride)]), arr.data.type)


def _step_scales(builder, srow, c, sh, two_blocks):
    """The scale of each lane of 16-byte step c as a vector. Normally one block spans
    2**sh steps (splat of one scale); with 8-byte blocks (4-bit block 16, 2-bit block
    32: scales passed as [N, nb/2, 2]) a step holds two blocks, 8 lanes each."""
    if not two_blocks:
        return _splat(builder, builder.load(builder.gep(srow, [builder.lshr(c, sh)])), _VF)
    pair = ir.VectorType(_F32, 2)
    two = _load_vec(builder, srow, builder.mul(c, _i64(2)), pair, 4)
    return builder.shuffle_vector(two, ir.Constant(pair, ir.Undefined),
                                  ir.Constant(_VI32, [0] * (W // 2) + [1] * (W // 2)))


def _load_vec(builder, base, offset, ty, align):
    return builder.load(builder.bitcast(builder.gep(base, [offset]), ty.as_pointer()), align=align)


def split_fields(builder, codes, vtype, lanes, bits, P):
    """The P bit fields of each lane of `codes` (a <lanes x iN> vector), low field first:
    field t = (codes >> bits*t) & mask; the top field needs no mask."""
    fmask = ir.Constant(vtype, [(1 << bits) - 1] * lanes)
    out = []
    for t in range(P):
        f = codes
        if t:
            f = builder.lshr(f, ir.Constant(vtype, [bits * t] * lanes))
        if t < P - 1:
            f = builder.and_(f, fmask)
        out.append(f)
    return out


def code_fields(builder, base, offset, P, bits):
    """The P fields of the 16 bytes at base[offset] as P <16 x float> (codes as stored,
    unsigned): field t of byte j is value P*j + t of the row."""
    codes = builder.zext(_load_vec(builder, base, offset, _VI8, 1), _VI32)
    return [builder.sitofp(f, _VF) for f in split_fields(builder, codes, _VI32, W, bits, P)]


def _block_correction(builder, srows, crows, b0, b1):
    """[[sum over blocks b0..b1 of s[b] * corr[b] for corr in crows] for s in srows]:
    the zero point's contribution, once per block instead of once per element."""
    zero = ir.Constant(_VF, [0.0] * W)
    vec = [[cgutils.alloca_once_value(builder, zero) for _ in crows] for _ in srows]
    tail = [[cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in crows]
            for _ in srows]
    vec_end = builder.sub(b1, builder.urem(builder.sub(b1, b0), _i64(W)))
    with cgutils.for_range(builder, builder.udiv(builder.sub(vec_end, b0), _i64(W))) as lp:
        b = builder.add(b0, builder.mul(lp.index, _i64(W)))
        cv = [_load_vec(builder, c, b, _VF, 4) for c in crows]
        for r, srow in enumerate(srows):
            sv = _load_vec(builder, srow, b, _VF, 4)
            for i in range(len(crows)):
                builder.store(_fma(builder, sv, cv[i], builder.load(vec[r][i])), vec[r][i])
    with cgutils.for_range(builder, b1, start=vec_end) as lp:
        for r, srow in enumerate(srows):
            sb = builder.load(builder.gep(srow, [lp.index]))
            for i, c in enumerate(crows):
                cb = builder.load(builder.gep(c, [lp.index]))
                builder.store(_fma(builder, sb, cb, builder.load(tail[r][i])), tail[r][i])
    return [[builder.fadd(_hsum(builder, builder.load(vec[r][i])), builder.load(tail[r][i]),
                          flags=_FM) for i in range(len(crows))] for r in range(len(srows))]


def _make_qdot_f32(R, Mt, U):
    """Intrinsic: R weight rows (n..n+R-1) times Mt activation rows (m..m+Mt-1), over
    16-byte steps c0..c1 of the packed rows, float32 arithmetic throughout.

    Returns a tuple of R*Mt float32 (row-major in r). `sh` = log2(steps per block).
    Unsigned codes are used as is; xcorr[m, b] = -zero_point * sum(x[m, block b]) adds
    the zero point back once per block (cheaper than subtracting it from every code).
    """

    @intrinsic
    def qdot(typingctx, packed, n, xs, m, scales, xcorr, c0, c1, sh):
        if not isinstance(xs, types.UniTuple) or 8 % xs.count or xs.count > 4:
            return None
        P = xs.count
        bits = 8 // P
        two_blocks = scales.ndim == 3
        sig = types.UniTuple(types.float32, R * Mt)(packed, n, xs, m, scales, xcorr, c0, c1, sh)

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
            xrow = [[_row(builder, a, v) for a in xarr] for v in xrows]
            zero = ir.Constant(_VF, [0.0] * W)
            acc = [[[cgutils.alloca_once_value(builder, zero) for _ in range(Mt)]
                    for _ in range(R)] for _ in range(U)]

            def step(c, u):
                g = builder.mul(c, _i64(W))
                xv = [[_load_vec(builder, xrow[i][t], g, _VF, 4) for t in range(P)]
                      for i in range(Mt)]
                for r in range(R):
                    fields = code_fields(builder, prow[r], g, P, bits)
                    sv = _step_scales(builder, srow[r], c, sh, two_blocks)
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

            crows = [builder.gep(xsma.data, [builder.mul(v, nb)]) for v in xrows]
            if two_blocks:
                b0, b1 = builder.mul(c0, _i64(2)), builder.mul(c1, _i64(2))
            else:
                b0, b1 = builder.lshr(c0, sh), builder.lshr(c1, sh)
            corr = _block_correction(builder, srow, crows, b0, b1)
            outs = []
            for r in range(R):
                for i in range(Mt):
                    tot = builder.load(acc[0][r][i])
                    for u in range(1, U):
                        tot = builder.fadd(tot, builder.load(acc[u][r][i]), flags=_FM)
                    outs.append(builder.fadd(_hsum(builder, tot), corr[r][i], flags=_FM))
            return context.make_tuple(builder, signature.return_type, outs)

        return sig, codegen

    return qdot


# GEMV, 1 row at a time, 2 interleaved accumulators (hides the FMA latency).
qdot_1x1 = _make_qdot_f32(R=1, Mt=1, U=2)
# GEMV for long rows: 4 weight rows share each load of x (x no longer fits in L1).
qdot_4x1 = _make_qdot_f32(R=4, Mt=1, U=1)


def _make_qgemm(R, Mt):
    """Intrinsic for M > 1: weight rows n..n+R-1 times activation rows m..m+Mt-1 over
    steps c0..c1 -> tuple of R*Mt float32 (row-major in r). Each 16-byte step is
    decoded once to float weights, (code - zp) * scale in one FMA per field, then used
    by all Mt rows: 2 FMAs per row per step (4-bit) against 3 in qdot_f32, whose
    per-row zero-point trick only pays off at M = 1; each x vector loaded serves R rows."""

    @intrinsic
    def qgemm(typingctx, packed, n, xs, m, scales, c0, c1, sh):
        if not isinstance(xs, types.UniTuple) or 8 % xs.count or xs.count > 4:
            return None
        P = xs.count
        bits = 8 // P
        two_blocks = scales.ndim == 3
        sig = types.UniTuple(types.float32, R * Mt)(packed, n, xs, m, scales, c0, c1, sh)

        def codegen(context, builder, signature, args):
            pk, n, xs_, m, sc, c0, c1, sh = args
            pka = context.make_array(signature.args[0])(context, builder, pk)
            sca = context.make_array(signature.args[4])(context, builder, sc)
            xarr = [context.make_array(signature.args[2].dtype)(context, builder, a)
                    for a in cgutils.unpack_tuple(builder, xs_, P)]
            _, nb, blob = cgutils.unpack_tuple(builder, pka.shape)
            rowbytes = builder.mul(nb, blob)
            rows = [builder.add(n, _i64(r)) for r in range(R)]
            prow = [builder.gep(pka.data, [builder.mul(v, rowbytes)]) for v in rows]
            srow = [builder.gep(sca.data, [builder.mul(v, nb)]) for v in rows]
            xrow = [[_row(builder, a, builder.add(m, _i64(i))) for a in xarr] for i in range(Mt)]
            zero = ir.Constant(_VF, [0.0] * W)
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(Mt)] for _ in range(R)]
            negzp = ir.Constant(_VF, [-float(1 << (bits - 1))] * W)
            with cgutils.for_range(builder, c1, start=c0) as lp:
                c = lp.index
                g = builder.mul(c, _i64(W))
                wv = []
                for r in range(R):
                    sv = _step_scales(builder, srow[r], c, sh, two_blocks)
                    zv = builder.fmul(sv, negzp, flags=_FM)
                    wv.append([_fma(builder, f, sv, zv) for f in code_fields(builder, prow[r], g, P, bits)])
                for i in range(Mt):
                    xv = [_load_vec(builder, xrow[i][t], g, _VF, 4) for t in range(P)]
                    for r in range(R):
                        a = builder.load(acc[r][i])
                        for t in range(P):
                            a = _fma(builder, wv[r][t], xv[t], a)
                        builder.store(a, acc[r][i])
            outs = [_hsum(builder, builder.load(acc[r][i])) for r in range(R) for i in range(Mt)]
            return context.make_tuple(builder, signature.return_type, outs)

        return sig, codegen

    return qgemm


# M > 1: 2 weight rows x 8 activation rows per step (16 accumulators: sized for the 32
# vector registers of AVX-512; LLVM spills on AVX2/NEON, a smaller block would suit
# those), and 2 x 4 for the remainder. Measured: 95 GFLOP/s on one core (1 x 8: 53;
# eight GEMVs: 45).
qgemm_2x8 = _make_qgemm(2, 8)
qgemm_2x4 = _make_qgemm(2, 4)


_I16 = ir.IntType(16)
_VI16 = ir.VectorType(_I16, W)
_VH = ir.VectorType(ir.HalfType(), W)


def _make_hdot(R, Mt, U):
    """Intrinsic: float16 weight rows n..n+R-1 (given as their uint16 bits) times
    activation rows m..m+Mt-1, float32 accumulation -> tuple of R*Mt float32."""

    @intrinsic
    def hdot(typingctx, w16, n, x, m):
        sig = types.UniTuple(types.float32, R * Mt)(w16, n, x, m)

        def codegen(context, builder, signature, args):
            wv, n, xv_, m = args
            wa = context.make_array(signature.args[0])(context, builder, wv)
            xa = context.make_array(signature.args[2])(context, builder, xv_)
            K = cgutils.unpack_tuple(builder, wa.shape)[1]
            wrow = [builder.gep(wa.data, [builder.mul(builder.add(n, _i64(r)), K)]) for r in range(R)]
            xrow = [_row(builder, xa, builder.add(m, _i64(i))) for i in range(Mt)]
            zero = ir.Constant(_VF, [0.0] * W)
            acc = [[[cgutils.alloca_once_value(builder, zero) for _ in range(Mt)] for _ in range(R)]
                   for _ in range(U)]
            tail = [[cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(Mt)]
                    for _ in range(R)]

            def step(k, u):
                wf = [builder.fpext(builder.bitcast(_load_vec(builder, w, k, _VI16, 2), _VH), _VF)
                      for w in wrow]
                for i in range(Mt):
                    xv = _load_vec(builder, xrow[i], k, _VF, 4)
                    for r in range(R):
                        a = acc[u][r][i]
                        builder.store(_fma(builder, wf[r], xv, builder.load(a)), a)

            nmain = builder.udiv(K, _i64(W * U))
            with cgutils.for_range(builder, nmain) as lp:
                base = builder.mul(lp.index, _i64(W * U))
                for u in range(U):
                    step(builder.add(base, _i64(W * u)), u)
            kvec = builder.sub(K, builder.urem(K, _i64(W)))
            with cgutils.for_range(builder, builder.udiv(builder.sub(kvec, builder.mul(nmain, _i64(W * U))), _i64(W))) as lp:
                step(builder.add(builder.mul(nmain, _i64(W * U)), builder.mul(lp.index, _i64(W))), 0)
            with cgutils.for_range(builder, K, start=kvec) as lp:
                for r in range(R):
                    h = builder.load(builder.gep(wrow[r], [lp.index]))
                    wf = builder.fpext(builder.bitcast(h, ir.HalfType()), _F32)
                    for i in range(Mt):
                        xs = builder.load(builder.gep(xrow[i], [lp.index]))
                        builder.store(_fma(builder, wf, xs, builder.load(tail[r][i])), tail[r][i])
            outs = []
            for r in range(R):
                for i in range(Mt):
                    tot = builder.load(acc[0][r][i])
                    for u in range(1, U):
                        tot = builder.fadd(tot, builder.load(acc[u][r][i]), flags=_FM)
                    outs.append(builder.fadd(_hsum(builder, tot), builder.load(tail[r][i]), flags=_FM))
            return context.make_tuple(builder, signature.return_type, outs)

        return sig, codegen

    return hdot


hdot_1x1 = _make_hdot(R=1, Mt=1, U=2)
hdot_2x8 = _make_hdot(R=2, Mt=8, U=1)
hdot_2x4 = _make_hdot(R=2, Mt=4, U=1)


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

    x8: P phase arrays int8 [M, K/P]; sx: float32 [M, nb], the x scale of each weight
    block; xcorr: float32 [M, nb] = -zero_point * sx * (sum of the block's x8);
    lanes_log2 = log2(blob / 4), the 32-bit lanes per weight block (blob >= 16, a
    power of 2). Per 64-byte step only the codes, P x8 vectors and a few scales are
    loaded: the activation side stays small enough for L1 at K = 11008.
    """

    @intrinsic
    def qdot(typingctx, packed, n, x8, m, scales, sx, xcorr, lanes_log2):
        if not isinstance(x8, types.UniTuple) or 8 % x8.count or x8.count > 4:
            return None
        P = x8.count
        bits = 8 // P
        sig = types.UniTuple(types.float32, Mt)(packed, n, x8, m, scales, sx, xcorr, lanes_log2)

        def codegen(context, builder, signature, args):
            pk, n, x8_, m, sc, sx_, xc_, llog = args
            pka = context.make_array(signature.args[0])(context, builder, pk)
            sca = context.make_array(signature.args[4])(context, builder, sc)
            sxa = context.make_array(signature.args[5])(context, builder, sx_)
            xca = context.make_array(signature.args[6])(context, builder, xc_)
            xarr = [context.make_array(signature.args[2].dtype)(context, builder, a)
                    for a in cgutils.unpack_tuple(builder, x8_, P)]
            _, nb, blob = cgutils.unpack_tuple(builder, pka.shape)
            rowbytes = builder.mul(nb, blob)
            prow = builder.gep(pka.data, [builder.mul(n, rowbytes)])
            srow = builder.gep(sca.data, [builder.mul(n, nb)])
            xrows = [builder.add(m, _i64(i)) for i in range(Mt)]
            xrow = [[_row(builder, a, v) for a in xarr] for v in xrows]
            sxrow = [builder.gep(sxa.data, [builder.mul(v, nb)]) for v in xrows]
            dp = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_VI32, [_VI32, _VI32, _VI32]),
                "llvm.x86.avx512.vpdpbusd.512")
            zero = ir.Constant(_VF, [0.0] * W)
            izero = ir.Constant(_VI32, [0] * W)
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(Mt)] for _ in range(U)]
            nsteps = builder.udiv(rowbytes, _i64(VW))

            def lane_scales(c, i, lanes_per_block):
                """s_w * s_x of each 32-bit lane of step c, as a 16-lane vector."""
                if lanes_per_block >= W:     # one block covers the whole step (or more)
                    b = builder.lshr(builder.mul(c, _i64(W)), llog)
                    s = builder.fmul(builder.load(builder.gep(srow, [b])),
                                     builder.load(builder.gep(sxrow[i], [b])), flags=_FM)
                    return _splat(builder, s, _VF)
                k = W // lanes_per_block
                vt = ir.VectorType(_F32, k)
                b = builder.mul(c, _i64(k))
                few = builder.fmul(_load_vec(builder, srow, b, vt, 4),
                                   _load_vec(builder, sxrow[i], b, vt, 4), flags=_FM)
                return builder.shuffle_vector(few, ir.Constant(vt, ir.Undefined), ir.Constant(
                    _VI32, [lane // lanes_per_block for lane in range(W)]))

            def step(c, u, lanes_per_block):
                g = builder.mul(c, _i64(VW))
                codes = _load_vec(builder, prow, g, _VI8x64, 1)
                fields = [builder.bitcast(f, _VI32) for f in split_fields(builder, codes, _VI8x64, VW, bits, P)]
                for i in range(Mt):
                    isum = izero
                    for t in range(P):
                        xv = builder.bitcast(_load_vec(builder, xrow[i][t], g, _VI8x64, 1), _VI32)
                        isum = builder.call(dp, [isum, fields[t], xv])
                    a = acc[u][i]
                    builder.store(_fma(builder, builder.sitofp(isum, _VF),
                                       lane_scales(c, i, lanes_per_block), builder.load(a)), a)

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
                            loop(W)   # lanes_per_block >= 16: broadcast (see lane_scales)
            crows = [builder.gep(xca.data, [builder.mul(v, nb)]) for v in xrows]
            corr = _block_correction(builder, [srow], crows, _i64(0), nb)[0]
            outs = []
            for i in range(Mt):
                tot = builder.load(acc[0][i])
                for u in range(1, U):
                    tot = builder.fadd(tot, builder.load(acc[u][i]), flags=_FM)
                outs.append(builder.fadd(_hsum(builder, tot), corr[i], flags=_FM))
            return context.make_tuple(builder, signature.return_type, outs)

        return sig, codegen

    return qdot


qdot_i8_1 = _make_qdot_i8(Mt=1, U=2)
qdot_i8_4 = _make_qdot_i8(Mt=4, U=1)
