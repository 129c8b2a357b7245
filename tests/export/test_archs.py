"""Architecture families beyond the trained fixtures: Llama 3 (llama3 rope scaling, tied and
untied heads), Qwen2.5 (q/k/v biases), Qwen3 (per-head q/k RMSNorm), Mistral with sliding-window
attention, Phi-3 (fused qkv and gate_up, longrope, partial rotary, a window).

Each is built here with transformers from a small config carrying the family's features (random
weights rounded to float16 so a float16 export is exact; 2 layers; the llama-relu-8m tokenizer),
norm weights and biases perturbed so none is the identity, saved as safetensors, exported, and compared with the float32 transformers reference: logits on
3 prompts, 32 greedy tokens, the numba and ort backends, plain onnxruntime on model.onnx."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import MODELS, ort_logits
from edgeinfer.export.config import model_config
from edgeinfer.export.exporter import export

import edgeinfer
from edgeinfer.errors import UnsupportedModelError

PROMPTS = ["Once upon a time", "The king said", "In the beginning of the war, the"]
# float16 weights (exact), float32 math on both sides: only summation order differs. Measured
# max |diff| is ~1e-5 on these models; 2e-3 as tests/runtime/test_parity.py.
F16_LOGIT_ATOL = 2e-3
WINDOW = 8              # shorter than every prompt plus 32 generated tokens
THREADS = 1             # 2-core machine: tiny matrices are not worth waking threads for
_COMMON = dict(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               initializer_range=0.08, bos_token_id=0, eos_token_id=None)
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=32)


def _configs():
    import transformers as t
    # Phi-3 longrope: one factor per rotary frequency (rotary_dim / 2 = 12 with the 0.75 partial factor)
    half = int(32 * 0.75) // 2
    phi_rope = dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                    short_factor=list(np.linspace(1.0, 1.5, half)), long_factor=list(np.linspace(1.0, 8.0, half)),
                    original_max_position_embeddings=64)
    return {
        "llama3": t.LlamaConfig(rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=False, **_COMMON),
        "llama3-tied": t.LlamaConfig(rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True, **_COMMON),
        "qwen2.5": t.Qwen2Config(tie_word_embeddings=True, **_COMMON),
        "qwen3": t.Qwen3Config(head_dim=48, tie_word_embeddings=False, **_COMMON),
        "mistral-swa": t.MistralConfig(sliding_window=WINDOW, **_COMMON),
        "phi3": t.Phi3Config(rope_parameters=phi_rope, sliding_window=2 * WINDOW, pad_token_id=None,
                             original_max_position_embeddings=64, **_COMMON),
    }


FAMILIES = ("llama3", "llama3-tied", "qwen2.5", "qwen3", "mistral-swa", "phi3")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """built(name) -> (transformers float32 model, checkpoint folder, f16 export), cached."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("archs")
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(_configs()[name]).eval()
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim == 1:   # norms start at 1 and biases at 0: spread them so a dropped one shows
                        p.add_(0.2 * torch.randn_like(p))
                    p.copy_(p.half().float())
            ckpt = root / name
            model.save_pretrained(ckpt)
            shutil.copy(MODELS / "llama-relu-8m" / "tokenizer.json", ckpt / "tokenizer.json")
            ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
            cache[name] = ref, ckpt, export(ckpt, root / f"{name}-f16", quant="f16", progress=False)
        return cache[name]

    return get


def _reference(ref, ids):
    import torch
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0].numpy()
        out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    return logits, out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_family_matches_transformers(name, built):
    ref, _, folder = built(name)
    model = edgeinfer.load(folder, threads=THREADS)
    ort = edgeinfer.load(folder, backend="ort", threads=THREADS)
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        want_logits, want_tokens = _reference(ref, ids)
        got = model.logits(ids)
        diff = np.abs(got - want_logits).max()
        print(f"{name} {prompt!r}: max |logit diff| vs transformers {diff:.2e}")
        assert diff < F16_LOGIT_ATOL
        assert list(model.generate(prompt, max_new_tokens=32).token_ids) == want_tokens
        assert list(ort.generate(prompt, max_new_tokens=32).token_ids) == want_tokens
        # the generated sequence's logits: positions past the window, through both backends
        full = ids + want_tokens
        ours, theirs = model.logits(full), ort.logits(full)
        assert np.abs(ours - theirs).max() < F16_LOGIT_ATOL
        assert np.abs(ours - ort_logits(folder, full, model.config)).max() < F16_LOGIT_ATOL


