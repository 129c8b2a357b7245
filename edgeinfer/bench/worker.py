"""One benchmarked configuration: a loaded model that warms up and times tokens.

By default each mode runs in its own process (ProcessWorker): its RSS
high-water mark is that mode's alone, a crash in one mode does not take the
others down, and the runner alternates runs between modes while all stay
loaded. LocalWorker runs the same code in this process (API use, debugging).
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from edgeinfer import errors


@dataclass(frozen=True)
class WorkerSpec:
    path: str
    mode: str
    memory_budget: object = None
    threads: int | None = None
    verify: str = "sampled"
    options: dict = field(default_factory=dict)   # RuntimeOptions fields besides mode


# -- memory ------------------------------------------------------------------------

def rss() -> dict:
    """Resident set size now and its high-water mark (bytes); Linux /proc, else getrusage."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "peak": int(fields["VmHWM"].split()[0]) * 1024,
                "source": "/proc/self/status"}
    except (OSError, KeyError, ValueError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024
        return {"rss": None, "peak": peak, "source": "getrusage (not resettable)"}


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current RSS (Linux >= 4.0: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- Numba compile accounting -----------------------------------------------------------

def compile_cache_stats() -> dict:
    """Numba dispatchers of edgeinfer: signatures loaded from the on-disk cache vs compiled."""
    from numba.core.dispatcher import Dispatcher
    hits = misses = 0
    for name, mod in list(sys.modules.items()):
        if not name.startswith("edgeinfer.") or mod is None:
            continue
        for obj in list(vars(mod).values()):
            if isinstance(obj, Dispatcher):
                st = obj.stats
                hits += sum(st.cache_hits.values())
                misses += sum(st.cache_misses.values())
    return {"cache_hits": hits, "cache_misses": misses, "cache_warm": misses == 0 and hits > 0}


class _CompileTimer:
    def __init__(self):
        from numba.core import event
        self._event = event
        self.listener = event.TimingListener()
        event.register("numba:compile", self.listener)

    def stop(self) -> float:
        self._event.unregister("numba:compile", self.listener)
        return self.listener.duration if self.listener.done else 0.0


# -- the benchmarked model ---------------------------------------------------------------

class Session:
    """A loaded model plus the measurements bench asks of it."""

    def __init__(self, spec: WorkerSpec):
        t0 = time.perf_counter()
        self.timer = _CompileTimer()
        from edgeinfer.runtime.loader import load
        self.model = load(spec.path, memory_budget=spec.memory_budget, threads=spec.threads,
                          verify=spec.verify, mode=spec.mode, **spec.options)
        self.load_s = time.perf_counter() - t0
        self.spec = spec
        self._reset = False

    def describe(self) -> dict:
        m = self.model
        plan = m.plan
        buffers = window_neurons = 0
        for step in m.executor.steps:
            fn = step[0]
            window_neurons += getattr(getattr(fn, "window", None), "capacity", 0)
            for attr in ("window", "cache"):          # neuron window (dense), expert cache (MoE)
                holder = getattr(fn, attr, None)
                nbytes = getattr(holder, "nbytes", None)
                if nbytes is not None:
                    buffers += int(nbytes() if callable(nbytes) else nbytes)
        files = {}
        if plan is not None:
            buffers += plan.scratch_bytes                  # e.g. naive mode's scratch buffer
            files = {rel: f.read_mode for rel, f in plan.streamed_files().items()}
        import numba
        return {"mode": m.mode, "budget": plan.budget if plan else None,
                "minimum_bytes": plan.minimum_bytes if plan else None,
                "total_weight_bytes": plan.total_bytes if plan else None,
                "resident_bytes": int(m.resident_bytes), "buffer_bytes": buffers,
                "accounted_bytes": int(m.resident_bytes) + buffers, "window_neurons": window_neurons,
                "streamed_nodes": len(plan.streamed) if plan else 0,
                "read_modes": files, "load_s": self.load_s, "threads": numba.get_num_threads(),
                "rss_after_load": rss(), "pid": os.getpid()}

    def warmup(self, ids: list[int], tokens: int) -> dict:
        """First forward passes: Numba compiles or loads its cache here. Excluded from
        the measured runs and reported on its own."""
        t0 = time.perf_counter()
        first = self._generate(ids, max(1, tokens))
        total = time.perf_counter() - t0
        compile_s = self.timer.stop()
        out = {"seconds": total, "first_token_s": first["ttft_s"], "tokens": tokens,
               "compile_s": compile_s, **compile_cache_stats(), "rss": rss()}
        self.model.stats.reset()
        return out

    def run(self, ids: list[int], new_tokens: int) -> dict:
        if not self._reset:
            self._reset = reset_peak_rss()
        out = self._generate(ids, new_tokens)
        out["rss"] = rss()
        out["rss_peak_reset"] = self._reset
        return out

    def _generate(self, ids: list[int], new_tokens: int) -> dict:
        """Greedy decode of exactly new_tokens tokens (EOS does not stop a benchmark)."""
        m, stats = self.model, self.model.stats
        cache = m.new_cache()
        before = stats.snapshot()
        t0 = time.perf_counter()
        logits = m.forward(ids, cache)
        token = int(np.argmax(logits[-1]))
        ttft = time.perf_counter() - t0
        prefill = stats.delta(stats.snapshot(), before)
        seconds, contexts, rows = [], [], []
        for _ in range(new_tokens - 1):
            contexts.append(cache.length + 1)
            b = stats.snapshot()
            t = time.perf_counter()
            logits = m.forward([token], cache)
            token = int(np.argmax(logits[-1]))
            seconds.append(time.perf_counter() - t)
            rows.append(stats.delta(stats.snapshot(), b))
        keys = sorted(rows[0]) if rows else []
        counters = {k: [r[k] for r in rows] for k in keys if any(r[k] for r in rows)}
        return {"ttft_s": ttft, "prefill": prefill, "decode_s": seconds, "context": contexts,
                "counters": counters, "kv_bytes": cache.nbytes}

    def close(self) -> None:
        self.model.close()      # the streamed weight files and the read queue's thread


def _relay(exc: BaseException) -> tuple:
    if isinstance(exc, errors.EdgeInferError):
        return ("error", type(exc).__name__, str(exc))
    return ("crash", f"{type(exc).__name__}: {exc}", traceback.format_exc())


def serve(conn, spec: WorkerSpec) -> None:
    """Child process main loop: load, then answer warmup / run / stop."""
    try:
        session = Session(spec)
        conn.send(("ok", session.describe()))
    except BaseException as exc:    # noqa: BLE001 - everything goes back to the parent
        conn.send(_relay(exc))
        return
    while True:
        try:
            cmd, kw = conn.recv()
        except EOFError:
            return
        if cmd == "stop":
            session.close()
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(session, cmd)(**kw)))
        except BaseException as exc:  # noqa: BLE001
            conn.send(_relay(exc))


