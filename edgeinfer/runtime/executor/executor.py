"""The executor: walks the graph once at load to bind every node to a kernel,
then runs the bound steps for each forward pass (prefill or one decode step)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from edgeinfer.errors import ActivationsWarning, ModelFormatError
from edgeinfer.format.constants import INPUT_IDS, LOGITS, POSITION_IDS
from edgeinfer.runtime.executor.graph import Graph
from edgeinfer.runtime.executor.ops import OPS, int8_unsupported


@dataclass
class RunState:
    """What a forward pass carries besides tensors: the KV cache of this sequence."""
    kv: object
    last_only: bool = False


class Executor:
    def __init__(self, graph: Graph, const, *, overrides: dict | None = None, segments=(), options=None):
        """`const(name)` returns an initializer array (or None); `overrides` maps a node
        name to a ready callable (how streaming replaces a resident FFN node);
        `segments` are callables that each run several consecutive nodes (onnxruntime
        sessions, executor/ort_backend.py): `.nodes` (indices), `.inputs`, `.outputs`,
        called fn(state, *inputs) -> a tuple of outputs; their nodes get no kernel.
        `options`: the RuntimeOptions (default: RuntimeOptions())."""
        if options is None:
            from edgeinfer.runtime.options import RuntimeOptions
            options = RuntimeOptions()
        self.graph = graph
        self.options = options
        # activations="int8": MatMulNBits node name -> why it keeps float32 (Numba nodes only;
        # onnxruntime segments get accuracy_level 4, see ort_backend.build_segments)
        self.int8_fallback: dict[str, str] = {}
        overrides = overrides or {}
        self.segments = list(segments)
        covered = {i: seg for seg in self.segments for i in seg.nodes}
        self.steps = []
        produced = set(graph.inputs)
        for i, node in enumerate(graph.nodes):
            seg = covered.get(i)
            if seg is not None:
                if i == seg.nodes[0]:
                    self.steps.append((seg, seg.inputs, tuple(seg.outputs)))
                produced.update(node.outputs)
                continue
            fn = overrides.get(node.name)
            if fn is None:
                factory = OPS.get(node.key)
                if factory is None:
                    raise ModelFormatError(f"node {node.name}: op {node.domain or 'ai.onnx'}.{node.op_type} "
                                           "is not supported by the edgeinfer runtime")
                fn = factory(node, const, options) if getattr(factory, "takes_options", False) else factory(node, const)
                if options.activations == "int8" and node.key == ("com.microsoft", "MatMulNBits"):
                    reason = int8_unsupported(node)
                    if reason is not None:
                        self.int8_fallback[node.name] = reason
            self.steps.append((fn, node.inputs, node.outputs[0]))
            produced.update(node.outputs)
        self.consts = {name: const(name) for name in graph.external} | graph.inline
        if self.int8_fallback:
            reasons = sorted(set(self.int8_fallback.values()))
            total = sum(1 for fn, _, _ in self.steps if hasattr(fn, "int8_activations"))
            msg = (f"activations='int8': {len(self.int8_fallback)} of {total} MatMulNBits nodes keep float32 "
                   f"activations ({next(iter(self.int8_fallback))}, ...): " + "; ".join(reasons))
            warnings.warn(msg, ActivationsWarning, stacklevel=3)
        self.head = self._find_head()

    def _find_head(self) -> int:
        """Index of the lm_head matmul, so a decode step computes logits for the last row only
        (-1 when a segment holds it: the segment then slices the last row itself)."""
        producer = {o: i for i, n in enumerate(self.graph.nodes) for o in n.outputs}
        i = producer.get(LOGITS)
        if i is None:
            raise ModelFormatError("graph has no 'logits' output")
        if self.graph.nodes[i].op_type == "Add":
            i = producer.get(self.graph.nodes[i].inputs[0], i)
        outs = self.graph.nodes[i].outputs[0]
        return next((j for j, (_, _, out) in enumerate(self.steps) if out == outs), -1)

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, state: RunState) -> np.ndarray:
        env = dict(self.consts)
        env[INPUT_IDS] = input_ids
        env[POSITION_IDS] = position_ids
        get = env.get
        for i, (fn, inputs, out) in enumerate(self.steps):
            args = [get(n) if n else None for n in inputs]
            if i == self.head and state.last_only:
                args[0] = args[0][-1:]
            if out.__class__ is tuple:
                env.update(zip(out, fn(state, *args)))
            else:
                env[out] = fn(state, *args)
        return env[LOGITS]
