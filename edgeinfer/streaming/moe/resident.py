"""The resident MoE op: every expert in memory at full precision (the whole of
experts.bin fits the budget, or no budget). Streaming replaces it (op.py)."""
from __future__ import annotations

import numpy as np

from edgeinfer.errors import ModelFormatError
from edgeinfer.format.experts import ExpertLayout, RecordFormat
from edgeinfer.kernels.experts import add_expert, expert_ffn
from edgeinfer.runtime.executor.ops import _need, op
from edgeinfer.streaming.moe.router import route, tokens_by_expert


class SharedExpert:
    """Qwen2-MoE's shared expert: y = sigmoid(x g^T) * ffn(x), resident."""

    def __init__(self, node, const):
        a = node.attrs
        self.fmt = RecordFormat(int(a["hidden"]), int(a["shared_ffn"]), tuple(int(s) for s in a["shared_stages"]),
                                int(a["group_size"]))
        self.record = records(_need(const, node.inputs[4], node), self.fmt.record_bytes, node)[0]
        self.gate = _need(const, node.inputs[5], node).reshape(-1).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        g = 1.0 / (1.0 + np.exp(-(x @ self.gate)))
        return expert_ffn(x, self.record, self.fmt) * g[:, None].astype(np.float32)


class MoENode:
    """What every MoE implementation needs from its node: layout, router, shared expert."""

    def __init__(self, node, const):
        a = node.attrs
        self.name = node.name
        self.layer = int(a["layer"])
        self.layout = ExpertLayout.from_attrs(a)
        self.top_k = int(a["top_k"])
        self.normalize = bool(a["norm_topk"])
        if a.get("activation", "silu") != "silu":
            raise ModelFormatError(f"node {node.name}: MoE activation {a['activation']!r} is not supported")
        self.router = np.ascontiguousarray(_need(const, node.inputs[1], node), dtype=np.float32)
        if self.router.shape != (self.layout.num_experts, self.layout.hidden):
            raise ModelFormatError(f"node {node.name}: router shape {self.router.shape} does not match the layout")
        has_shared = len(node.inputs) > 4 and node.inputs[4] and int(a.get("shared_ffn", 0))
        self.shared = SharedExpert(node, const) if has_shared else None

    def route(self, x):
        return route(x, self.router, self.top_k, self.normalize)

    def finish(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return y + self.shared(x) if self.shared is not None else y


def records(value: np.ndarray, record_bytes: int, node) -> np.ndarray:
    """An experts initializer ([E, R] uint8, or float16 [E, R/2]) as uint8 records [E, R]."""
    rec = np.ascontiguousarray(value).view(np.uint8)
    if rec.ndim != 2 or rec.shape[1] != record_bytes:
        raise ModelFormatError(f"node {node.name}: expert records {value.shape} x {value.dtype} do not match "
                               f"record_bytes={record_bytes}")
    return rec


@op("edgeinfer", "MoE")
def _moe(node, const):
    moe = MoENode(node, const)
    experts = records(_need(const, node.inputs[2], node), moe.layout.high_bytes, node)
    if experts.shape[0] != moe.layout.num_experts:
        raise ModelFormatError(f"node {node.name}: {experts.shape[0]} expert records, expected "
                               f"{moe.layout.num_experts}")
    high = moe.layout.high

    def run(state, x, *_):
        x = np.ascontiguousarray(x, dtype=np.float32)
        idx, w = moe.route(x)
        y = np.zeros_like(x)
        for e, (rows, weights) in tokens_by_expert(idx, w).items():
            add_expert(y, x, rows, weights, experts[e], high)
        return moe.finish(x, y)

    return run
