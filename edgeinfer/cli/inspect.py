"""edgeinfer inspect [-m MODEL_DIR]: shapes, ops, quantization, files and checksums."""
from __future__ import annotations

import json
from collections import Counter

from edgeinfer.cli.args import add_json, add_model, add_verify, model_of

SAMPLED_TENSORS = 4     # tensors checked per file by --verify sampled (as load(verify="sampled"))


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show what a model folder holds",
                       description="Print a model folder's architecture, graph ops, quantization, "
                                   "files with sizes and checksums.")
    add_model(p)
    add_verify(p, "none", "recompute checksums and compare them with the manifest")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    add_json(p, "the summary")
    p.set_defaults(handler=run)


def summary(folder, verify: str = "none") -> dict:
    """What `edgeinfer inspect` prints. verify: "full", "sampled" or "none" (True means "full")."""
    from edgeinfer.errors import ChecksumError, InvalidArgumentError
    from edgeinfer.format.manifest import read_manifest, verify_file
    from edgeinfer.runtime.executor import load_graph
    from edgeinfer.runtime.loader import DEMO_MODEL
    from edgeinfer.runtime.options import VERIFY_MODES

    verify = {True: "full", False: "none"}.get(verify, verify)
    if verify not in VERIFY_MODES:
        raise InvalidArgumentError(f"unknown verify mode {verify!r}; choose one of {', '.join(VERIFY_MODES)}")
    m = read_manifest(folder if folder is not None else DEMO_MODEL)
    g = load_graph(m)
    ops = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in g.nodes)
    files = []
    for rel, f in m.files.items():
        status = "not checked"
        if verify != "none":
            try:
                if verify == "full":
                    verify_file(m, rel)
                else:
                    _verify_sampled(m, rel)
                status = "ok" if verify == "full" else "ok (sampled)"
            except ChecksumError:
                status = "MISMATCH"
        files.append({"path": rel, "size": f["size"], "crc32": f"{f['crc32']:08x}", "check": status})
    q = dict(m.quantization)
    err = q.pop("relative_error", {})
    if err:
        q["relative_error_mean"] = round(sum(err.values()) / len(err), 5)
        q["relative_error_max"] = round(max(err.values()), 5)
    return {"path": str(m.folder), "format_version": m.raw["format_version"], "created_by": m.raw.get("created_by"),
            "config": m.config.to_dict(), "quantization": q, "ops": dict(sorted(ops.items())),
            "nodes": len(g.nodes), "files": files,
            "tensors": [{"name": e.name, "file": e.file, "offset": e.offset, "shape": list(e.shape),
                         "dtype": e.dtype, "nbytes": e.nbytes} for e in m.tensors.values()],
            "generation": m.generation}


def _verify_sampled(m, rel: str) -> None:
    """The crc32 of a few tensors of one file (the first, the last, and some between)."""
    import numpy as np

    from edgeinfer.format.manifest import verify_tensor
    entries = [e for e in m.tensors.values() if e.file == rel]
    if not entries:
        return
    picks = sorted({round(i * (len(entries) - 1) / max(1, SAMPLED_TENSORS - 1)) for i in range(SAMPLED_TENSORS)})
    with open(m.path(rel), "rb") as fh:
        for i in picks:
            e = entries[i]
            fh.seek(e.offset)
            verify_tensor(e, np.frombuffer(fh.read(e.nbytes), dtype=np.uint8))


def run(args) -> int:
    from edgeinfer.units import fmt_bytes
    s = summary(model_of(args), verify=args.verify)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0 if all(f["check"] != "MISMATCH" for f in s["files"]) else 1
    c = s["config"]
    print(f"{s['path']}  (edgeinfer format v{s['format_version']}, {s['created_by']})")
    print(f"  architecture  {c['source_architecture']} [{c['family']}]  layers {c['num_layers']}  hidden "
          f"{c['hidden_size']}  heads {c['num_heads']}/{c['num_kv_heads']} x {c['head_dim']}  ffn {c['ffn_dim']} "
          f"({c['activation']}{', gated' if c['gated'] else ''})  vocab {c['vocab_size']}  context "
          f"{c['max_position_embeddings']}")
    if c["num_experts"]:
        print(f"  experts       {c['num_experts']} (top-{c['experts_per_token']})"
              + (f" + shared {c['shared_expert_ffn_dim']}" if c["shared_expert_ffn_dim"] else ""))
    print("  quantization  " + ", ".join(f"{k} {v}" for k, v in s["quantization"].items()))
    print(f"  graph         {s['nodes']} nodes: " + ", ".join(f"{k} x{v}" for k, v in s["ops"].items()))
    print("  files")
    print(f"    {'path':<20} {'size':>12} {'crc32':>10}  check")
    for f in s["files"]:
        print(f"    {f['path']:<20} {fmt_bytes(f['size']):>12} {f['crc32']:>10}  {f['check']}")
    if args.tensors:
        print("  tensors")
        for t in s["tensors"]:
            print(f"    {t['name']:<40} {t['dtype']:>8} {str(t['shape']):<20} {t['file']}@{t['offset']}")
    return 0 if all(f["check"] != "MISMATCH" for f in s["files"]) else 1
