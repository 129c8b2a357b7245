"""edgeinfer bench MODEL_DIR [--compare MODES] [--json FILE] [--plot FILE]
edgeinfer bench synthetic -o DIR --shape 7b-like --layers 2"""
from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples:
  edgeinfer bench                                   the built-in demo model
  edgeinfer bench MODEL_DIR --memory-budget 50% --prompt-tokens 128 --new-tokens 128 --runs 5
  edgeinfer bench MODEL_DIR --compare naive,resident,streaming --json results.json --plot latency.png
  edgeinfer bench MODEL_DIR --device jetson-orin-nano-8gb     floor and prediction for that profile

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
                                   "(bytes / bandwidth). Argument: MODEL_DIR (default: the built-in demo), or the word "
                                   "`synthetic` with -o DIR to make a large synthetic model (options at the end; a "
                                   "model folder named synthetic: ./synthetic).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the built-in demo)")
    p.add_argument("--compare", default=None, metavar="MODES",
                   help="comma-separated modes: resident, naive, streaming, oracle "
                        "(default: resident,naive,streaming, those the model supports)")
    p.add_argument("--memory-budget", default=None, metavar="BUDGET",
                   help="budget of the streaming modes: 50%%, 300MB, 2GB (default: the device profile's "
                        "default budget with --device, else none)")
    p.add_argument("--device", default=None, metavar="NAME|FILE",
                   help="device profile (name from `edgeinfer devices`, or a .toml) for the floor and the cost "
                        "model; default: a quick probe of this machine")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per mode (default 3)")
    p.add_argument("--warmup-tokens", type=int, default=4, help="tokens of warm-up per mode (default 4)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--window", type=int, default=None, help="neuron window in tokens (default: the runtime's)")
    p.add_argument("--activations", default=None, choices=["float32", "int8"],
                   help="activations of the int4/int8 matmuls (default: the runtime's, float32); see generate")
    p.add_argument("--in-process", action="store_true",
                   help="run every mode in this process (peak RSS then covers all modes loaded)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every number as JSON ('-': stdout)")
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
    g.add_argument("--quant", default="int4", choices=["f16", "int8", "int4"], help="export precision (default int4)")
    g.add_argument("--calibration-tokens", type=int, default=4096,
                   help="tokens the exporter trains the predictors on (default 4096)")
    g.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    g.add_argument("--checkpoint-only", action="store_true", help="write the checkpoint, do not export it")
    g.add_argument("--force", action="store_true", help="replace existing output folders")
    p.set_defaults(handler=run)


def run(args) -> int:
    from edgeinfer.errors import EdgeInferError
    if args.model == "synthetic":
        if not args.output:
            raise EdgeInferError("edgeinfer bench synthetic needs -o DIR (the model folder to write)")
        return run_synthetic(args)
    if args.output:
        raise EdgeInferError("-o/--output is for `edgeinfer bench synthetic`; a benchmark writes --json / --plot")
    from edgeinfer.bench import BenchConfig, run_bench
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
    cfg = BenchConfig(model=args.model, modes=modes, memory_budget=budget, device=args.device,
                      prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs,
                      warmup_tokens=args.warmup_tokens, threads=args.threads, window=args.window,
                      activations=args.activations,
                      isolate=not args.in_process, progress=not args.quiet)
    res = run_bench(cfg)
    text = format_table(res)
    if args.json == "-":
        print(json.dumps(res, indent=1, default=str))
        print(text, file=sys.stderr)
    else:
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1, default=str)
            print(f"wrote {args.json}")
    if args.plot:
        from edgeinfer.bench.plot import plot_latency
        plot_latency(res, args.plot)
        print(f"wrote {args.plot}")
    return 0


def run_synthetic(a) -> int:
    from edgeinfer.bench.synthetic import make_synthetic
    make_synthetic(a.output, shape=a.shape, layers=a.layers, ffn=a.ffn, quant=a.quant,
                   calibration_tokens=a.calibration_tokens, seed=a.seed, export_model=not a.checkpoint_only,
                   force=a.force, progress=not a.quiet)
    return 0
