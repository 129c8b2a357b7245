"""Reading Hugging Face checkpoints tensor by tensor.

safetensors files are parsed here directly (8-byte header length, JSON header,
raw little-endian data) and memory-mapped, so a tensor is read only when the
exporter asks for it: peak memory stays near one layer, not the model. bfloat16
is widened to float32 by a bit shift, so no torch is needed for safetensors.
PyTorch .bin/.pt checkpoints need torch and load with weights_only=True: an
arbitrary pickle is never executed.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from edgeinfer.errors import CheckpointError

_DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 2**20


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """One .safetensors file: header parsed at open, tensors memory-mapped on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path.name}: truncated safetensors file ({size} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{self.path.name}: truncated or corrupt safetensors header")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint shard is missing: {self.path}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.path.name}: corrupt safetensors header ({exc})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self._size = size
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int, str]] = {}
        for name, meta in header.items():
            dt = meta.get("dtype")
            if dt not in _DTYPES:
                raise CheckpointError(f"{self.path.name}: tensor {name} has unsupported dtype {dt}")
            begin, end = meta["data_offsets"]
            shape = tuple(int(s) for s in meta["shape"])
            if self._data_start + end > size:
                raise CheckpointError(
                    f"{self.path.name}: truncated: tensor {name} ends at byte {self._data_start + end}"
                    f" but the file has {size} bytes")
            if end - begin != int(np.prod(shape, dtype=np.int64)) * _DTYPES[dt].itemsize:
                raise CheckpointError(f"{self.path.name}: tensor {name} size does not match its shape")
            self.entries[name] = (_DTYPES[dt], shape, begin, end, dt)
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def get(self, name: str) -> np.ndarray:
        """Tensor as float32 (floating dtypes) or its own integer dtype."""
        dtype, shape, begin, end, tag = self.entries[name]
        raw = np.asarray(self._mm[self._data_start + begin:self._data_start + end]).view(dtype).reshape(shape)
        if tag == "BF16":
            return _bf16_to_f32(raw)
        if raw.dtype.kind == "f":
            return raw.astype(np.float32)
        return np.array(raw)

    def dtype_name(self, name: str) -> str:
        return self.entries[name][4]


class Checkpoint:
    """All tensors of a checkpoint folder by name, across shards."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {self.folder}")
        self._where: dict[str, object] = {}
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index.name} is not a valid safetensors index ({exc})") from None
            shards = {}
            for shard_name in sorted(set(weight_map.values())):
                shards[shard_name] = SafetensorsFile(self._inside(shard_name))
            for name, shard_name in weight_map.items():
                if name not in shards[shard_name].entries:
                    raise CheckpointError(f"{shard_name} lacks tensor {name} named in {index.name}")
                self._where[name] = shards[shard_name]
        elif single.exists():
            st = SafetensorsFile(single)
            self._where = {name: st for name in st.entries}
        else:
            bins = sorted(self.folder.glob("pytorch_model*.bin")) + sorted(self.folder.glob("*.pt"))
            if not bins:
                raise CheckpointError(
                    f"no weights in {self.folder}: expected model.safetensors, "
                    "model.safetensors.index.json or pytorch_model*.bin")
            for b in bins:
                tensors = _load_torch_weights_only(b)
                for name, t in tensors.items():
                    self._where[name] = t

    def _inside(self, rel: str) -> Path:
        """A shard path from the index; refuse anything that escapes the folder."""
        p = (self.folder / rel).resolve()
        if self.folder.resolve() not in p.parents:
            raise CheckpointError(f"shard path {rel!r} escapes the checkpoint folder")
        return p

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> np.ndarray:
        try:
            src = self._where[name]
        except KeyError:
            raise CheckpointError(f"checkpoint lacks tensor {name}") from None
        if isinstance(src, SafetensorsFile):
            return src.get(name)
        return src  # already numpy (torch checkpoint)

    def source_dtype(self) -> str:
        for src in self._where.values():
            if isinstance(src, SafetensorsFile):
                for name in src.entries:
                    return src.dtype_name(name)
        return "F32"


def _load_torch_weights_only(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path.name} is a PyTorch checkpoint; install the export extra (pip install 'edgeinfer[export]')"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad pickles
        raise CheckpointError(f"{path.name}: cannot load with weights_only=True ({exc})") from None
    out = {}
    for name, t in state.items():
        if hasattr(t, "float"):
            out[name] = t.float().numpy() if t.is_floating_point() else t.numpy()
    return out
