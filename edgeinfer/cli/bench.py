"""edgeinfer bench [-m MODEL_DIR] [--compare MODES] [--json | --json-file FILE] [--plot FILE]
edgeinfer bench synthetic -o DIR --shape 7b-like --layers 2"""
from __future__ import annotations

import argparse
import sys

from edgeinfer.bench.report import write_json
from edgeinfer.bench.runner import BenchConfig
from edgeinfer.cli.args import (
    LEGACY_MODEL,
    add_json,
    add_max_new_tokens,
    add_model,
    add_threads,
    model_of,
)
from edgeinfer.runtime.options import MATMUL_ACTIVATIONS, WEIGHT_QUANTS

EPILOG = """\
examples:
  edgeinfer bench                                   the built-in demo model
  edgeinfer bench -m MODEL_DIR --memory-budget 50% -p 128 -n 128 -r 5
  edgeinfer bench -m MODEL_DIR --compare naive,resident,streaming --json-file results.json --plot latency.png
  edgeinfer bench -m MODEL_DIR --json > results.json        the numbers on stdout, the table on stderr
  edgeinfer bench -m MODEL_DIR --device jetson-orin-nano-8gb     floor and prediction for that profile

  edgeinfer bench synthetic -o /tmp/syn7b --shape 7b-like --layers 2
      writes a SYNTHETIC Hugging Face checkpoint at real shapes (see --shape) and
      exports it with predictors into /tmp/syn7b (the checkpoint goes to /tmp/syn7b.hf)

modes: resident (everything in memory; runs without a budget: the baseline),
naive (every layer's whole FFN read from flash each token: LLM in a flash's
baseline), streaming (predictor + neuron window under the budget), oracle (the
exact active neurons; for measurements). Modes run side by side, one process
each, runs alternating; warm-up (Numba compile or cache load) is reported apart.
"""


def register(sub) -> None:
    p = sub.add_parser("bench", help="token latency of a model in several modes, and why",
                       description="Measure time to first token, decode ms/token (p50/p90), tokens/s, bytes read "
                                   "from flash and DRAM per token, I/O vs compute time, cache hit rates and peak "
                                   "memory, beside the cost model's prediction and the physical floor "
                                   "(bytes / bandwidth). The model: -m MODEL_DIR (default: the built-in demo); the "
                                   "word `synthetic` with -o DIR makes a large synthetic model (options at the end).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model(p)
    p.add_argument("--compare", default=None, metavar="MODES",
                   help="comma-separated modes: resident, naive, streaming, oracle "
                        "(default: resident,naive,streaming, those the model supports)")
    p.add_argument("--memory-budget", default=None, metavar="BUDGET",
                   help="budget of the streaming modes: 50%%, 300MB, 2GB (default: the device profile's "
                        "default budget with --device, else none)")
    p.add_argument("--device", default=None, metavar="NAME|FILE",
                   help="device profile (name from `edgeinfer devices`, or a .toml) for the floor and the cost "
                        "model; default: a quick probe of this machine")
    p.add_argument("-p", "--prompt-tokens", type=int, default=BenchConfig.prompt_tokens, metavar="N",
                   help=f"prompt length in tokens (default {BenchConfig.prompt_tokens})")
    add_max_new_tokens(p, BenchConfig.new_tokens, "tokens generated per run")
    p.add_argument("-r", "--runs", type=int, default=BenchConfig.runs,
                   help=f"measured runs per mode (default {BenchConfig.runs})")
    p.add_argument("--warmup-tokens", type=int, default=BenchConfig.warmup_tokens,
                   help=f"tokens of warm-up per mode (default {BenchConfig.warmup_tokens})")
    add_threads(p)
    p.add_argument("--window", type=int, default=None, help="neuron window in tokens (default: the runtime's)")
    p.add_argument("--activations", default=None, choices=MATMUL_ACTIVATIONS,
                   help="activations of the int4/int8 matmuls (default: the runtime's, float32); see generate")
    p.add_argument("--in-process", action="store_true",
                   help="run every mode in this process (peak RSS then covers all modes loaded)")
    add_json(p, "every number", file=True)
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="write a latency breakdown plot (needs matplotlib: pip install 'edgeinfer[bench]')")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    from edgeinfer.bench.synthetic import SHAPES
    g = p.add_argument_group(
        "synthetic models (edgeinfer bench synthetic -o DIR [options])",
        "Write a SYNTHETIC Hugging Face checkpoint at a real model's shapes with few layers (config.json, "
        "safetensors, the fixture tokenizer) into DIR.hf, with weights built so that activations look like a "
        "trained model's (70-90%% of FFN activations zero, neurons reused by consecutive tokens, skewed expert "
        "usage; measured and printed), then export it with predictors into DIR. Labelled synthetic in the "
        "manifest and in bench's output. Shapes: " + "; ".join(f"{k} = {v.describe()}" for k, v in SHAPES.items()))
    g.add_argument("-o", "--output", help="model folder to write (the checkpoint goes to OUTPUT.hf)")
    g.add_argument("--shape", default="7b-like", choices=sorted(SHAPES), help="preset shape (default 7b-like)")
    g.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    g.add_argument("--ffn", type=int, default=None, help="override the preset's FFN width")
    g.add_argument("--quant", default="int4", choices=WEIGHT_QUANTS, help="export precision (default int4)")
    g.add_argument("--calibration-tokens", type=int, default=4096,
                   help="tokens the exporter trains the predictors on (default 4096)")
    g.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    g.add_argument("--checkpoint-only", action="store_true", help="write the checkpoint, do not export it")
    g.add_argument("--force", action="store_true", help="replace existing output folders")
    p.set_defaults(handler=run)


