"""MoE expert offloading benchmark: decode ms/token under a memory budget, side by side.

    python benchmarks/moe.py                       # synthetic Mixtral-like model, built in a temp dir
    python benchmarks/moe.py --json-file out.json  # the table, and the numbers as JSON (--json: stdout)
    python benchmarks/moe.py --work /tmp/moe-bench # keep (and reuse) the checkpoint and the export
    python benchmarks/moe.py --model MODEL_DIR     # an exported MoE folder instead

Rows (one run, one model, one budget; the page cache bypassed: experts are read with
O_DIRECT through storage.WeightFile):
  (a) lru           on-demand loading at full precision, LRU expert cache
  (b) lru+prefetch  (a) + layer-level prefetch of the next layer's guessed experts
  (c) hobbit t=T     (b) + mixed precision (a miss whose gate weight is below T, from
                    --threshold, reads the int4 prefix of the nested record) + the
                    multidimensional (recency, frequency, precision) cache policy
Each row decodes the same token sequence (teacher-forced text, so low precision cannot
change the workload), `--tokens` steps after a `--prompt-tokens` prefill; rounds alternate
the rows so machine-load drift reaches every row alike. ms/token is the median step.

The synthetic model is labelled SYNTHETIC everywhere: edgeinfer.bench.synthetic's
mixtral-like checkpoint at the shapes given here (default hidden 2048, 8 experts x FFN
8192, 2 layers), its routers fitted so each layer's expert usage matches the trained
fixture's (tests/fixtures/models/fixtures_metrics.json, mixtral-8x-16m). It is written
under --work (a temp dir by default, removed afterwards), never inside the repository.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numba

ROOT = Path(__file__).resolve().parent.parent

import edgeinfer  # noqa: E402
from edgeinfer.bench.report import write_json
from edgeinfer.bench.synthetic import write_checkpoint  # noqa: E402
from edgeinfer.cli.args import add_json
from edgeinfer.format.constants import EXPERTS_FILE, MANIFEST, TOKENIZER_FILE  # noqa: E402
from edgeinfer.runtime.options import EXPERT_LOW_QUANTS
from edgeinfer.streaming.moe.op import runtime_of  # noqa: E402
from edgeinfer.units import fmt_bytes  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
USAGE = FIXTURES / "models" / "fixtures_metrics.json"
TEXT = FIXTURES / "data" / "wikitext2_test_head.txt"
ROWS = {
    "a": ("(a) lru", dict(expert_policy="lru", prefetch=False, expert_low_threshold=0.0)),
    "b": ("(b) lru+prefetch", dict(expert_policy="lru", prefetch=True, expert_low_threshold=0.0)),
    "c": ("(c) hobbit", dict(expert_policy="hobbit", prefetch=True)),
}


# ---- measurement -------------------------------------------------------------------------------
def _decode(model, ids, prompt_tokens):
    cache = model.new_cache()
    model.forward(ids[:prompt_tokens], cache)
    before = model.stats.snapshot()
    counts0 = dict(runtime_of(model).counts)
    times = []
    for t in ids[prompt_tokens:]:
        t0 = time.perf_counter()
        model.forward([t], cache)
        times.append(time.perf_counter() - t0)
    after = model.stats.snapshot()
    counts = {k: v - counts0.get(k, 0) for k, v in runtime_of(model).counts.items()}
    return times, model.stats.delta(after, before), counts


def run(args) -> dict:
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="edgeinfer-moe-bench-"))
    synthetic = None
    try:
        if args.model:
            folder = Path(args.model)
        else:
            tag = f"mixtral-h{args.hidden}-f{args.ffn}-e{args.experts}-l{args.layers}"
            ckpt = work / f"{tag}.hf"
            if not (ckpt / "config.json").exists():
                print(f"writing the SYNTHETIC checkpoint {ckpt} ...", file=sys.stderr, flush=True)
                usage = json.loads(USAGE.read_text())["mixtral-8x-16m"]["expert_usage_per_layer"]
                write_checkpoint(ckpt, "mixtral-like", layers=args.layers, hidden=args.hidden, ffn=args.ffn,
                                 experts=args.experts, expert_usage=usage, force=True)
            synthetic = json.loads((ckpt / "config.json").read_text())["edgeinfer_synthetic"]
            folder = work / f"{tag}-{args.quant}-{args.expert_low}"
            if not (folder / MANIFEST).exists():
                from edgeinfer.export.exporter import export
                print(f"exporting to {folder} ({args.quant}, experts also {args.expert_low}) ...", file=sys.stderr,
                      flush=True)
                t0 = time.perf_counter()
                export(ckpt, folder, quant=args.quant, expert_low=args.expert_low, force=True, progress=False)
                print(f"  exported in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        return measure(folder, args, synthetic)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def measure(folder: Path, args, synthetic) -> dict:
    from tokenizers import Tokenizer

    from edgeinfer.format.manifest import read_manifest
    m = read_manifest(folder)
    experts_bytes = sum(e.nbytes for e in m.tensors.values() if e.file == EXPERTS_FILE)
    budget = int(experts_bytes * args.budget)
    ids = Tokenizer.from_file(str(folder / TOKENIZER_FILE)).encode(TEXT.read_text()[:20000]).ids
    ids = ids[:args.prompt_tokens + args.tokens]
    specs = {}
    for key in args.rows:
        label, opts = ROWS[key]
        if key != "c":
            specs[label] = opts
        for t in (args.threshold if key == "c" else ()):
            specs[f"{label} t={t:g}"] = dict(opts, expert_low_threshold=t)
    models = {label: edgeinfer.load(folder, memory_budget=budget, mode="streaming", threads=args.threads,
                                    io_threads=args.io_threads, io_depth=args.io_depth, **opts)
              for label, opts in specs.items()}
    some = next(iter(models.values()))
    direct = {f.read_mode for f in some.plan.streamed_files().values()}
    results = {k: {"times": [], "stats": [], "counts": [], "round_ms": []} for k in models}
    for r in range(args.rounds):
        order = list(models)[r % len(models):] + list(models)[:r % len(models)]
        for key in order:
            model = models[key]
            for layer in runtime_of(model).layers.values():      # every round starts from a cold cache
                layer.cache.clear()
            times, st, counts = _decode(model, ids, args.prompt_tokens)
            results[key]["times"] += times[args.warmup:]
            results[key]["round_ms"].append(statistics.median(times[args.warmup:]) * 1e3)
            results[key]["stats"].append(st)
            results[key]["counts"].append(counts)
    rows = []
    for key, res in results.items():
        st = {k: sum(s[k] for s in res["stats"]) for k in res["stats"][0]}
        c = {k: sum(x.get(k, 0) for x in res["counts"]) for k in set().union(*res["counts"])}
        steps = len(res["stats"]) * args.tokens
        ms = statistics.median(res["times"]) * 1e3
        rows.append({"row": key, "ms_per_token": round(ms, 1),
                     "ms_per_token_mean": round(statistics.fmean(res["times"]) * 1e3, 1),
                     "hit_rate": round(st["experts_hit"] / max(1, st["experts_needed"]), 3),
                     "prefetch_accuracy": round(st["prefetch_hits"] / st["prefetch_issued"], 3)
                     if st["prefetch_issued"] else None,
                     "mb_per_token": round(st["io_bytes_read"] / steps / 1e6, 1),
                     "bytes_per_token": int(st["io_bytes_read"] / steps),
                     "low_precision_share": round(c.get("experts_run_low", 0) / max(1, c.get("experts_run", 1)), 3),
                     "io_wait_ms_per_token": round(st["io_wait_seconds"] / steps * 1e3, 1),
                     "compute_ms_per_token": round(st["compute_seconds"] / steps * 1e3, 1)})
    base = rows[0]["ms_per_token"]
    base_rounds = results[rows[0]["row"]]["round_ms"]
    for row in rows:
        row["speedup_vs_a"] = round(base / row["ms_per_token"], 2)
        # each round's median against (a)'s in the same round: how reliable the ratio is
        per_round = [a / b for a, b in zip(base_rounds, results[row["row"]]["round_ms"])]
        row["speedup_vs_a_per_round"] = [round(v, 2) for v in per_round]
        row["speedup_vs_a_min_round"] = round(min(per_round), 2)
    cfg = m.config
    return {"model": str(folder), "synthetic": synthetic,
            "shape": {"hidden": cfg.hidden_size, "ffn": cfg.ffn_dim, "experts": cfg.num_experts,
                      "top_k": cfg.experts_per_token, "layers": cfg.num_layers},
            "quantization": {"weights": m.quantization.get("weights"),
                             "expert_low": m.quantization.get("expert_low")},
            "experts_bytes": experts_bytes, "budget_bytes": budget, "resident_bytes": some.resident_bytes,
            "cache_bytes": runtime_of(some).cache_bytes(), "read_mode": sorted(direct),
            "threshold": args.threshold, "threads": numba.get_num_threads(), "io_threads": args.io_threads,
            "io_depth": args.io_depth,
            "tokens": args.tokens, "rounds": args.rounds, "rows": rows}


def print_table(out: dict) -> None:
    s = out["shape"]
    label = "SYNTHETIC " if out["synthetic"] else ""
    q = out["quantization"]
    print(f"{label}Mixtral-like MoE: hidden {s['hidden']}, {s['experts']} experts x FFN {s['ffn']} "
          f"(top-{s['top_k']}), {s['layers']} layers; {q['weights']} experts, low copy {q['expert_low']} (nested)")
    print(f"experts {fmt_bytes(out['experts_bytes'])} = {out['experts_bytes'] / out['budget_bytes']:.2f} x "
          f"the budget "
          f"{fmt_bytes(out['budget_bytes'])} (resident {fmt_bytes(out['resident_bytes'])}, expert caches "
          f"{fmt_bytes(out['cache_bytes'])}); reads {', '.join(out['read_mode'])}, "
          f"{f'io_uring depth {d}' if (d := out['io_depth']) else str(out['io_threads']) + ' read threads'}; "
          f"{out['threads']} compute thread(s); {out['tokens']} tokens x {out['rounds']} rounds")
    cols = [("row", 22, "{}"), ("ms_per_token", 8, "{:.1f}"), ("speedup_vs_a", 7, "{:.2f}x"),
            ("speedup_vs_a_min_round", 9, "{:.2f}x"), ("hit_rate", 6, "{:.3f}"), ("prefetch_accuracy", 8, "{}"),
            ("mb_per_token", 7, "{:.1f}"), ("low_precision_share", 6, "{:.3f}"), ("io_wait_ms_per_token", 7, "{:.1f}"),
            ("compute_ms_per_token", 7, "{:.1f}")]
    heads = ["", "ms/tok", "vs (a)", "min round", "hits", "prefetch", "MB/tok", "low", "io ms", "comp ms"]
    print("  ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, (_, w, _)) in enumerate(zip(heads, cols))))
    for row in out["rows"]:
        cells = []
        for i, (k, w, f) in enumerate(cols):
            v = row[k]
            text = "-" if v is None else f.format(v)
            cells.append(f"{text:<{w}}" if i == 0 else f"{text:>{w}}")
        print("  ".join(cells))
    print("ms/tok: median decode step; vs (a): ratio of medians (min round: the worst round's ratio, each row's "
          "median against (a)'s in that round); hits: experts served from the cache; prefetch: prefetched experts "
          "that were used / prefetched; MB/tok: bytes read from flash per token (prefetch included); low: share of "
          "experts run at low precision; io ms / comp ms: per token, waiting for reads / in expert kernels")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an exported MoE model folder (default: build the synthetic one)")
    p.add_argument("--work", help="folder for the synthetic checkpoint and export, kept and reused "
                                  "(default: a temp dir, removed afterwards)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--quant", default="int8", choices=["int8", "int4"])
    p.add_argument("--expert-low", default="int4", choices=EXPERT_LOW_QUANTS)
    p.add_argument("--budget", type=float, default=0.5,
                   help="memory budget as a fraction of the expert bytes (default 0.5: experts = 2x the budget)")
    p.add_argument("--threshold", type=lambda v: [float(t) for t in v.split(",")], default=[0.5, 0.8],
                   help="expert_low_threshold of row (c); a comma-separated list gives one row each (default 0.5,0.8; "
                        "the runtime's default is 0.8)")
    p.add_argument("--tokens", type=int, default=24, help="decode steps per round (default 24)")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4, help="steps of each round left out of the median")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", default="abc", help="which rows to run (default abc)")
    p.add_argument("--threads", type=int, default=None,
                   help="Numba threads (default: all cores. With pread threads, --io-depth 0, Numba's workers "
                        "beside the read threads were measured 4x slower than one thread: use 1 there)")
    p.add_argument("--io-depth", type=int, default=128, help="io_uring reads in flight (RuntimeOptions.io_depth; "
                                                             "default 128; 0: pread threads)")
    p.add_argument("--io-threads", type=int, default=4, help="pread threads per batch with --io-depth 0 or no "
                                                            "io_uring (RuntimeOptions.io_threads; default 4)")
    add_json(p, "the numbers", file=True)
    args = p.parse_args(argv)
    out = run(args)
    print_table(out)
    if args.json or args.json_file:
        write_json(out, stdout=args.json, path=args.json_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
