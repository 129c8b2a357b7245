"""Shared fixtures: the trained checkpoints shipped in tests/fixtures, exported
once per session at each precision."""
from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = FIXTURES / "models"
DATA = FIXTURES / "data"
DENSE = ("opt-relu-7m", "llama-relu-8m")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(name, quant) -> folder of that checkpoint exported at that precision (cached)."""
    from edgeinfer.export.exporter import export

    root = tmp_path_factory.mktemp("exported")
    done = {}

    def get(name: str, quant: str = "f16", **kw) -> Path:
        if kw.get("predictors"):
            # Half the CLI's calibration tokens, to halve export time in tests; the
            # streaming quality test checks the predictors this gives.
            kw.setdefault("calibration_tokens", 8192)
        key = (name, quant, tuple(sorted(kw.items())))
        if key not in done:
            tag = "-".join([name, quant] + [k for k, v in sorted(kw.items()) if v])
            done[key] = export(MODELS / name, root / tag, quant=quant, progress=False, **kw)
        return done[key]

    return get


@pytest.fixture(scope="session")
def wikitext_ids():
    """The first 20,000 tokens of wikitext2_test.txt (held-out text), fixture tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODELS / "llama-relu-8m" / "tokenizer.json"))
    ids = tok.encode((DATA / "wikitext2_test_head.txt").read_text()).ids
    assert len(ids) >= 20000
    return ids[:20000]


@pytest.fixture(scope="session")
def hf_model():
    """hf_model(name) -> the transformers float32 reference (cached)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cache = {}

    def get(name: str):
        if name not in cache:
            m = transformers.AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32)
            cache[name] = m.eval()
        return cache[name]

    return get


def ort_logits(folder, ids, cfg):
    """Logits of model.onnx run by plain onnxruntime (CPU provider) from an empty cache."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([ids], np.int64), "position_ids": np.arange(len(ids))[None]}
    for i in range(cfg.num_layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
    return sess.run(["logits"], feed)[0][0]


def ffn_budget(folder, fraction: float) -> int:
    """Bytes that hold every resident weight plus `fraction` of the FFN bundles."""
    from edgeinfer.format.constants import FFN_FILE
    from edgeinfer.format.manifest import read_manifest
    m = read_manifest(folder)
    total = sum(f["size"] for k, f in m.files.items() if k.endswith(".bin"))
    ffn = m.files[FFN_FILE]["size"]
    return total - ffn + int(fraction * ffn)
