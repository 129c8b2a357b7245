"""The streamed MoE op: experts come from experts.bin through each layer's expert cache
under the memory budget.

Per layer call: route; pin the cached experts and queue the reads of the missing ones,
as one batch, on the model's read queue, behind this layer's own prefetch (HOBBIT's
token-level dynamic expert loading: a miss whose gate weight is below
`expert_low_threshold` reads the low-precision copy; a cached high copy is always used);
queue the next layer's prefetch; run the cached experts while the reads go on, then the
rest. Every read lands in a pinned, not yet ready slot; the cache's bookkeeping is under
its lock, so the reads run outside it.

Layer-level prefetch (after HOBBIT's layer-level expert prefetching): while layer L
computes, layer L+1's router applied to L's hidden state guesses L+1's experts, and
their reads are queued. The residual stream changes little from one layer to the next,
so the guess is usually right; a wrong guess costs a read, never a wrong result (layer
L+1 routes for itself).

Modes: "streaming" (and "oracle": routing is exact anyway) use the options as given;
"naive" is the no-reuse baseline: room for one token's experts, each read at full
precision every time it is needed, no prefetch.
"""
from __future__ import annotations

import threading
from collections import Counter

import numpy as np

from edgeinfer.errors import BudgetError
from edgeinfer.format.experts import HIGH, LOW, ExpertLayout
from edgeinfer.io.read_queue import OverlapTimer, ReadQueue
from edgeinfer.io.records import VerifiedRecords
from edgeinfer.kernels.experts import add_expert
from edgeinfer.streaming.base import StreamedOp
from edgeinfer.streaming.moe.expert_cache import ExpertCache, block_geometry
from edgeinfer.streaming.moe.resident import MoENode
from edgeinfer.streaming.moe.router import tokens_by_expert


def _minimum_bytes(node) -> int:
    """Room for one token's experts at full precision."""
    return int(node.attrs["top_k"]) * block_geometry(ExpertLayout.from_attrs(node.attrs))[2]


class MoEStreaming(StreamedOp):
    def minimum_bytes(self, node, manifest, options, mode) -> int:
        return _minimum_bytes(node)

    def streamed_inputs(self, node) -> list[str]:
        """The expert records (the router and shared expert stay resident)."""
        return [name for name in node.inputs[2:4] if name]

    def build(self, node, const, ctx):
        return StreamedMoE(node, const, ctx)


class MoERuntime:
    """What the streamed MoE layers of one model share: their order, the read queue, and
    counters beyond RuntimeStats (experts run at low precision, prefetch reads)."""

    def __init__(self, reads: ReadQueue):
        self.layers: dict[int, StreamedMoE] = {}
        self.reads = reads
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    @classmethod
    def of(cls, ctx) -> MoERuntime:
        """The runtime of ctx's model, made by its first MoE layer."""
        if ctx.moe is None:
            ctx.moe = cls(ctx.reads)
        return ctx.moe

    def add(self, layer: "StreamedMoE") -> None:
        self.layers[layer.layer] = layer
        self._order = sorted(self.layers)

    def is_first(self, layer: int) -> bool:
        return layer == self._order[0]

    def next_layer(self, layer: int) -> "StreamedMoE | None":
        later = [i for i in self._order if i > layer]
        return self.layers[later[0]] if later else None

    def count(self, **kw) -> None:
        with self._lock:
            self.counts.update(kw)

    def cache_bytes(self) -> int:
        return sum(layer.cache.nbytes for layer in self.layers.values())


def runtime_of(model) -> MoERuntime | None:
    """The MoE runtime of a loaded model (None when no MoE layer streams)."""
    return model.plan.moe_runtime if model.plan is not None else None


