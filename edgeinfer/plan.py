"""The memory plan: what stays resident and what streams from flash under a budget.

Resident: every weight file except the streamable ones (FFN bundles, experts),
read whole at load. Streamed: nodes whose op has a streaming implementation
(a plugin) get a share of the budget left after the resident part, and read
their weights through the storage layer on demand.

Budget accounting covers weights (resident files + window/cache buffers). The
KV cache and activations are overhead beside it (reported by bench).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from dataclasses import dataclass, field
from importlib import import_module

from .budget import fmt_bytes, parse_budget
from .errors import BudgetError, EdgeInferError
from .executor.graph import Graph, Node
from .manifest import Manifest
from .stats import RuntimeStats
from .storage import WeightFile

MODES = ("auto", "resident", "streaming", "naive", "oracle")
# Activations of the quantized matmuls (MatMulNBits), at every number of rows:
#   float32  all arithmetic float32 (the default)
#   int8     activations quantized per weight block to int8 (scale max|x| / 127) and
#            multiplied in int32 by AVX512-VNNI, as llama.cpp's Q8_0 activations and
#            onnxruntime's MatMulNBits accuracy_level=4 (which the ort / hybrid backends
#            then use). Where the host or a node's layout has no int8 path, those nodes
#            keep float32 with a warning (executor.ActivationsWarning).
ACTIVATIONS = ("float32", "int8")
# (domain, op) -> module with minimum_bytes(node, manifest, options) and make(node, const, ctx)
PLUGINS = {
    ("edgeinfer", "BundledFFN"): "edgeinfer.sparsity.streaming",
    ("edgeinfer", "MoE"): "edgeinfer.moe.streaming",
}


@dataclass(frozen=True)
class RuntimeOptions:
    mode: str = "auto"            # auto: resident if it fits the budget, else streaming
    window: int = 0               # k > 0: drop neurons not active in the last k tokens (LLM in a flash
                                  # §3.3); 0: keep neurons until their slot is needed (LRU)
    threshold: float | None = None  # override the predictors' calibrated thresholds (probability)
    direct_io: bool = True        # bypass the page cache (O_DIRECT / F_NOCACHE)
    verify_reads: bool = True     # crc32 of each streamed neuron record / expert stage on its first read
    io_threads: int = 16          # pread threads per batch where io_uring is unavailable
    io_depth: int = 128           # io_uring reads in flight per batch (0: threads). Random 8 KiB O_DIRECT
                                  # reads here: 49k/s on 16 threads, 59k/s at depth 64, 67k/s at 128
    expert_policy: str = "hobbit"  # MoE cache eviction: "lru" or "hobbit" (recency, frequency, precision)
    prefetch: bool = True          # MoE: start next layer's likely experts while this layer computes
    expert_low_threshold: float = 0.8  # MoE: a miss whose gate weight is below this loads the low-precision copy
                                       # (exports with --expert-low; 0: always full precision). 0.8: see README
    activations: str = "float32"   # MatMulNBits activations: "float32" (exact float arithmetic) or "int8"
                                   # (quantized per weight block, VNNI; onnxruntime: accuracy_level 4). See
                                   # ACTIVATIONS below and README

    def __post_init__(self):
        if self.mode not in MODES:
            raise EdgeInferError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not (isinstance(self.window, int) and 0 <= self.window <= 1 << 16):
            raise EdgeInferError("window must be an integer >= 0")
        if self.threshold is not None and not (0.0 <= float(self.threshold) <= 1.0):
            raise EdgeInferError("threshold must be a probability in [0, 1]")
        if self.expert_policy not in ("lru", "hobbit"):
            raise EdgeInferError(f"unknown expert policy {self.expert_policy!r}; choose lru or hobbit")
        if not 0.0 <= float(self.expert_low_threshold) <= 1.0:
            raise EdgeInferError("expert_low_threshold must be in [0, 1]")
        if not (self.io_threads >= 1 and self.io_depth >= 0):
            raise EdgeInferError("io_threads must be >= 1 and io_depth >= 0")
        if self.activations not in ACTIVATIONS:
            raise EdgeInferError(f"unknown activations {self.activations!r}; choose one of {', '.join(ACTIVATIONS)}")


@dataclass
class StreamContext:
    """What a streaming op gets besides its node: the files to read, its budget share, counters."""
    manifest: Manifest
    options: RuntimeOptions
    mode: str
    stats: RuntimeStats
    share: int                      # bytes of buffers this node may hold
    files: dict = field(default_factory=dict)
    # Windows, caches and scratch buffers are shared by every sequence generating on the
    # model: streamed layers run one at a time (threads still overlap in resident layers).
    lock: threading.Lock = field(default_factory=threading.Lock)
    # One background reader: a streamed layer reads its missing neurons there while it
    # computes the ones it holds (its thread starts at the first read).
    reader: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeinfer-read"))

    def file(self, rel: str) -> WeightFile:
        f = self.files.get(rel)
        if f is None:
            f = self.files[rel] = WeightFile(self.manifest.path(rel), direct=self.options.direct_io,
                                             stats=self.stats.io, threads=self.options.io_threads,
                                             queue_depth=self.options.io_depth)
        return f


@dataclass
class Plan:
    mode: str
    budget: int | None
    total_bytes: int
    resident_files: list[str]
    streamed: list[Node]
    minimum_bytes: int
    context: StreamContext | None = None
    shares: dict = field(default_factory=dict)   # node name -> bytes of buffers it may hold

    def overrides(self, const) -> dict:
        return {n.name: _plugin(n).make(n, const, dataclasses.replace(self.context, share=self.shares[n.name]))
                for n in self.streamed}

    def close(self) -> None:
        if self.context:
            self.context.reader.shutdown(wait=True)
            for f in self.context.files.values():
                if isinstance(f, WeightFile):
                    f.close()


def _plugin(node: Node):
    return import_module(PLUGINS[node.key])


def _streamed_inputs(node: Node) -> list[str]:
    """The inputs a streaming op reads from flash: its plugin's `streamed_inputs(node)`, else input 1."""
    fn = getattr(_plugin(node), "streamed_inputs", None)
    return fn(node) if fn is not None else node.inputs[1:2]


