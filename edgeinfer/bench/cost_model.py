"""Predicted decode latency of a configuration, from first principles (LLM in a flash §2-3).

    t_token = t_resident + t_ffn_compute + t_flash  (the runtime reads a layer's
              neurons, then computes it: no overlap is assumed)

t_resident     resident matmuls (bytes / this machine's GEMV rate), attention over
               the KV cache, and the small nodes (norms, adds, executor steps).
t_ffn_compute  per layer: every neuron considered pays its first projection, every
               active one its other projections (rates of the bundled FFN kernel);
               streaming adds the predictor and the neuron window's bookkeeping.
t_flash        per layer and token: neurons not in the window are read. Random
               neurons of density p coalesce into runs of 1/(1-p) records (§3.2);
               O_DIRECT widens each run to whole 4 KiB pages, and runs that
               then touch merge (page_reads computes this for random draws); a run of c bytes
               reads at the device's bandwidth for c-byte chunks (the flash curve
               of the device profile or probe). Naive mode reads each layer's whole
               bundle in 1 MiB reads.

Inputs: the model's shapes (traffic.py), sparsity measured at export
(manifest predictors: predicted_active, true_active per layer), window reuse
(the neuron hit rate, measured by the run or given), the device profile, and
kernel rates measured on this machine (rates.py). Nothing is fitted to the
run being predicted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeinfer.bench.rates import KernelRates
from edgeinfer.bench.traffic import ModelTraffic
from edgeinfer.io import ALIGN

MAX_READ = 1 << 20       # WeightFile's largest single read


@dataclass
class Prediction:
    ms: float
    parts: dict = field(default_factory=dict)      # ms by part
    flash_bytes: float = 0.0                       # predicted bytes read from flash per token
    reads: float = 0.0                             # predicted read calls per token
    inputs: dict = field(default_factory=dict)     # what the prediction assumed

    def to_dict(self) -> dict:
        return {"ms": self.ms, "parts_ms": self.parts, "flash_bytes": self.flash_bytes, "reads": self.reads,
                "inputs": self.inputs}


def _gemv_s(rates: KernelRates, nbytes: int, bits: int) -> float:
    gbps = rates.gemv_gbps.get(bits) or rates.gemv_gbps.get(str(bits)) or min(rates.gemv_gbps.values())
    return nbytes / (gbps * 1e9)


def page_reads(ffn: int, record: int, n: int, align: int, trials: int = 3) -> tuple[float, float]:
    """Bytes and read calls to load n random neurons of a layer: records are widened
    to `align`, touching or overlapping ranges merge, ranges split at MAX_READ
    (io/read_plan.py). Averaged over a few random draws (seeded: deterministic)."""
    rng = np.random.default_rng(0)
    n = min(max(n, 0), ffn)
    if n == 0:
        return 0.0, 0.0
    total = calls = 0.0
    for _ in range(trials):
        ids = np.sort(rng.choice(ffn, n, replace=False)).astype(np.int64)
        start = ids * record // align * align
        end = -(-(ids * record + record) // align) * align
        reach = np.maximum.accumulate(end)
        new = np.concatenate(([True], start[1:] > reach[:-1]))
        first = np.flatnonzero(new)
        last = np.concatenate((first[1:], [n])) - 1
        lengths = reach[last] - start[first]
        total += float(lengths.sum())
        calls += float((-(-lengths // MAX_READ)).sum())
    return total / trials, calls / trials


def read_time(device, nbytes: float, chunk: float) -> float:
    """Seconds to read nbytes in reads of `chunk` bytes, from the device's flash curve."""
    if nbytes <= 0:
        return 0.0
    return nbytes / (device.flash_bandwidth(max(1, int(chunk))) * 1e9)


