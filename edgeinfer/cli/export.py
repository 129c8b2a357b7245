"""edgeinfer export CHECKPOINT -o MODEL_DIR --quant int4"""
from __future__ import annotations

from edgeinfer.runtime.options import EXPERT_LOW_QUANTS, WEIGHT_QUANTS


def register(sub) -> None:
    p = sub.add_parser("export", help="turn a Hugging Face checkpoint into an edgeinfer model folder",
                       description="Export a Hugging Face checkpoint folder (safetensors, sharded or not; "
                                   "OPT, Llama/Mistral/Qwen2, Mixtral, Qwen2-MoE) to a quantized ONNX model "
                                   "folder laid out for streaming. Needs the export extra: "
                                   "pip install 'edgeinfer[export]'.")
    p.add_argument("checkpoint", help="checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("-o", "--output", required=True, help="model folder to write")
    p.add_argument("--quant", default="int4", choices=WEIGHT_QUANTS,
                   help="weight precision of the linear layers (default int4; embeddings/lm_head stay int8)")
    p.add_argument("--expert-low", choices=EXPERT_LOW_QUANTS, default=None,
                   help="MoE models: also store each expert at this lower precision, nested in the high one, "
                        "for low-precision loading of less important experts (HOBBIT)")
    p.add_argument("--group-size", type=int, default=32, help="quantization group size along K (default 32)")
    p.add_argument("--predictors", action="store_true",
                   help="train per-layer sparsity predictors on the shipped calibration text (ReLU FFNs), "
                        "so the model can stream FFN neurons under a memory budget")
    p.add_argument("--predictor-rank", type=int, default=64, help="rank of each low-rank predictor (default 64)")
    p.add_argument("--predictor-recall", type=float, default=0.95,
                   help="recall each layer's threshold is calibrated to (default 0.95): higher = fewer "
                        "missed neurons, more bytes read")
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--no-bundle", action="store_true",
                   help="plain MatMulNBits FFN matrices instead of row-column bundles (resident only)")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args) -> int:
    from edgeinfer.errors import EdgeInferError
    from edgeinfer.units import fmt_bytes
    try:
        from edgeinfer.export.exporter import export
    except ImportError as exc:
        raise EdgeInferError(f"the exporter is not installed ({exc}); pip install 'edgeinfer[export]'") from None
    if not 0.5 <= args.predictor_recall < 1 or args.predictor_rank < 1 or args.calibration_tokens < 256:
        raise EdgeInferError("--predictor-recall must be in [0.5, 1), --predictor-rank >= 1, "
                             "--calibration-tokens >= 256")
    out = export(args.checkpoint, args.output, quant=args.quant, group_size=args.group_size,
                 bundle=not args.no_bundle, predictors=args.predictors, predictor_rank=args.predictor_rank,
                 predictor_recall=args.predictor_recall, calibration_tokens=args.calibration_tokens,
                 expert_low=args.expert_low, force=args.force, progress=not args.quiet)
    from edgeinfer.format.manifest import read_manifest
    m = read_manifest(out)
    total = sum(f["size"] for f in m.files.values())
    low = f", experts also {args.expert_low}" if args.expert_low else ""
    print(f"wrote {out} ({fmt_bytes(total)}, {args.quant}{low})")
    return 0
