"""Resident weights: whole weight files read into memory once, checksummed, and
handed out as zero-copy numpy views per tensor."""
from __future__ import annotations

import numpy as np

from edgeinfer.errors import ChecksumError, InvalidArgumentError, ModelFormatError
from edgeinfer.format.checksum import crc32_bytes
from edgeinfer.format.manifest import Manifest, verify_tensor
from edgeinfer.runtime.options import VERIFY_MODES


class ResidentWeights:
    def __init__(self, manifest: Manifest, files: list[str], *, verify: str = "full"):
        if verify not in VERIFY_MODES:
            raise InvalidArgumentError(f"unknown verify mode {verify!r}; choose one of {', '.join(VERIFY_MODES)}")
        self.manifest = manifest
        self.buffers: dict[str, np.ndarray] = {}
        for rel in files:
            data = _read_whole(manifest, rel)
            if verify == "full":
                crc = crc32_bytes(data)
                if crc != manifest.files[rel]["crc32"]:
                    bad = _first_bad_tensor(manifest, rel, data)
                    where = f" in tensor {bad.name} at offset {bad.offset}" if bad else ""
                    raise ChecksumError(f"{manifest.folder / rel}: checksum mismatch{where}: "
                                        "the file is corrupted; re-export or re-download the model")
            self.buffers[rel] = data
        if verify == "sampled":  # a few tensors per file: catches a replaced file cheaply
            rng = np.random.default_rng(0)
            for rel in files:
                entries = [e for e in manifest.tensors.values() if e.file == rel]
                for i in rng.choice(len(entries), size=min(4, len(entries)), replace=False):
                    e = entries[i]
                    verify_tensor(e, self.buffers[rel][e.offset:e.offset + e.nbytes])

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def has(self, name: str) -> bool:
        e = self.manifest.tensors.get(name)
        return e is not None and e.file in self.buffers

    def tensor(self, name: str) -> np.ndarray:
        e = self.manifest.tensors[name]
        buf = self.buffers.get(e.file)
        if buf is None:
            raise ModelFormatError(f"tensor {name} is in {e.file}, which is not resident")
        return buf[e.offset:e.offset + e.nbytes].view(e.dtype).reshape(e.shape)


def _read_whole(manifest: Manifest, rel: str) -> np.ndarray:
    path = manifest.path(rel)
    size = manifest.files[rel]["size"]
    out = np.empty(size, dtype=np.uint8)
    with open(path, "rb", buffering=0) as f:
        got = f.readinto(memoryview(out))
    if got != size:
        raise ModelFormatError(f"{path}: read {got} of {size} bytes (file truncated while loading?)")
    return out


def _first_bad_tensor(manifest: Manifest, rel: str, data: np.ndarray):
    for e in sorted((e for e in manifest.tensors.values() if e.file == rel), key=lambda e: e.offset):
        if crc32_bytes(data[e.offset:e.offset + e.nbytes]) != e.crc32:
            return e
    return None
