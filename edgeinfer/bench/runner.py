"""`edgeinfer bench`: token latency of several modes of one model, measured side by side.

Each mode is loaded once (its own process by default), warmed up (Numba compile
or cache load, first reads: reported, never measured), then the runs alternate
between modes, rotating the order each round, so a noisy neighbour slows every
mode alike. Every decode token is timed alone, with the runtime's counters
(model.stats) read around it.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeinfer.bench.worker import LocalWorker, ProcessWorker, WorkerSpec
from edgeinfer.errors import ContextLengthError, EdgeInferError
from edgeinfer.units import fmt_bytes

ALL_MODES = ("resident", "naive", "streaming", "oracle")
DEFAULT_MODES = ("resident", "naive", "streaming")
BASELINES = ("resident", "naive")

# The benchmark prompt: plain English prose (written for this project), repeated as needed.
PROMPT_TEXT = (
    "The lighthouse keeper climbed the stairs every evening at the same hour, counting the steps "
    "as his father had taught him. From the lamp room he could see the harbour, the fishing boats "
    "coming home with their lanterns lit, and the long road that wound along the cliffs toward the "
    "town. In winter the wind pressed against the glass so hard that the whole tower seemed to "
    "breathe. He kept a small notebook in which he wrote down the weather, the ships that passed, "
    "and anything else that struck him as worth remembering: a flock of geese flying south, a "
    "stranger on the beach, the night the sea turned silver under a full moon. Years later his "
    "granddaughter found the notebooks in a wooden chest and read them one by one, and in those "
    "plain lines she discovered a patient, curious man she had never really known. "
)


@dataclass(frozen=True)
class BenchConfig:
    model: str | None = None            # model folder (None: the built-in demo)
    modes: tuple[str, ...] | None = None  # None: resident, naive, streaming where available
    memory_budget: object = None        # for the streaming modes; resident runs unbudgeted
    device: str | None = None           # profile name or .toml path; None: probe this machine
    prompt_tokens: int = 128
    new_tokens: int = 32
    runs: int = 3
    warmup_tokens: int = 4
    threads: int | None = None
    window: int | None = None           # RuntimeOptions.window override
    activations: str | None = None      # RuntimeOptions.activations override
    isolate: bool = True                # one process per mode
    progress: bool = True

    def validate(self) -> None:
        if self.prompt_tokens < 1 or self.new_tokens < 2:
            raise EdgeInferError("--prompt-tokens must be >= 1 and --max-new-tokens >= 2 "
                                 "(the first new token comes from the prefill)")
        if self.runs < 1 or self.warmup_tokens < 0:
            raise EdgeInferError("--runs must be >= 1 and --warmup-tokens >= 0")
        if self.threads is not None and self.threads < 1:
            raise EdgeInferError("--threads must be >= 1")
        for m in self.modes or ():
            if m not in ALL_MODES:
                raise EdgeInferError(f"unknown mode {m!r} in --compare; choose from {', '.join(ALL_MODES)}")
        if self.modes is not None and len(set(self.modes)) != len(self.modes):
            raise EdgeInferError("--compare lists a mode twice")


def _say(cfg: BenchConfig, msg: str) -> None:
    if cfg.progress:
        print(f"bench: {msg}", file=sys.stderr, flush=True)


# -- inputs ---------------------------------------------------------------------------

def resolve_device(spec: str | None, folder: Path, progress: bool = True):
    """(profile, how): a shipped profile by name, a .toml path, or a quick probe of this
    machine on the storage that holds the model."""
    from edgeinfer.devices.profiles import load_profile, probe
    if spec not in (None, "probe"):
        return load_profile(spec), "profile"
    from edgeinfer.cli.devices import QUICK
    where = folder if os.access(folder, os.W_OK) and "site-packages" not in str(folder) \
        and folder.name != "demo" else Path(tempfile.gettempdir())
    return probe(where, progress=progress, name="this-machine", **QUICK), f"probe ({where}, quick)"


def prompt_ids(tokenizer, n: int, vocab: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(PROMPT_TEXT)
    ids = [i for i in ids if i < vocab][:n]
    if len(ids) < n:
        raise EdgeInferError("the model's tokenizer cannot encode the benchmark prompt")
    return ids


def mode_availability(manifest, graph, mode: str) -> str | None:
    """None if `mode` can run on this model folder, else the reason it cannot."""
    from edgeinfer.streaming.registry import STREAMED_OPS
    if mode == "resident":
        return None
    nodes = [n for n in graph.nodes if n.key in STREAMED_OPS]
    if not nodes:
        return "this export has no streamable FFN or experts (export with bundles)"
    if mode == "streaming" and any(n.op_type == "BundledFFN" and (len(n.inputs) < 5 or not n.inputs[4])
                                   for n in nodes):
        return "the model has no sparsity predictors (export with --predictors)"
    return None


def check_budget(manifest, graph, mode: str, budget, options: dict) -> None:
    """Raise BudgetError now (one clear line) if `budget` cannot hold the resident part."""
    from edgeinfer.runtime.options import RuntimeOptions
    from edgeinfer.runtime.stats import RuntimeStats
    from edgeinfer.streaming.plan import plan_memory
    plan_memory(manifest, graph, budget, RuntimeOptions(mode=mode, **options), RuntimeStats()).close()


# -- the benchmark ------------------------------------------------------------------------

def run_bench(cfg: BenchConfig) -> dict:
    """Measure; returns the results dict that `report` prints and --json writes."""
    from edgeinfer.bench.traffic import model_traffic
    from edgeinfer.format.manifest import read_manifest
    from edgeinfer.runtime.executor import load_graph
    from edgeinfer.runtime.loader import DEMO_MODEL
    from edgeinfer.runtime.tokenizer import Tokenizer

    cfg.validate()
    load_start = _loadavg()
    folder = Path(cfg.model) if cfg.model is not None else DEMO_MODEL
    manifest = read_manifest(folder)
    graph = load_graph(manifest)
    if manifest.tokenizer is None:
        raise EdgeInferError(f"{folder} has no tokenizer")
    if cfg.device not in (None, "probe"):
        device, device_source = resolve_device(cfg.device, folder, cfg.progress)   # a bad name fails now
    options = {"direct_io": True}
    if cfg.window is not None:
        options["window"] = cfg.window
    if cfg.activations is not None:
        options["activations"] = cfg.activations
    skipped = {}
    if cfg.modes is None:
        modes = []
        for m in DEFAULT_MODES:
            why = mode_availability(manifest, graph, m)
            (skipped.__setitem__(m, why) if why else modes.append(m))
    else:
        modes = list(cfg.modes)
        for m in modes:
            why = mode_availability(manifest, graph, m)
            if why:
                raise EdgeInferError(f"mode {m} cannot run on {folder}: {why}")
    budgets, notes = {}, {}
    for m in modes:
        if m == "resident":
            budgets[m] = None                     # the baseline that fits: no budget
            continue
        budgets[m] = cfg.memory_budget
        if m == "naive":
            # the baseline needs one layer's FFN in memory; below that it runs at its minimum
            need, resident = naive_minimum(manifest, graph, options)
            asked = _budget_bytes(manifest, cfg.memory_budget)
            if asked is not None and resident <= asked < need:
                budgets[m] = need
                notes[m] = f"naive runs at its minimum {fmt_bytes(need)} (one layer's FFN), above the budget"
        check_budget(manifest, graph, m, budgets[m], options)
    total = cfg.prompt_tokens + cfg.new_tokens
    max_ctx = int(manifest.generation.get("max_context", manifest.config.max_position_embeddings))
    if total > max_ctx:
        raise ContextLengthError(f"--prompt-tokens {cfg.prompt_tokens} + --max-new-tokens {cfg.new_tokens} = {total} "
                                 f"exceeds the model's context window of {max_ctx} tokens")
    tokenizer = Tokenizer(manifest.path(manifest.tokenizer))
    ids = prompt_ids(tokenizer, cfg.prompt_tokens, manifest.config.vocab_size)
    if cfg.device in (None, "probe"):
        device, device_source = resolve_device(cfg.device, folder, cfg.progress)
    _drop_page_cache(manifest)

    workers = {}
    warm = {}
    try:
        for m in modes:        # one at a time: the first compiles (or loads) Numba's cache
            spec = WorkerSpec(str(folder), m, budgets[m], cfg.threads, options=options)
            _say(cfg, f"loading {m}")
            workers[m] = (ProcessWorker if cfg.isolate else LocalWorker)(spec)
            _say(cfg, f"warming up {m} ({cfg.warmup_tokens} tokens)")
            warm[m] = workers[m].call("warmup", ids=ids, tokens=max(1, cfg.warmup_tokens))
        _say(cfg, "measuring kernel rates for the cost model")
        rates = _kernel_rates(manifest, graph, cfg.threads)
        runs = {m: [] for m in modes}
        for r in range(cfg.runs):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for m in order:
                t0 = time.perf_counter()
                runs[m].append(workers[m].call("run", ids=ids, new_tokens=cfg.new_tokens))
                _say(cfg, f"run {r + 1}/{cfg.runs} {m}: {time.perf_counter() - t0:.1f} s")
    finally:
        for w in workers.values():
            w.close()
    traffic = model_traffic(manifest, graph)
    from edgeinfer.bench.report import build_results
    return build_results(cfg=cfg, manifest=manifest, traffic=traffic, device=device, device_source=device_source,
                         rates=rates, modes=modes, infos={m: w.info for m, w in workers.items()}, warm=warm,
                         runs=runs, skipped=skipped, prompt=ids, load_avg=(load_start, _loadavg()), notes=notes)


def naive_minimum(manifest, graph, options: dict) -> tuple[int, int]:
    """(naive mode's minimum budget, the resident weights within it)."""
    from edgeinfer.runtime.options import RuntimeOptions
    from edgeinfer.runtime.stats import RuntimeStats
    from edgeinfer.streaming.plan import plan_memory
    plan = plan_memory(manifest, graph, None, RuntimeOptions(mode="naive", **options), RuntimeStats())
    plan.close()
    return plan.minimum_bytes, sum(manifest.files[f]["size"] for f in plan.resident_files)


def _budget_bytes(manifest, spec) -> int | None:
    from edgeinfer.units import parse_budget
    total = sum(manifest.files[f]["size"] for f in {e.file for e in manifest.tensors.values()})
    return parse_budget(spec, total)


def _loadavg() -> float | None:
    """1-minute load average: other work on the machine slows every mode (reported)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _kernel_rates(manifest, graph, threads):
    from edgeinfer.bench.rates import measure_kernel_rates
    from edgeinfer.bench.traffic import model_traffic
    if threads is not None:
        import numba
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    return measure_kernel_rates(manifest, model_traffic(manifest, graph))


def _drop_page_cache(manifest) -> None:
    """Ask the kernel to forget the streamed files' pages (direct I/O bypasses the
    cache anyway; this covers a buffered fallback)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for rel in manifest.files:
        try:
            fd = os.open(manifest.path(rel), os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def config_dict(cfg: BenchConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["modes"] = list(cfg.modes) if cfg.modes else None
    return d


def percentile(values, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None
