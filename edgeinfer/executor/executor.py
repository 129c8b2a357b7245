"""The executor: walks the graph once at load to bind every node to a kernel,
then runs the bound plan for each forward pass (prefill or one decode step)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelFormatError
from .graph import Graph
from .ops import OPS


@dataclass
class RunState:
    """What a forward pass carries besides tensors: the KV cache of this sequence."""
    kv: object
    last_only: bool = False


class Executor:
    def __init__(self, graph: Graph, const, *, overrides: dict | None = None):
        """`const(name)` returns an initializer array (or None); `overrides` maps a node
        name to a ready callable (how streaming replaces a resident FFN node)."""
        self.graph = graph
        overrides = overrides or {}
        self.plan = []
        produced = set(graph.inputs)
        for node in graph.nodes:
            fn = overrides.get(node.name)
            if fn is None:
                factory = OPS.get(node.key)
                if factory is None:
                    raise ModelFormatError(f"node {node.name}: op {node.domain or 'ai.onnx'}.{node.op_type} "
                                           "is not supported by the edgeinfer runtime")
                fn = factory(node, const)
            self.plan.append((fn, node.inputs, node.outputs[0]))
            produced.update(node.outputs)
        self.consts = {name: const(name) for name in graph.external} | graph.inline
        self.head = self._find_head()

    def _find_head(self) -> int:
        """Index of the lm_head matmul, so a decode step computes logits for the last row only."""
        producer = {out: i for i, (_, _, out) in enumerate(self.plan)}
        i = producer.get("logits")
        if i is None:
            raise ModelFormatError("graph has no 'logits' output")
        if self.graph.nodes[i].op_type == "Add":
            i = producer.get(self.graph.nodes[i].inputs[0], i)
        return i

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, state: RunState) -> np.ndarray:
        env = dict(self.consts)
        env["input_ids"] = input_ids
        env["position_ids"] = position_ids
        get = env.get
        for i, (fn, inputs, out) in enumerate(self.plan):
            args = [get(n) if n else None for n in inputs]
            if i == self.head and state.last_only:
                args[0] = args[0][-1:]
            env[out] = fn(state, *args)
        return env["logits"]
