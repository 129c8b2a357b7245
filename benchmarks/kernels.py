"""Kernel benchmark: quantized GEMV against this machine's memory bandwidth and
against onnxruntime's MatMulNBits on the same packed weights.

    python benchmarks/kernels.py                 # table
    python benchmarks/kernels.py --json out.json # table, and the numbers as JSON
    python benchmarks/kernels.py --prefill       # also the M sweep (GEMV -> GEMM path)

Decode reads every weight once per token, so the weights are streamed from DRAM:
each measurement cycles over enough copies of the matrix to exceed the last-level
cache (a single 28 MB int4 matrix would otherwise sit in a 32 MB L3 and flatter both
kernels). GB/s counts weight bytes (packed + scales) per call; the fraction is of the
memcpy bandwidth (read + write bytes of a 256 MiB numpy copy, best of several).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba  # noqa: E402

from edgeinfer.kernels import matmul_nbits  # noqa: E402
from export.quantize import quantize  # noqa: E402

SHAPES = ((11008, 4096), (4096, 11008))   # (N, K): up/gate-like and down-like
STREAM_BYTES = 160 << 20                  # weights touched per measurement cycle


def memcpy_bandwidth(reps: int) -> float:
    """GB/s of a numpy copy of 256 MiB, read + write bytes, best of `reps`."""
    src = np.ones(256 << 18, dtype=np.float32)
    dst = np.empty_like(src)
    best = min(_time(lambda: np.copyto(dst, src)) for _ in range(reps))
    return 2 * src.nbytes / best / 1e9


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _best(fns, reps: int) -> float:
    """Best seconds per call over `reps` rounds through all fns (one per weight copy)."""
    for fn in fns:
        fn()
    return min(_time(fn) for _ in range(reps) for fn in fns)


def _weights(N, K, bits, block, rng):
    w = rng.standard_normal((N, K), dtype=np.float32) * 0.02
    packed, scales = quantize(w, bits, block)
    copies = max(2, -(-STREAM_BYTES // (packed.nbytes + scales.nbytes)))
    return [(packed.copy(), scales.copy()) for _ in range(copies)]


def ort_sessions(weights, N, K, bits, block, threads, accuracy_level):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    sessions = []
    for packed, scales in weights:
        node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft",
                                K=K, N=N, bits=bits, block_size=block,
                                accuracy_level=accuracy_level)
        graph = helper.make_graph(
            [node], "gemv",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
            initializer=[numpy_helper.from_array(packed, "w"),
                         numpy_helper.from_array(scales.reshape(-1), "s")])
        # onnx writes a newer IR than onnxruntime may load: pin it (DESIGN.md).
        model = helper.make_model(graph, ir_version=10, opset_imports=[
            helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sessions.append(ort.InferenceSession(model.SerializeToString(), opts,
                                             providers=["CPUExecutionProvider"]))
    return sessions


def gemv_rows(args, memcpy, rng):
    rows = []
    for bits in args.bits:
        for N, K in SHAPES:
            weights = _weights(N, K, bits, args.block_size, rng)
            nbytes = weights[0][0].nbytes + weights[0][1].nbytes
            x = rng.standard_normal((1, K), dtype=np.float32)
            out = np.empty((1, N), dtype=np.float32)
            for threads in args.threads:
                numba.set_num_threads(threads)
                ours = _best([lambda p=p, s=s: matmul_nbits(x, p, s, bits, args.block_size, out=out)
                              for p, s in weights], args.reps)
                row = dict(bits=bits, N=N, K=K, block=args.block_size, threads=threads,
                           weight_bytes=nbytes, numba_ms=ours * 1e3, numba_gbs=nbytes / ours / 1e9,
                           numba_frac_memcpy=nbytes / ours / 1e9 / memcpy)
                if not args.no_ort:
                    sess = ort_sessions(weights, N, K, bits, args.block_size, threads,
                                        args.ort_accuracy_level)
                    theirs = _best([lambda s=s: s.run(None, {"x": x}) for s in sess], args.reps)
                    row.update(ort_ms=theirs * 1e3, ort_gbs=nbytes / theirs / 1e9,
                               speedup_vs_ort=theirs / ours)
                    del sess
                rows.append(row)
                _print_gemv(row)
    return rows


def prefill_rows(args, rng):
    """Time per call against M at one shape: where the fused path hands over to BLAS."""
    rows = []
    N, K = SHAPES[0]
    numba.set_num_threads(max(args.threads))
    for bits in args.bits:
        packed, scales = _weights(N, K, bits, args.block_size, rng)[0]
        for M in (1, 2, 4, 8, 12, 16, 24, 32, 64, 128, 512):
            x = rng.standard_normal((M, K), dtype=np.float32)
            t = _best([lambda: matmul_nbits(x, packed, scales, bits, args.block_size)], 3)
            rows.append(dict(bits=bits, N=N, K=K, M=M, ms=t * 1e3, gflops=2 * M * N * K / t / 1e9))
            print(f"  prefill int{bits} M={M:4d}  {t * 1e3:8.2f} ms  {2 * M * N * K / t / 1e9:7.1f} GFLOP/s")
    return rows


_HEADER = (f"{'kernel':6} {'N x K':>12} {'thr':>3} | {'numba ms':>8} {'GB/s':>6} {'of memcpy':>9} | "
           f"{'ort ms':>7} {'GB/s':>6} | {'numba/ort':>9}")


def _print_gemv(r):
    ort = (f"{r['ort_ms']:7.3f} {r['ort_gbs']:6.2f} | {r['speedup_vs_ort']:8.2f}x"
           if "ort_ms" in r else f"{'-':>7} {'-':>6} | {'-':>9}")
    print(f"int{r['bits']:<3} {r['N']:>5} x {r['K']:<5} {r['threads']:>3} | {r['numba_ms']:8.3f} "
          f"{r['numba_gbs']:6.2f} {100 * r['numba_frac_memcpy']:8.1f}% | {ort}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=[2, 4, 8])
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--threads", type=int, nargs="+",
                    default=sorted({1, numba.config.NUMBA_NUM_THREADS}),
                    help="thread counts to measure (default: 1 and all cores)")
    ap.add_argument("--reps", type=int, default=20, help="rounds over the weight copies; best is kept")
    ap.add_argument("--no-ort", action="store_true", help="skip onnxruntime")
    ap.add_argument("--ort-accuracy-level", type=int, default=0,
                    help="MatMulNBits accuracy_level (0: float32 compute, 4: int8 activations)")
    ap.add_argument("--prefill", action="store_true", help="also time M = 1 .. 512 (all threads)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    memcpy = memcpy_bandwidth(reps=8)
    print(f"{_cpu_name()}, {os.cpu_count()} cores; numba {numba.__version__}, numpy {np.__version__}")
    print(f"memcpy bandwidth (numpy copy of 256 MiB, read + write): {memcpy:.1f} GB/s")
    print(f"GEMV, M = 1, block {args.block_size}; weights streamed from DRAM "
          f"({STREAM_BYTES >> 20} MiB of copies per round), best of {args.reps} rounds")
    print(_HEADER)
    print("-" * len(_HEADER))
    result = dict(memcpy_gbs=memcpy, gemv=gemv_rows(args, memcpy, rng))
    if args.prefill:
        result["prefill"] = prefill_rows(args, rng)
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
