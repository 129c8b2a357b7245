"""manifest.json: what a model folder holds, validated before anything is allocated.

Every path in it must stay inside the folder; every size and shape is checked
against its file; every file carries a crc32.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeinfer.errors import ChecksumError, ModelFormatError
from edgeinfer.format.checksum import crc32_bytes, crc32_file
from edgeinfer.format.config import ModelConfig
from edgeinfer.format.constants import GRAPH_FILE, MANIFEST

FORMAT_NAME = "edgeinfer-model"
FORMAT_VERSION = 1
_DTYPES = {"float32", "float16", "uint8", "int8", "int32", "uint32", "int64"}
_MAX_TENSOR_BYTES = 1 << 40
# Sampling defaults a checkpoint's generation_config.json may set, with the range each must be in
# (the ranges SamplingConfig accepts).
SAMPLING_KEYS = {"temperature": (0.0, 100.0), "top_k": (0, 1 << 31), "top_p": (0.0, 1.0),
                 "repetition_penalty": (0.0, 10.0)}
_MAX_EOS_IDS = 64
_MAX_CHAT_TEMPLATE_BYTES = 4 << 20
_MAX_SPECIAL_TOKEN_CHARS = 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    crc32: int


@dataclass(frozen=True)
class Manifest:
    folder: Path
    config: ModelConfig
    quantization: dict
    files: dict[str, dict]
    tensors: dict[str, TensorEntry]
    graph: str
    tokenizer: str | None
    generation: dict
    raw: dict
    chat_template: str | None = None                         # the template file, when the model has one
    special_tokens: dict = field(default_factory=dict)     # bos_token, eos_token, ... as the template sees them

    def path(self, rel: str) -> Path:
        return inside(self.folder, rel)


def inside(folder: Path, rel: str) -> Path:
    """Resolve `rel` under `folder`; refuse absolute paths and anything escaping it."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or "\0" in rel:
        raise ModelFormatError(f"invalid path {rel!r} in model folder {folder}")
    root = folder.resolve()
    p = (root / rel).resolve()
    if p != root and root not in p.parents:
        raise ModelFormatError(f"path {rel!r} escapes the model folder {folder}")
    return p


def read_manifest(folder: str | Path) -> Manifest:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFormatError(f"model folder not found: {folder}")
    mpath = folder / MANIFEST
    if not mpath.exists():
        hint = " (it looks like a Hugging Face checkpoint: run `edgeinfer export` first)" \
            if (folder / "config.json").exists() else ""
        raise ModelFormatError(f"{folder} is not an edgeinfer model folder: no {MANIFEST}{hint}")
    try:
        raw = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{mpath} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{mpath} is not an edgeinfer manifest")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(
            f"{folder}: format version {raw.get('format_version')!r}; this edgeinfer reads version "
            f"{FORMAT_VERSION}: re-export the model with this version")
    config = ModelConfig.from_dict(raw.get("config"))
    files = {}
    for f in _list(raw, "files"):
        p = inside(folder, f.get("path"))
        if not p.exists():
            raise ModelFormatError(f"{folder}: file {f['path']} named in the manifest is missing")
        size = p.stat().st_size
        if size != f.get("size"):
            raise ModelFormatError(
                f"{folder}: {f['path']} has {size} bytes, the manifest says {f.get('size')} (truncated or replaced)")
        files[f["path"]] = f
    tensors = {}
    for name, t in _dict(raw, "tensors").items():
        e = _tensor_entry(name, t)
        if e.file not in files:
            raise ModelFormatError(f"tensor {name} lives in {e.file!r}, which is not in the manifest's file table")
        if e.offset + e.nbytes > files[e.file]["size"]:
            raise ModelFormatError(f"tensor {name} extends past the end of {e.file}")
        tensors[name] = e
    graph = raw.get("graph", GRAPH_FILE)
    if graph not in files:
        raise ModelFormatError(f"{folder}: graph file {graph!r} is not in the manifest's file table")
    tok = raw.get("tokenizer")
    if tok is not None and tok not in files:
        raise ModelFormatError(f"{folder}: tokenizer file {tok!r} is missing")
    chat_template, special_tokens = _chat(raw, files, folder)
    return Manifest(folder=folder, config=config, quantization=_dict(raw, "quantization"), files=files,
                    tensors=tensors, graph=graph, tokenizer=tok, generation=_generation(raw, config), raw=raw,
                    chat_template=chat_template, special_tokens=special_tokens)


