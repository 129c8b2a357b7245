"""RuntimeOptions.activations: "int8" quantizes the activations of every MatMulNBits to
int8 per weight block (kernels.quant.matmul_nbits(int8_activations=True), AVX512-VNNI;
onnxruntime: accuracy_level 4). It must stay within stated tolerances of the float32
default, and fall back to float32 with a warning where it cannot run."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import DENSE

import edgeinfer
from edgeinfer.bench.perplexity import perplexity
from edgeinfer.errors import ActivationsWarning, EdgeInferError
from edgeinfer.kernels import _simd
from edgeinfer.runtime.options import RuntimeOptions

PROMPTS = ["Once upon a time", "In the beginning of the war, the king said that"]
# int8 vs float32 activations, int4 and int8 exports of the fixtures: measured max |logit
# diff| 0.067-0.112 on logits of magnitude ~12 (rounding to 1/127 of each block's max),
# wikitext2 perplexity (2048 tokens) within +-0.05% of float32 activations.
LOGIT_ATOL = 0.25
PPL_REL = 0.005
GREEDY_TOKENS = 16

needs_vnni = pytest.mark.skipif(not _simd.HAS_VNNI, reason="this CPU has no AVX512-VNNI: int8 activations "
                                                            "fall back to float32 here (tested below)")


def _load(folder, **kw):
    return edgeinfer.load(folder, threads=1, verify="none", **kw)


def _nbits_fns(model):
    return [fn for fn, _, _ in model.executor.steps if hasattr(fn, "int8_activations")]


def _greedy(model, ids, n=GREEDY_TOKENS):
    cache, tokens, margins = model.new_cache(), [], []
    row = model.forward(ids, cache)[-1]
    for _ in range(n):
        top2 = np.partition(row, -2)[-2:]
        tokens.append(int(np.argmax(row)))
        margins.append(float(top2[1] - top2[0]))
        row = model.forward([tokens[-1]], cache)[-1]
    return tokens, margins


@needs_vnni
@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("name", DENSE)
def test_int8_activations_stay_within_tolerance(name, quant, exported):
    folder = exported(name, quant)
    ref, model = _load(folder), _load(folder, activations="int8")
    assert all(fn.int8_activations for fn in _nbits_fns(model)) and _nbits_fns(model)
    assert not any(fn.int8_activations for fn in _nbits_fns(ref))
    assert not model.executor.int8_fallback
    for p in PROMPTS:
        ids = ref.tokenizer.encode(p)
        a, b = ref.logits(ids), model.logits(ids)
        diff = np.abs(a - b).max()
        print(f"{name} {quant} int8 activations: max |logit diff| {diff:.3f} (logits up to {np.abs(a).max():.1f})")
        assert 0 < diff < LOGIT_ATOL
        (want, margins), (got, _) = _greedy(ref, ids), _greedy(model, ids)
        for i, (w, t, m) in enumerate(zip(want, got, margins)):
            assert t == w, f"{name} {quant}: greedy token {i} is {t}, float32's {w}"
            if m < 2 * LOGIT_ATOL:     # a near tie: either token is right, and the continuations may part
                break


@needs_vnni
@pytest.mark.parametrize("name", DENSE)
def test_int8_activations_perplexity(name, exported, wikitext_ids):
    folder = exported(name, "int4")
    ids = wikitext_ids[:2048]
    base = perplexity(_load(folder), ids)
    ppl = perplexity(_load(folder, activations="int8"), ids)
    print(f"{name} int4: ppl {base:.3f} float32 activations, {ppl:.3f} int8 ({ppl / base - 1:+.3%})")
    assert abs(ppl / base - 1) < PPL_REL


def test_unknown_activations_are_refused(exported):
    with pytest.raises(EdgeInferError, match="unknown activations 'int4'"):
        RuntimeOptions(activations="int4")
    with pytest.raises(EdgeInferError, match="choose one of float32, int8"):
        _load(exported("llama-relu-8m", "int4"), activations="bf16")


def test_float16_weights_are_unaffected(exported):
    """int8 activations are a MatMulNBits path only: a float16 export computes as before, silently."""
    folder = exported("llama-relu-8m", "f16")
    ids = edgeinfer.load(folder).tokenizer.encode(PROMPTS[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ActivationsWarning)
        model = _load(folder, activations="int8")
    assert np.array_equal(model.logits(ids), _load(folder).logits(ids))


def test_no_vnni_falls_back_to_float32_with_a_warning(exported, monkeypatch):
    monkeypatch.setattr(_simd, "HAS_VNNI", False)
    folder = exported("llama-relu-8m", "int4")
    with pytest.warns(ActivationsWarning, match=r"activations='int8': (\d+) of \1 MatMulNBits nodes keep float32.*"
                                                r"no AVX512-VNNI"):
        model = _load(folder, activations="int8")
    assert not any(fn.int8_activations for fn in _nbits_fns(model))
    assert len(model.executor.int8_fallback) == len(_nbits_fns(model))
    ids = model.tokenizer.encode(PROMPTS[1])
    assert np.array_equal(model.logits(ids), _load(folder).logits(ids))


@needs_vnni
def test_unsupported_layout_falls_back_per_node(exported):
    """4-bit blocks of 16 values are 8 bytes: no int8 path; those nodes keep float32, the
    8-bit lm_head (block 32) still takes it."""
    folder = exported("llama-relu-8m", "int4", group_size=16)
    with pytest.warns(ActivationsWarning, match="bits=4, block_size=16"):
        model = _load(folder, activations="int8")
    fns = _nbits_fns(model)
    fallback = model.executor.int8_fallback
    assert fallback and len(fallback) < len(fns)
    assert sum(fn.int8_activations for fn in fns) == len(fns) - len(fallback)
    ids = model.tokenizer.encode(PROMPTS[1])
    assert np.abs(model.logits(ids) - _load(folder).logits(ids)).max() < LOGIT_ATOL


@needs_vnni
def test_ort_backends_use_accuracy_level_4(exported):
    pytest.importorskip("onnxruntime")
    folder = exported("llama-relu-8m", "int4")
    ids = edgeinfer.load(folder).tokenizer.encode(PROMPTS[1])
    numba8 = _load(folder, activations="int8").logits(ids)
    for backend in ("ort", "hybrid"):
        model = _load(folder, backend=backend, activations="int8")
        assert all(seg.runner.accuracy_level == {4: 4, 8: 4} for seg in model.executor.segments)
        got = model.logits(ids)
        floats = _load(folder, backend=backend).logits(ids)
        assert np.abs(got - numba8).max() < LOGIT_ATOL, backend
        assert np.abs(got - floats).max() > 0, f"{backend}: activations='int8' did not reach onnxruntime"


def test_cli_activations_flag(exported, capsys):
    from edgeinfer.cli import main

    folder = str(exported("llama-relu-8m", "int4"))
    out = {}
    for act in ("float32", "int8"):
        assert main(["generate", "Once upon a time", "-m", folder, "--max-new-tokens", "8", "--threads", "1",
                     "--activations", act]) == 0
        out[act] = capsys.readouterr().out
    assert out["float32"].startswith("Once upon a time") and out["int8"].startswith("Once upon a time")
    with pytest.raises(SystemExit):
        main(["generate", "x", "-m", folder, "--activations", "int4"])


def test_cli_generate_passes_the_runtime_options(exported, monkeypatch, capsys):
    """--mode, --window, --threshold, --no-direct-io and --activations reach load()."""
    from edgeinfer.cli import main

    seen = {}
    load = edgeinfer.load

    def spy(path=None, **kw):
        seen.update(kw)
        return load(path, **kw)

    monkeypatch.setattr(edgeinfer, "load", spy)
    folder = str(exported("llama-relu-8m", "int4"))
    assert main(["generate", "Once", "-m", folder, "--max-new-tokens", "2", "--threads", "1", "--mode", "resident",
                 "--window", "3", "--threshold", "0.4", "--no-direct-io", "--activations", "int8"]) == 0
    capsys.readouterr()
    assert {k: seen[k] for k in ("mode", "window", "threshold", "direct_io", "activations")} == dict(
        mode="resident", window=3, threshold=0.4, direct_io=False, activations="int8")
