"""Which graph ops can stream, and the StreamedOp that streams each one."""
from __future__ import annotations

from edgeinfer.runtime.executor.graph import Node
from edgeinfer.streaming.base import StreamedOp
from edgeinfer.streaming.ffn.op import BundledFFNStreaming
from edgeinfer.streaming.moe.op import MoEStreaming

# (domain, op_type) -> its streaming implementation
STREAMED_OPS: dict[tuple[str, str], type[StreamedOp]] = {
    ("edgeinfer", "BundledFFN"): BundledFFNStreaming,
    ("edgeinfer", "MoE"): MoEStreaming,
}


def streamed_op(node: Node) -> StreamedOp:
    """The streaming implementation of `node`'s op (its key must be in STREAMED_OPS)."""
    return STREAMED_OPS[node.key]()
