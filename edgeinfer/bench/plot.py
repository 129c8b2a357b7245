"""Latency breakdown plot (PNG): per mode, a bar of decode ms/token split into I/O
wait, streamed-layer compute and the rest, beside the cost model's prediction and
the physical floor. Needs matplotlib: pip install 'edgeinfer[bench]'."""
from __future__ import annotations

from edgeinfer.errors import EdgeInferError


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise EdgeInferError("--plot needs matplotlib, which is not installed: pip install 'edgeinfer[bench]' "
                             "(or drop --plot; --json has every number)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_latency(res: dict, path: str) -> None:
    plt = require_matplotlib()
    modes = list(res["modes"])
    parts = [("I/O wait", "io_wait_ms", "#d95f02"), ("streamed compute", "streamed_compute_ms", "#1b9e77"),
             ("rest (resident layers, Python)", "rest_ms", "#7570b3")]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(modes), 4.2), dpi=120)
    xs = range(len(modes))
    bottom = [0.0] * len(modes)
    split = []
    for m in modes:
        pt = res["modes"][m]["per_token"]
        vals = [max(0.0, pt[key] or 0.0) for _, key, _ in parts]
        mean = res["modes"][m]["decode_ms"]["mean"] or 0.0
        if sum(vals) > mean > 0:        # counters that overlap: scale the stack to the token's time
            vals = [v * mean / sum(vals) for v in vals]
        split.append(vals)
    for i, (label, _, color) in enumerate(parts):
        vals = [v[i] for v in split]
        ax.bar(xs, vals, 0.55, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    pred = [res["modes"][m]["predicted"]["ms"] for m in modes]
    floor = [res["modes"][m]["floor"]["ms"] for m in modes]
    p50 = [res["modes"][m]["decode_ms"]["p50"] for m in modes]
    ax.scatter(xs, pred, marker="D", color="black", zorder=3, label="cost model")
    ax.scatter(xs, floor, marker="_", s=900, color="red", zorder=3, label="physical floor")
    for x, v in zip(xs, p50):
        ax.annotate(f"p50 {v:.1f}", (x, v), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.set_xticks(list(xs), modes)
    ax.set_ylabel("decode ms / token (mean, split)")
    ax.set_title(res["title"], fontsize=9)
    ax.set_ylim(0, 1.25 * max(bottom + pred + floor + p50))
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
