"""edgeinfer inspect MODEL_DIR: shapes, ops, quantization, files and checksums."""
from __future__ import annotations

import json
from collections import Counter


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show what a model folder holds",
                       description="Print a model folder's architecture, graph ops, quantization, "
                                   "files with sizes and checksums.")
    p.add_argument("model", help="model folder")
    p.add_argument("--verify", action="store_true", help="recompute every file's crc32 and compare")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run)


def summary(folder, verify: bool = False) -> dict:
    from edgeinfer.errors import ChecksumError
    from edgeinfer.format.manifest import read_manifest, verify_file
    from edgeinfer.runtime.executor import load_graph

    m = read_manifest(folder)
    g = load_graph(m)
    ops = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in g.nodes)
    files = []
    for rel, f in m.files.items():
        status = "not checked"
        if verify:
            try:
                verify_file(m, rel)
                status = "ok"
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


def run(args) -> int:
    from edgeinfer.units import fmt_bytes
    s = summary(args.model, verify=args.verify)
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
