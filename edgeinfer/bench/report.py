"""Bench results: one dict (what --json writes) and the table printed from it.

Every figure in the table is read from the dict, so the two never disagree.
Units in the dict: ms, bytes, seconds as named; rates are fractions in [0, 1].
"""
from __future__ import annotations

import json
import os
import platform
import socket

import numpy as np

from edgeinfer import __version__
from edgeinfer.bench.cost_model import floor_ms, predict
from edgeinfer.units import fmt_bytes

SCHEMA = 1


def write_json(data, *, stdout: bool = False, path: str | None = None) -> None:
    """--json (stdout) and --json-file FILE (edgeinfer.cli.args.add_json): the numbers as JSON."""
    text = json.dumps(data, indent=1, default=str)
    if stdout:
        print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def _pct(values, q):
    return float(np.percentile(values, q)) if len(values) else None


def _per_token(runs: list[dict], key: str) -> float:
    total = sum(sum(r["counters"].get(key, ())) for r in runs)
    n = sum(len(r["decode_s"]) for r in runs)
    return total / n if n else 0.0


def _window_ratio(pt: dict) -> str:
    held, needed = pt.get("window_neurons") or 0, pt.get("neurons_needed") or 0
    return f"{held} / {needed:.0f} ({held / needed:.2f}x)" if held and needed else "-"


def _rate(hit: float, needed: float) -> float | None:
    return hit / needed if needed else None


