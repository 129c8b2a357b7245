"""Streaming plugin for BundledFFN nodes: the FFN of a layer read from flash.

streaming: the predictor chooses neurons; the window keeps recent ones; only
           neurons not in the window are read, in one batch per layer per token
           (adjacent neurons coalesce into one read) into window slots, on a
           background thread while the layer computes the neurons it holds.
oracle:    as streaming, with the exact active set (testing: output equals resident).
naive:     the baseline of LLM in a flash: read the layer's whole FFN every token.
"""
from __future__ import annotations

import concurrent.futures
import time
import zlib

import numpy as np

from edgeinfer.errors import ChecksumError, ModelFormatError
from edgeinfer.format.bundle import BundleLayout
from edgeinfer.io import aligned_empty
from edgeinfer.kernels.ffn import bundled_ffn
from edgeinfer.streaming.ffn.predictor import LowRankPredictor, OraclePredictor
from edgeinfer.streaming.ffn.window import NeuronWindow

MIN_NEURONS = 32   # smallest window per layer; larger active sets are processed in rounds
# Coalesce reads of missing neurons separated by at most this many records not needed
# (read and dropped): one 4 KiB-page read costs ~25 us of latency on flash, a few KiB
# more of a read costs a few us (LLM in a flash §3.2: larger chunks read faster).
MAX_GAP_RECORDS = 1


def _layout(node) -> BundleLayout:
    return BundleLayout.from_attrs(node.attrs)


def _check_records(raw, slots, neurons, crcs, entry, R) -> None:
    for s, n in zip(slots, neurons):
        if zlib.crc32(raw[s]) != crcs[n]:
            raise ChecksumError(f"{entry.file}: checksum mismatch in neuron {n} of {entry.name} at offset "
                                f"{entry.offset + n * R} ({R} bytes): the file is corrupted; re-export the model")