def _generation(raw: dict, config: ModelConfig) -> dict:
    gen = _dict(raw, "generation")
    eos = gen.get("eos_token_ids", [])
    if not isinstance(eos, list) or len(eos) > _MAX_EOS_IDS or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < config.vocab_size for t in eos):
        raise ModelFormatError(f"manifest generation.eos_token_ids must be at most {_MAX_EOS_IDS} token ids "
                               f"below the vocabulary size {config.vocab_size}")
    bos = gen.get("bos_token_id")
    if bos is not None and not (isinstance(bos, int) and 0 <= bos < config.vocab_size):
        raise ModelFormatError("manifest generation.bos_token_id must be a token id of the vocabulary or null")
    ctx = gen.get("max_context")
    if ctx is not None and not (isinstance(ctx, int) and 0 < ctx <= config.max_position_embeddings):
        raise ModelFormatError(f"manifest generation.max_context must be in 1..{config.max_position_embeddings}")
    for key, (lo, hi) in SAMPLING_KEYS.items():
        v = gen.get(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and lo <= v <= hi):
            raise ModelFormatError(f"manifest generation.{key} must be a number in [{lo}, {hi}]")
    return gen


def _chat(raw: dict, files: dict, folder: Path) -> tuple[str | None, dict]:
    """The chat template's file (in the file table, bounded in size) and the special-token strings."""
    chat = _dict(raw, "chat")
    template = chat.get("template")
    if template is not None:
        if template not in files:
            raise ModelFormatError(f"{folder}: chat template file {template!r} is not in the manifest's file table")
        if files[template]["size"] > _MAX_CHAT_TEMPLATE_BYTES:
            raise ModelFormatError(f"{folder}: chat template {template} has {files[template]['size']} bytes, over "
                                   f"the limit of {_MAX_CHAT_TEMPLATE_BYTES}: it is not a chat template")
    special = chat.get("special_tokens", {})
    if not isinstance(special, dict) or len(special) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) <= _MAX_SPECIAL_TOKEN_CHARS
            for k, v in special.items()):
        raise ModelFormatError("manifest chat.special_tokens must map at most 16 names to strings of at most "
                               f"{_MAX_SPECIAL_TOKEN_CHARS} characters")
    return template, dict(special)


def _list(raw: dict, key: str) -> list:
    v = raw.get(key)
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise ModelFormatError(f"manifest field {key!r} must be a list of objects")
    return v


def _dict(raw: dict, key: str) -> dict:
    v = raw.get(key, {})
    if not isinstance(v, dict):
        raise ModelFormatError(f"manifest field {key!r} must be an object")
    return v


def _tensor_entry(name: str, t: dict) -> TensorEntry:
    try:
        shape = tuple(int(s) for s in t["shape"])
        e = TensorEntry(name=name, file=str(t["file"]), offset=int(t["offset"]), nbytes=int(t["nbytes"]),
                        dtype=str(t["dtype"]), shape=shape, crc32=int(t["crc32"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"manifest entry for tensor {name} is malformed ({exc})") from None
    if e.dtype not in _DTYPES:
        raise ModelFormatError(f"tensor {name}: dtype {e.dtype!r} is not allowed")
    if any(s < 0 for s in shape) or e.offset < 0 or not (0 <= e.nbytes <= _MAX_TENSOR_BYTES):
        raise ModelFormatError(f"tensor {name}: negative or absurd shape/offset/size")
    expect = int(np.prod(shape, dtype=np.float64)) * np.dtype(e.dtype).itemsize
    if expect != e.nbytes:
        raise ModelFormatError(f"tensor {name}: shape {shape} x {e.dtype} needs {expect} bytes, manifest says {e.nbytes}")
    return e


def verify_file(manifest: Manifest, rel: str, data: np.ndarray | bytes | None = None) -> None:
    """Check a whole file's crc32 (from `data` if already read) against the manifest."""
    expect = manifest.files[rel]["crc32"]
    crc = crc32_file(manifest.path(rel)) if data is None else crc32_bytes(data)
    if crc != expect:
        raise ChecksumError(f"{manifest.folder / rel}: checksum mismatch (crc32 {crc:08x}, manifest {expect:08x}): "
                            "the file is corrupted; re-export or re-download the model")


def verify_tensor(entry: TensorEntry, data: np.ndarray) -> None:
    crc = crc32_bytes(data)
    if crc != entry.crc32:
        raise ChecksumError(f"{entry.file}: checksum mismatch in tensor {entry.name} at offset {entry.offset} "
                            f"({entry.nbytes} bytes): the file is corrupted; re-export the model")
