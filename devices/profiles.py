"""Device profiles: what a target can hold and how fast it moves bytes.

One TOML file per target in the `devices` package (devices/*.toml), or any
.toml path. The cost model and `bench` read the flash curve (GB/s by read
size) and DRAM bandwidth to put a floor under token latency; the runtime
takes the memory budget, execution providers and precisions as defaults.
`probe` measures this machine and returns a profile; `write_profile` saves it.

Units: bytes; bandwidth in GB/s = 1e9 bytes/s.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.resources
import json
import math
import os
import platform
import re
import socket
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeinfer.errors import DeviceProfileError, InvalidArgumentError
from edgeinfer.io.measure import DEFAULT_CHUNKS, measure_read_bandwidth
from edgeinfer.units import fmt_bytes

PRECISIONS = ("int2", "int4", "int8", "float16", "bfloat16", "float32")
COMPUTE_DTYPES = ("float16", "bfloat16", "float32")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_REQUIRED = ("name", "description", "memory_bytes", "default_memory_budget", "cores",
             "dram_bandwidth_gbps", "flash_read_gbps", "execution_providers", "precisions")
_OPTIONAL = ("flash_storage", "sources")


@dataclasses.dataclass(frozen=True)
class Precisions:
    weights: str = "int4"        # dense and FFN weights (MatMulNBits blocks)
    experts_low: str = "int2"    # low-precision copy of experts for cache misses (HOBBIT)
    compute: str = "float32"     # activation dtype on the preferred provider


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    memory_bytes: int
    default_memory_budget: int                     # bytes the runtime may use by default
    cores: int
    dram_bandwidth_gbps: float                     # shipped: datasheet peak; probe: measured
    flash_read_gbps: tuple[tuple[int, float], ...]  # (chunk bytes, GB/s), chunk ascending
    execution_providers: tuple[str, ...]           # onnxruntime providers, preferred first
    precisions: Precisions = Precisions()
    flash_storage: str = ""                        # what the flash figures are for
    sources: tuple[str, ...] = ()                  # where each figure comes from

    def flash_bandwidth(self, chunk_bytes: int) -> float:
        """Flash read bandwidth (GB/s) for reads of `chunk_bytes`, interpolated
        log-log between table entries. Below the table, reads are latency-bound
        (bandwidth proportional to size); above it, the last entry holds."""
        if chunk_bytes <= 0:
            raise InvalidArgumentError(f"chunk_bytes must be positive, got {chunk_bytes}")
        sizes = np.array([c for c, _ in self.flash_read_gbps], dtype=np.float64)
        gbps = np.array([g for _, g in self.flash_read_gbps], dtype=np.float64)
        if chunk_bytes <= sizes[0]:
            return float(gbps[0] * chunk_bytes / sizes[0])
        if chunk_bytes >= sizes[-1]:
            return float(gbps[-1])
        return float(np.exp(np.interp(np.log(chunk_bytes), np.log(sizes), np.log(gbps))))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["flash_read_gbps"] = {str(c): g for c, g in self.flash_read_gbps}
        d["execution_providers"] = list(self.execution_providers)
        d["sources"] = list(self.sources)
        return d

    @classmethod
    def from_dict(cls, data: dict, where: str = "profile") -> DeviceProfile:
        """Validate a parsed profile; every problem names the file and field."""
        def fail(msg: str):
            raise DeviceProfileError(f"{where}: {msg}")

        unknown = set(data) - set(_REQUIRED) - set(_OPTIONAL)
        if unknown:
            fail(f"unknown field(s) {', '.join(sorted(unknown))}; "
                 f"known: {', '.join(_REQUIRED + _OPTIONAL)}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            fail(f"missing field(s) {', '.join(missing)}")

        def positive(key, integer):
            v = data[key]
            ok = (not isinstance(v, bool) and isinstance(v, int if integer else (int, float))
                  and math.isfinite(v) and v > 0)
            if not ok:
                fail(f"{key} must be a positive {'integer' if integer else 'number'}, "
                     f"got {v!r}")
            return v

        name = data["name"]
        if not isinstance(name, str) or not _NAME.match(name):
            fail(f"name must be lowercase letters, digits, '.', '-' or '_', got {name!r}")
        memory = positive("memory_bytes", True)
        budget = positive("default_memory_budget", True)
        if budget > memory:
            fail(f"default_memory_budget ({budget}) exceeds memory_bytes ({memory})")
        table = data["flash_read_gbps"]
        if not isinstance(table, dict) or not table:
            fail("flash_read_gbps must be a table of chunk bytes = GB/s")
        flash = []
        for key, value in table.items():
            try:
                chunk = int(key)
            except ValueError:
                fail(f"flash_read_gbps key {key!r} is not a byte count")
            if chunk <= 0 or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                fail(f"flash_read_gbps entry {key} = {value!r} must be positive")
            flash.append((chunk, float(value)))
        providers = data["execution_providers"]
        if (not isinstance(providers, list) or not providers
                or not all(isinstance(p, str) and p.endswith("ExecutionProvider")
                           for p in providers)):
            fail("execution_providers must be a non-empty list of onnxruntime provider "
                 "names (e.g. \"CPUExecutionProvider\")")
        prec = data["precisions"]
        if not isinstance(prec, dict) or set(prec) - {"weights", "experts_low", "compute"}:
            fail("precisions must be a table with weights, experts_low, compute")
        precisions = Precisions(**prec)
        for key in ("weights", "experts_low"):
            if getattr(precisions, key) not in PRECISIONS:
                fail(f"precisions.{key} must be one of {', '.join(PRECISIONS)}")
        if precisions.compute not in COMPUTE_DTYPES:
            fail(f"precisions.compute must be one of {', '.join(COMPUTE_DTYPES)}")
        sources = data.get("sources", [])
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            fail("sources must be a list of strings")
        for key in ("description", "flash_storage"):
            if not isinstance(data.get(key, ""), str):
                fail(f"{key} must be a string")
        return cls(
            name=name,
            description=data["description"],
            memory_bytes=memory,
            default_memory_budget=budget,
            cores=positive("cores", True),
            dram_bandwidth_gbps=float(positive("dram_bandwidth_gbps", False)),
            flash_read_gbps=tuple(sorted(flash)),
            execution_providers=tuple(providers),
            precisions=precisions,
            flash_storage=data.get("flash_storage", ""),
            sources=tuple(sources),
        )


# -- shipped profiles -----------------------------------------------------------

def profiles_dir():
    """The folder of shipped profiles (the `devices` package; editable or installed)."""
    return importlib.resources.files("edgeinfer.devices")


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(p.name[:-5] for p in profiles_dir().iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str | os.PathLike) -> DeviceProfile:
    """A shipped profile by name (e.g. "jetson-orin-nano-8gb") or a .toml file by path."""
    text = os.fspath(name_or_path)
    path = Path(text)
    if text.endswith(".toml") or os.sep in text or path.exists():
        if not path.is_file():
            raise DeviceProfileError(f"device profile file {text} does not exist")
        where, source = str(path), path.read_bytes()
    else:
        resource = profiles_dir().joinpath(f"{text}.toml")
        if not resource.is_file():
            raise DeviceProfileError(
                f"unknown device profile {text!r}; known profiles: "
                f"{', '.join(list_profiles())} (or give a path to a .toml file)")
        where, source = f"devices/{text}.toml", resource.read_bytes()
    try:
        data = tomllib.loads(source.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DeviceProfileError(f"{where}: not valid TOML: {exc}") from exc
    return DeviceProfile.from_dict(data, where)


def write_profile(profile: DeviceProfile, path: str | os.PathLike) -> Path:
    """Write `profile` as TOML to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    DeviceProfile.from_dict(profile.to_dict(), str(path))     # refuse to write garbage
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial-tmp",
                               dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(to_toml(profile))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def to_toml(p: DeviceProfile) -> str:
    def s(v: str) -> str:
        return json.dumps(v, ensure_ascii=False)      # a valid TOML basic string

    lines = [
        "# edgeinfer device profile. Units: bytes; bandwidth in GB/s (1e9 bytes/s).",
        f"name = {s(p.name)}",
        f"description = {s(p.description)}",
        f"memory_bytes = {p.memory_bytes}  # {p.memory_bytes / 2**30:.1f} GiB",
        f"default_memory_budget = {p.default_memory_budget}  "
        f"# {p.default_memory_budget / 2**30:.1f} GiB",
        f"cores = {p.cores}",
        f"dram_bandwidth_gbps = {p.dram_bandwidth_gbps!r}",
        f"flash_storage = {s(p.flash_storage)}",
        "execution_providers = [" + ", ".join(s(x) for x in p.execution_providers) + "]",
        "sources = [",
        *[f"    {s(x)}," for x in p.sources],
        "]",
        "",
        "[precisions]",
        f"weights = {s(p.precisions.weights)}",
        f"experts_low = {s(p.precisions.experts_low)}",
        f"compute = {s(p.precisions.compute)}",
        "",
        "[flash_read_gbps]  # read size in bytes = GB/s",
        *[f"{c} = {g!r}" for c, g in p.flash_read_gbps],
    ]
    return "\n".join(lines) + "\n"


