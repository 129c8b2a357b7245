"""edgeinfer bench: the runner on the demo model, the JSON beside the table, bad input,
the cost model's arithmetic, synthetic checkpoints' statistics."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeinfer.cli import main
from edgeinfer.errors import EdgeInferError
from edgeinfer.runtime.loader import DEMO_MODEL


def _cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo_bench(tmp_path_factory):
    """One default benchmark of the demo model (-m, plus --json-file to parse)."""
    path = tmp_path_factory.mktemp("bench") / "results.json"
    rc, out, err = _cli("bench", "-m", str(DEMO_MODEL), "--json-file", str(path))
    assert rc == 0, err
    return out, json.loads(path.read_text())


ROWS = ["time to first token (ms)", "decode p50 (ms/token)", "decode p90 (ms/token)", "tokens/s",
        "speedup over naive", "cost model (ms/token)", "physical floor (ms/token)", "achieved fraction of floor",
        "flash read per token", "DRAM read per token", "I/O time per token (ms)", "compute in streamed layers (ms)",
        "neuron window hit rate", "expert cache hit rate", "peak RSS (measured runs)", "budget",
        "resident weights + buffers", "Numba compile (s)", "Numba cache"]


def _row(table: str, label: str) -> list[str]:
    line = next(ln for ln in table.splitlines() if ln.strip().startswith(label))
    return line[line.index(label) + len(label):].split()


def test_demo_bench_prints_everything(demo_bench):
    out, res = demo_bench
    for label in ROWS:
        assert label in out, label
    from edgeinfer.bench.runner import DEFAULT_MODES, mode_availability
    from edgeinfer.format.manifest import read_manifest
    from edgeinfer.runtime.executor import load_graph
    m = read_manifest(DEMO_MODEL)
    g = load_graph(m)
    runnable = [x for x in DEFAULT_MODES if mode_availability(m, g, x) is None]
    assert list(res["modes"]) == runnable and {"resident", "naive"} <= set(runnable)
    for x in DEFAULT_MODES:
        assert (x in runnable) != (f"{x}: skipped" in out)


def test_mode_availability_says_why():
    from edgeinfer.bench.runner import mode_availability
    from edgeinfer.runtime.executor.graph import Graph, Node
    ffn = Node("layers.0.ffn", "BundledFFN", "edgeinfer", ["x", "layers.0.ffn.bundle", "", ""], ["y"])
    g = Graph([ffn], [], [], {}, {}, {})
    assert mode_availability(None, g, "resident") is None
    assert "no sparsity predictors" in mode_availability(None, g, "streaming")
    assert mode_availability(None, g, "naive") is None
    assert "no streamable" in mode_availability(None, Graph([], [], [], {}, {}, {}), "naive")


def test_json_carries_the_table_numbers(demo_bench):
    out, res = demo_bench
    names = list(res["modes"])
    header = next(ln for ln in out.splitlines() if ln.split() == names)
    assert header
    for label, get in (("decode p50 (ms/token)", lambda r: r["decode_ms"]["p50"]),
                       ("cost model (ms/token)", lambda r: r["predicted"]["ms"]),
                       ("physical floor (ms/token)", lambda r: r["floor"]["ms"])):
        for cell, m in zip(_row(out, label), names):
            assert float(cell) == pytest.approx(get(res["modes"][m]), rel=0.01, abs=0.01), (label, m)
    tps = [float(c) for c in _row(out, "tokens/s")]
    assert tps == pytest.approx([res["modes"][m]["tokens_per_s"] for m in names], rel=0.001, abs=0.051)


def test_demo_bench_numbers_are_consistent(demo_bench):
    _, res = demo_bench
    cfg = res["config"]
    res_m, naive = res["modes"]["resident"], res["modes"]["naive"]
    assert not res["synthetic"]
    assert res["device"]["source"].startswith("probe")
    for r in (res_m, naive):
        assert r["tokens_measured"] == cfg["runs"] * (cfg["new_tokens"] - 1)
        d = r["decode_ms"]
        assert 0 < d["min"] <= d["p50"] <= d["p90"]
        assert r["ttft_ms"]["p50"] > 0 and r["tokens_per_s"] > 0
        assert r["memory"]["rss_peak_runs"] > r["memory"]["resident_weight_bytes"]
        assert r["warmup"]["numba_cache_warm"] in (True, False)
        assert r["predicted"]["ms"] > 0 and r["floor"]["ms"] > 0
        assert 0 < r["floor"]["achieved_fraction"] < 1.5
    # resident reads nothing from flash; naive reads every layer's whole bundle per token
    assert res_m["per_token"]["flash_bytes"] == 0
    assert naive["per_token"]["flash_bytes_requested"] == res["model"]["ffn_bytes"]
    assert naive["per_token"]["flash_bytes"] >= res["model"]["ffn_bytes"]
    assert naive["per_token"]["io_ms"] > 0 and naive["cache"]["neuron_hit_rate"] == 0
    assert naive["predicted"]["flash_bytes"] == res["model"]["ffn_bytes"]
    assert naive["memory"]["budget"] is not None and res_m["memory"]["budget"] is None
    assert naive["read_modes"] and set(naive["read_modes"].values()) <= {"direct", "nocache", "buffered"}
    assert res["ratios"]["naive/resident"] > 0 and "resident/naive" not in res["ratios"]
    st = res["modes"].get("streaming")
    if st is not None:                              # the demo export has predictors
        assert 0 < st["per_token"]["flash_bytes"] < naive["per_token"]["flash_bytes"]
        assert 0 <= st["cache"]["neuron_hit_rate"] <= 1 and st["per_token"]["neurons_needed"] > 0
        assert st["memory"]["stream_buffer_bytes"] > 0
        # windows of the demo's record size fill the buffers: capacity = buffer bytes / record
        assert 0 < st["per_token"]["window_neurons"] * 32 <= st["memory"]["stream_buffer_bytes"]
        assert naive["per_token"]["window_neurons"] == 0
        assert st["predicted"]["inputs"]["hit_rate"] == pytest.approx(st["cache"]["neuron_hit_rate"])


@pytest.mark.parametrize("argv, message", [
    (["--device", "jetson-nano-2gb"], "unknown device profile 'jetson-nano-2gb'"),
    (["--compare", "naive", "--memory-budget", "1MB"], "below this model's resident minimum"),
    (["--compare", "resident,turbo"], "unknown mode 'turbo'"),
    (["--prompt-tokens", "500", "--new-tokens", "64"], "exceeds the model's context window"),
    (["--memory-budget", "lots", "--compare", "naive"], "cannot read memory budget"),
])
def test_bad_input_is_one_clear_line(argv, message):
    rc, out, err = _cli("bench", str(DEMO_MODEL), "--quiet", *argv)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeinfer: error: ") and message in lines[0], err


def test_not_a_model_folder(tmp_path):
    from conftest import MODELS
    rc, _, err = _cli("bench", str(MODELS / "llama-relu-8m"), "--quiet")
    assert rc == 1 and "not an edgeinfer model folder" in err and "edgeinfer export" in err
    rc, _, err = _cli("bench", str(tmp_path / "nothing"), "--quiet")
    assert rc == 1 and "model folder not found" in err


def test_plot_needs_matplotlib_or_writes_png(demo_bench, tmp_path):
    _, res = demo_bench
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        rc, _, err = _cli("bench", str(DEMO_MODEL), "--quiet", "--plot", str(tmp_path / "x.png"))
        assert rc == 1 and "pip install 'edgeinfer[bench]'" in err
        return
    from edgeinfer.bench.plot import plot_latency
    plot_latency(res, tmp_path / "latency.png")
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_label_reaches_title(demo_bench, tmp_path):
    from edgeinfer.bench.report import _title, format_table
    from edgeinfer.bench.synthetic import label_manifest
    from edgeinfer.format.manifest import read_manifest
    folder = tmp_path / "m"
    shutil.copytree(DEMO_MODEL, folder)
    label_manifest(folder, {"shape": "7b-like", "generator": "test"})
    m = read_manifest(folder)
    assert m.raw["source"]["synthetic"]["shape"] == "7b-like"
    assert "SYNTHETIC" in _title(m, m.raw["source"]["synthetic"])
    _, res = demo_bench
    res = dict(res, synthetic=True, title=_title(m, m.raw["source"]["synthetic"]))
    assert "SYNTHETIC" in format_table(res).splitlines()[0]


# -- the cost model's arithmetic --------------------------------------------------------

@pytest.fixture(scope="module")
def demo_traffic():
    from edgeinfer.bench.traffic import model_traffic
    from edgeinfer.format.manifest import read_manifest
    from edgeinfer.runtime.executor import load_graph
    m = read_manifest(DEMO_MODEL)
    return m, model_traffic(m, load_graph(m))


def _rates(**kw):
    from edgeinfer.bench.rates import KernelRates
    base = dict(gemv_gbps={4: 5.0, 8: 5.0, 16: 5.0}, ffn_first_s=1e-7, ffn_rest_s=3e-7, attention_s=1e-7,
                small_op_s=2e-6, predictor_s=1e-5, window_s=1e-6, threads=1)
    return KernelRates(**{**base, **kw})


def test_traffic_matches_the_manifest(demo_traffic):
    m, t = demo_traffic
    bundles = [e for n, e in m.tensors.items() if n.endswith(".bundle")]
    assert t.ffn_bytes == sum(e.nbytes for e in bundles) and len(t.ffn) == m.config.num_layers
    qk = sum(e.nbytes for n, e in m.tensors.items() if ".attn." in n)
    assert t.resident_matmul_bytes >= qk
    assert t.kv_bytes_per_position == 2 * m.config.num_layers * m.config.num_kv_heads * m.config.head_dim * 4
    d0, d1 = t.dram_bytes("resident", 10), t.dram_bytes("resident", 20)
    assert d1["kv_cache"] == 2 * d0["kv_cache"] and d1["total"] > d0["total"]


def test_cost_model_orders_modes_and_counts_bytes(demo_traffic):
    from edgeinfer.devices.profiles import load_profile

    from edgeinfer.bench.cost_model import floor_ms, predict
    _, t = demo_traffic
    dev = load_profile("laptop-x86-16gb")
    res = predict(t, "resident", dev, _rates(), context=100)
    naive = predict(t, "naive", dev, _rates(), context=100)
    assert res.flash_bytes == 0 and "flash" not in res.parts
    assert naive.flash_bytes == t.ffn_bytes
    assert naive.parts["flash"] == pytest.approx(t.ffn_bytes / (dev.flash_bandwidth(t.ffn[0].bundle_bytes) * 1e9) * 1e3)
    assert naive.ms > res.ms and res.ms == pytest.approx(sum(res.parts.values()))
    # twice the GEMV rate halves the resident matmul part
    fast = predict(t, "resident", dev, _rates(gemv_gbps={4: 10.0, 8: 10.0, 16: 10.0}), context=100)
    assert fast.parts["resident_matmuls"] == pytest.approx(res.parts["resident_matmuls"] / 2)
    # the floor: bytes / bandwidth, both parts
    f = floor_ms(dev, 2e6, 10, 1e8)
    assert f["flash_ms"] == pytest.approx(2e6 / (dev.flash_bandwidth(200_000) * 1e9) * 1e3)
    assert f["dram_ms"] == pytest.approx(1e8 / (dev.dram_bandwidth_gbps * 1e9) * 1e3)


def test_streaming_prediction_falls_with_window_reuse(demo_traffic):
    import dataclasses

    from edgeinfer.devices.profiles import load_profile

    from edgeinfer.bench.cost_model import predict
    from edgeinfer.bench.traffic import ModelTraffic
    _, t = demo_traffic
    t = ModelTraffic(**{**{f.name: getattr(t, f.name) for f in dataclasses.fields(t)},
                        "ffn": [dataclasses.replace(f, true_active=0.2, predicted_active=0.4) for f in t.ffn]})
    dev = load_profile("raspberry-pi-5-8gb")
    cold = predict(t, "streaming", dev, _rates(), context=50, hit_rate=0.0)
    warm = predict(t, "streaming", dev, _rates(), context=50, hit_rate=0.9)
    naive = predict(t, "naive", dev, _rates(), context=50)
    assert warm.flash_bytes < cold.flash_bytes < naive.flash_bytes
    assert warm.ms < cold.ms
    assert warm.inputs["hit_rate"] == 0.9 and warm.inputs["predicted_active"] == pytest.approx(0.4)


# -- synthetic checkpoints -------------------------------------------------------------

@pytest.mark.parametrize("shape", ["tiny", "tiny-moe"])
def test_synthetic_checkpoint_statistics(tmp_path, shape):
    from edgeinfer.export.checkpoint import Checkpoint
    from edgeinfer.export.config import model_config, read_hf_config

    from edgeinfer.bench.synthetic import write_checkpoint
    info = write_checkpoint(tmp_path / "ckpt", shape, layers=2, progress=False)
    cfg = read_hf_config(tmp_path / "ckpt")
    assert cfg["edgeinfer_synthetic"]["shape"] == shape and "SYNTHETIC" in cfg["edgeinfer_synthetic"]["note"]
    mc = model_config(cfg)
    ckpt = Checkpoint(tmp_path / "ckpt")
    assert "model.embed_tokens.weight" in ckpt
    assert (tmp_path / "ckpt" / "tokenizer.json").read_bytes() == (DEMO_MODEL / "tokenizer.json").read_bytes()
    for st in info["stats"]["layers"]:
        if mc.is_moe:
            usage = st["expert_usage"]
            assert sum(usage) == pytest.approx(1.0, abs=0.01)
            assert max(usage) > 2.0 / mc.num_experts        # skewed: some experts far above uniform
        else:
            assert 0.7 <= st["zero_fraction"] <= 0.9
            # consecutive tokens share active neurons well beyond chance (= the active fraction)
            assert st["reuse_previous_token"] > (1 - st["zero_fraction"]) + 0.15
            assert st["new_per_token_window5"] < 0.5 * (1 - st["zero_fraction"])


def test_synthetic_moe_checkpoint_takes_shape_overrides_and_expert_usage(tmp_path):
    """benchmarks/moe.py's checkpoint: shapes given on the command line, routers fitted to
    a trained model's per-layer expert usage instead of a Zipf law."""
    from edgeinfer.export.config import model_config, read_hf_config

    from edgeinfer.bench.synthetic import write_checkpoint
    usage = [[0.55, 0.15, 0.15, 0.15], [0.1, 0.1, 0.1, 0.7]]
    info = write_checkpoint(tmp_path / "ckpt", "tiny-moe", layers=2, hidden=128, ffn=256, experts=4,
                            expert_usage=usage, tokens=128, progress=False)
    mc = model_config(read_hf_config(tmp_path / "ckpt"))
    assert (mc.hidden_size, mc.ffn_dim, mc.num_experts, mc.experts_per_token) == (128, 256, 4, 2)
    for want, st in zip(usage, info["stats"]["layers"]):
        got = st["expert_usage"]
        assert int(np.argmax(got)) == int(np.argmax(want))     # the favoured expert is the one asked for
    with pytest.raises(EdgeInferError, match="expert_usage needs a MoE shape and at least 4 fractions"):
        write_checkpoint(tmp_path / "bad", "tiny-moe", layers=1, experts=4, expert_usage=[[0.5, 0.5]],
                         progress=False)
    with pytest.raises(EdgeInferError, match="hidden 100 is not a multiple"):
        write_checkpoint(tmp_path / "bad", "tiny-moe", layers=1, hidden=100, progress=False)


