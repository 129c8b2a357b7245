"""Backend benchmark: decode tokens/s of the numba, ort and hybrid backends on the same
exported model, side by side, and cold start (process start to first token).

    python benchmarks/backends.py                    # synthetic int4 Llama (520-560 MB of weights), both layouts
    python benchmarks/backends.py --json-file out.json   # table, and the numbers as JSON
    python benchmarks/backends.py --model MODEL_DIR  # an exported folder instead
    python benchmarks/backends.py --cold-only        # only the cold start of the demo model

The synthetic model is a random-init LlamaForCausalLM (ReLU, vocab 8192; needs torch and
transformers) saved to --work and exported there at int4 twice: `bundled` (the default
export: FFN as BundledFFN row-column bundles, what streaming needs) and `matmul`
(bundle=False: FFN as MatMulNBits). Nothing is written inside the repository.

What runs where:
  numba        every node a Numba kernel
  ort          one onnxruntime session (CPU provider): MatMulNBits with float activations
               for 4-bit weights, int8 activations for the 8-bit lm_head (ort_backend.py);
               a BundledFFN runs through its ONNX function body, which onnxruntime
               constant-folds into float32 weights (8x the int4 bytes; above
               ort_backend.FOLD_LIMIT folding is off and it dequantizes every call), so
               ort runs on the matmul layout only unless --ort-on-bundled
  numba-int8act  as numba, with activations="int8" (RuntimeOptions): MatMulNBits
               activations quantized per block to int8 (AVX512-VNNI); the numerics of
               ort-int8act, not of the float rows
  ort-int8act  as ort, activations="int8": every MatMulNBits with int8 activations
               (accuracy_level 4), the fastest onnxruntime CPU path
  hybrid       BundledFFN in Numba, the rest in onnxruntime segments (one per layer)

Decode: a greedy loop over Model.forward (no sampling, no EOS stop), `--tokens` steps
after a short prompt; per backend the median step, over `--rounds` rounds that
alternate the backends (the order rotates each round), so drift in machine load
reaches every backend alike. Random weights have ~50% ReLU sparsity, trained ReLU
models far more: the bundled FFN kernel skips zero neurons in the down projection.

Cold start: `edgeinfer.load()` (the demo model) and one generated token in a fresh
subprocess, measured from before the spawn; run `--cold-runs` times (the first may
compile Numba kernels whose cache is stale; the next find it warm).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

import edgeinfer  # noqa: E402
from edgeinfer.bench.report import write_json
from edgeinfer.cli.args import add_json
from edgeinfer.format.constants import MANIFEST, TOKENIZER_FILE  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "models" / "llama-relu-8m" / "tokenizer.json"   # vocab 8192
# backend x matmul activations: the runtime's BACKENDS, and int8 activations for two of them
BACKEND_ROWS = ("numba", "numba-int8act", "ort", "ort-int8act", "hybrid")
PROMPT = "Once upon a time, in a land far away, there"

COLD_CHILD = r"""
import json, sys, time
t0 = time.time()
import edgeinfer
t1 = time.time()
model = edgeinfer.load(backend=sys.argv[1])
t2 = time.time()
model.generate("Once upon a time", max_new_tokens=1)
t3 = time.time()
print(json.dumps({"python_start": t0, "import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2,
                  "end": t3}))
