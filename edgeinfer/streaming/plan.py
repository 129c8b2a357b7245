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

from edgeinfer.errors import BudgetError, EdgeInferError
from edgeinfer.format.manifest import Manifest
from edgeinfer.io import WeightFile
from edgeinfer.runtime.executor.graph import Graph, Node
from edgeinfer.runtime.options import RuntimeOptions
from edgeinfer.runtime.stats import RuntimeStats
from edgeinfer.units import fmt_bytes, parse_budget

# (domain, op) -> module with minimum_bytes(node, manifest, options) and make(node, const, ctx)
PLUGINS = {
    ("edgeinfer", "BundledFFN"): "edgeinfer.streaming.ffn.op",
    ("edgeinfer", "MoE"): "edgeinfer.streaming.moe.op",
}


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
