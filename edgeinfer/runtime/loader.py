"""The public entry point: edgeinfer.load()."""
from __future__ import annotations

import os
from pathlib import Path

from edgeinfer.errors import EdgeInferError, InvalidArgumentError
from edgeinfer.format.manifest import read_manifest
from edgeinfer.io.resident import ResidentWeights
from edgeinfer.runtime.executor import Executor, load_graph
from edgeinfer.runtime.model import Model
from edgeinfer.runtime.options import (
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_VERIFY,
    VERIFY_MODES,
    RuntimeOptions,
)
from edgeinfer.runtime.stats import RuntimeStats
from edgeinfer.runtime.tokenizer import Tokenizer
from edgeinfer.streaming.plan import plan_memory
from edgeinfer.streaming.registry import STREAMED_OPS

DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo"


def load(path: str | os.PathLike | None = None, *, memory_budget=None, backend: str = DEFAULT_BACKEND,
         verify: str = DEFAULT_VERIFY, threads: int | None = None, providers=None, device: str | None = None,
         **options) -> Model:
    """Load a model folder written by `edgeinfer export` (default: the built-in demo model).

    memory_budget: bytes, "300MB", "2GB" or "40%" of the model's weight bytes; when the
        model does not fit, FFN neurons / experts stream from flash (see edgeinfer/streaming/plan.py).
    verify: "full" checks every resident weight file's crc32, "sampled" a few tensors, "none".
    backend: "numba" (every node a Numba kernel), "ort" (every node in onnxruntime) or
        "hybrid" (the streamable FFN / MoE nodes in Numba, the rest in onnxruntime); see
        edgeinfer/runtime/executor/partition.py.
    providers: onnxruntime execution providers for "ort" / "hybrid", preferred first
        (default: the device profile's, else CPU); full onnxruntime names or short ones
        (cuda, tensorrt, cpu, ...); a missing one falls back with a ProviderWarning.
    device: a device profile name or .toml path (edgeinfer devices): its execution providers
        and default memory budget become the defaults; None or "cpu": no profile.
    options: RuntimeOptions fields (mode, window, threshold, direct_io, expert_policy,
        activations, ...). activations="int8" quantizes the activations of the int4/int8
        matmuls to int8 per block (AVX512-VNNI; faster, slightly less exact; see
        edgeinfer.runtime.options.MATMUL_ACTIVATIONS); nodes or hosts without that path keep float32 with an
        ActivationsWarning.
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if verify not in VERIFY_MODES:
        raise InvalidArgumentError(f"unknown verify mode {verify!r}; choose one of {', '.join(VERIFY_MODES)}")
    if providers is not None and backend == "numba":
        raise InvalidArgumentError("providers choose onnxruntime execution providers: use backend='ort' or 'hybrid'")
    profile = None
    if device not in (None, "cpu"):
        from edgeinfer.devices.profiles import load_profile
        profile = load_profile(device)
        if memory_budget is None:
            memory_budget = profile.default_memory_budget
    opts = options.pop("runtime_options", None) or RuntimeOptions.from_kwargs(**options)
    if threads is not None:
        import numba
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    manifest = read_manifest(Path(path) if path is not None else DEMO_MODEL)
    if manifest.tokenizer is None:
        raise EdgeInferError(f"{manifest.folder} has no tokenizer")
    tokenizer = Tokenizer(manifest.path(manifest.tokenizer))
    graph = load_graph(manifest)
    stats = RuntimeStats()
    plan = plan_memory(manifest, graph, memory_budget, opts, stats)
    weights = ResidentWeights(manifest, plan.resident_files, verify=verify)

    def const(name):
        return weights.tensor(name) if weights.has(name) else graph.inline.get(name)

    segments = []
    if backend != "numba":
        from edgeinfer.runtime.executor.ort_backend import build_segments
        from edgeinfer.runtime.executor.providers import resolve_providers
        segments = build_segments(graph, manifest, const, backend=backend, plan=plan, threads=threads,
                                  providers=resolve_providers(providers, profile), numba_ops=STREAMED_OPS,
                                  activations=opts.activations)
    executor = Executor(graph, const, overrides=plan.overrides(const), segments=segments, options=opts)
    return Model(manifest, executor, tokenizer, resident_bytes=weights.nbytes, plan=plan, stats=stats)