@pytest.mark.parametrize("name", ["qwen3", "mistral-swa", "phi3"])
def test_int4_export_runs_in_plain_onnxruntime_and_streams(name, built, tmp_path):
    """At int4 (MatMulNBits) the new attention features still run through their ONNX function
    bodies in plain onnxruntime; the FFN bundles stream (naive mode: SiLU FFNs have no ReLU
    sparsity to predict) with the same result as resident."""
    from conftest import ffn_budget
    folder = export(built(name)[1], tmp_path / "int4", quant="int4", progress=False)
    model = edgeinfer.load(folder, threads=THREADS)
    ids = model.tokenizer.encode(PROMPTS[2]) + list(range(10, 40))
    ours = model.logits(ids)
    # same weights, different kernels: float32 summation order only (as test_parity.py)
    assert np.abs(ours - ort_logits(folder, ids, model.config)).max() < F16_LOGIT_ATOL
    streamed = edgeinfer.load(folder, threads=THREADS, memory_budget=ffn_budget(folder, 0.5), mode="naive")
    np.testing.assert_allclose(streamed.logits(ids), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, field, value", [
    ("llama3", "rope_scaling", _LLAMA3_ROPE["rope_type"]),
    ("qwen3", "qk_norm", True),
    ("mistral-swa", "sliding_window", WINDOW),
    ("phi3", "rotary_dim", 24),
])
def test_family_features_reach_the_config(name, field, value, built):
    """The features the parity test exercises are really on (a config that dropped one would
    still pass parity only by accident)."""
    from edgeinfer.format.manifest import read_manifest
    cfg = read_manifest(built(name)[2]).config
    got = getattr(cfg, field)
    assert (got.get("rope_type") if isinstance(got, dict) else got) == value


def test_sliding_window_changes_the_result(built):
    """Past the window the windowed model differs from full attention: the parity above is
    evidence that the window is implemented, not that it does not matter."""
    import torch
    ref, _, folder = built("mistral-swa")
    model = edgeinfer.load(folder, threads=THREADS)
    ids = model.tokenizer.encode(PROMPTS[2]) + list(range(10, 30))
    assert len(ids) > 2 * WINDOW
    ref.config.sliding_window = None
    try:
        with torch.no_grad():
            full_attention = ref(torch.tensor([ids])).logits[0].numpy()
    finally:
        ref.config.sliding_window = WINDOW
    assert np.abs(model.logits(ids)[2 * WINDOW:] - full_attention[2 * WINDOW:]).max() > 100 * F16_LOGIT_ATOL


def test_incremental_decode_with_window(built):
    """One-token steps through the KV cache, across the window edge, equal the full pass."""
    model = edgeinfer.load(built("mistral-swa")[2], threads=THREADS)
    ids = model.tokenizer.encode(PROMPTS[2]) + list(range(10, 30))
    full = model.logits(ids)
    cache = model.new_cache()
    steps = [model.forward(ids[:3], cache)[-1]]
    for t in ids[3:]:
        steps.append(model.forward([t], cache)[-1])
    np.testing.assert_allclose(np.stack(steps), full[2:], atol=1e-4, rtol=0)


def _hf(model_type, **kw):
    return dict(model_type=model_type, architectures=["X"], vocab_size=64, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=128, max_position_embeddings=4096, **kw)


@pytest.mark.parametrize("hf, option", [
    (_hf("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (_hf("qwen2", use_sliding_window=True, sliding_window=64, layer_types=["chunked_attention"] * 2),
     "chunked_attention"),
])
def test_unsupported_options_are_refused(hf, option):
    with pytest.raises(UnsupportedModelError, match=option):
        model_config(hf)


def test_window_wider_than_context_is_full_attention():
    cfg = model_config(_hf("mistral", sliding_window=4096))
    assert cfg.sliding_window == 0
    assert model_config(_hf("mistral", sliding_window=512)).sliding_window == 512
