"""Graph execution: the graph as loaded (graph.py), the op table (ops.py), the
bound plan that runs a forward pass (executor.py)."""
from edgeinfer.runtime.executor.executor import Executor, RunState
from edgeinfer.runtime.executor.graph import Graph, load_graph

__all__ = ["Executor", "RunState", "Graph", "load_graph"]