def _demand(node: Node, manifest: Manifest, mode: str) -> tuple[float, int] | None:
    """(bytes a node would like to hold per token, bytes it can use at most), from its
    plugin's `demand` hook; None: no estimate (it gets an equal part)."""
    fn = getattr(_plugin(node), "demand", None)
    return fn(node, manifest, mode) if fn is not None else None


def _split(spare: int, minimums: list[int], demands: list) -> list[int]:
    """Shares of the spare budget: in proportion to each node's demand (layers whose
    predicted active set is larger get larger windows: with equal parts the densest
    layers thrash while sparse ones hold neurons they never use), never above what a
    node can use; what a capped node cannot use goes to the others."""
    n = len(minimums)
    if spare <= 0 or not n:
        return list(minimums)
    known = [d for d in demands if d is not None]
    mean = sum(d[0] for d in known) / len(known) if known else 1.0
    want = [max(d[0], 1.0) if d is not None else max(mean, 1.0) for d in demands]
    cap = [d[1] - m if d is not None else None for d, m in zip(demands, minimums)]
    extra = [0] * n
    open_ = [i for i in range(n) if cap[i] is None or cap[i] > 0]
    left = spare
    while left > 0 and open_:
        total = sum(want[i] for i in open_)
        give = {i: int(left * want[i] / total) for i in open_}
        capped = [i for i in open_ if cap[i] is not None and extra[i] + give[i] >= cap[i]]
        if not capped:
            for i in open_:
                extra[i] += give[i]
            break
        for i in capped:                      # fill the capped ones, then split the rest again
            left -= cap[i] - extra[i]
            extra[i] = cap[i]
        open_ = [i for i in open_ if i not in capped]
    return [m + e for m, e in zip(minimums, extra)]


def make_plan(manifest: Manifest, graph: Graph, budget_spec, options: RuntimeOptions, stats: RuntimeStats) -> Plan:
    weight_files = sorted({e.file for e in manifest.tensors.values()})
    total = sum(manifest.files[f]["size"] for f in weight_files)
    budget = parse_budget(budget_spec, total)
    candidates = [n for n in graph.nodes if n.key in PLUGINS]
    streamed = {i for n in candidates for i in _streamed_inputs(n) if i in manifest.tensors}
    streamed_files = sorted({manifest.tensors[i].file for i in streamed})
    mode = options.mode
    if mode == "auto":
        mode = "resident" if budget is None or budget >= total else "streaming"
    if mode == "resident" or not candidates:
        if budget is not None and budget < total:
            hint = "" if candidates else " (this export has no streamable FFN: export with bundles to stream)"
            raise BudgetError(f"memory budget {fmt_bytes(budget)} is below the {fmt_bytes(total)} this model needs "
                              f"resident (minimum {total} bytes){hint}")
        return Plan("resident", budget, total, weight_files, [], total)
    # Streamed tensors must be alone in their files: a file is either resident or streamed.
    shared = [e.name for e in manifest.tensors.values() if e.file in streamed_files
              and e.name not in streamed]
    if shared:
        raise EdgeInferError(f"cannot stream: {streamed_files} also hold resident tensors ({shared[0]}, ...)")
    resident_files = [f for f in weight_files if f not in streamed_files]
    resident = sum(manifest.files[f]["size"] for f in resident_files)
    per_node_min = [_plugin(n).minimum_bytes(n, manifest, options, mode) for n in candidates]
    minimum = resident + sum(per_node_min)
    if budget is None:
        budget = total if mode in ("streaming", "oracle") else minimum
    if budget < minimum:
        raise BudgetError(f"memory budget {fmt_bytes(budget)} is below this model's resident minimum "
                          f"{fmt_bytes(minimum)} (minimum {minimum} bytes: {fmt_bytes(resident)} resident weights "
                          f"+ {fmt_bytes(sum(per_node_min))} smallest streaming buffers)")
    share = _split(budget - minimum, per_node_min, [_demand(n, manifest, mode) for n in candidates])
    ctx = StreamContext(manifest, options, mode, stats, share=0)
    return Plan(mode, budget, total, resident_files, candidates, minimum, ctx,
                shares=dict(zip((n.name for n in candidates), share)))
