"""Random O_DIRECT reads per second by read size, io_uring depth and pread threads, side by side.

    python benchmarks/reads.py                        # a 512 MiB temp file in the current folder
    python benchmarks/reads.py --file /tmp/syn/wide-sparse-8l/ffn.bin --sizes 8K 12K 1M
    python benchmarks/reads.py --json-file out.json   # also every number as JSON (--json: stdout)

Small random reads are latency-bound, so their rate grows with the reads in flight until
the device saturates; this is what sets a streamed token's I/O time (reads per token /
reads per second). Each configuration reads batches of distinct random chunk-aligned
offsets through storage.WeightFile.read_batch (no merging) for --seconds; configurations
alternate over --rounds so drift reaches each alike; the best round is reported.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeinfer.bench.report import write_json
from edgeinfer.cli.args import add_json
from edgeinfer.io import WeightFile, aligned_empty  # noqa: E402
from edgeinfer.units import fmt_bytes  # noqa: E402


def size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    n = int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)
    if n <= 0 or n % 4096:
        raise argparse.ArgumentTypeError(f"{text}: sizes must be positive multiples of 4 KiB")
    return n


def measure(wf: WeightFile, chunk: int, seconds: float, rng) -> float:
    slots = wf.size // chunk
    n = int(min(slots, max(64, (8 << 20) // chunk)))
    out = aligned_empty(n * chunk)
    lengths = np.full(n, chunk, dtype=np.int64)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        offsets = rng.choice(slots, n, replace=False).astype(np.int64) * chunk
        wf.read_batch(np.stack([offsets, lengths], axis=1), out=out, max_gap=-1)
        done += n
    return done / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", type=Path, help="an existing file to read (default: a temp file in --dir)")
    ap.add_argument("--dir", type=Path, default=Path("."), help="where the temp file goes (default: .)")
    ap.add_argument("--sizes", type=size, nargs="+", default=[size(s) for s in ("4K", "8K", "12K", "32K", "1M")])
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 32, 128, 256],
                    help="io_uring reads in flight; 0 = pread threads (default: 0 32 128 256)")
    ap.add_argument("--io-threads", "--threads", dest="threads", type=int, default=16,
                    help="read (pread) threads for depth 0 (default: 16)")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
    add_json(ap, "the numbers", file=True)
    args = ap.parse_args()
    if min(args.depths) < 0 or args.threads < 1 or args.seconds <= 0 or args.rounds < 1:
        ap.error("--depths must be >= 0, --io-threads and --rounds >= 1, --seconds > 0")
    if args.file is not None and not args.file.is_file():
        ap.error(f"--file {args.file}: no such file")

    tmp = None
    path = args.file
    if path is None:
        fd, name = tempfile.mkstemp(prefix="edgeinfer-reads-", dir=args.dir)
        with os.fdopen(fd, "wb") as f:
            block = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
            for _ in range(512):
                f.write(block)
        path = tmp = Path(name)
    rng = np.random.default_rng(1)
    best: dict[tuple[int, int], float] = {}
    try:
        files = {d: WeightFile(path, queue_depth=d, threads=args.threads) for d in args.depths}
        for _ in range(args.rounds):
            for chunk in args.sizes:
                for d, wf in files.items():
                    rate = measure(wf, chunk, args.seconds, rng)
                    best[(chunk, d)] = max(best.get((chunk, d), 0.0), rate)
        modes = {d: wf.read_mode for d, wf in files.items()}
        for wf in files.values():
            if wf.queue_depth != 0 and not wf._rings:
                print(f"note: depth {wf.queue_depth}: no io_uring here, pread threads were used", file=sys.stderr)
            wf.close()
    finally:
        if tmp is not None:
            tmp.unlink()

    cols = [f"depth {d}" if d else f"{args.threads} threads" for d in args.depths]
    print(f"random reads per second (thousands), {path} ({modes[args.depths[0]]} I/O), best of {args.rounds}")
    print(f"{'size':>8}" + "".join(f"{c:>14}" for c in cols))
    for chunk in args.sizes:
        print(f"{fmt_bytes(chunk):>8}" + "".join(f"{best[(chunk, d)] / 1e3:>14.1f}" for d in args.depths))
    if args.json or args.json_file:
        rows = [{"bytes": c, "depth": d, "threads": args.threads if d == 0 else 1, "reads_per_s": best[(c, d)],
                 "gbps": best[(c, d)] * c / 1e9} for c in args.sizes for d in args.depths]
        write_json({"file": str(path), "rows": rows}, stdout=args.json, path=args.json_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
