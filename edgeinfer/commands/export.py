"""edgeinfer export CHECKPOINT -o MODEL_DIR --quant int4"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="turn a Hugging Face checkpoint into an edgeinfer model folder",
                       description="Export a Hugging Face checkpoint folder (safetensors, sharded or not; "
                                   "OPT, Llama/Mistral/Qwen2, Mixtral, Qwen2-MoE) to a quantized ONNX model "
                                   "folder laid out for streaming. Needs the export extra: "
                                   "pip install 'edgeinfer[export]'.")
    p.add_argument("checkpoint", help="checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("-o", "--output", required=True, help="model folder to write")
    p.add_argument("--quant", default="int4", choices=["f16", "int8", "int4"],
                   help="weight precision of the linear layers (default int4; embeddings/lm_head stay int8)")
    p.add_argument("--group-size", type=int, default=32, help="quantization group size along K (default 32)")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args) -> int:
    from edgeinfer.budget import fmt_bytes
    from edgeinfer.errors import EdgeInferError
    try:
        from export.exporter import export
    except ImportError as exc:
        raise EdgeInferError(f"the exporter is not installed ({exc}); pip install 'edgeinfer[export]'") from None
    out = export(args.checkpoint, args.output, quant=args.quant, group_size=args.group_size, force=args.force,
                 progress=not args.quiet)
    from edgeinfer.manifest import read_manifest
    m = read_manifest(out)
    total = sum(f["size"] for f in m.files.values())
    print(f"wrote {out} ({fmt_bytes(total)}, {args.quant})")
    return 0