def _raise(reply: tuple, mode: str):
    if reply[0] == "error":
        cls = getattr(errors, reply[1], errors.EdgeInferError)
        raise cls(reply[2])
    raise errors.EdgeInferError(f"bench worker for mode {mode} failed: {reply[1]}\n{reply[2]}")


class ProcessWorker:
    """A Session in its own process (spawned: no state inherited from this one)."""

    def __init__(self, spec: WorkerSpec, timeout: float = 3600.0):
        ctx = multiprocessing.get_context("spawn")
        self.spec = spec
        self.timeout = timeout
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, spec), daemon=True, name=f"edgeinfer-bench-{spec.mode}")
        self.proc.start()
        child.close()
        self.info = self._reply()

    def _reply(self):
        if not self.conn.poll(self.timeout):
            self.proc.kill()
            raise errors.EdgeInferError(f"bench worker for mode {self.spec.mode} did not answer in {self.timeout:.0f} s")
        try:
            reply = self.conn.recv()
        except EOFError:
            raise errors.EdgeInferError(f"bench worker for mode {self.spec.mode} died "
                                        f"(exit code {self.proc.exitcode}; out of memory?)") from None
        if reply[0] != "ok":
            self.proc.join(5)
            _raise(reply, self.spec.mode)
        return reply[1]

    def call(self, cmd: str, **kw):
        self.conn.send((cmd, kw))
        return self._reply()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("stop")
            except errors.EdgeInferError:
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
        self.conn.close()


class LocalWorker:
    """A Session in this process (peak RSS then covers every mode loaded so far)."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.session = Session(spec)
        self.info = self.session.describe()

    def call(self, cmd: str, **kw):
        return getattr(self.session, cmd)(**kw)

    def close(self) -> None:
        self.session.close()
