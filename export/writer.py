"""Writing a model folder: aligned weight files, model.onnx, manifest — atomically.

Everything is written into a hidden sibling folder `.NAME.partial-PID`; the
manifest is written last and the folder is renamed into place only when all of
it is on disk. An interrupted export leaves no folder under the final name, and
a folder without a manifest never loads.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx

from edgeinfer.errors import EdgeInferError, InternalError
from edgeinfer.format.checksum import crc32_bytes, crc32_file
from edgeinfer.format.constants import ALIGN, GRAPH_FILE, MANIFEST, find_multiple
from edgeinfer.format.manifest import FORMAT_NAME, FORMAT_VERSION


class WeightFileWriter:
    """Appends tensors to one .bin file, each ALIGN-aligned, with a crc32 per tensor
    (edgeinfer.io.WeightFile is the runtime's reader of such a file)."""

    def __init__(self, folder: Path, name: str):
        self.name = name
        self.path = folder / name
        self._f = open(self.path, "wb")
        self.size = 0
        self.crc = 0

    def append(self, data: np.ndarray) -> tuple[int, int, int]:
        pad = find_multiple(self.size, ALIGN) - self.size
        if pad:
            self._write(b"\0" * pad)
        offset = self.size
        buf = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        self._write(buf)
        return offset, buf.nbytes, crc32_bytes(buf)

    def _write(self, b) -> None:
        self._f.write(b)
        self.crc = crc32_bytes(b, self.crc)
        self.size += len(b) if isinstance(b, bytes) else b.nbytes

    def flush(self) -> None:
        if not self._f.closed:
            self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


class ModelFolderWriter:
    """Collects weight files and tensors, then commits the folder atomically."""

    def __init__(self, out: str | os.PathLike, *, force: bool = False):
        self.out = Path(out)
        if self.out.exists() and not force:
            raise EdgeInferError(f"output folder {self.out} exists; pass --force to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.force = force
        self.files: dict[str, WeightFileWriter] = {}
        self.tensors: dict[str, dict] = {}

    def add_tensor(self, name: str, array: np.ndarray, file: str) -> onnx.TensorProto:
        """Store `array` in weight file `file` and return the ONNX initializer that points at it."""
        if name in self.tensors:
            raise InternalError(f"tensor {name} written twice: a bug in the exporter; please report it")
        wf = self.files.get(file) or self.files.setdefault(file, WeightFileWriter(self.tmp, file))
        offset, nbytes, crc = wf.append(array)
        self.tensors[name] = {"file": file, "offset": offset, "nbytes": nbytes, "dtype": array.dtype.name,
                              "shape": list(array.shape), "crc32": crc}
        t = onnx.TensorProto()
        t.name = name
        t.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", file), ("offset", str(offset)), ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    def copy_file(self, src: Path, name: str) -> None:
        shutil.copyfile(src, self.tmp / name)

    def stage(self, model: onnx.ModelProto, manifest: dict) -> Path:
        """Write model.onnx and the manifest into the hidden folder, which can then be
        loaded (the exporter runs it to train predictors); tensors may still be appended."""
        for wf in self.files.values():
            wf.flush()
        onnx_path = self.tmp / GRAPH_FILE
        onnx_path.write_bytes(model.SerializeToString())
        onnx.checker.check_model(str(onnx_path), full_check=True)
        files = []
        for p in sorted(self.tmp.iterdir()):
            if p.name == MANIFEST:
                continue
            wf = self.files.get(p.name)
            crc = wf.crc if wf is not None else crc32_file(p)
            files.append({"path": p.name, "size": p.stat().st_size, "crc32": crc})
        manifest = dict(manifest, format=FORMAT_NAME, format_version=FORMAT_VERSION,
                        graph=GRAPH_FILE, files=files, tensors=self.tensors)
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        return self.tmp

    def commit(self, model: onnx.ModelProto, manifest: dict) -> Path:
        """Stage the final files, then move the folder into place."""
        for wf in self.files.values():
            wf.close()
        self.stage(model, manifest)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        for wf in self.files.values():
            try:
                wf._f.close()
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

