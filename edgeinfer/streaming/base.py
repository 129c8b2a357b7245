"""What a streamed op implements: the interface between the memory plan and an op whose
weights are read from flash on demand (FFN neurons, MoE experts).

The plan asks each streamed node for its smallest workable buffers (`minimum_bytes`) and,
optionally, for how much it would use (`demand`), splits the budget, then has each node
`build` the function the executor runs in its place.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeinfer.format.manifest import Manifest
    from edgeinfer.runtime.executor.graph import Node
    from edgeinfer.runtime.options import RuntimeOptions
    from edgeinfer.streaming.context import StreamContext


class StreamedOp(ABC):
    """The streaming implementation of one graph op (domain, op_type); stateless: the
    state of a streamed node lives in what `build` returns."""

    @abstractmethod
    def minimum_bytes(self, node: Node, manifest: Manifest, options: RuntimeOptions, mode: str) -> int:
        """Bytes of buffers below which `node` cannot run in `mode`. Required."""

    def demand(self, node: Node, manifest: Manifest, mode: str) -> tuple[float, int] | None:
        """(bytes the node would like to hold per token, bytes it can use at most); the plan
        splits the spare budget by it. Optional: the default, None, means no estimate, and
        the node gets the mean of the others' demands."""
        return None

    def streamed_inputs(self, node: Node) -> list[str]:
        """The node's inputs read from flash (the rest stay resident). Optional: the
        default is input 1."""
        return node.inputs[1:2]

    @abstractmethod
    def build(self, node: Node, const: Callable, ctx: StreamContext) -> Callable:
        """The function the executor runs for `node`, fn(state, *inputs) -> output, holding
        at most ctx.share_of(node) bytes of buffers. Required."""
