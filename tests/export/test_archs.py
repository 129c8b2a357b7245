"""Architecture families beyond the trained fixtures: Llama 3 (llama3 rope scaling, tied and
untied heads), Qwen2.5 (q/k/v biases), Qwen3 (per-head q/k RMSNorm), Mistral with sliding-window
attention, Phi-3 (fused qkv and gate_up, longrope, partial rotary, a window), Qwen3-MoE and
OLMoE (q/k RMSNorm over the whole projection).

Each is built here with transformers from a small config carrying the family's features (random
weights rounded to float16 so a float16 export is exact; 2 layers; the llama-relu-8m tokenizer;
norm weights and biases perturbed so none is the identity), saved as safetensors, exported, and
compared with the float32 transformers reference: logits on 3 prompts, 32 greedy tokens, the
numba, ort and hybrid backends, plain onnxruntime on model.onnx."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import MODELS, ort_logits
from edgeinfer.export.config import model_config
from edgeinfer.export.exporter import export

import edgeinfer
from edgeinfer.errors import UnsupportedModelError

# The Phi-3 configs here have a longer context than LongRoPE's original one: export says so.
pytestmark = pytest.mark.filterwarnings("ignore::edgeinfer.errors.ContextLimitWarning")
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
        "qwen3-moe": t.Qwen3MoeConfig(head_dim=48, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                                      norm_topk_prob=True, mlp_only_layers=[1], **_COMMON),
        "olmoe": t.OlmoeConfig(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                               **dict(_COMMON, intermediate_size=64)),
    }


FAMILIES = ("llama3", "llama3-tied", "qwen2.5", "qwen3", "mistral-swa", "phi3", "qwen3-moe", "olmoe")


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
    hybrid = edgeinfer.load(folder, backend="hybrid", threads=THREADS)
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
        ours = model.logits(full)
        assert np.abs(ours - ort.logits(full)).max() < F16_LOGIT_ATOL
        assert np.abs(ours - hybrid.logits(full)).max() < F16_LOGIT_ATOL
        assert np.abs(ours - ort_logits(folder, full, model.config)).max() < F16_LOGIT_ATOL


@pytest.mark.parametrize("name", ["qwen3", "mistral-swa", "phi3"])
def test_int4_export_runs_in_plain_onnxruntime_and_streams(name, built, tmp_path):
    """At int4 (MatMulNBits) the new attention features still run through their ONNX function
    bodies in plain onnxruntime; the FFN bundles stream (naive mode: SiLU FFNs have no ReLU
    sparsity to predict) with the same result as resident."""
    from conftest import ffn_budget
    import onnx
    folder = export(built(name)[1], tmp_path / "int4", quant="int4", progress=False)
    onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    model = edgeinfer.load(folder, threads=THREADS)
    ids = model.tokenizer.encode(PROMPTS[2]) + list(range(10, 40))
    ours = model.logits(ids)
    # same weights, different kernels: float32 summation order only (as test_parity.py)
    assert np.abs(ours - ort_logits(folder, ids, model.config)).max() < F16_LOGIT_ATOL
    streamed = edgeinfer.load(folder, threads=THREADS, memory_budget=ffn_budget(folder, 0.5), mode="naive")
    np.testing.assert_allclose(streamed.logits(ids), ours, atol=1e-5, rtol=0)


def test_qwen3_moe_experts_stream(built):
    """Qwen3-MoE under a budget that holds half the experts: experts.bin streams through the
    expert cache with the resident model's result (same precision, no low copies)."""
    from edgeinfer.format.constants import EXPERTS_FILE
    from edgeinfer.format.manifest import read_manifest
    folder = built("qwen3-moe")[2]
    files = read_manifest(folder).files
    budget = sum(f["size"] for k, f in files.items() if k.endswith(".bin")) - files[EXPERTS_FILE]["size"] // 2
    model = edgeinfer.load(folder, threads=THREADS)
    streamed = edgeinfer.load(folder, threads=THREADS, memory_budget=budget)
    ids = model.tokenizer.encode(PROMPTS[2]) + list(range(10, 40))
    np.testing.assert_allclose(streamed.logits(ids), model.logits(ids), atol=1e-5, rtol=0)
    counts = streamed.stats.snapshot()
    assert counts["experts_loaded"] > 0 and counts["experts_evicted"] > 0   # it did stream


