"""edgeinfer generate PROMPT [-m MODEL_DIR]"""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt (default model: the built-in demo)",
                       description="Generate text from a prompt, streaming it to stdout.")
    p.add_argument("prompt", help="the text to complete")
    p.add_argument("-m", "--model", default=None, help="model folder (default: the built-in demo model)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--memory-budget", default=None, help="e.g. 40%%, 300MB, 2GB")
    p.add_argument("--mode", default="auto", choices=["auto", "resident", "streaming", "naive", "oracle"],
                   help="auto: resident if the model fits the budget, else stream FFN neurons / experts")
    p.add_argument("--window", type=int, default=0,
                   help="k > 0: drop neurons not active in the last k tokens; 0 (default): keep them "
                        "until their window slot is needed (LRU)")
    p.add_argument("--threshold", type=float, default=None, help="override the predictors' thresholds")
    p.add_argument("--no-direct-io", action="store_true", help="read through the page cache")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--verify", default="full", choices=["full", "sampled", "none"],
                   help="checksum weight files at load (default full)")
    p.add_argument("--backend", default="numba", choices=["numba", "ort", "hybrid"],
                   help="numba: every node a Numba kernel (default); ort: everything in onnxruntime; hybrid: "
                        "streamed FFN / MoE in Numba, the rest in onnxruntime")
    p.add_argument("--providers", default=None,
                   help="onnxruntime execution providers for --backend ort/hybrid, comma-separated, preferred first "
                        "(default: the device profile's, else CPUExecutionProvider)")
    p.add_argument("--device", default=None, help="device profile name or .toml path (see edgeinfer devices list)")
    p.add_argument("--activations", default="float32", choices=["float32", "int8"],
                   help="activations of the int4/int8 matmuls: float32 (default) or int8 (quantized per block, "
                        "AVX512-VNNI: faster, slightly less exact; unsupported nodes keep float32 with a warning)")
    p.add_argument("--stats", action="store_true", help="print timing to stderr")
    p.set_defaults(handler=run)


def run(args) -> int:
    import edgeinfer
    from edgeinfer.errors import EdgeInferError
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    model = edgeinfer.load(args.model, memory_budget=args.memory_budget, threads=args.threads, verify=args.verify,
                           backend=args.backend, providers=providers, device=args.device, mode=args.mode,
                           window=args.window, threshold=args.threshold, direct_io=not args.no_direct_io,
                           activations=args.activations)
    try:
        pieces = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                repetition_penalty=args.repetition_penalty, stream=True)
    except ValueError as exc:
        raise EdgeInferError(str(exc)) from None
    sys.stdout.write(args.prompt)
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        model.last_completion.finish_reason = "interrupted"
    sys.stdout.write("\n")
    c = model.last_completion
    if args.stats:
        dec = sum(c.decode_s) / len(c.decode_s) * 1e3 if c.decode_s else float("nan")
        print(f"[{c.prompt_tokens} prompt tokens, {c.new_tokens} new, finish: {c.finish_reason}, "
              f"first token {c.prefill_s * 1e3:.1f} ms, decode {dec:.2f} ms/token]", file=sys.stderr)
    return 130 if c.finish_reason == "interrupted" else 0