def run(args) -> int:
    from edgeinfer.errors import EdgeInferError
    if getattr(args, LEGACY_MODEL) == "synthetic" and args.model is None:
        if not args.output:
            raise EdgeInferError("edgeinfer bench synthetic needs -o DIR (the model folder to write)")
        return run_synthetic(args)
    if args.output:
        raise EdgeInferError("-o/--output is for `edgeinfer bench synthetic`; a benchmark writes --json-file / "
                             "--plot")
    model = model_of(args)
    to_stdout, json_file = args.json, args.json_file
    from edgeinfer.bench import run_bench
    from edgeinfer.bench.report import format_table
    modes = None
    if args.compare:
        modes = tuple(m.strip() for m in args.compare.split(",") if m.strip())
    budget = args.memory_budget
    if budget is None and args.device is not None:
        from edgeinfer.devices.profiles import load_profile
        budget = load_profile(args.device).default_memory_budget
    if args.plot:
        from edgeinfer.bench.plot import require_matplotlib
        require_matplotlib()          # fail before measuring, not after
    cfg = BenchConfig(model=model, modes=modes, memory_budget=budget, device=args.device,
                      prompt_tokens=args.prompt_tokens, new_tokens=args.max_new_tokens, runs=args.runs,
                      warmup_tokens=args.warmup_tokens, threads=args.threads, window=args.window,
                      activations=args.activations,
                      isolate=not args.in_process, progress=not args.quiet)
    res = run_bench(cfg)
    text = format_table(res)
    write_json(res, stdout=to_stdout)
    print(text, file=sys.stderr if to_stdout else sys.stdout)
    if json_file:
        write_json(res, path=json_file)
        print(f"wrote {json_file}", file=sys.stderr if to_stdout else sys.stdout)
    if args.plot:
        from edgeinfer.bench.plot import plot_latency
        plot_latency(res, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if to_stdout else sys.stdout)
    return 0


def run_synthetic(a) -> int:
    from edgeinfer.bench.synthetic import make_synthetic
    make_synthetic(a.output, shape=a.shape, layers=a.layers, ffn=a.ffn, quant=a.quant,
                   calibration_tokens=a.calibration_tokens, seed=a.seed, export_model=not a.checkpoint_only,
                   force=a.force, progress=not a.quiet)
    return 0