@pytest.mark.slow
def test_synthetic_export_and_streaming_bench(tmp_path):
    """A 7B-wide synthetic model whose FFN is twice the budget: bench prints naive/streaming
    ratios and the cost model lands within 30% of streaming's ms/token. Set
    EDGEINFER_BENCH_SYNTHETIC to a folder made by `edgeinfer bench synthetic` to reuse it."""
    import os

    from edgeinfer.bench import BenchConfig, run_bench
    from edgeinfer.bench.synthetic import make_synthetic
    out = os.environ.get("EDGEINFER_BENCH_SYNTHETIC")
    if not out:
        out = tmp_path / "syn"
        make_synthetic(out, shape="7b-wide", layers=2, calibration_tokens=2048, progress=False)
    m = json.loads((Path(out) / "manifest.json").read_text())
    assert m["source"]["synthetic"]["shape"]
    ffn = sum(t["nbytes"] for k, t in m["tensors"].items() if k.endswith(".bundle"))
    res = run_bench(BenchConfig(model=str(out), modes=("naive", "streaming"), memory_budget=ffn // 2,
                                prompt_tokens=32, new_tokens=16, runs=3, progress=False))
    assert res["synthetic"] and "SYNTHETIC" in res["title"]
    assert res["ratios"]["naive/streaming"] > 1
    assert abs(res["modes"]["streaming"]["prediction_error"]) < 0.3
