"""Prefill routing (executor/ops.py): the fused kernels below kernels.dequant.BLAS_MATMUL_MIN_ROWS
rows, chunked dequantization + numpy BLAS from there on (float32 activations); both
give the same numbers up to summation order."""
from __future__ import annotations

import numpy as np
import pytest
from edgeinfer.export.quantize import quantize

import edgeinfer
from edgeinfer.kernels import dequant, matmul_f16, matmul_nbits

PROMPT = "In the beginning of the war, the king said that the people of the north would"
FLOAT_ATOL = 2e-3     # as tests/runtime/test_backends.py: same float math, another summation order


@pytest.mark.parametrize("bits", [4, 8])
def test_prefill_matmul_matches_the_fused_kernel(bits, monkeypatch):
    monkeypatch.setattr(dequant, "CHUNK_BYTES", 64 << 10)      # several chunks
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((700, 512), dtype=np.float32)
    packed, scales = quantize(w, bits, 32)
    x = rng.standard_normal((37, 512), dtype=np.float32)
    ref = matmul_nbits(x, packed, scales, bits, 32)
    assert np.abs(dequant.prefill_matmul(x, packed, scales, bits) - ref).max() < 1e-4 * np.abs(ref).max()
    w16 = w.astype(np.float16)
    ref = matmul_f16(x, w16)
    assert np.abs(dequant.prefill_matmul_f16(x, w16) - ref).max() < 1e-4 * np.abs(ref).max()


def _calls(monkeypatch):
    calls = []
    for name in ("prefill_matmul", "prefill_matmul_f16"):
        fn = getattr(dequant, name)
        monkeypatch.setattr(dequant, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    return calls


@pytest.mark.parametrize("quant", ["int4", "f16"])
def test_long_prompts_take_blas_with_the_same_logits(quant, exported, monkeypatch):
    folder = exported("llama-relu-8m", quant)
    model = edgeinfer.load(folder, threads=1)
    ids = model.tokenizer.encode(PROMPT)
    calls = _calls(monkeypatch)
    fused = model.logits(ids)
    assert len(ids) < dequant.BLAS_MATMUL_MIN_ROWS and not calls
    monkeypatch.setattr(dequant, "BLAS_MATMUL_MIN_ROWS", 8)
    blas = model.logits(ids)
    assert ("prefill_matmul" if quant == "int4" else "prefill_matmul_f16") in calls
    assert np.abs(blas - fused).max() < FLOAT_ATOL


def test_int8_activations_stay_fused_on_long_prompts(exported, monkeypatch):
    from edgeinfer.kernels._simd import HAS_VNNI
    if not HAS_VNNI:
        pytest.skip("no AVX512-VNNI: int8 activations fall back to float32 here")
    model = edgeinfer.load(exported("llama-relu-8m", "int4"), threads=1, activations="int8")
    monkeypatch.setattr(dequant, "BLAS_MATMUL_MIN_ROWS", 8)
    calls = _calls(monkeypatch)
    model.logits(model.tokenizer.encode(PROMPT))
    assert not calls