def minimum_bytes(node, manifest, options, mode) -> int:
    lay = _layout(node)
    if mode == "naive":   # one scratch buffer of a whole layer, shared by all layers
        layers = sum(1 for t in manifest.tensors if t.endswith(".ffn.bundle")) or 1
        return -(-lay.ffn * lay.record_bytes // layers)
    return min(lay.ffn, MIN_NEURONS) * lay.record_bytes


def demand(node, manifest, mode) -> tuple[float, int] | None:
    """(bytes of the neurons a token is expected to need, bytes of the whole FFN): the
    export's per-layer predicted (streaming) or true (oracle) active fraction; the plan
    splits the budget by it. Naive mode holds one scratch buffer: no demand."""
    lay = _layout(node)
    full = lay.ffn * lay.record_bytes
    if mode == "naive":
        return None
    stats = {s.get("layer"): s for s in manifest.raw.get("predictors") or []}.get(node.name) or {}
    frac = stats.get("true_active" if mode == "oracle" else "predicted_active")
    if frac is None:
        return None
    return float(frac) * full, full


def make(node, const, ctx):
    lay = _layout(node)
    entry = ctx.manifest.tensors.get(node.inputs[1])
    if entry is None:
        raise ModelFormatError(f"node {node.name}: bundle {node.inputs[1]} is not in the manifest")
    f = ctx.file(entry.file)
    inp = node.inputs + [""] * (7 - len(node.inputs))
    up_bias = const(inp[2]) if inp[2] else None
    down_bias = const(inp[3]) if inp[3] else None
    act = node.attrs["activation"]
    stats = ctx.stats
    R = lay.record_bytes

    if ctx.mode == "naive":
        scratch = ctx.files.setdefault(("naive-scratch", lay.ffn * R), aligned_empty(lay.ffn * R))
        records = scratch.view(lay.dtype).reshape(lay.row_shape)

        def run_naive(state, x, *_):
            with ctx.lock:
                return _run_naive(state, x)

        def _run_naive(state, x):
            t0 = time.perf_counter()
            f.read_into(entry.offset, scratch)
            t1 = time.perf_counter()
            y = bundled_ffn(x, records, lay, act, up_bias=up_bias)
            stats.add(ffn_calls=1, tokens=x.shape[0], neurons_needed=lay.ffn, neurons_loaded=lay.ffn,
                      io_wait_seconds=t1 - t0, compute_seconds=time.perf_counter() - t1)
            return y + down_bias if down_bias is not None else y

        return run_naive

    if ctx.mode == "oracle":
        full = f.read(entry.offset, entry.nbytes).view(lay.dtype).reshape(lay.row_shape)
        predict = OraclePredictor(lay, full, up_bias)
        del full
    else:
        if not inp[4]:
            raise ModelFormatError(f"{ctx.manifest.folder} has no sparsity predictors: export with --predictors "
                                   "to stream, or load with a budget that holds the whole model")
        threshold = ctx.options.threshold if ctx.options.threshold is not None else node.attrs["threshold"]
        predict = LowRankPredictor(const(inp[4]), const(inp[5]), const(inp[6]), threshold)
    crc_name = f"{node.inputs[1]}.crc32"
    crcs = const(crc_name) if ctx.options.verify_reads and crc_name in ctx.manifest.tensors else None
    # A record is checked the first time this process reads it: corruption at rest is
    # caught before the record is ever used, and re-reads of the same bytes (an evicted
    # neuron coming back) skip ~2.5 us of crc32 per 7 KiB record.
    checked = np.zeros(lay.ffn, dtype=bool)
    capacity = max(min(lay.ffn, MIN_NEURONS), min(lay.ffn, ctx.share // R))
    window = NeuronWindow(lay.ffn, R, capacity, ctx.options.window, dtype=lay.dtype)
    raw = window.buf.view(np.uint8).reshape(capacity, R)
    max_gap = MAX_GAP_RECORDS * R

    def read(neurons: np.ndarray, slots: np.ndarray) -> None:
        req = np.empty((neurons.size, 2), dtype=np.int64)
        req[:, 0] = entry.offset + neurons * R
        req[:, 1] = R
        f.read_batch(req, out=raw.reshape(-1), dest=slots * R, max_gap=max_gap)
        if crcs is not None:
            new = ~checked[neurons]
            _check_records(raw, slots[new], neurons[new], crcs, entry, R)
            checked[neurons] = True

    def start_load(neurons: np.ndarray):
        """Reserve slots for `neurons` and read them on the background reader."""
        return ctx.reader.submit(read, neurons, window.reserve(neurons))

    def finish_load(pending, neurons: np.ndarray) -> None:
        try:
            pending.result()
        except BaseException:   # StorageError, ChecksumError or Ctrl-C: keep the window truthful
            concurrent.futures.wait([pending])      # the read must end before its slots are reused
            window.unreserve(neurons)
            raise

    def ffn_over(x, part):
        return bundled_ffn(x, window.buf, lay, act, rows=window.slot_of[part], neuron_ids=part, up_bias=up_bias)

    def run(state, x, *args):
        with ctx.lock:
            return _run(state, x)

    def _run(state, x):
        t0 = time.perf_counter()
        needed = predict(x)
        t_pred = time.perf_counter() - t0
        window.begin_step()
        # window k > 0: neurons not active in the last k tokens leave now (LLM in a flash
        # §3.3). k = 0 (the default): the buffer is preallocated, so early eviction frees
        # no memory and only costs re-reads; neurons stay until make_room needs their
        # slot, least recently used first.
        evicted = window.drop_stale()
        y = None
        io = comp = 0.0
        loaded = hit = 0
        # Usually one round; an active set larger than the window is done in pieces.
        for start in range(0, needed.size, capacity):
            part = needed[start:start + capacity]
            t1 = time.perf_counter()
            missing = window.touch(part)
            hit += part.size - missing.size
            evicted += window.make_room(missing.size, part)
            held = part[window.slot_of[part] >= 0] if missing.size else part
            pending = start_load(missing) if missing.size else None
            t2 = time.perf_counter()
            try:   # the neurons held compute while the missing ones are read
                yp = ffn_over(x, held) if held.size else None
            finally:
                t3 = time.perf_counter()
                if pending is not None:
                    finish_load(pending, missing)
            t4 = time.perf_counter()
            if missing.size:
                yn = ffn_over(x, missing)
                yp = yn if yp is None else yp + yn
                loaded += missing.size
            if yp is not None:
                y = yp if y is None else y + yp
            io += (t2 - t1) + (t4 - t3)     # the wait the overlap did not hide
            comp += (t3 - t2) + (time.perf_counter() - t4)
        if y is None:
            y = np.zeros_like(x)
        stats.add(ffn_calls=1, tokens=x.shape[0], neurons_needed=needed.size, neurons_hit=hit,
                  neurons_loaded=loaded, neurons_evicted=evicted, io_wait_seconds=io,
                  compute_seconds=comp + t_pred)
        return y + down_bias if down_bias is not None else y

    run.window = window
    run.bundle = entry          # where the window's records come from (tests check them against it)
    return run
