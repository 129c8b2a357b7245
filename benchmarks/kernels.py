"""Kernel benchmark: quantized GEMV against this machine's memory bandwidth and
against onnxruntime's MatMulNBits on the same packed weights.

    python benchmarks/kernels.py                 # tables
    python benchmarks/kernels.py --json-file out.json  # tables, and the numbers as JSON
    python benchmarks/kernels.py --prefill       # also the M sweep (prefill / batches)
    python benchmarks/kernels.py --prefill-only --threads 1 2 --bits 4   # only the sweep

Decode reads every weight once per token, so the weights are streamed from DRAM:
each measurement cycles over enough copies of the matrix to exceed the last-level
cache (a single 28 MB int4 matrix would otherwise sit in a 32 MB L3 and flatter both
kernels). GB/s counts weight bytes (packed + scales) per call; the fraction is of the
memcpy bandwidth (read + write bytes of a 256 MiB numpy copy, best of several).
Two comparisons: our float32 path (the default) against MatMulNBits accuracy_level=0
(float32 compute), and our int8-activation path against accuracy_level=4 (int8
activations), each like for like. Times are the best of all rounds: on a shared
machine other work only ever adds time.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import time

import numba  # noqa: E402
import numpy as np
from edgeinfer.export.quantize import quantize  # noqa: E402

from edgeinfer.bench.report import write_json
from edgeinfer.cli.args import add_json
from edgeinfer.kernels import matmul_nbits  # noqa: E402
from edgeinfer.kernels.quant import int8_activations_supported  # noqa: E402

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


def _best(fns, reps: int, budget_s: float = 10.0) -> float:
    """Best seconds per call over `reps` rounds through all fns (one per weight copy),
    fewer rounds if a slow kernel would take longer than budget_s."""
    for fn in fns:
        fn()
    best, start = float("inf"), time.perf_counter()
    for _ in range(reps):
        best = min([best] + [_time(fn) for fn in fns])
        if time.perf_counter() - start > budget_s:
            break
    return best


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
        # onnx writes a newer IR than onnxruntime may load: pin it, as export/graph.py does.
        model = helper.make_model(graph, ir_version=10, opset_imports=[
            helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sessions.append(ort.InferenceSession(model.SerializeToString(), opts,
                                             providers=["CPUExecutionProvider"]))
    return sessions


def gemv_rows(args, memcpy):
    """One row per (bits, shape, threads): our float32 and int8-activation paths, and
    onnxruntime's MatMulNBits at accuracy_level 0 (float32) and 4 (int8 activations).

    All Numba runs come first, then all onnxruntime runs: measured here, a Numba run
    after onnxruntime sessions had run was up to 3x slower (two thread pools on 2 cores).
    """
    configs = [(bits, N, K) for bits in args.bits for N, K in SHAPES]
    rows = {(c, t): dict(bits=c[0], N=c[1], K=c[2], block=args.block_size, threads=t)
            for c in configs for t in args.threads}

    def record(row, name, seconds):
        row[f"{name}_ms"] = seconds * 1e3
        row[f"{name}_gbs"] = row["weight_bytes"] / seconds / 1e9
        row[f"{name}_frac_memcpy"] = row["weight_bytes"] / seconds / 1e9 / memcpy

    for engine in ("numba", "ort") if not args.no_ort else ("numba",):
        for c in configs:
            bits, N, K = c
            weights = _weights(N, K, bits, args.block_size, np.random.default_rng(c))
            x = np.random.default_rng(K).standard_normal((1, K), dtype=np.float32)
            out = np.empty((1, N), dtype=np.float32)
            for t in args.threads:
                row = rows[c, t]
                row["weight_bytes"] = weights[0][0].nbytes + weights[0][1].nbytes
                if engine == "numba":
                    numba.set_num_threads(t)
                    for name, i8 in (("numba", False), ("numba_int8", True)):
                        if i8 and not int8_activations_supported(bits, args.block_size, K):
                            continue
                        record(row, name, _best([lambda p=p, s=s, i8=i8: matmul_nbits(
                            x, p, s, bits, args.block_size, out=out, int8_activations=i8)
                            for p, s in weights], args.reps))
                else:
                    for name, level in (("ort", 0), ("ort_a4", 4)):
                        sess = ort_sessions(weights, N, K, bits, args.block_size, t, level)
                        record(row, name, _best([lambda s=s: s.run(None, {"x": x})
                                                 for s in sess], args.reps))
                        del sess
                        gc.collect()
            print(f"  measured {engine} int{bits} {N} x {K}", flush=True)
    return list(rows.values())


def prefill_rows(args, rng):
    """Time per call against M at one shape, per thread count: the fused kernels (what
    the executor runs for every M) beside dequantize + BLAS (kernels.dequant, the
    executor's prefill path before it was measured here) and, for float16 weights,
    matmul_f16 beside np.dot on the weights cast to float32.

    `+numba` columns time BLAS right after a parallel Numba kernel, as a prefill
    alternates them (attention, norms): two thread pools on the same cores."""
    from edgeinfer.kernels import matmul_f16
    try:
        from edgeinfer.kernels.dequant import prefill_matmul
    except ImportError:
        prefill_matmul = None
    rows = []
    N, K = SHAPES[0]
    weights = {bits: _weights(N, K, bits, args.block_size, rng)[0] for bits in args.bits}
    w16 = (rng.standard_normal((N, K), dtype=np.float32) * 0.02).astype(np.float16)
    for threads in args.threads:
        numba.set_num_threads(threads)
        for kind in [f"int{b}" for b in args.bits] + ["f16"]:
            for M in args.prefill_m:
                x = rng.standard_normal((M, K), dtype=np.float32)
                xs = x[:1]
                if kind == "f16":
                    ours = lambda: matmul_f16(x, w16)
                    paths = {"numba": ours,
                             "blas": lambda: np.dot(x, w16.T.astype(np.float32))}
                    paths["blas+numba"] = lambda: (matmul_f16(xs, w16), np.dot(x, w16.T.astype(np.float32)))
                else:
                    bits = int(kind[3:])
                    packed, scales = weights[bits]
                    ours = lambda: matmul_nbits(x, packed, scales, bits, args.block_size)
                    paths = {"numba": ours}
                    if int8_activations_supported(bits, args.block_size, K):
                        paths["numba_int8"] = lambda: matmul_nbits(x, packed, scales, bits, args.block_size,
                                                                   int8_activations=True)
                    if prefill_matmul is not None:
                        paths["blas"] = lambda: prefill_matmul(x, packed, scales, bits)
                        paths["blas+numba"] = lambda: (matmul_nbits(xs, packed, scales, bits, args.block_size),
                                                       prefill_matmul(x, packed, scales, bits))
                line = f"  {threads} thr {kind:4} M={M:4d}"
                for name, fn in paths.items():
                    t = _best([fn], 3 if M <= 64 else 2)
                    if name == "blas+numba":   # less the M = 1 Numba call it starts with
                        t -= _best([(lambda: matmul_f16(xs, w16)) if kind == "f16" else
                                    (lambda: matmul_nbits(xs, packed, scales, bits, args.block_size))], 3)
                    rows.append(dict(path=name, kind=kind, threads=threads, N=N, K=K, M=M, ms=t * 1e3,
                                     gflops=2 * M * N * K / t / 1e9))
                    line += f" | {name} {t * 1e3:7.1f} ms {2 * M * N * K / t / 1e9:5.1f} GF/s"
                print(line, flush=True)
    return rows


def _cell(row, name, memcpy_col=True):
    if f"{name}_ms" not in row:
        return f"{'-':>8} {'-':>6}" + (f" {'-':>6}" if memcpy_col else "")
    text = f"{row[name + '_ms']:8.3f} {row[name + '_gbs']:6.2f}"
    return text + (f" {100 * row[name + '_frac_memcpy']:5.1f}%" if memcpy_col else "")


def _ratio(row, ours, theirs):
    if f"{ours}_ms" in row and f"{theirs}_ms" in row:
        return f"{row[theirs + '_ms'] / row[ours + '_ms']:7.2f}x"
    return f"{'-':>8}"


def print_table(rows, ours, theirs, title):
    head = (f"{'kernel':6} {'N x K':>12} {'thr':>3} | {'numba ms':>8} {'GB/s':>6} {'memcpy':>6} | "
            f"{'ort ms':>8} {'GB/s':>6} | {'numba/ort':>9}")
    print(f"\n{title}")
    print("(memcpy: GB/s as a fraction of the memcpy bandwidth; numba/ort: ort time / numba "
          "time, > 1 when numba is faster)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"int{r['bits']:<3} {r['N']:>5} x {r['K']:<5} {r['threads']:>3} | {_cell(r, ours)} | "
              f"{_cell(r, theirs, False)} | {_ratio(r, ours, theirs):>9}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_json(ap, "the numbers", file=True)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=[2, 4, 8])
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--threads", type=int, nargs="+",
                    default=sorted({1, numba.config.NUMBA_NUM_THREADS}),
                    help="thread counts to measure (default: 1 and all cores)")
    ap.add_argument("--reps", type=int, default=20, help="rounds over the weight copies; best is kept")
    ap.add_argument("--no-ort", action="store_true", help="skip onnxruntime")
    ap.add_argument("--prefill", action="store_true", help="also time M = 1 .. 512 (each thread count)")
    ap.add_argument("--prefill-m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 512],
                    help="rows M of the --prefill sweep")
    ap.add_argument("--prefill-only", action="store_true", help="only the --prefill sweep (no GEMV tables)")
    ap.add_argument("--quick", action="store_true", help="int4 only, 5 rounds: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.bits, args.reps = [4], 5

    rng = np.random.default_rng(0)
    memcpy = memcpy_bandwidth(reps=8)
    print(f"{_cpu_name()}, {os.cpu_count()} cores; numba {numba.__version__}, numpy {np.__version__}")
    print(f"memcpy bandwidth (numpy copy of 256 MiB, read + write): {memcpy:.1f} GB/s")
    if not args.prefill_only:
        print(f"GEMV, M = 1, block {args.block_size}; weights streamed from DRAM "
              f"({STREAM_BYTES >> 20} MiB of copies per round), best of {args.reps} rounds")
    result = dict(memcpy_gbs=memcpy)
    rows = [] if args.prefill_only else gemv_rows(args, memcpy)
    if rows:
        print_table(rows, "numba", "ort", "float32 activations (the default) vs onnxruntime "
                "MatMulNBits accuracy_level=0")
    if any("numba_int8_ms" in r for r in rows):
        print_table(rows, "numba_int8", "ort_a4", "int8 activations (int8_activations=True) "
                    "vs onnxruntime MatMulNBits accuracy_level=4")
    result["gemv"] = rows
    if args.prefill or args.prefill_only:
        print(f"\nM sweep (prefill / batches), N x K = {SHAPES[0][0]} x {SHAPES[0][1]}, best-of times, "
              "GF/s = 2 M N K / time:")
        result["prefill"] = prefill_rows(args, rng)
    if args.json or args.json_file:
        write_json(result, stdout=args.json, path=args.json_file)


if __name__ == "__main__":
    main()