@pytest.mark.parametrize("name, field, value", [
    ("llama3", "rope_scaling", _LLAMA3_ROPE["rope_type"]),
    ("qwen3", "qk_norm", True),
    ("mistral-swa", "sliding_window", WINDOW),
    ("phi3", "rotary_dim", 24),
    ("qwen3-moe", "qk_norm", True),
    ("olmoe", "norm_topk_prob", False),
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
    (_hf("olmoe", clip_qkv=8.0, num_experts=8, num_experts_per_tok=2), "clip_qkv"),
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


# config.json as published checkpoints ship it (older transformers format), trimmed to what
# the parser reads: the values of meta-llama/Llama-3.2-1B, Qwen/Qwen2.5-0.5B, Qwen/Qwen3-0.6B,
# mistralai/Mistral-7B-v0.1, microsoft/Phi-3-mini-4k-instruct, microsoft/Phi-4-mini-instruct,
# Qwen/Qwen3-30B-A3B.
_LLAMA32 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
                intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                tie_word_embeddings=True, hidden_act="silu")
_QWEN25 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896,
               intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
               max_position_embeddings=32768, max_window_layers=24, sliding_window=32768, use_sliding_window=False,
               rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu")
_QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024,
              intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
              head_dim=128, max_position_embeddings=40960, max_window_layers=28, sliding_window=None,
              use_sliding_window=False, attention_bias=False, rms_norm_eps=1e-6, rope_theta=1000000,
              rope_scaling=None, tie_word_embeddings=True, hidden_act="silu")
_MISTRAL01 = dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=32000, hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False, hidden_act="silu")
_PHI3_4K = dict(model_type="phi3", architectures=["Phi3ForCausalLM"], vocab_size=32064, hidden_size=3072,
                intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
                rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False,
                hidden_act="silu")
_PHI4_MINI = dict(model_type="phi3", architectures=["Phi3ForCausalLM"], vocab_size=200064, hidden_size=3072,
                  intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
                  max_position_embeddings=131072, original_max_position_embeddings=4096, partial_rotary_factor=0.75,
                  sliding_window=262144, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                  rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.5] * 48},
                  hidden_act="silu")
_QWEN3_MOE = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048,
                  intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                  num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                  decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960, sliding_window=None,
                  use_sliding_window=False, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                  hidden_act="silu")


@pytest.mark.parametrize("hf, expect", [
    (_LLAMA32, dict(family="llama", rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                                                  "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
                    tie_word_embeddings=True, sliding_window=0, rotary_dim=64)),
    (_QWEN25, dict(family="llama", attention_bias=True, sliding_window=0, rope_theta=1e6)),
    (_QWEN3, dict(family="qwen3", qk_norm=True, head_dim=128, rotary_dim=128, sliding_window=0)),
    (_MISTRAL01, dict(family="llama", sliding_window=4096, full_attention_layers=())),
    (_PHI3_4K, dict(family="phi3", sliding_window=2047, rotary_dim=96, rope_scaling={})),
    # longrope: the context is the original 4096 (the short factors' range); the 262144 window is wider
    (_PHI4_MINI, dict(family="phi3", rotary_dim=96, max_position_embeddings=4096, sliding_window=0)),
    (_QWEN3_MOE, dict(family="qwen3_moe", qk_norm=True, num_experts=128, experts_per_token=8, ffn_dim=768,
                      norm_topk_prob=True, shared_expert_ffn_dim=0)),
])
def test_published_configs(hf, expect):
    cfg = model_config(hf)
    assert {k: getattr(cfg, k) for k in expect} == expect


def test_qwen2_window_from_max_window_layers():
    cfg = model_config(dict(_QWEN25, use_sliding_window=True, sliding_window=4096, max_window_layers=20))
    assert cfg.sliding_window == 4096 and cfg.full_attention_layers == tuple(range(20))
    assert cfg.window(19) == 0 and cfg.window(20) == 4096
    from edgeinfer.format.config import ModelConfig
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg       # as the manifest stores it


def test_longrope_context_limit_is_announced():
    from edgeinfer.errors import ContextLimitWarning
    with pytest.warns(ContextLimitWarning, match="limited to 4096 .not 131072"):
        model_config(_PHI4_MINI)


def test_longrope_factors_must_match_the_rotary_dimension():
    from edgeinfer.errors import CheckpointError
    bad = dict(_PHI4_MINI, rope_scaling=dict(_PHI4_MINI["rope_scaling"], short_factor=[1.0] * 64))
    with pytest.raises(CheckpointError, match="short_factor has 64 values"):
        model_config(bad)
