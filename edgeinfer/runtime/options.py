"""Every choice a user makes at load time, in one place: the enums the CLI offers and
the API accepts, their defaults, and RuntimeOptions, validated once when it is built.
(Sampling defaults live beside SamplingConfig in edgeinfer/runtime/sampling.py.)"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from edgeinfer.errors import InvalidArgumentError
from edgeinfer.format import quant

# How a model runs (RuntimeOptions.mode):
#   auto       resident if the model fits the budget, else streaming
#   resident   every weight in memory
#   streaming  FFN neurons / experts read from flash on demand (predictor, window, expert cache)
#   naive      the baseline of LLM in a flash: read each streamed layer whole, every token
#   oracle     streaming with the exact active set (testing: output equals resident)
MODES = ("auto", "resident", "streaming", "naive", "oracle")
# Who runs the graph's nodes (load(backend=)); see runtime/executor/partition.py.
BACKENDS = ("numba", "ort", "hybrid")
DEFAULT_BACKEND = "numba"
# Checksums of resident weight files at load (load(verify=)).
VERIFY_MODES = ("full", "sampled", "none")
DEFAULT_VERIFY = "full"
# MoE expert cache eviction (RuntimeOptions.expert_policy).
EXPERT_POLICIES = ("lru", "hobbit")
# Activations of the quantized matmuls (MatMulNBits), at every number of rows:
#   float32  all arithmetic float32 (the default)
#   int8     activations quantized per weight block to int8 (scale max|x| / 127) and
#            multiplied in int32 by AVX512-VNNI, as llama.cpp's Q8_0 activations and
#            onnxruntime's MatMulNBits accuracy_level=4 (which the ort / hybrid backends
#            then use). Where the host or a node's layout has no int8 path, those nodes
#            keep float32 with a warning (edgeinfer.errors.ActivationsWarning).
MATMUL_ACTIVATIONS = ("float32", "int8")
# Weight precision of an export (edgeinfer export --quant) and of the low-precision expert
# copies (--expert-low, HOBBIT) are the format's to define; offered here with the rest.
WEIGHT_QUANTS = quant.WEIGHT_QUANTS
EXPERT_LOW_QUANTS = quant.EXPERT_LOW_QUANTS


@dataclass(frozen=True)
class RuntimeOptions:
    mode: str = "auto"            # one of MODES
    window: int = 0               # neuron window in tokens: k > 0 drops neurons not active in the last
                                  # k tokens (LLM in a flash §3.3); 0 keeps them until their slot is needed (LRU)
    threshold: float | None = None  # override the predictors' calibrated thresholds (probability)
    direct_io: bool = True        # bypass the page cache (O_DIRECT / F_NOCACHE)
    verify_reads: bool = True     # crc32 of each streamed neuron record / expert stage on its first read
    io_threads: int = 16          # pread threads per batch where io_uring is unavailable
    io_depth: int = 128           # io_uring reads in flight per batch (0: threads). Random 8 KiB O_DIRECT
                                  # reads here: 49k/s on 16 threads, 59k/s at depth 64, 67k/s at 128
    expert_policy: str = "hobbit"  # MoE cache eviction, one of EXPERT_POLICIES (recency, frequency, precision)
    prefetch: bool = True          # MoE: start next layer's likely experts while this layer computes
    expert_low_threshold: float = 0.8  # MoE: a miss whose gate weight is below this loads the low-precision copy
                                       # (exports with --expert-low; 0: always full precision). 0.8: see README
    activations: str = "float32"   # one of MATMUL_ACTIVATIONS

    def __post_init__(self):
        if self.mode not in MODES:
            raise InvalidArgumentError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not (isinstance(self.window, int) and 0 <= self.window <= 1 << 16):
            raise InvalidArgumentError("window must be an integer >= 0")
        if self.threshold is not None and not (_number(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise InvalidArgumentError("threshold must be a probability in [0, 1]")
        if self.expert_policy not in EXPERT_POLICIES:
            raise InvalidArgumentError(f"unknown expert policy {self.expert_policy!r}; choose one of "
                                       f"{', '.join(EXPERT_POLICIES)}")
        if not (_number(self.expert_low_threshold) and 0.0 <= self.expert_low_threshold <= 1.0):
            raise InvalidArgumentError("expert_low_threshold must be in [0, 1]")
        if not (_integer(self.io_threads) and _integer(self.io_depth) and self.io_threads >= 1
                and self.io_depth >= 0):
            raise InvalidArgumentError("io_threads must be >= 1 and io_depth >= 0")
        if self.activations not in MATMUL_ACTIVATIONS:
            raise InvalidArgumentError(f"unknown activations {self.activations!r}; choose one of "
                                       f"{', '.join(MATMUL_ACTIVATIONS)}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> RuntimeOptions:
        """RuntimeOptions from load()'s keyword arguments; an unknown name is an InvalidArgumentError."""
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise InvalidArgumentError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                                       f"load() takes {', '.join(f.name for f in fields(cls))}")
        return cls(**kwargs)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
