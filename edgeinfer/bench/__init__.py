"""Benchmarks: token latency of a model in several modes, and why (bytes, I/O vs
compute, cache hit rates, a cost model and the physical floor); large synthetic
models to run them on.

runner      run_bench(BenchConfig): workers per mode, warm-up, alternating runs
worker      one loaded configuration (its own process by default)
traffic     bytes a decode token touches, from the graph and manifest
rates       this machine's kernel rates at the model's shapes (a compute probe)
cost_model  predicted ms/token and the physical floor
report      the results dict (--json) and the table
plot        latency breakdown as a PNG (needs the bench extra: matplotlib)
synthetic   Hugging Face checkpoints at real shapes with imitated activation statistics
"""
from edgeinfer.bench.runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
