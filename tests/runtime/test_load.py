"""Loading a model folder: corrupted, truncated or hostile folders give clear errors."""
from __future__ import annotations

import json
import shutil

import pytest

import edgeinfer
from edgeinfer.errors import BudgetError, ChecksumError, ModelFormatError


@pytest.fixture
def folder(exported, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(exported("opt-relu-7m", "int4"), dst)
    return dst


def test_corrupted_weight_file_is_caught_by_checksum(folder):
    m = json.loads((folder / "manifest.json").read_text())
    t = m["tensors"]["layers.2.attn.q.qweight"]
    with open(folder / t["file"], "r+b") as f:
        f.seek(t["offset"] + 100)
        b = f.read(1)
        f.seek(t["offset"] + 100)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(ChecksumError, match=rf"weights.bin: checksum mismatch in tensor layers.2.attn.q.qweight "
                                            rf"at offset {t['offset']}"):
        edgeinfer.load(folder)


def test_truncated_weight_file(folder):
    p = folder / "ffn.bin"
    p.write_bytes(p.read_bytes()[:-4096])
    with pytest.raises(ModelFormatError, match=r"ffn.bin has \d+ bytes, the manifest says \d+ \(truncated"):
        edgeinfer.load(folder)


def test_missing_tokenizer_at_load(folder):
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer.json named in the manifest is missing"):
        edgeinfer.load(folder)


def test_not_a_model_folder(tmp_path):
    from conftest import MODELS
    with pytest.raises(ModelFormatError, match="not an edgeinfer model folder.*run `edgeinfer export` first"):
        edgeinfer.load(MODELS / "opt-relu-7m")
    with pytest.raises(ModelFormatError, match="model folder not found"):
        edgeinfer.load(tmp_path / "missing")


@pytest.mark.parametrize("path", ["../outside.bin", "/etc/passwd", "sub/../../x.bin"])
def test_paths_escaping_the_folder_are_refused(folder, path):
    m = json.loads((folder / "manifest.json").read_text())
    m["files"][0]["path"] = path
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelFormatError, match="escapes the model folder|invalid path"):
        edgeinfer.load(folder)


def test_absurd_shapes_refused_before_allocating(folder):
    m = json.loads((folder / "manifest.json").read_text())
    m["config"]["hidden_size"] = 10**9
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelFormatError, match="hidden_size=1000000000 is out of range"):
        edgeinfer.load(folder)


def test_future_format_version(folder):
    m = json.loads((folder / "manifest.json").read_text())
    m["format_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelFormatError, match="format version 99.*re-export"):
        edgeinfer.load(folder)


def test_budget_below_resident_minimum_states_minimum(folder):
    with pytest.raises(BudgetError, match=r"minimum \d+ bytes"):
        edgeinfer.load(folder, memory_budget="1MB")
