"""Exporter: the folder it writes, and bad input (clear error, nothing half-written)."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import MODELS
from edgeinfer.export.exporter import export

from edgeinfer.errors import CheckpointError, EdgeInferError, UnsupportedModelError
from edgeinfer.format.manifest import read_manifest


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(MODELS / name, dst)
    return dst


def _no_folders(parent, name):
    return not any(p.name == name or p.name.startswith(f".{name}.") for p in parent.iterdir())


def test_manifest_and_alignment(exported):
    m = read_manifest(exported("llama-relu-8m", "int4"))
    assert m.config.family == "llama" and m.config.num_kv_heads == 2 and m.config.tie_word_embeddings
    assert m.quantization["weights"] == "int4" and m.quantization["group_size"] == 32
    assert all(e.offset % 4096 == 0 for e in m.tensors.values())
    assert {"model.onnx", "weights.bin", "ffn.bin", "tokenizer.json"} <= set(m.files)
    assert max(m.quantization["relative_error"].values()) < 0.12


def test_old_transformers_config_format(tmp_path):
    """rope_theta / torch_dtype at top level (older transformers) give the same config."""
    src = _copy("llama-relu-8m", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype")
    (src / "config.json").write_text(json.dumps(cfg))
    old = read_manifest(export(src, tmp_path / "old", quant="f16", progress=False)).config
    new = read_manifest(export(MODELS / "llama-relu-8m", tmp_path / "new", quant="f16", progress=False)).config
    assert old == new


def test_unknown_architecture(tmp_path):
    src = _copy("opt-relu-7m", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt_bigcode", ["GPTBigCodeForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPTBigCodeForCausalLM.*not supported"):
        export(src, tmp_path / "out", progress=False)
    assert _no_folders(tmp_path, "out")


def test_missing_shard(tmp_path):
    src = _copy("llama-relu-8m", tmp_path)
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard is missing.*model-00002-of-00002"):
        export(src, tmp_path / "out", progress=False)
    assert _no_folders(tmp_path, "out")


def test_truncated_shard(tmp_path):
    src = _copy("llama-relu-8m", tmp_path)
    shard = src / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: truncated"):
        export(src, tmp_path / "out", progress=False)
    assert _no_folders(tmp_path, "out")


def test_missing_tokenizer(tmp_path):
    src = _copy("opt-relu-7m", tmp_path)
    (src / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        export(src, tmp_path / "out", progress=False)
    assert _no_folders(tmp_path, "out")


def test_output_exists_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EdgeInferError, match="exists; pass --force"):
        export(MODELS / "opt-relu-7m", out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    export(MODELS / "opt-relu-7m", out, quant="int8", force=True, progress=False)
    assert not (out / "keep.txt").exists() and read_manifest(out).quantization["weights"] == "int8"


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing: no folder under the final name, no partial folder left."""
    import edgeinfer.export.decoder as decoder

    real = decoder.bundled_ffn
    calls = {"n": 0}

    def interrupt(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(decoder, "bundled_ffn", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export(MODELS / "opt-relu-7m", tmp_path / "out", progress=False)
    assert _no_folders(tmp_path, "out")


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    from edgeinfer.cli import main

    assert main(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeinfer: error: ") and "\n" not in err