def summarize_mode(mode, info, warm, runs, traffic, device, rates) -> dict:
    decode_ms = np.array([s * 1e3 for r in runs for s in r["decode_s"]])
    n_tokens = decode_ms.size
    context = float(np.mean([c for r in runs for c in r["context"]])) if n_tokens else 0.0
    pt = {k: _per_token(runs, k) for k in (
        "io_bytes_read", "io_bytes_requested", "io_requests", "io_read_calls", "io_seconds", "io_retries",
        "io_wait_seconds", "compute_seconds", "neurons_needed", "neurons_hit", "neurons_loaded", "neurons_evicted",
        "experts_needed", "experts_hit", "experts_loaded", "experts_low_precision", "prefetch_issued",
        "prefetch_hits", "ffn_calls")}
    mean_ms = float(decode_ms.mean()) if n_tokens else None
    io_wait_ms = pt["io_wait_seconds"] * 1e3
    compute_ms = pt["compute_seconds"] * 1e3
    dram = traffic.dram_bytes(mode, context, pt["neurons_needed"] if pt["ffn_calls"] else None)
    floor = floor_ms(device, pt["io_bytes_read"], pt["io_read_calls"], dram["total"])
    p50 = _pct(decode_ms, 50)
    hit_rate = _rate(pt["neurons_hit"], pt["neurons_needed"])
    streams = mode in ("streaming", "oracle")
    pred = predict(traffic, mode, device, rates, context=context, hit_rate=hit_rate if streams else None,
                   expert_hit_rate=_rate(pt["experts_hit"], pt["experts_needed"]) if streams else None)
    peak_runs = max((r["rss"]["peak"] for r in runs), default=None)
    return {
        "mode": info["mode"],
        "tokens_measured": int(n_tokens),
        "ttft_ms": {"p50": _pct([r["ttft_s"] * 1e3 for r in runs], 50),
                    "runs": [r["ttft_s"] * 1e3 for r in runs]},
        "decode_ms": {"p50": p50, "p90": _pct(decode_ms, 90), "mean": mean_ms,
                      "min": float(decode_ms.min()) if n_tokens else None,
                      "runs_p50": [_pct([s * 1e3 for s in r["decode_s"]], 50) for r in runs]},
        "tokens_per_s": n_tokens / (decode_ms.sum() / 1e3) if n_tokens else None,
        "per_token": {
            "flash_bytes": pt["io_bytes_read"], "flash_bytes_requested": pt["io_bytes_requested"],
            "flash_requests": pt["io_requests"], "flash_read_calls": pt["io_read_calls"],
            "flash_retries": pt["io_retries"],
            "read_amplification": pt["io_bytes_read"] / pt["io_bytes_requested"] if pt["io_bytes_requested"] else None,
            "dram_bytes": dram["total"], "dram_bytes_by_part": {k: v for k, v in dram.items() if k != "total"},
            "io_ms": pt["io_seconds"] * 1e3, "io_wait_ms": io_wait_ms, "streamed_compute_ms": compute_ms,
            "rest_ms": (mean_ms - io_wait_ms - compute_ms) if mean_ms is not None else None,
            "neurons_needed": pt["neurons_needed"], "neurons_loaded": pt["neurons_loaded"],
            "window_neurons": info.get("window_neurons", 0),
            "neurons_evicted": pt["neurons_evicted"], "experts_needed": pt["experts_needed"],
            "experts_loaded": pt["experts_loaded"], "context": context,
        },
        "cache": {"neuron_hit_rate": hit_rate,
                  "expert_hit_rate": _rate(pt["experts_hit"], pt["experts_needed"]),
                  "expert_low_precision_rate": _rate(pt["experts_low_precision"], pt["experts_needed"]),
                  "prefetch_hit_rate": _rate(pt["prefetch_hits"], pt["prefetch_issued"])},
        "predicted": pred.to_dict(),
        "prediction_error": (pred.ms - p50) / p50 if p50 else None,
        "floor": {**floor, "achieved_fraction": floor["ms"] / p50 if p50 else None},
        "memory": {"rss_peak_runs": peak_runs, "rss_peak_source": runs[0]["rss"]["source"] if runs else None,
                   "rss_peak_reset_before_runs": bool(runs and runs[0].get("rss_peak_reset")),
                   "rss_after_load": info["rss_after_load"]["rss"], "rss_peak_warmup": warm["rss"]["peak"],
                   "budget": info["budget"], "minimum_bytes": info["minimum_bytes"],
                   "resident_weight_bytes": info["resident_bytes"], "stream_buffer_bytes": info["buffer_bytes"],
                   "accounted_bytes": info["accounted_bytes"],
                   "kv_cache_bytes": max((r["kv_bytes"] for r in runs), default=0),
                   "budget_note": "resident baseline: runs without a budget" if mode == "resident" else ""},
        "warmup": {"load_s": info["load_s"], "seconds": warm["seconds"], "first_token_s": warm["first_token_s"],
                   "tokens": warm["tokens"], "numba_compile_s": warm["compile_s"],
                   "numba_cache_hits": warm["cache_hits"], "numba_cache_misses": warm["cache_misses"],
                   "numba_cache_warm": warm["cache_warm"]},
        "read_modes": info["read_modes"],
        "threads": info["threads"],
    }


def ratios(modes: dict) -> dict:
    """p50 ms/token of a over b, for the baselines against every other mode."""
    out = {}
    for base in ("naive", "resident"):
        if base not in modes:
            continue
        for m, r in modes.items():
            if m == base:
                continue
            a, b = modes[base]["decode_ms"]["p50"], r["decode_ms"]["p50"]
            key = f"{base}/{m}" if base == "naive" else f"{m}/{base}"
            if a and b:
                out[key] = a / b if base == "naive" else b / a
    return out


