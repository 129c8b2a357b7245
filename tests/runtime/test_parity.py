"""Logits parity: edgeinfer vs transformers (float32 reference) vs plain onnxruntime."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import DENSE, ort_logits

import edgeinfer

PROMPTS = ["Once upon a time", "The king said", "In the beginning of the war, the", "ROMEO:\nWhat light"]
# float16 export of float16/bfloat16 checkpoints: the weights are exact or rounded
# once to float16; measured max |diff| is ~1e-5 on logits of magnitude ~12. 2e-3
# leaves room for summation order and still catches any real mistake.
F16_LOGIT_ATOL = 2e-3


@pytest.mark.parametrize("name", DENSE)
def test_logits_match_transformers(name, exported, hf_model):
    import torch

    model = edgeinfer.load(exported(name, "f16"))
    ref = hf_model(name)
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].numpy()
        got = model.logits(ids)
        diff = np.abs(got - want).max()
        print(f"{name} {prompt!r}: max |logit diff| {diff:.2e}")
        assert diff < F16_LOGIT_ATOL


@pytest.mark.parametrize("name", DENSE)
def test_greedy_32_tokens_match_transformers(name, exported, hf_model):
    import torch

    model = edgeinfer.load(exported(name, "f16"))
    ref = hf_model(name)
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                               pad_token_id=1)
        want = out[0, len(ids):].tolist()
        result = model.generate(prompt, max_new_tokens=32)
        got = list(result.token_ids)
        assert got == want[:len(got)] and (len(got) == 32 or result.finish_reason == "eos")


@pytest.mark.parametrize("quant", ["f16", "int8", "int4"])
@pytest.mark.parametrize("name", DENSE)
def test_onnxruntime_runs_the_same_folder(name, quant, exported):
    """Vanilla onnxruntime (custom ops through their ONNX function bodies, MatMulNBits
    through its own kernels) and edgeinfer agree on the same exported folder."""
    folder = exported(name, quant)
    model = edgeinfer.load(folder)
    ids = model.tokenizer.encode(PROMPTS[2])
    ours = model.logits(ids)
    theirs = ort_logits(folder, ids, model.config)
    diff = np.abs(ours - theirs).max()
    print(f"{name} {quant}: edgeinfer vs onnxruntime max |logit diff| {diff:.2e}")
    # Same weights, different kernels (ORT may quantize activations for int4 on some
    # CPUs: accuracy_level defaults to 0, i.e. float); float32 summation order only.
    assert diff < 2e-3


def test_onnx_checker_full_check(exported):
    import onnx

    for name in DENSE:
        for quant in ("f16", "int4"):
            onnx.checker.check_model(str(exported(name, quant) / "model.onnx"), full_check=True)


def test_incremental_decode_equals_full_forward(exported):
    """Prefill + one-token decode steps through the KV cache give the same logits as
    one forward pass over the whole sequence."""
    model = edgeinfer.load(exported("llama-relu-8m", "int4"))
    ids = model.tokenizer.encode("Once upon a time there was a king who")
    full = model.logits(ids)
    cache = model.new_cache()
    steps = [model.forward(ids[:3], cache)[-1]]
    for t in ids[3:]:
        steps.append(model.forward([t], cache)[-1])
    np.testing.assert_allclose(np.stack(steps), full[2:], atol=1e-4, rtol=0)
