"""Sparse bundled FFN kernel (edgeinfer/kernels/ffn.py): the explicit-SIMD path beside
the plain Numba loop, on one decode token over random int4 records of a 7B-like layer,
with this machine's memory copy bandwidth for scale. Records hold random codes, so
about half the gates are positive (as a dense ReLU layer; the streamed set is sparser).

    python benchmarks/ffn.py [--hidden 4096] [--neurons 2048] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from edgeinfer.format.bundle import BundleLayout
from edgeinfer.kernels import ffn
from edgeinfer.units import fmt_bytes


def _best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--neurons", type=int, default=2048, help="records in the active set")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, numba.config.NUMBA_NUM_THREADS])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    lay = BundleLayout(args.hidden, args.neurons, args.bits, 32, True)
    rng = np.random.default_rng(0)
    records = rng.integers(0, 256, (args.neurons, lay.record_bytes), dtype=np.uint8)
    scales = np.full(lay.parts * lay.n_groups, 0.01, np.float16).view(np.uint8)
    records[:, lay.scale_offset:lay.scale_offset + scales.size] = scales
    x = rng.standard_normal((1, args.hidden), dtype=np.float32)
    src = np.ones(records.nbytes, np.uint8)
    dst = np.empty_like(src)
    memcpy = records.nbytes / _best(lambda: np.copyto(dst, src), args.reps) / 1e9
    print(f"bundled FFN, int{args.bits}, hidden {args.hidden}, {args.neurons} neurons x {lay.record_bytes} B "
          f"records ({fmt_bytes(records.nbytes)}); memcpy {memcpy:.1f} GB/s")
    print(f"{'threads':>7} | {'SIMD GB/s':>9} {'% memcpy':>8} | {'loop GB/s':>9} | {'ratio':>5}")
    for t in args.threads:
        numba.set_num_threads(t)
        rates = {}
        for simd in (True, False):
            ffn.SIMD = simd
            rates[simd] = records.nbytes / _best(lambda: ffn.bundled_ffn(x, records, lay, "relu"), args.reps) / 1e9
        ffn.SIMD = True
        print(f"{t:>7} | {rates[True]:>9.2f} {100 * rates[True] / memcpy:>7.0f}% | {rates[False]:>9.2f} | "
              f"{rates[True] / rates[False]:>4.1f}x")


if __name__ == "__main__":
    main()
