"""Compute rates of this machine's kernels, at the model's shapes (a compute probe).

Device profiles carry what moves bytes (flash curve, DRAM bandwidth); the cost
model also needs how fast the kernels turn bytes into results on these cores.
These micro-benchmarks time the runtime's own kernels on random weights of the
model's layout, never the model run they predict. Each figure is the best of a
few repeats (noise only ever adds time).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from edgeinfer.bench.traffic import ModelTraffic


@dataclass(frozen=True)
class KernelRates:
    gemv_gbps: dict          # bits -> GB/s of packed weight bytes through matmul_nbits (M = 1)
    ffn_first_s: float       # bundled FFN: seconds per considered neuron (first projection)
    ffn_rest_s: float        # ... extra seconds per active neuron (other projections, down axpy)
    attention_s: float       # seconds per cached position per layer
    small_op_s: float        # seconds per small node (norm, add, rotary, executor step)
    predictor_s: float       # seconds per predictor call (one layer)
    window_s: float          # seconds per neuron inserted or evicted in a neuron window
    threads: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gemv_gbps"] = {str(k): v for k, v in self.gemv_gbps.items()}
        return d


def _best(fn, repeats: int = 7, inner: int = 1, budget_s: float = 0.25) -> float:
    """Fastest of `repeats` timings (more while under budget_s): on a shared machine
    noise only ever adds time, and a parallel kernel waits for its slowest thread."""
    fn()                                                   # compile / warm caches
    best = float("inf")
    start = time.perf_counter()
    done = 0
    while done < repeats or (time.perf_counter() - start < budget_s and done < 50):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
        done += 1
    return best


def measure_kernel_rates(manifest, traffic: ModelTraffic) -> KernelRates:
    import numba

    from edgeinfer import kernels
    from edgeinfer.format.bundle import BundleLayout
    from edgeinfer.kernels.ffn import bundled_ffn

    rng = np.random.default_rng(0)
    cfg = manifest.config
    d = cfg.hidden_size
    group = int(manifest.quantization.get("group_size") or 32)

    gemv = {}
    for bits in (4, 8):
        n = max(256, min(4096, (8 << 20) // (d * bits // 8)))     # ~8 MiB of weights: out of cache
        packed = rng.integers(0, 256, (n, d // group, group * bits // 8), dtype=np.uint8)
        scales = rng.random((n, d // group), dtype=np.float32)
        x = rng.standard_normal((1, d), dtype=np.float32)
        t = _best(lambda: kernels.matmul_nbits(x, packed, scales, bits, group))
        gemv[bits] = (packed.nbytes + scales.nbytes) / t / 1e9
    n = max(256, min(4096, (8 << 20) // (2 * d)))
    w16 = (rng.standard_normal((n, d)) * 0.05).astype(np.float16)
    x = rng.standard_normal((1, d), dtype=np.float32)
    gemv[16] = w16.nbytes / _best(lambda: kernels.matmul_f16(x, w16)) / 1e9

    if traffic.ffn:
        lay = traffic.ffn[0].layout
    else:
        lay = BundleLayout(d, max(256, cfg.ffn_dim), 4, group, cfg.gated)
    n = int(max(64, min(lay.ffn, (16 << 20) // lay.record_bytes)))
    x = rng.standard_normal((1, lay.hidden), dtype=np.float32)
    records = _random_bundle(rng, lay, n)
    silent = records.copy()
    if lay.bits == 16:
        silent[:, :lay.hidden] = 0                       # first projection all zero: nothing active
    else:                                                # its codes at the zero point
        silent[:, :lay.q_bytes] = 0x88 if lay.bits == 4 else 0x80
    act = cfg.activation if cfg.activation == "relu" else "relu"
    t_first = _best(lambda: bundled_ffn(x, silent, lay, act)) / n
    t_half = _best(lambda: bundled_ffn(x, records, lay, act)) / n
    # random codes and inputs: about half the neurons are active
    frac = _active_fraction(records, lay, x)
    t_rest = max(0.0, (t_half - t_first) / max(frac, 1e-3))

    H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    T = 256
    q = rng.standard_normal((1, H, D), dtype=np.float32)
    kc = rng.standard_normal((KVH, T, D), dtype=np.float32)
    vc = rng.standard_normal((KVH, T, D), dtype=np.float32)
    t_att = _best(lambda: kernels.attention(q, kc, vc, T - 1, 0.125), inner=10) / T

    w = np.ones(d, dtype=np.float32)
    xs = rng.standard_normal((1, d), dtype=np.float32)
    t_small = _best(lambda: kernels.rms_norm(xs, w, 1e-6), inner=200)

    rank = 64
    F = lay.ffn
    a = rng.standard_normal((rank, d), dtype=np.float32)
    bt = rng.standard_normal((rank, F), dtype=np.float32)
    c = np.zeros(F, np.float32)
    t_pred = _best(lambda: np.flatnonzero(((xs @ a.T) @ bt + c >= 0.0).any(axis=0)), inner=5)

    t_window = _window_rate(lay)
    return KernelRates(gemv, t_first, t_rest, t_att, t_small, t_pred, t_window, numba.get_num_threads())


def _random_bundle(rng, lay, n: int) -> np.ndarray:
    """n bundle records with random codes and sane float16 scales."""
    if lay.bits == 16:
        return (rng.standard_normal((n, lay.row_shape[1])) * 0.05).astype(np.float16)
    rec = rng.integers(0, 256, (n, lay.record_bytes), dtype=np.uint8)
    scales = np.full((n, lay.parts * lay.n_groups), 0.01, dtype=np.float16).view(np.uint8)
    rec[:, lay.scale_offset:lay.scale_offset + scales.shape[1]] = scales
    return rec


def _active_fraction(records, lay, x) -> float:
    from edgeinfer.format.bundle import decode
    first = decode(lay, records[:256])[0]
    return float(((first @ x[0]) > 0).mean())


def _window_rate(lay) -> float:
    """Seconds per neuron loaded into a NeuronWindow (its eviction included), at this
    record size: the bookkeeping a streamed layer pays besides reading."""
    from edgeinfer.streaming.ffn.window import NeuronWindow

    cap, pool, batch = 512, 2048, 128
    w = NeuronWindow(pool, lay.record_bytes, cap, 1, dtype=lay.dtype)
    rng = np.random.default_rng(1)

    def cycle() -> int:
        w.begin_step()
        w.drop_stale()
        ids = rng.choice(pool, batch, replace=False)
        missing = w.touch(ids)
        w.make_room(missing.size, ids)
        w.reserve(missing)
        return int(missing.size)

    for _ in range(8):
        cycle()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        n = sum(cycle() for _ in range(4))
        best = min(best, (time.perf_counter() - t0) / max(n, 1))
    return best
