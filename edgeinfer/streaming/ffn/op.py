"""The streamed BundledFFN op: the FFN of a layer read from flash.

streaming: the predictor chooses neurons; the window keeps recent ones; only
           neurons not in the window are read, in one batch per layer per token
           (adjacent neurons coalesce into one read) into window slots, on the
           model's read queue while the layer computes the neurons it holds.
oracle:    as streaming, with the exact active set (testing: output equals resident).
naive:     the baseline of LLM in a flash: read the layer's whole FFN every token.
"""
from __future__ import annotations

import numpy as np

from edgeinfer.errors import ModelFormatError
from edgeinfer.format.bundle import BundleLayout
from edgeinfer.io.read_queue import OverlapTimer, PendingRead
from edgeinfer.io.records import VerifiedRecords
from edgeinfer.kernels.ffn import bundled_ffn
from edgeinfer.streaming.base import StreamedOp
from edgeinfer.streaming.ffn.predictor import LowRankPredictor, OraclePredictor
from edgeinfer.streaming.ffn.window import NeuronWindow

MIN_NEURONS = 32   # smallest window per layer; larger active sets are processed in rounds
# Coalesce reads of missing neurons separated by at most this many records not needed
# (read and dropped): one 4 KiB-page read costs ~25 us of latency on flash, a few KiB
# more of a read costs a few us (LLM in a flash §3.2: larger chunks read faster).
MAX_GAP_RECORDS = 1


def _layout(node) -> BundleLayout:
    return BundleLayout.from_attrs(node.attrs)


