"""Flash streaming of FFN neurons: window mechanics, exactness with the oracle,
quality with the learned predictors, budgets, I/O accounting."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import DENSE, ffn_budget

import edgeinfer
from edgeinfer.bench.perplexity import perplexity
from edgeinfer.errors import BudgetError
from edgeinfer.streaming.ffn.window import NeuronWindow


# ---- the window ----------------------------------------------------------------------------
def test_window_delete_frees_the_slot_without_moving_records():
    w = NeuronWindow(ffn=100, record_bytes=8, capacity=6, window=2)
    w.begin_step()
    slots = w.reserve(np.array([5, 7, 9]))
    w.buf[slots] = np.array([[5] * 8, [7] * 8, [9] * 8], dtype=np.uint8)
    assert w.count == 3 and list(w.slot_of[[5, 7, 9]]) == [0, 1, 2]
    w._delete_slots(np.array([0]))
    assert w.count == 2 and w.slot_of[5] == -1 and list(w.slot_of[[7, 9]]) == [1, 2]
    assert (w.buf[1] == 7).all() and (w.buf[2] == 9).all()     # survivors stay put
    assert 0 in w.reserve(np.array([40]))                      # the freed slot is reused


def test_window_bookkeeping_stays_consistent():
    """Random reserve / touch / make_room / drop_stale / unreserve: every neuron held has
    exactly one slot, free and occupied slots partition the buffer, capacity holds."""
    rng = np.random.default_rng(0)
    w = NeuronWindow(ffn=300, record_bytes=4, capacity=40, window=3)
    for _ in range(400):
        w.begin_step()
        w.drop_stale()
        need = rng.choice(300, int(rng.integers(1, 40)), replace=False)
        missing = w.touch(need)
        w.make_room(missing.size, need)
        w.reserve(missing)
        if rng.random() < 0.1:
            w.unreserve(missing)
        held = np.flatnonzero(w.slot_of >= 0)
        occupied = np.flatnonzero(w.neuron_at >= 0)
        assert held.size == occupied.size == w.count <= w.capacity
        assert (w.neuron_at[w.slot_of[held]] == held).all()
        free = w.free[:w.nfree]
        assert np.unique(free).size == w.nfree and not np.isin(free, occupied).any()


def test_window_keeps_last_k_tokens_only():
    w = NeuronWindow(ffn=50, record_bytes=4, capacity=10, window=2)
    w.begin_step()
    w.reserve(np.array([1, 2]))
    w.begin_step()
    assert list(w.touch(np.array([2, 3]))) == [3]
    w.reserve(np.array([3]))
    w.begin_step()                         # step 3: neuron 1 last used at step 1 -> stale
    assert w.drop_stale() == 1 and w.slot_of[1] == -1 and w.slot_of[2] >= 0


def test_make_room_evicts_least_recently_used_not_needed():
    w = NeuronWindow(ffn=50, record_bytes=4, capacity=3, window=0)
    for n in (10, 11, 12):
        w.begin_step()
        w.reserve(np.array([n]))
    w.begin_step()
    w.touch(np.array([10]))
    assert w.make_room(2, keep=np.array([10, 20, 21])) == 2
    assert w.slot_of[10] >= 0 and w.slot_of[11] == -1 and w.slot_of[12] == -1


# ---- exactness -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DENSE)
@pytest.mark.parametrize("fraction", [0.08, 0.3, 0.7])
def test_oracle_streaming_equals_resident(name, fraction, exported):
    """With the true active set, streaming changes nothing but summation order,
    whatever the budget (small ones process the active set in rounds)."""
    folder = exported(name, "int8")
    res = edgeinfer.load(folder)
    streamed = edgeinfer.load(folder, memory_budget=ffn_budget(folder, fraction), mode="oracle")
    assert streamed.mode == "oracle"
    ids = res.tokenizer.encode("The king said that he would not go to the war, for")
    np.testing.assert_allclose(streamed.logits(ids), res.logits(ids), atol=2e-4, rtol=0)
    c1, c2 = res.new_cache(), streamed.new_cache()
    res.forward(ids[:4], c1)
    streamed.forward(ids[:4], c2)
    for t in ids[4:]:
        np.testing.assert_allclose(streamed.forward([t], c2), res.forward([t], c1), atol=2e-4, rtol=0)
    s = streamed.stats.snapshot()
    assert s["neurons_loaded"] > 0 and s["io_bytes_requested"] > 0


# ---- quality with the learned predictor --------------------------------------------------------
@pytest.mark.parametrize("name", DENSE)
def test_predictor_quality_at_half_ffn_budget(name, exported, wikitext_ids):
    """Token-by-token perplexity (the predictor chooses per token) at a budget that holds
    half of the FFN, against resident: within +2%."""
    folder = exported(name, "int8", predictors=True)
    ids = wikitext_ids[:2048]
    base = perplexity(edgeinfer.load(folder), ids, stepwise=True)
    model = edgeinfer.load(folder, memory_budget=ffn_budget(folder, 0.5))
    assert model.mode == "streaming"
    ppl = perplexity(model, ids, stepwise=True)
    s = model.stats.snapshot()
    per_call = s["neurons_needed"] / s["ffn_calls"]
    print(f"{name}: resident ppl {base:.3f}, streaming ppl {ppl:.3f} ({ppl / base - 1:+.2%}); "
          f"{per_call:.0f} neurons/layer/token chosen, {s['neurons_loaded'] / s['ffn_calls']:.1f} loaded")
    assert ppl / base - 1 < 0.02


def test_predictor_statistics_in_manifest(exported):
    from edgeinfer.format.manifest import read_manifest
    m = read_manifest(exported("opt-relu-7m", "int8", predictors=True))
    stats = m.raw["predictors"]
    assert len(stats) == m.config.num_layers
    for s in stats:
        assert 0.9 <= s["recall"] <= 1 and 0 < s["precision"] <= 1 and s["predicted_active"] < 0.8


# ---- budgets and accounting --------------------------------------------------------------------
def test_budget_below_resident_minimum(exported):
    folder = exported("opt-relu-7m", "int8", predictors=True)
    with pytest.raises(BudgetError, match=r"below this model's resident minimum .*\(minimum \d+ bytes"):
        edgeinfer.load(folder, memory_budget=ffn_budget(folder, 0.0))


def test_window_buffers_stay_within_budget(exported):
    folder = exported("llama-relu-8m", "int8", predictors=True)
    budget = ffn_budget(folder, 0.4)
    model = edgeinfer.load(folder, memory_budget=budget)
    windows = [fn.window for fn, _, _ in model.executor.steps if hasattr(fn, "window")]
    assert len(windows) == model.config.num_layers
    assert model.resident_bytes + sum(w.nbytes for w in windows) <= budget


def test_naive_reads_the_whole_ffn_every_token(exported):
    folder = exported("opt-relu-7m", "int8", predictors=True)
    model = edgeinfer.load(folder, memory_budget=ffn_budget(folder, 0.5), mode="naive")
    ffn_bytes = sum(e.nbytes for e in model.manifest.tensors.values() if e.name.endswith(".ffn.bundle"))
    model.generate("The king said", max_new_tokens=5)
    s = model.stats.snapshot()
    assert s["io_bytes_requested"] == ffn_bytes * s["ffn_calls"] // model.config.num_layers
    assert s["ffn_calls"] == model.config.num_layers * 5   # prefill + 4 decode steps


def test_streaming_reads_less_than_naive(exported):
    folder = exported("opt-relu-7m", "int8", predictors=True)
    budget = ffn_budget(folder, 0.5)
    a = edgeinfer.load(folder, memory_budget=budget, mode="naive")
    b = edgeinfer.load(folder, memory_budget=budget)
    prompt = "The king said that he would"
    a.generate(prompt, max_new_tokens=16)
    b.generate(prompt, max_new_tokens=16)
    na, nb = a.stats.snapshot()["io_bytes_requested"], b.stats.snapshot()["io_bytes_requested"]
    print(f"flash bytes: naive {na}, streaming {nb} ({nb / na:.1%})")
    assert nb < 0.35 * na


def test_cli_generate_with_budget(exported, capsys):
    from edgeinfer.cli import main
    folder = exported("llama-relu-8m", "int8", predictors=True)
    assert main(["generate", "The king said", "-m", str(folder), "--memory-budget",
                 str(ffn_budget(folder, 0.5)), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("The king said")


# ---- the memory plan and the streamed-op interface ----------------------------------------
def _plan(folder, budget, **options):
    from edgeinfer.format.manifest import read_manifest
    from edgeinfer.runtime.executor import load_graph
    from edgeinfer.runtime.options import RuntimeOptions
    from edgeinfer.runtime.stats import RuntimeStats
    from edgeinfer.streaming.plan import plan_memory
    manifest = read_manifest(folder)
    return plan_memory(manifest, load_graph(manifest), budget, RuntimeOptions(**options), RuntimeStats())


def test_split_budget_follows_demand_and_gives_what_a_capped_node_cannot_use_to_the_others():
    from edgeinfer.streaming.budget import split_budget
    assert split_budget(0, [10, 20], [None, None]) == [10, 20]
    assert split_budget(300, [0, 0, 0], [(1.0, 1000), (2.0, 1000), None]) == [66, 133, 100]   # None: the mean
    # node 0 can use 50 bytes beyond its minimum; the rest of its part goes to node 1
    assert split_budget(300, [10, 10], [(100.0, 60), (100.0, 10_000)]) == [60, 260]


def test_streamed_op_interface_says_what_is_required_and_the_defaults():
    from edgeinfer.runtime.executor.graph import Node
    from edgeinfer.streaming.base import StreamedOp
    from edgeinfer.streaming.registry import STREAMED_OPS

    class OnlyMinimum(StreamedOp):
        def minimum_bytes(self, node, manifest, options, mode):
            return 1

    with pytest.raises(TypeError, match="build"):
        OnlyMinimum()

    class Minimal(OnlyMinimum):
        def build(self, node, const, ctx):
            return None

    node = Node(name="n", op_type="X", domain="d", inputs=["x", "w", "b"], outputs=["y"], attrs={})
    assert Minimal().demand(node, None, "streaming") is None and Minimal().streamed_inputs(node) == ["w"]
    assert STREAMED_OPS and all(issubclass(cls, StreamedOp) for cls in STREAMED_OPS.values())


def test_plan_logs_what_streams_and_why_at_debug(exported, caplog):
    import logging
    folder = exported("llama-relu-8m", "int8", predictors=True)
    with caplog.at_level(logging.DEBUG, logger="edgeinfer.streaming.plan"):
        plan = _plan(folder, ffn_budget(folder, 0.3))
    plan.close()
    text = caplog.text
    assert plan.mode == "streaming" and "ffn.bin" in text
    for node in plan.streamed:
        assert f"{node.name} (BundledFFN): share " in text
    assert "per token, at most" in text            # the predictor statistics drove the split


def test_stream_context_shares_scratch_and_closes_what_it_opened(exported):
    folder = exported("opt-relu-7m", "int8", predictors=True)
    model = edgeinfer.load(folder, memory_budget=ffn_budget(folder, 0.5), mode="naive")
    plan = model.plan
    layer_bytes = max(e.nbytes for e in model.manifest.tensors.values() if e.name.endswith(".ffn.bundle"))
    assert plan.scratch_bytes == layer_bytes            # one buffer, shared by every layer
    assert plan.moe_runtime is None
    files = plan.streamed_files()
    assert list(files) == ["ffn.bin"] and not files["ffn.bin"].closed
    model.generate("The king said", max_new_tokens=2)
    model.close()
    assert files["ffn.bin"].closed
    with pytest.raises(RuntimeError):            # the read queue's thread has ended
        plan.context.reads.submit(print)