class StreamedMoE:
    def __init__(self, node, const, ctx):
        self.moe = MoENode(node, const)
        self.layer = self.moe.layer
        self.layout = layout = self.moe.layout
        high = ctx.manifest.tensors[node.inputs[2]]
        self.file = ctx.file(high.file)
        self.high_at = high.offset
        self.low_at = None
        if layout.low_bits and not layout.low_nested:
            self.low_at = ctx.manifest.tensors[node.inputs[3]].offset
        opts = ctx.options
        self.tensor_names = {HIGH: node.inputs[2], LOW: node.inputs[3] if self.low_at is not None else node.inputs[2]}
        # tensor -> its crc32 per record stage, checked on a stage's first read
        self.verified: dict[str, VerifiedRecords] = {}
        if opts.verify_reads:
            for prec, name in self.tensor_names.items():
                if name in self.verified or f"{name}.crc32" not in ctx.manifest.tensors:
                    continue                     # a nested low copy is the high record's prefix
                fmt = layout.high if prec == HIGH else layout.low
                self.verified[name] = VerifiedRecords(
                    const(f"{name}.crc32"), path=self.file.path, tensor=name, kind="expert",
                    base=self.high_at if prec == HIGH else self.low_at, record_bytes=fmt.record_bytes,
                    stages=fmt.stage_offsets())
        self.naive = ctx.mode == "naive"
        top_k = self.moe.top_k
        capacity = _minimum_bytes(node) if self.naive else ctx.share_of(node)
        self.cache = ExpertCache(layout, capacity, "lru" if self.naive else opts.expert_policy, min_blocks=top_k)
        self.threshold = 0.0 if self.naive or not layout.low_bits else float(opts.expert_low_threshold)
        self.prefetch = bool(opts.prefetch) and not self.naive
        self.stats = ctx.stats
        self.runtime = MoERuntime.of(ctx)
        self.runtime.add(self)
        self.lock = threading.Lock()             # one call of this layer at a time
        self.shared_lock = ctx.lock              # streamed layers run one at a time (StreamContext.lock)

    # -- where an expert's bytes are --------------------------------------------------------
    def _range(self, expert: int, precision: str) -> tuple[int, int]:
        L = self.layout
        if precision == HIGH:
            return self.high_at + expert * L.high_bytes, L.high_bytes
        if L.low_nested:                         # the low copy is the record's prefix
            return self.high_at + expert * L.high_bytes, L.low_bytes
        return self.low_at + expert * L.low_bytes, L.low_bytes

    def precision(self, weight: float) -> str:
        return LOW if weight < self.threshold else HIGH

    # -- loading ------------------------------------------------------------------------
    def _load(self, wants):
        """Pin a usable cached copy of each (expert, precision), reading the missing ones as
        one batch. Returns (entries, entries read now). Thread-safe: the cache's bookkeeping
        happens under its lock, the read outside it (into pinned, not yet ready slots)."""
        cache = self.cache
        entries, fresh, requests, dests = [], [], [], []
        try:
            with cache.lock:
                evicted0 = cache.counts.evicted
                try:
                    self._reserve(wants, entries, fresh, requests, dests)
                finally:
                    self.stats.add(experts_evicted=cache.counts.evicted - evicted0)
            if requests:
                self.file.read_batch(requests, out=cache.buffer, dest=dests)
                for ent, (off, n) in zip(fresh, requests):
                    self._verify(ent, off, n)
        except BaseException:                    # StorageError, ChecksumError, Ctrl-C: keep the cache truthful
            with cache.lock:
                for ent in fresh:
                    cache.drop(ent)
                for ent in entries:
                    cache.release(ent)
            raise
        with cache.lock:
            for ent in fresh:
                cache.commit(ent)
        return entries, fresh

    def _reserve(self, wants, entries, fresh, requests, dests) -> None:
        """_load's bookkeeping (under the cache's lock): pin what is cached, reserve the rest."""
        cache, L = self.cache, self.layout
        for e, prec in wants:
            have = cache.get(e)
            if have is not None and (have.precision == HIGH or prec == LOW):
                entries.append(cache.pin(have))
                continue
            new = None
            if have is not None and L.low_nested:    # upgrade in place: read the rest after the prefix
                new = cache.upgrade_in_place(have)
                if new is not None:
                    off, n = self._range(e, prec)
                    entries.append(new)
                    fresh.append(new)
                    requests.append((off + L.low_bytes, n - L.low_bytes))
                    dests.append(cache.offset(new) + L.low_bytes)
                    continue
            if have is not None:                 # upgrade: keep the low copy while a slot is found
                try:
                    new = cache.reserve(e, prec, keep=have)
                except BudgetError:              # no room beside it: read the whole record instead
                    cache.drop(have)
                    have = None
            if new is None:
                new = cache.reserve(e, prec)
            entries.append(new)
            fresh.append(new)
            at = cache.offset(new)
            off, n = self._range(e, prec)
            if have is not None:
                if L.low_nested:                 # the record's prefix is the low copy: copy, read the rest
                    cache.buffer[at:at + L.low_bytes] = cache.view(have)
                    off, n, at = off + L.low_bytes, n - L.low_bytes, at + L.low_bytes
                    new.prefetched = have.prefetched     # a prefetched prefix still saved its read
                cache.drop(have)
            requests.append((off, n))
            dests.append(at)

    def _unpin(self, read) -> None:
        """Undo of this layer's own read when the wait for it was interrupted: a read that
        ended well pinned its entries for a call that will not run them (a failed read
        undid its reservations in _load)."""
        if read.cancelled() or read.exception() is not None:
            return
        entries, _ = read.result()
        with self.cache.lock:
            for ent in entries:
                self.cache.release(ent)

    def _verify(self, entry, off: int, n: int) -> None:
        """Check the stages of entry's record (format.experts stages) that the read of n
        bytes at file offset `off` covered."""
        v = self.verified.get(self.tensor_names[entry.precision])
        if v is not None:
            start = off - v.base - entry.expert * v.record_bytes      # where in the record the read began
            v.check_range(self.cache.buffer, self.cache.offset(entry), entry.expert, start, n)

    def _prefetch_into(self, wants) -> None:
        """Runs on the read queue: read this layer's guessed experts into its cache.
        A guess finds no room while this layer's own call pins the cache: it is skipped."""
        try:
            entries, fresh = self._load(wants)
        except BudgetError:
            entries, fresh = [], []
            for want in wants:
                try:
                    ent, new = self._load([want])
                except BudgetError:
                    continue
                entries += ent
                fresh += new
        with self.cache.lock:
            for ent in fresh:
                ent.prefetched = True
            for ent in entries:
                self.cache.release(ent)
        if fresh:
            self.stats.add(prefetch_issued=len(fresh))
            self.runtime.count(prefetch_bytes=sum(self._range(e.expert, e.precision)[1] for e in fresh))

    def _start_prefetch(self, x: np.ndarray) -> None:
        nxt = self.runtime.next_layer(self.layer)
        if nxt is None:
            return
        idx, w = nxt.moe.route(x[-1:])
        wants = [(int(e), nxt.precision(float(v))) for e, v in zip(idx[0], w[0])]
        self.runtime.reads.prefetch(nxt.layer, nxt._prefetch_into, wants)

    # -- the layer ------------------------------------------------------------------------
    def __call__(self, state, x, *_):
        x = np.ascontiguousarray(x, dtype=np.float32)
        rt = self.runtime
        with self.shared_lock:
            idx, w = self.moe.route(x)
            groups = tokens_by_expert(idx, w)
            with self.lock:
                y = self._run(x, groups)
        if rt.is_first(self.layer):
            self.stats.add(tokens=x.shape[0])
        return self.moe.finish(x, y)

    def _run(self, x: np.ndarray, groups) -> np.ndarray:
        """Run this call's experts. The copies already cached run first while the missing ones
        are read on the prefetch thread (after this layer's prefetch, which may still be
        reading: its slots are pinned and not ready, so they are left to the read); then
        the next layer's prefetch is queued and the rest run as their reads complete."""
        cache, rt = self.cache, self.runtime
        with cache.lock:
            cache.tick()
            wants = []
            for e, (_, wts) in groups.items():
                top = float(wts.max())
                cache.used(e, low_eligible=top < self.threshold)
                wants.append((e, self.precision(top)))
            # cached experts first, so reading the others cannot evict them
            wants.sort(key=lambda ew: cache.get(ew[0]) is None)
        y = np.zeros_like(x)
        hits = loaded = low_loaded = run_low = used_prefetch = 0
        timer = OverlapTimer()
        step = cache.blocks
        for start in range(0, len(wants), step):
            chunk = wants[start:start + step]
            ready, rest = [], []
            with cache.lock:                     # usable, ready copies: pinned now, run while the rest is read
                for e, prec in chunk:
                    have = None if self.naive else cache.get(e)
                    if have is not None and (have.precision == HIGH or prec == LOW):
                        ready.append((e, cache.pin(have)))
                    else:
                        rest.append((e, prec))
            job = None
            if rest and not self.naive:          # FIFO behind this layer's prefetch, ahead of the next one
                job = rt.reads.submit(self._load, rest, undo=self._unpin)
            if start == 0 and self.prefetch:
                self._start_prefetch(x)
            entries, fresh = [], []
            if rest and self.naive:
                entries, fresh = self._load(rest)
            timer.io()
            pinned = [ent for _, ent in ready]
            try:
                try:
                    self._compute(x, y, groups, ready)
                finally:
                    timer.compute()
                    if job is not None:          # wait for the read even when the above failed: its pins
                        try:
                            entries, fresh = job.wait()
                        finally:
                            timer.io()
                pinned += entries
                pairs = [(e, ent) for (e, _), ent in zip(rest, entries)]
                self._compute(x, y, groups, pairs)
                timer.compute()
            finally:
                with cache.lock:
                    for ent in pinned:
                        cache.release(ent)
                        if self.naive:
                            cache.drop(ent)
            loaded += len(fresh)
            low_loaded += sum(ent.precision == LOW for ent in fresh)
            hits += len(ready) + len(entries) - len(fresh)
            run_low += sum(ent.precision == LOW for _, ent in ready + pairs)
            used_prefetch += sum(ent.prefetched for _, ent in ready + pairs)
            for _, ent in ready + pairs:
                ent.prefetched = False
        if rt.next_layer(self.layer) is None:    # nothing reads after the last layer's call returns
            rt.reads.wait(self.layer)
            timer.io()
        else:                                    # its error, if it is done (one still reading goes on)
            rt.reads.collect(self.layer)
        self.stats.add(experts_needed=len(wants), experts_hit=hits, experts_loaded=loaded,
                       experts_low_precision=low_loaded, prefetch_hits=used_prefetch,
                       io_wait_seconds=timer.io_seconds, compute_seconds=timer.compute_seconds)
        self.runtime.count(experts_run=len(wants), experts_run_low=run_low)
        return y

    def _compute(self, x, y, groups, pairs) -> None:
        for e, ent in pairs:
            rows, wts = groups[e]
            add_expert(y, x, rows, wts, self.cache.view(ent), self.layout.format(ent.precision))
