"""edgeinfer generate [-m MODEL_DIR] PROMPT | -p PROMPT"""
from __future__ import annotations

import sys

from edgeinfer.cli.args import add_max_new_tokens, add_model, add_threads, add_verify
from edgeinfer.runtime.options import (
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_VERIFY,
    MATMUL_ACTIVATIONS,
    MODES,
    RuntimeOptions,
)
from edgeinfer.runtime.sampling import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
)


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt (default model: the built-in demo)",
                       description="Generate text from a prompt, streaming it to stdout.")
    p.add_argument("prompt", nargs="?", default=None, help="the text to complete (or -p PROMPT)")
    p.add_argument("-p", "--prompt", dest="prompt_opt", default=None, metavar="PROMPT",
                   help="the text to complete (instead of the positional PROMPT)")
    add_model(p, positional=False)
    add_max_new_tokens(p, DEFAULT_MAX_TOKENS, "generate at most N new tokens")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"0 = greedy (default {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=f"0 = off (default {DEFAULT_TOP_K})")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help=f"1 = off (default {DEFAULT_TOP_P})")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--repetition-penalty", type=float, default=DEFAULT_REPETITION_PENALTY,
                   help=f"1 = off (default {DEFAULT_REPETITION_PENALTY})")
    p.add_argument("--memory-budget", default=None, help="e.g. 40%%, 300MB, 2GB")
    p.add_argument("--mode", default=RuntimeOptions.mode, choices=MODES,
                   help="auto: resident if the model fits the budget, else stream FFN neurons / experts")
    p.add_argument("--window", type=int, default=RuntimeOptions.window,
                   help="k > 0: drop neurons not active in the last k tokens; 0 (default): keep them "
                        "until their window slot is needed (LRU)")
    p.add_argument("--threshold", type=float, default=None, help="override the predictors' thresholds")
    p.add_argument("--no-direct-io", action="store_true", help="read through the page cache")
    add_threads(p)
    add_verify(p, DEFAULT_VERIFY, "checksum weight files at load")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS,
                   help="numba: every node a Numba kernel (default); ort: everything in onnxruntime; hybrid: "
                        "streamed FFN / MoE in Numba, the rest in onnxruntime")
    p.add_argument("-e", "--providers", default=None,
                   help="onnxruntime execution providers for --backend ort/hybrid, comma-separated, preferred "
                        "first: cuda, tensorrt, cpu, ... or full names such as CUDAExecutionProvider "
                        "(default: the device profile's, else cpu)")
    p.add_argument("--device", default=None, help="device profile name or .toml path (see `edgeinfer devices list`)")
    p.add_argument("--activations", default=RuntimeOptions.activations, choices=MATMUL_ACTIVATIONS,
                   help="activations of the int4/int8 matmuls: float32 (default) or int8 (quantized per block, "
                        "AVX512-VNNI: faster, slightly less exact; unsupported nodes keep float32 with a warning)")
    p.add_argument("--stats", action="store_true", help="print timing to stderr")
    p.set_defaults(handler=run)


def prompt_of(args) -> str:
    from edgeinfer.errors import InvalidArgumentError
    if (args.prompt is None) == (args.prompt_opt is None):
        raise InvalidArgumentError("give the prompt once: positionally or with -p PROMPT")
    return args.prompt if args.prompt is not None else args.prompt_opt


def run(args) -> int:
    import edgeinfer
    from edgeinfer.runtime.generate import GenerationResult
    prompt = prompt_of(args)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    model = edgeinfer.load(args.model, memory_budget=args.memory_budget, threads=args.threads, verify=args.verify,
                           backend=args.backend, providers=providers, device=args.device, mode=args.mode,
                           window=args.window, threshold=args.threshold, direct_io=not args.no_direct_io,
                           activations=args.activations)
    steps = model.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                           repetition_penalty=args.repetition_penalty, stream=True)
    sys.stdout.write(prompt)
    seen = []
    try:
        for step in steps:
            seen.append(step)
            sys.stdout.write(step.text)
            sys.stdout.flush()
        result = seen[-1].result
    except KeyboardInterrupt:
        result = GenerationResult.from_steps(seen, "interrupted")
    sys.stdout.write("\n")
    if args.stats:
        print(f"[{result.prompt_tokens} prompt tokens, {result.new_tokens} new, finish: {result.finish_reason}, "
              f"first token {result.ttft_s * 1e3:.1f} ms, decode {result.decode_ms_per_token:.2f} ms/token]",
              file=sys.stderr)
    return 130 if result.finish_reason == "interrupted" else 0