def build_results(*, cfg, manifest, traffic, device, device_source, rates, modes, infos, warm, runs, skipped,
                  prompt, load_avg=(None, None), notes=None) -> dict:
    from edgeinfer.bench.runner import config_dict
    source = manifest.raw.get("source") or {}
    synthetic = source.get("synthetic")
    per_mode = {m: summarize_mode(m, infos[m], warm[m], runs[m], traffic, device, rates) for m in modes}
    c = manifest.config
    return {
        "edgeinfer_bench": SCHEMA,
        "edgeinfer_version": __version__,
        "synthetic": bool(synthetic),
        "title": _title(manifest, synthetic),
        "host": {"name": socket.gethostname(), "machine": platform.machine(), "system": platform.system(),
                 "cpus": os.cpu_count(), "load_avg_start": load_avg[0], "load_avg_end": load_avg[1]},
        "model": {"path": str(manifest.folder), "source": source, "family": c.family, "layers": c.num_layers,
                  "hidden": c.hidden_size, "ffn": c.ffn_dim, "experts": c.num_experts, "vocab": c.vocab_size,
                  "quantization": manifest.quantization.get("weights"),
                  "weight_bytes": sum(manifest.files[f]["size"] for f in {e.file for e in manifest.tensors.values()}),
                  "ffn_bytes": traffic.ffn_bytes, "true_active": traffic.true_active,
                  "predicted_active": traffic.predicted_active},
        "device": {"name": device.name, "source": device_source, "dram_gbps": device.dram_bandwidth_gbps,
                   "flash_gbps": {str(k): v for k, v in device.flash_read_gbps}, "cores": device.cores},
        "config": {**config_dict(cfg), "prompt_tokens_used": len(prompt), "direct_io": True,
                   "alternating": True, "sampling": "greedy, EOS ignored"},
        "kernel_rates": rates.to_dict(),
        "modes": per_mode,
        "ratios": ratios(per_mode),
        "skipped": skipped,
        "notes": notes or {},
    }


def _title(manifest, synthetic) -> str:
    name = manifest.folder.name
    if synthetic:
        return f"{name} [SYNTHETIC weights: {synthetic.get('shape', '')}, not a trained model]"
    return name


# -- the table ---------------------------------------------------------------------------

def _ms(v):
    return "-" if v is None else (f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}")


def _n(v):
    return f"{v:.0f}" if v >= 10 or v == 0 else f"{v:.1f}"


def _b(v):
    return "-" if v is None else fmt_bytes(v)


