"""Backend assignment: which graph nodes run in Numba and which in onnxruntime.

The idea of ggml's backend scheduler: give every node a backend, then cut the
node list into segments of consecutive nodes on the same backend. A run of
onnxruntime nodes becomes one session (executor/ort_backend.py); Numba nodes
stay single kernel calls. The cut points are where tensors cross backends.

  numba   every node in Numba (the default on CPU)
  ort     every node in onnxruntime: custom ops run through their ONNX function
          bodies, MatMulNBits through onnxruntime's own kernels
  hybrid  the streamable ops (BundledFFN, MoE: edgeinfer.streaming.registry) in Numba, where
          the neuron window and expert cache live; the rest (attention, norms,
          projections, head) in onnxruntime, e.g. on a GPU (PowerInfer's split of
          hot and cold work between devices)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto, helper

from edgeinfer.errors import EdgeInferError, InternalError
from edgeinfer.format.constants import INPUT_IDS, POSITION_IDS
from edgeinfer.runtime.executor.graph import Graph, Node
from edgeinfer.runtime.options import BACKENDS

NUMBA, ORT = "numba", "ort"


@dataclass
class Segment:
    """Consecutive nodes on one backend and the tensors that cross its edges."""
    backend: str
    nodes: list[int]                                  # indices into graph.nodes, ascending, consecutive
    inputs: list[str] = field(default_factory=list)   # activations it reads that come from outside
    outputs: list[str] = field(default_factory=list)  # tensors it makes that a later node or the caller reads
    host_outputs: set[str] = field(default_factory=set)  # of those, the ones Numba or the caller needs


def assign(graph: Graph, backend: str, *, numba_ops=(), numba_nodes=(), ort_ops=None) -> list[str]:
    """A backend per node. `numba_ops` (domain, op) keys and `numba_nodes` names go to
    Numba in hybrid mode (the streamable ops, the streamed nodes); an edgeinfer op
    without an ONNX function body in the model can only run in Numba."""
    if backend not in BACKENDS:
        raise EdgeInferError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == NUMBA:
        return [NUMBA] * len(graph.nodes)
    ort_ops = set(ort_ops) if ort_ops is not None else None
    numba_ops, numba_nodes = set(numba_ops), set(numba_nodes)
    out = []
    for node in graph.nodes:
        runnable = ort_ops is None or node.key in ort_ops or node.domain in ("", "ai.onnx", "com.microsoft")
        if backend == ORT:
            if not runnable:
                raise EdgeInferError(f"node {node.name}: op {node.domain}.{node.op_type} has no ONNX function body "
                                     "in this model, so onnxruntime cannot run it; use backend='hybrid' or 'numba'")
            out.append(ORT)
        else:
            hot = node.key in numba_ops or node.name in numba_nodes or not runnable
            out.append(NUMBA if hot else ORT)
    return out


def partition(graph: Graph, assignment: list[str]) -> list[Segment]:
    """Cut the node list where the backend changes; fill in each segment's boundary tensors."""
    if len(assignment) != len(graph.nodes):
        raise InternalError(f"{len(assignment)} backends for {len(graph.nodes)} nodes: a bug in edgeinfer; please report it")
    segments: list[Segment] = []
    for i, b in enumerate(assignment):
        if segments and segments[-1].backend == b:
            segments[-1].nodes.append(i)
        else:
            segments.append(Segment(b, [i]))
    constant = set(graph.external) | set(graph.inline)
    consumers: dict[str, list[int]] = {}            # tensor -> segment indices that read it
    for s, seg in enumerate(segments):
        for i in seg.nodes:
            for name in graph.nodes[i].inputs:
                if name and name not in constant:
                    consumers.setdefault(name, []).append(s)
    graph_outputs = set(graph.outputs)
    for s, seg in enumerate(segments):
        made = [o for i in seg.nodes for o in graph.nodes[i].outputs if o]
        made_set = set(made)
        seen = set()
        for i in seg.nodes:
            for name in graph.nodes[i].inputs:
                if name and name not in constant and name not in made_set and name not in seen:
                    seen.add(name)
                    seg.inputs.append(name)
        for name in made:
            readers = [r for r in consumers.get(name, ()) if r != s]
            if readers or name in graph_outputs:
                seg.outputs.append(name)
                if name in graph_outputs or any(segments[r].backend == NUMBA for r in readers):
                    seg.host_outputs.add(name)
    return segments


def tensor_types(graph: Graph, manifest) -> dict[str, int]:
    """ONNX element type of every tensor, propagated through the nodes (the exported
    graph carries no value_info for intermediates, and onnx shape inference does not
    know the contrib ops). Sub-models need these for their inputs and outputs."""
    types: dict[str, int] = {INPUT_IDS: TensorProto.INT64, POSITION_IDS: TensorProto.INT64}
    for name in graph.external:
        types[name] = helper.np_dtype_to_tensor_dtype(np.dtype(manifest.tensors[name].dtype))
    for name, arr in graph.inline.items():
        types[name] = helper.np_dtype_to_tensor_dtype(arr.dtype)
    for name in graph.inputs:
        types.setdefault(name, TensorProto.FLOAT)
    for node in graph.nodes:
        for o in node.outputs:
            if o:
                types[o] = _output_type(node, types)
    return types


def _output_type(node: Node, types: dict[str, int]) -> int:
    if node.op_type == "Cast":
        return int(node.attrs["to"])
    if node.op_type in ("Shape", "Size", "NonZero", "ArgMax", "ArgMin"):
        return TensorProto.INT64
    if node.domain in ("edgeinfer", "com.microsoft"):
        return TensorProto.FLOAT                   # custom and contrib ops compute in float32
    if node.op_type == "Gather" or node.op_type == "GatherElements":
        return types.get(node.inputs[0], TensorProto.FLOAT)
    for name in node.inputs:
        if name in types:
            return types[name]
    return TensorProto.FLOAT
