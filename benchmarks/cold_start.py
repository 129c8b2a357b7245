"""Process start -> first token: a fresh interpreter per run, with a fresh empty
NUMBA_CACHE_DIR (cold: every kernel compiles) and with one already filled (warm), as
`edgeinfer generate` runs after `pip install` and on every later run.

Each run is split into python (interpreter start), import (import edgeinfer), load
(edgeinfer.load), first token (the prompt's forward and the first sampled token) and,
inside those, compile (seconds in Numba compilations of edgeinfer kernels, from
numba:compile events). Timings include whatever else the machine runs: take them
under `flock /tmp/bench.lock` on a shared host and say so.

    python benchmarks/cold_start.py [-m MODEL_DIR] [-r 3] [-t N] [--json | --json-file FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from edgeinfer.bench.report import write_json
from edgeinfer.cli.args import add_json, add_model, add_threads

# Runs in the child; prints one JSON line of wall-clock stamps (time.time()) and compile seconds.
_CHILD = r"""
import json, sys, time
t_start = time.time()
from numba.core import event
compile_s = [0.0]
open_events = {}
class _Timer(event.Listener):
    def on_start(self, ev):
        d = ev.data.get("dispatcher")
        if getattr(getattr(d, "py_func", None), "__module__", "").startswith("edgeinfer."):
            open_events[id(ev.data)] = time.perf_counter()
    def on_end(self, ev):
        t = open_events.pop(id(ev.data), None)
        if t is not None and not open_events:      # outermost edgeinfer compilation only
            compile_s[0] += time.perf_counter() - t
event.register("numba:compile", _Timer())
import edgeinfer
t_import = time.time()
model_dir, threads, prompt = json.loads(sys.argv[1])
model = edgeinfer.load(model_dir, threads=threads)
t_load = time.time()
steps = model.generate(prompt, max_new_tokens=1, stream=True)
next(steps)
t_first = time.time()
print(json.dumps({"start": t_start, "import": t_import, "load": t_load, "first": t_first,
                  "compile": compile_s[0]}))
"""

PHASES = ("python", "import", "load", "first_token", "total", "compile")


def run_once(model_dir, threads, prompt, cache_dir) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([model_dir, threads, prompt])],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"child failed:\n{proc.stderr}")
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"python": s["start"] - t0, "import": s["import"] - s["start"], "load": s["load"] - s["import"],
            "first_token": s["first"] - s["load"], "total": s["first"] - t0, "compile": s["compile"],
            "announced": "compiling kernels" in proc.stderr}


def summarize(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in PHASES}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model(ap, positional=False)
    add_threads(ap)
    ap.add_argument("-r", "--runs", type=int, default=3, help="runs of each kind (default 3)")
    ap.add_argument("-p", "--prompt", default="Once upon a time")
    add_json(ap, "the runs and their medians", file=True)
    args = ap.parse_args(argv)

    results = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="edgeinfer-warm-") as warm_dir:
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="edgeinfer-cold-") as cold_dir:
                results["cold"].append(run_once(args.model, args.threads, args.prompt, cold_dir))
        run_once(args.model, args.threads, args.prompt, warm_dir)      # fills the warm cache
        for _ in range(args.runs):
            results["warm"].append(run_once(args.model, args.threads, args.prompt, warm_dir))

    data = {"model": args.model or "demo", "threads": args.threads, "prompt": args.prompt, "runs": results,
            "median": {kind: summarize(runs) for kind, runs in results.items()}}
    if not args.json:
        print(f"process start -> first token, median of {args.runs} runs (seconds)")
        print(f"{'cache':<6}" + "".join(f"{p:>13}" for p in PHASES) + "   announced")
        for kind, runs in results.items():
            med = data["median"][kind]
            announced = sum(r["announced"] for r in runs)
            print(f"{kind:<6}" + "".join(f"{med[p]:>13.2f}" for p in PHASES) + f"   {announced}/{len(runs)}")
    write_json(data, stdout=args.json, path=args.json_file)


if __name__ == "__main__":
    main()
