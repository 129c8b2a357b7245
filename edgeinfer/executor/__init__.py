"""Graph execution: the graph as loaded (graph.py), the op table (ops.py), the
bound plan that runs a forward pass (executor.py)."""
from .executor import ActivationsWarning, Executor, RunState
from .graph import Graph, load_graph

__all__ = ["ActivationsWarning", "Executor", "RunState", "Graph", "load_graph"]