# -- probing this machine -------------------------------------------------------

def measure_dram_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """GB/s of a single-threaded numpy copy, counting bytes read plus bytes written
    (best of `repeats`)."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)                                  # fault the pages in
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def probe(directory: str | os.PathLike, *, chunk_sizes: Sequence[int] = DEFAULT_CHUNKS,
          threads: int = 16, file_size: int = 256 << 20, seconds: float = 0.5,
          dram_bytes: int = 256 << 20, progress: bool = True,
          name: str = "this-machine") -> DeviceProfile:
    """Measure this machine: flash read bandwidth per chunk size (O_DIRECT random
    aligned reads of a temporary file written in `directory`, on `threads` threads)
    and DRAM bandwidth (numpy copy). Progress goes to stderr."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DeviceProfileError(f"probe directory {directory} does not exist; give "
                                 "--dir a folder on the storage that will hold models")
    if not _NAME.match(name):
        raise DeviceProfileError(f"profile name {name!r}: use lowercase letters, digits, "
                                 "'.', '-' or '_'")
    say = _Progress(progress)
    chunks = sorted(set(chunk_sizes))
    say(f"probe: flash reads in {directory} ({len(chunks)} chunk sizes, {threads} threads, "
        f"{max(file_size, 8 * chunks[-1]) >> 20} MiB test file)")
    try:
        flash = measure_read_bandwidth(
            directory, chunks, threads=threads, file_size=file_size, seconds=seconds,
            progress=lambda i, c, g: say(f"  [{i + 1}/{len(chunks)}] {fmt_bytes(c):>8}: "
                                         f"{g:8.3f} GB/s"))
    except OSError as exc:
        raise DeviceProfileError(f"probe of {directory} failed: {exc}") from exc
    say(f"probe: DRAM copy of {dram_bytes >> 20} MiB")
    dram = measure_dram_bandwidth(dram_bytes)
    say(f"  {dram:.2f} GB/s (read + write)")
    memory, memory_known = _physical_memory()
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    how = {"direct": "O_DIRECT", "nocache": "F_NOCACHE",
           "buffered": "buffered (page-cache bypass unavailable: figures may be cached)"}
    return DeviceProfile(
        name=name,
        description=f"Measured on {socket.gethostname()} ({platform.system()} "
                    f"{platform.machine()}) by edgeinfer devices probe, {stamp}",
        memory_bytes=memory,
        default_memory_budget=memory // 2,
        cores=os.cpu_count() or 1,
        dram_bandwidth_gbps=round(dram, 3),
        flash_read_gbps=tuple((c, round(g, 4)) for c, g in sorted(flash.gbps.items())),
        execution_providers=_available_providers(),
        precisions=Precisions(),
        flash_storage=f"{directory.resolve()} (measured)",
        sources=(
            f"flash: measured, {how[flash.read_mode]} random chunk-aligned reads of a "
            f"{flash.file_size >> 20} MiB file, {flash.threads} threads, "
            f"{'native' if flash.native else 'Python'} reader, {seconds:g} s per size; "
            "a virtual disk may be served from the host's cache",
            f"dram: measured, single-thread numpy copy of {dram_bytes >> 20} MiB, best of 5, "
            "bytes read + written",
            ("memory_bytes: physical memory from sysconf" if memory_known else
             "memory_bytes: ESTIMATE, physical memory unknown here, 8 GiB assumed")
            + "; default_memory_budget: half of it",
            "execution_providers: onnxruntime.get_available_providers() on this machine",
        ),
    )


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)


def _physical_memory() -> tuple[int, bool]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), True
    except (ValueError, OSError, AttributeError):
        return 8 << 30, False


def _available_providers() -> tuple[str, ...]:
    try:
        import onnxruntime
        providers = [p for p in onnxruntime.get_available_providers()
                     if p != "AzureExecutionProvider"]   # remote inference, not a device
    except Exception:
        providers = []
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
    return tuple(providers)