def _frac(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def format_table(res: dict) -> str:
    modes = res["modes"]
    names = list(modes)
    cfg = res["config"]
    dev = res["device"]
    head = [f"edgeinfer bench: {res['title']}",
            f"  model {res['model']['path']} ({res['model']['family']}, {res['model']['layers']} layers, "
            f"hidden {res['model']['hidden']}, ffn {res['model']['ffn']}, {res['model']['quantization']}; "
            f"weights {_b(res['model']['weight_bytes'])}, FFN {_b(res['model']['ffn_bytes'])})",
            f"  device {dev['name']} [{dev['source']}]: DRAM {dev['dram_gbps']:.1f} GB/s, flash "
            f"{_flash_summary(dev)}",
            f"  prompt {cfg['prompt_tokens_used']} tokens, {cfg['new_tokens']} new, {cfg['runs']} runs per mode "
            f"alternating; budget {_budget(cfg['memory_budget'])}; direct I/O; warm-up excluded"
            + (f"; {cfg['activations']} activations" if cfg.get("activations") else ""),
            f"  host {res['host']['cpus']} CPUs, load average {res['host']['load_avg_start']} at start, "
            f"{res['host']['load_avg_end']} at end (other work slows every mode alike: runs alternate)"]
    rows: list[tuple[str, ...]] = [("",) + tuple(names)]

    def row(label, fn):
        rows.append((label,) + tuple(fn(modes[m]) for m in names))

    def sep(label):
        rows.append((label,) + ("",) * len(names))

    sep("latency")
    row("  time to first token (ms)", lambda r: _ms(r["ttft_ms"]["p50"]))
    row("  decode p50 (ms/token)", lambda r: _ms(r["decode_ms"]["p50"]))
    row("  decode p90 (ms/token)", lambda r: _ms(r["decode_ms"]["p90"]))
    row("  tokens/s", lambda r: "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}")
    rat = res["ratios"]
    if "naive" in modes:
        row("  speedup over naive", lambda r: _x(rat.get(f"naive/{r['mode']}")) if r["mode"] != "naive" else "1.00x")
    if "resident" in modes:
        row("  slowdown vs resident", lambda r: _x(rat.get(f"{r['mode']}/resident"))
            if r["mode"] != "resident" else "1.00x")
    sep("why")
    row("  cost model (ms/token)", lambda r: _ms(r["predicted"]["ms"]))
    row("  prediction error", lambda r: "-" if r["prediction_error"] is None else f"{100 * r['prediction_error']:+.0f}%")
    row("  physical floor (ms/token)", lambda r: _ms(r["floor"]["ms"]))
    row("    flash + DRAM (ms)", lambda r: f"{_ms(r['floor']['flash_ms'])} + {_ms(r['floor']['dram_ms'])}")
    row("  achieved fraction of floor", lambda r: _frac(r["floor"]["achieved_fraction"]))
    row("  flash read per token", lambda r: _b(r["per_token"]["flash_bytes"]))
    row("    reads per token / mean size", lambda r: f"{_n(r['per_token']['flash_read_calls'])} / "
        f"{_b(r['floor']['mean_read_bytes']) if r['per_token']['flash_read_calls'] else '-'}")
    row("  DRAM read per token", lambda r: _b(r["per_token"]["dram_bytes"]))
    row("  I/O time per token (ms)", lambda r: _ms(r["per_token"]["io_ms"]))
    row("  I/O wait in streamed layers (ms)", lambda r: _ms(r["per_token"]["io_wait_ms"]))
    row("  compute in streamed layers (ms)", lambda r: _ms(r["per_token"]["streamed_compute_ms"]))
    row("  rest of the token (ms)", lambda r: _ms(r["per_token"]["rest_ms"]))
    row("  neuron window hit rate", lambda r: _frac(r["cache"]["neuron_hit_rate"]))
    row("    neurons loaded per token", lambda r: f"{r['per_token']['neurons_loaded']:.0f}"
        if r["cache"]["neuron_hit_rate"] is not None else "-")
    # windows barely larger than a token's active set can only reuse what the last token used
    row("    window / needed per token", lambda r: _window_ratio(r["per_token"]))
    row("  expert cache hit rate", lambda r: _frac(r["cache"]["expert_hit_rate"]))
    sep("memory")
    row("  peak RSS (measured runs)", lambda r: _b(r["memory"]["rss_peak_runs"]))
    row("  budget", lambda r: "none" if r["memory"]["budget"] is None else _b(r["memory"]["budget"]))
    row("  resident weights + buffers", lambda r: f"{_b(r['memory']['resident_weight_bytes'])} + "
        f"{_b(r['memory']['stream_buffer_bytes'])}")
    row("  KV cache", lambda r: _b(r["memory"]["kv_cache_bytes"]))
    sep("warm-up (excluded)")
    row("  load (s)", lambda r: f"{r['warmup']['load_s']:.2f}")
    row("  first token (s)", lambda r: f"{r['warmup']['first_token_s']:.2f}")
    row("  Numba compile (s)", lambda r: f"{r['warmup']['numba_compile_s']:.2f}")
    row("  Numba cache", lambda r: "warm" if r["warmup"]["numba_cache_warm"] else
        f"cold ({r['warmup']['numba_cache_misses']} compiled)")
    lines = head + [""] + _render(rows)
    for m, why in res["skipped"].items():
        lines.append(f"  ({m}: skipped, {why})")
    for m, note in res.get("notes", {}).items():
        lines.append(f"  ({note})")
    if res["synthetic"]:
        lines.append("  SYNTHETIC weights: shapes of a real model, statistics imitated; not a trained model")
    if dev["source"] == "profile":
        lines.append(f"  floor and prediction use the {dev['name']} profile; the measurement is of this machine")
    return "\n".join(lines)


def _budget(spec) -> str:
    if spec is None:
        return "none"
    return fmt_bytes(spec) if isinstance(spec, (int, float)) else str(spec)


def _flash_summary(dev: dict) -> str:
    table = {int(k): v for k, v in dev["flash_gbps"].items()}
    parts = [f"{v:.2f} GB/s @ {fmt_bytes(k)}" for k, v in sorted(table.items()) if k in (4096, 1 << 20)]
    return ", ".join(parts) or "?"


def _render(rows) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append("  ".join(cells).rstrip())
    return out