def predict(traffic: ModelTraffic, mode: str, device, rates: KernelRates, *, context: float,
            hit_rate: float | None = None, expert_hit_rate: float | None = None,
            direct_io: bool = True) -> Prediction:
    """Predicted ms per decode token of `mode` (resident | naive | streaming | oracle)."""
    s = {"resident_matmuls": sum(_gemv_s(rates, b, bits) for b, bits in traffic.matmuls),
         "attention": traffic.attention_nodes * context * rates.attention_s}
    small = traffic.nodes - len(traffic.matmuls) - len(traffic.ffn)
    s["small_ops"] = max(small, 0) * rates.small_op_s
    ffn_compute = predictor = window = flash = 0.0
    flash_bytes = reads = 0.0
    inputs = {"mode": mode, "context": context, "device": device.name}
    if mode in ("streaming", "oracle"):
        inputs["hit_rate"] = hit_rate if hit_rate is not None else 0.0
        inputs["hit_rate_source"] = "given" if hit_rate is not None else "assumed 0 (no reuse)"
    for f in traffic.ffn:
        F, R = f.layout.ffn, f.layout.record_bytes
        true_active = f.true_active if f.true_active is not None else 1.0
        if mode in ("resident", "naive"):
            considered = F
        elif mode == "oracle":
            considered = true_active * F
        else:
            considered = (f.predicted_active if f.predicted_active is not None else 1.0) * F
        active = min(true_active * F, considered)
        ffn_compute += considered * rates.ffn_first_s + active * rates.ffn_rest_s
        if mode == "naive":
            flash_bytes += f.bundle_bytes
            reads += -(-f.bundle_bytes // MAX_READ)
            flash += read_time(device, f.bundle_bytes, min(f.bundle_bytes, MAX_READ))
        elif mode in ("streaming", "oracle"):
            if mode == "streaming":
                predictor += rates.predictor_s
            loaded = considered * (1.0 - (hit_rate or 0.0))
            window += loaded * rates.window_s
            if loaded > 0:
                nbytes, n_reads = page_reads(F, R, int(round(loaded)), ALIGN if direct_io else 1)
                flash_bytes += nbytes
                reads += n_reads
                if n_reads:
                    flash += read_time(device, nbytes, nbytes / n_reads)
    for m in traffic.moe:
        # each routed expert: its whole record through the expert kernel (a GEMV over
        # gate, up and down); a miss is one contiguous, aligned read of the record
        ffn_compute += m.top_k * _gemv_s(rates, m.record_bytes, m.bits)
        if mode == "resident":
            continue
        misses = m.top_k if mode == "naive" else m.top_k * (1.0 - (expert_hit_rate or 0.0))
        flash_bytes += misses * m.record_bytes
        reads += misses * max(1, -(-m.record_bytes // MAX_READ))
        flash += read_time(device, misses * m.record_bytes, min(m.record_bytes, MAX_READ))
    if traffic.moe and mode in ("streaming", "oracle"):
        inputs["expert_hit_rate"] = expert_hit_rate if expert_hit_rate is not None else 0.0
    s["ffn_compute"] = ffn_compute
    if mode == "streaming":
        s["predictor"] = predictor
    if mode in ("streaming", "oracle"):
        s["window"] = window
    if mode != "resident":
        s["flash"] = flash
    parts = {k: v * 1e3 for k, v in s.items()}
    sparsity = {"predicted_active": traffic.predicted_active, "true_active": traffic.true_active}
    inputs.update({k: v for k, v in sparsity.items() if v is not None})
    return Prediction(sum(parts.values()), parts, flash_bytes, reads, inputs)


def floor_ms(device, flash_bytes: float, read_calls: float, dram_bytes: float) -> dict:
    """The physical floor of one token: bytes from flash at the device's
    bandwidth for the reads' mean size, plus bytes from DRAM at DRAM bandwidth."""
    chunk = flash_bytes / read_calls if read_calls else 0
    flash = read_time(device, flash_bytes, chunk) * 1e3 if flash_bytes else 0.0
    dram = dram_bytes / (device.dram_bandwidth_gbps * 1e9) * 1e3
    return {"ms": flash + dram, "flash_ms": flash, "dram_ms": dram, "mean_read_bytes": chunk}
