"""Quantization quality: wikitext2 perplexity (first 20,000 held-out tokens) of the
int8 and int4 exports against the float16 export."""
from __future__ import annotations

import pytest
from conftest import DENSE

import edgeinfer
from edgeinfer.bench.perplexity import perplexity

LIMITS = {"int8": 0.01, "int4": 0.10}   # allowed relative increase over float16


@pytest.mark.parametrize("name", DENSE)
def test_quantized_perplexity(name, exported, wikitext_ids):
    base = perplexity(edgeinfer.load(exported(name, "f16")), wikitext_ids)
    for quant, limit in LIMITS.items():
        ppl = perplexity(edgeinfer.load(exported(name, quant)), wikitext_ids)
        rel = ppl / base - 1
        print(f"{name}: f16 ppl {base:.2f}  {quant} ppl {ppl:.2f}  ({rel:+.2%}, limit +{limit:.0%})")
        assert rel < limit
