"""The memory plan: what stays resident and what streams from flash under a budget.

Resident: every weight file except the streamable ones (FFN bundles, experts),
read whole at load. Streamed: nodes whose op has a streaming implementation
(edgeinfer.streaming.registry) get a share of the budget left after the resident
part, and read their weights through the storage layer on demand.

Budget accounting covers weights (resident files + window/cache buffers). The
KV cache and activations are overhead beside it (reported by bench).
Each decision is logged at debug level (logger edgeinfer.streaming.plan).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from edgeinfer.errors import BudgetError, EdgeInferError
from edgeinfer.format.manifest import Manifest
from edgeinfer.io import WeightFile
from edgeinfer.runtime.executor.graph import Graph, Node
from edgeinfer.runtime.options import RuntimeOptions
from edgeinfer.runtime.stats import RuntimeStats
from edgeinfer.streaming.budget import split_budget
from edgeinfer.streaming.context import StreamContext
from edgeinfer.streaming.registry import STREAMED_OPS, streamed_op
from edgeinfer.units import fmt_bytes, parse_budget

logger = logging.getLogger(__name__)


@dataclass
class MemoryPlan:
    mode: str
    budget: int | None
    total_bytes: int
    resident_files: list[str]
    streamed: list[Node]
    minimum_bytes: int
    context: StreamContext | None = None

    def overrides(self, const) -> dict:
        """node name -> the function that runs each streamed node in place of its resident op."""
        return {n.name: streamed_op(n).build(n, const, self.context) for n in self.streamed}

    def streamed_files(self) -> dict[str, WeightFile]:
        """The weight files opened for streaming, by path relative to the model folder."""
        return dict(self.context.files) if self.context is not None else {}

    @property
    def scratch_bytes(self) -> int:
        """Bytes of the scratch buffers streamed layers share (naive mode reads a layer there)."""
        return self.context.scratch_bytes if self.context is not None else 0

    @property
    def moe_runtime(self):
        """What the streamed MoE layers share (edgeinfer.streaming.moe.op.MoERuntime), or None."""
        return self.context.moe if self.context is not None else None

    def close(self) -> None:
        if self.context is not None:
            self.context.close()


def plan_memory(manifest: Manifest, graph: Graph, budget_spec, options: RuntimeOptions,
                stats: RuntimeStats) -> MemoryPlan:
    """Decide what is resident and what streams under `budget_spec` (see units.parse_budget);
    BudgetError when the budget cannot hold the smallest workable plan."""
    weight_files = sorted({e.file for e in manifest.tensors.values()})
    total = sum(manifest.files[f]["size"] for f in weight_files)
    budget = parse_budget(budget_spec, total)
    candidates = [n for n in graph.nodes if n.key in STREAMED_OPS]
    streamed = {i for n in candidates for i in streamed_op(n).streamed_inputs(n) if i in manifest.tensors}
    streamed_files = sorted({manifest.tensors[i].file for i in streamed})
    mode = options.mode
    if mode == "auto":
        mode = "resident" if budget is None or budget >= total else "streaming"
        logger.debug("mode auto -> %s: budget %s, weights %s", mode,
                     "none" if budget is None else fmt_bytes(budget), fmt_bytes(total))
    if mode == "resident" or not candidates:
        if budget is not None and budget < total:
            hint = "" if candidates else " (this export has no streamable FFN: export with bundles to stream)"
            raise BudgetError(f"memory budget {fmt_bytes(budget)} is below the {fmt_bytes(total)} this model needs "
                              f"resident (minimum {total} bytes){hint}")
        logger.debug("resident: all of %s (%s)%s", ", ".join(weight_files), fmt_bytes(total),
                     "" if candidates else "; no node has a streaming implementation")
        return MemoryPlan("resident", budget, total, weight_files, [], total)
    # Streamed tensors must be alone in their files: a file is either resident or streamed.
    shared = [e.name for e in manifest.tensors.values() if e.file in streamed_files
              and e.name not in streamed]
    if shared:
        raise EdgeInferError(f"cannot stream: {streamed_files} also hold resident tensors ({shared[0]}, ...); "
                             "re-export the model with its streamed tensors in files of their own")
    resident_files = [f for f in weight_files if f not in streamed_files]
    resident = sum(manifest.files[f]["size"] for f in resident_files)
    per_node_min = [streamed_op(n).minimum_bytes(n, manifest, options, mode) for n in candidates]
    minimum = resident + sum(per_node_min)
    if budget is None:
        budget = total if mode in ("streaming", "oracle") else minimum
    if budget < minimum:
        raise BudgetError(f"memory budget {fmt_bytes(budget)} is below this model's resident minimum "
                          f"{fmt_bytes(minimum)} (minimum {minimum} bytes: {fmt_bytes(resident)} resident weights "
                          f"+ {fmt_bytes(sum(per_node_min))} smallest streaming buffers)")
    demands = [streamed_op(n).demand(n, manifest, mode) for n in candidates]
    shares = split_budget(budget - minimum, per_node_min, demands)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s: budget %s = %s resident (%s) + %s for %d streamed nodes (minimum %s) reading %s",
                     mode, fmt_bytes(budget), fmt_bytes(resident), ", ".join(resident_files) or "nothing",
                     fmt_bytes(budget - resident), len(candidates), fmt_bytes(sum(per_node_min)),
                     ", ".join(streamed_files))
        for n, m, d, s in zip(candidates, per_node_min, demands, shares):
            why = ("no demand estimate: the mean of the others" if d is None
                   else f"demand {fmt_bytes(int(d[0]))} per token, at most {fmt_bytes(d[1])} usable")
            logger.debug("  %s (%s): share %s, minimum %s; %s", n.name, n.op_type, fmt_bytes(s), fmt_bytes(m), why)
    ctx = StreamContext(manifest, options, mode, stats, shares=dict(zip((n.name for n in candidates), shares)))
    return MemoryPlan(mode, budget, total, resident_files, candidates, minimum, ctx)