"""


# ---- the synthetic model --------------------------------------------------------------------
def synthetic_checkpoint(args) -> Path:
    d = Path(args.work) / f"llama-h{args.hidden}-f{args.ffn}-l{args.layers}-kv{args.kv_heads}"
    if (d / "config.json").exists() and not args.rebuild:
        return d
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"building a random-init Llama checkpoint in {d} ...", file=sys.stderr, flush=True)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, hidden_act="relu",
                      vocab_size=8192, max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    if d.exists():
        shutil.rmtree(d)
    model.save_pretrained(d, safe_serialization=True)
    shutil.copy(TOKENIZER, d / TOKENIZER_FILE)
    return d


def synthetic_exports(args) -> dict[str, Path]:
    from edgeinfer.export.exporter import export

    src = synthetic_checkpoint(args)
    out = {}
    for layout in args.layouts:
        dst = Path(args.work) / f"{src.name}-int4-{layout}"
        if not (dst / MANIFEST).exists() or args.rebuild:
            print(f"exporting {dst} ...", file=sys.stderr, flush=True)
            export(src, dst, quant="int4", bundle=(layout == "bundled"), force=True, progress=True)
        out[layout] = dst
    return out


def weight_bytes(folder: Path) -> int:
    from edgeinfer.format.manifest import read_manifest

    m = read_manifest(folder)
    return sum(m.files[f]["size"] for f in {e.file for e in m.tensors.values()})


# ---- decode ---------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_backend(folder, backend, threads):
    base, _, int8 = backend.partition("-")
    r0, t0 = _rss(), time.perf_counter()
    model = edgeinfer.load(folder, backend=base, threads=threads, activations="int8" if int8 else "float32")
    return model, time.perf_counter() - t0, _rss() - r0


def decode(model, ids, tokens: int):
    """Greedy decode through Model.forward: (per-step seconds, generated ids)."""
    cache = model.new_cache()
    t0 = time.perf_counter()
    logits = model.forward(ids, cache)
    prefill = time.perf_counter() - t0
    out, steps = [], []
    for _ in range(tokens):
        tok = int(np.argmax(logits[-1]))
        out.append(tok)
        t0 = time.perf_counter()
        logits = model.forward([tok], cache)
        steps.append(time.perf_counter() - t0)
    return prefill, steps, out


def decode_rows(folder: Path, layout: str, args) -> list[dict]:
    models, rows = {}, {}
    for b in args.backends:
        if b == "hybrid" and layout == "matmul":
            print("  hybrid: skipped on the matmul layout (no BundledFFN / MoE nodes: it would be ort)",
                  file=sys.stderr)
            continue
        if b.startswith("ort") and layout == "bundled" and not args.ort_on_bundled:
            print(f"  {b}: skipped on the bundled layout (onnxruntime runs BundledFFN through its reference body: "
                  "constant-folded it needs float32 weights, 8x, and ran out of memory at 520 MB; unfolded it "
                  "dequantized every token, 5.8 s/token; --ort-on-bundled to run it anyway)", file=sys.stderr)
            continue
        model, load_s, rss = load_backend(folder, b, args.threads)
        ids = model.tokenizer.encode(PROMPT)
        decode(model, ids, 2)                                          # warm up (kernels, arenas)
        models[b] = (model, ids)
        rows[b] = dict(layout=layout, backend=b, load_s=load_s, rss_mb=rss / 2**20, steps=[], prefill=[])
        print(f"  loaded {b}: {load_s:.1f} s, +{rss / 2**20:.0f} MB RSS", file=sys.stderr, flush=True)
    names = list(models)
    for r in range(args.rounds):
        for b in names[r % len(names):] + names[:r % len(names)]:
            model, ids = models[b]
            prefill, steps, toks = decode(model, ids, args.tokens)
            row = rows[b]
            row["steps"].append(float(np.median(steps)))
            row["prefill"].append(prefill)
            row["tokens"] = toks
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{b} {1 / rows[b]['steps'][-1]:.2f} tok/s" for b in names), file=sys.stderr, flush=True)
    ref = rows[names[0]]["tokens"] if names else []
    out = []
    for b in names:
        row = rows[b]
        step = float(np.median(row["steps"]))
        row.update(ms_per_token=step * 1e3, tokens_per_s=1 / step, prefill_ms=float(np.median(row["prefill"])) * 1e3,
                   rounds_ms=[s * 1e3 for s in row["steps"]],
                   same_tokens_as=names[0] if row["tokens"] == ref else "differs")
        del row["steps"], row["prefill"], row["tokens"]
        out.append(row)
    del models
    return out


# ---- cold start -----------------------------------------------------------------------------
def cold_start(backend: str, runs: int) -> list[dict]:
    out = []
    for i in range(runs):
        t0 = time.time()
        p = subprocess.run([sys.executable, "-c", COLD_CHILD, backend], capture_output=True, text=True,
                           cwd=str(ROOT))
        if p.returncode != 0:
            raise SystemExit(f"cold start child failed:\n{p.stderr}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r = dict(backend=backend, run=i + 1, total_s=r["end"] - t0, interpreter_s=r["python_start"] - t0,
                 import_s=r["import_s"], load_s=r["load_s"], first_token_s=r["first_token_s"])
        out.append(r)
        print(f"  cold start {backend} run {i + 1}: {r['total_s']:.2f} s", file=sys.stderr, flush=True)
    return out


# ---- report ---------------------------------------------------------------------------------
def environment(args) -> dict:
    import numba
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), load_average=os.getloadavg(), onnxruntime=onnxruntime.__version__,
                numba=numba.__version__, numba_threads=args.threads or numba.config.NUMBA_NUM_THREADS,
                python=platform.python_version())


def print_decode(rows, sizes):
    print(f"\n{'layout':8s} {'backend':13s} {'tok/s':>7s} {'ms/tok':>8s} {'prefill ms':>10s} {'load s':>7s} "
          f"{'RSS +MB':>8s}  rounds ms/tok          tokens")
    for r in rows:
        rounds = " ".join(f"{x:.1f}" for x in r["rounds_ms"])
        print(f"{r['layout']:8s} {r['backend']:13s} {r['tokens_per_s']:7.2f} {r['ms_per_token']:8.1f} "
              f"{r['prefill_ms']:10.1f} {r['load_s']:7.1f} {r['rss_mb']:8.0f}  {rounds:22s} "
              f"{'same' if r['same_tokens_as'] != 'differs' else 'differ'}")
    for layout in dict.fromkeys(r["layout"] for r in rows):
        by = {r["backend"]: r for r in rows if r["layout"] == layout}
        if "numba" in by and "ort" in by:
            print(f"{layout}: numba/ort tokens/s ratio {by['numba']['tokens_per_s'] / by['ort']['tokens_per_s']:.2f}"
                  + (f", hybrid/ort {by['hybrid']['tokens_per_s'] / by['ort']['tokens_per_s']:.2f}"
                     if "hybrid" in by else "")
                  + (f", numba-int8act/ort-int8act {by['numba-int8act']['tokens_per_s'] / by['ort-int8act']['tokens_per_s']:.2f}"
                     if "numba-int8act" in by and "ort-int8act" in by else "")
                  + (f" ({sizes[layout] / 2**20:.0f} MB of weights)" if layout in sizes else ""))


def print_cold(rows):
    print(f"\n{'cold start':12s} {'run':>3s} {'total s':>8s} {'python':>7s} {'import':>7s} {'load':>7s} "
          f"{'1st token':>9s}")
    for r in rows:
        print(f"{r['backend']:12s} {r['run']:3d} {r['total_s']:8.2f} {r['interpreter_s']:7.2f} {r['import_s']:7.2f} "
              f"{r['load_s']:7.2f} {r['first_token_s']:9.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--model", default=None, help="an exported model folder (default: the synthetic model)")
    p.add_argument("--work", default="/tmp/edgeinfer-bench", help="where the synthetic checkpoint/exports live")
    p.add_argument("--rebuild", action="store_true", help="rebuild the synthetic checkpoint and exports")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--layouts", default="bundled,matmul", help="synthetic exports: bundled, matmul or both")
    p.add_argument("--backends", default=",".join(BACKEND_ROWS), help=f"comma-separated, from {', '.join(BACKEND_ROWS)}")
    p.add_argument("--tokens", type=int, default=32, help="decode steps per round (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--ort-on-bundled", action="store_true",
                   help="also run ort / ort-int8act on the bundled layout (very slow or out of memory at this size)")
    p.add_argument("--cold-runs", type=int, default=2, help="cold-start subprocesses per backend (default 2)")
    p.add_argument("--cold-backends", default="numba", help="backends whose cold start to time (default numba)")
    p.add_argument("--cold-only", action="store_true", help="only the cold start")
    p.add_argument("--skip-cold", action="store_true", help="no cold start")
    add_json(p, "the numbers", file=True)
    args = p.parse_args(argv)
    args.layouts = [x for x in args.layouts.split(",") if x]
    args.backends = [x for x in args.backends.split(",") if x]
    bad = [b for b in args.backends if b not in BACKEND_ROWS] + [x for x in args.layouts if x not in ("bundled", "matmul")]
    if bad:
        p.error(f"unknown backend/layout {', '.join(bad)}")

    report = dict(environment=environment(args), decode=[], cold_start=[], weight_bytes={})
    if not args.cold_only:
        if args.model:
            m = json.loads((Path(args.model) / MANIFEST).read_text())
            folders = {m.get("ffn_layout", "model"): Path(args.model)}
        else:
            folders = synthetic_exports(args)
        for layout, folder in folders.items():
            report["weight_bytes"][layout] = weight_bytes(folder)
            print(f"decode: {folder} ({report['weight_bytes'][layout] / 2**20:.0f} MB of weights)",
                  file=sys.stderr, flush=True)
            report["decode"] += decode_rows(folder, layout, args)
    if not args.skip_cold:
        for b in args.cold_backends.split(","):
            report["cold_start"] += cold_start(b, args.cold_runs)
    report["environment"]["load_average_end"] = os.getloadavg()
    env = report["environment"]
    print(f"\n{env['cpu']}, {env['cores']} cores, onnxruntime {env['onnxruntime']}, numba {env['numba']} "
          f"({env['numba_threads']} threads); load average {env['load_average'][0]:.1f} at start, "
          f"{env['load_average_end'][0]:.1f} at end")
    if report["decode"]:
        print_decode(report["decode"], report["weight_bytes"])
    if report["cold_start"]:
        print_cold(report["cold_start"])
    if args.json or args.json_file:
        write_json(report, stdout=args.json, path=args.json_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