class BundledFFNStreaming(StreamedOp):
    def minimum_bytes(self, node, manifest, options, mode) -> int:
        lay = _layout(node)
        if mode == "naive":   # one scratch buffer of a whole layer, shared by all layers
            layers = sum(1 for t in manifest.tensors if t.endswith(".ffn.bundle")) or 1
            return -(-lay.ffn * lay.record_bytes // layers)
        return min(lay.ffn, MIN_NEURONS) * lay.record_bytes

    def demand(self, node, manifest, mode) -> tuple[float, int] | None:
        """(bytes of the neurons a token is expected to need, bytes of the whole FFN): the
        export's per-layer predicted (streaming) or true (oracle) active fraction. Naive
        mode holds one scratch buffer: no demand."""
        lay = _layout(node)
        full = lay.ffn * lay.record_bytes
        if mode == "naive":
            return None
        stats = {s.get("layer"): s for s in manifest.raw.get("predictors") or []}.get(node.name) or {}
        frac = stats.get("true_active" if mode == "oracle" else "predicted_active")
        if frac is None:
            return None
        return float(frac) * full, full

    def build(self, node, const, ctx):
        return _naive(node, const, ctx) if ctx.mode == "naive" else _windowed(node, const, ctx)


def _bundle(node, ctx):
    entry = ctx.manifest.tensors.get(node.inputs[1])
    if entry is None:
        raise ModelFormatError(f"node {node.name}: bundle {node.inputs[1]} is not in the manifest; "
                               "re-export the model")
    return entry


def _biases(node, const):
    inp = node.inputs + [""] * (4 - len(node.inputs))
    return (const(inp[2]) if inp[2] else None), (const(inp[3]) if inp[3] else None)


def _naive(node, const, ctx):
    """Read the layer's whole FFN into a scratch buffer every call, then compute."""
    lay = _layout(node)
    entry = _bundle(node, ctx)
    f = ctx.file(entry.file)
    up_bias, down_bias = _biases(node, const)
    act = node.attrs["activation"]
    stats = ctx.stats
    scratch = ctx.scratch(lay.ffn * lay.record_bytes)
    records = scratch.view(lay.dtype).reshape(lay.row_shape)

    def run_naive(state, x, *_):
        with ctx.lock:
            return _run_naive(state, x)

    def _run_naive(state, x):
        timer = OverlapTimer()
        f.read_into(entry.offset, scratch)
        timer.io()
        y = bundled_ffn(x, records, lay, act, up_bias=up_bias)
        timer.compute()
        stats.add(ffn_calls=1, tokens=x.shape[0], neurons_needed=lay.ffn, neurons_loaded=lay.ffn,
                  io_wait_seconds=timer.io_seconds, compute_seconds=timer.compute_seconds)
        return y + down_bias if down_bias is not None else y

    return run_naive


def _windowed(node, const, ctx):
    """The predictor (or the oracle) picks neurons; the window holds recent ones; the
    missing ones are read on the read queue while the held ones compute."""
    lay = _layout(node)
    entry = _bundle(node, ctx)
    f = ctx.file(entry.file)
    inp = node.inputs + [""] * (7 - len(node.inputs))
    up_bias, down_bias = _biases(node, const)
    act = node.attrs["activation"]
    stats = ctx.stats
    R = lay.record_bytes

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
    verified = None
    crc_name = f"{node.inputs[1]}.crc32"
    if ctx.options.verify_reads and crc_name in ctx.manifest.tensors:
        verified = VerifiedRecords(const(crc_name), path=f.path, tensor=entry.name, kind="neuron",
                                   base=entry.offset, record_bytes=R)
    capacity = max(min(lay.ffn, MIN_NEURONS), min(lay.ffn, ctx.share_of(node) // R))
    window = NeuronWindow(lay.ffn, R, capacity, ctx.options.window, dtype=lay.dtype)
    raw = window.buf.view(np.uint8).reshape(capacity, R)
    max_gap = MAX_GAP_RECORDS * R

    def read(neurons: np.ndarray, slots: np.ndarray) -> None:
        """On the read queue: the records of `neurons` into window slots `slots`."""
        req = np.empty((neurons.size, 2), dtype=np.int64)
        req[:, 0] = entry.offset + neurons * R
        req[:, 1] = R
        f.read_batch(req, out=raw.reshape(-1), dest=slots * R, max_gap=max_gap)
        if verified is not None:
            verified.check_whole(raw, slots, neurons)

    def start_load(neurons: np.ndarray) -> PendingRead:
        """Reserve slots for `neurons` and queue their read; a failed or interrupted read
        gives the slots back, so the window never holds records that did not arrive."""
        slots = window.reserve(neurons)
        return ctx.reads.submit(read, neurons, slots, undo=lambda _: window.unreserve(neurons))

    def ffn_over(x, part):
        return bundled_ffn(x, window.buf, lay, act, rows=window.slot_of[part], neuron_ids=part, up_bias=up_bias)

    def run(state, x, *args):
        with ctx.lock:
            return _run(state, x)

    def _run(state, x):
        timer = OverlapTimer()
        needed = predict(x)
        window.begin_step()
        # window k > 0: neurons not active in the last k tokens leave now (LLM in a flash
        # §3.3). k = 0 (the default): the buffer is preallocated, so early eviction frees
        # no memory and only costs re-reads; neurons stay until make_room needs their
        # slot, least recently used first.
        evicted = window.drop_stale()
        timer.compute()
        y = None
        loaded = hit = 0
        # Usually one round; an active set larger than the window is done in pieces.
        for start in range(0, needed.size, capacity):
            part = needed[start:start + capacity]
            missing = window.touch(part)
            hit += part.size - missing.size
            evicted += window.make_room(missing.size, part)
            held = part[window.slot_of[part] >= 0] if missing.size else part
            pending = start_load(missing) if missing.size else None
            timer.io()
            try:   # the neurons held compute while the missing ones are read
                yp = ffn_over(x, held) if held.size else None
            finally:
                timer.compute()
                if pending is not None:
                    pending.wait()
            timer.io()                      # the wait the overlap did not hide
            if missing.size:
                yn = ffn_over(x, missing)
                yp = yn if yp is None else yp + yn
                loaded += missing.size
            if yp is not None:
                y = yp if y is None else y + yp
            timer.compute()
        if y is None:
            y = np.zeros_like(x)
        stats.add(ffn_calls=1, tokens=x.shape[0], neurons_needed=needed.size, neurons_hit=hit,
                  neurons_loaded=loaded, neurons_evicted=evicted, io_wait_seconds=timer.io_seconds,
                  compute_seconds=timer.compute_seconds)
        return y + down_bias if down_bias is not None else y

    run.window = window
    run.bundle = entry          # where the window's records come from (tests check them against it)
    return run
