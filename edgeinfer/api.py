"""The public entry point: edgeinfer.load()."""
from __future__ import annotations

import os
from pathlib import Path

from .budget import fmt_bytes, parse_budget
from .engine.tokenizer import Tokenizer
from .errors import BudgetError, EdgeInferError
from .executor import Executor, load_graph
from .manifest import read_manifest
from .model import Model
from .weights import ResidentWeights

DEMO_MODEL = Path(__file__).parent / "demo"
BACKENDS = ("numba",)


def load(path: str | os.PathLike | None = None, *, memory_budget=None, backend: str = "numba",
         verify: str = "full", threads: int | None = None) -> Model:
    """Load a model folder written by `edgeinfer export` (default: the built-in demo model).

    memory_budget: bytes, "300MB", "2GB" or "40%" of the model's weight bytes.
    verify: "full" checks every weight file's crc32, "sampled" a few tensors, "none" nothing.
    """
    if backend not in BACKENDS:
        raise EdgeInferError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if threads is not None:
        import numba
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    manifest = read_manifest(Path(path) if path is not None else DEMO_MODEL)
    weight_files = sorted({e.file for e in manifest.tensors.values()})
    total = sum(manifest.files[f]["size"] for f in weight_files)
    budget = parse_budget(memory_budget, total)
    if budget is not None and budget < total:
        raise BudgetError(f"memory budget {fmt_bytes(budget)} is below the {fmt_bytes(total)} this model needs "
                          f"resident (minimum {total} bytes)")
    if manifest.tokenizer is None:
        raise EdgeInferError(f"{manifest.folder} has no tokenizer")
    tokenizer = Tokenizer(manifest.path(manifest.tokenizer))
    graph = load_graph(manifest)
    weights = ResidentWeights(manifest, weight_files, verify=verify)

    def const(name):
        return weights.tensor(name) if weights.has(name) else graph.inline.get(name)

    executor = Executor(graph, const)
    return Model(manifest, executor, tokenizer, resident_bytes=weights.nbytes)
