"""Build native/fastread.c at first use and load it with ctypes.

The shared library goes to $XDG_CACHE_HOME/edgeinfer/ (default
~/.cache/edgeinfer/), named by a hash of the source and the compile command,
so an edited source rebuilds and concurrent first uses do not clash (each
builds to a temporary name, then renames). Everything degrades to None: no
compiler, a failed build, a non-POSIX platform, or EDGEINFER_NATIVE=0 means
the pure Python reader is used. Nothing here may break an import.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ABI_VERSION = 2
SOURCE = "fastread.c"
CFLAGS = ["-O2", "-shared", "-fPIC", "-pthread"]

_i64p = np.ctypeslib.ndpointer(dtype=np.int64, flags="C_CONTIGUOUS")
_u64p = np.ctypeslib.ndpointer(dtype=np.uint64, flags="C_CONTIGUOUS")


class FastRead:
    """The loaded helper: batched reads into given addresses (pread on threads, or an
    io_uring queue where the kernel has one), batched memcpy."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._lib = lib
        lib.ei_pread_batch.restype = ctypes.c_int
        lib.ei_pread_batch.argtypes = [ctypes.c_int, ctypes.c_int64, _i64p, _i64p, _u64p,
                                       ctypes.c_int64, ctypes.c_int, _i64p, _i64p]
        lib.ei_ring_open.restype = ctypes.c_void_p
        lib.ei_ring_open.argtypes = [ctypes.c_uint]
        lib.ei_ring_close.restype = None
        lib.ei_ring_close.argtypes = [ctypes.c_void_p]
        lib.ei_ring_batch.restype = ctypes.c_int
        lib.ei_ring_batch.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, _i64p, _i64p,
                                      _u64p, ctypes.c_int64, _i64p, _i64p]
        lib.ei_copy_batch.restype = None
        lib.ei_copy_batch.argtypes = [ctypes.c_int64, _u64p, _u64p, _i64p]

    def pread_batch(self, fd: int, offsets: np.ndarray, lengths: np.ndarray,
                    dests: np.ndarray, align: int, nthreads: int):
        """Read request i into the address dests[i]; (status, calls) per request:
        status = bytes read (short at EOF) or -errno. The GIL is released."""
        args = _batch(offsets, lengths, dests)
        self._lib.ei_pread_batch(fd, len(args[0]), *args[:3], align, nthreads, *args[3:])
        return args[3], args[4]

    def ring_open(self, entries: int) -> int | None:
        """An io_uring of `entries` reads in flight (a handle), or None where io_uring is
        missing or refused. One ring serves one thread at a time."""
        return self._lib.ei_ring_open(int(entries)) or None

    def ring_close(self, ring: int) -> None:
        self._lib.ei_ring_close(ring)

    def ring_batch(self, ring: int, fd: int, offsets: np.ndarray, lengths: np.ndarray,
                   dests: np.ndarray, align: int):
        """As pread_batch, through `ring`: (rc, status, calls); rc < 0 (-errno) means
        io_uring itself failed and the batch must be redone another way."""
        args = _batch(offsets, lengths, dests)
        rc = self._lib.ei_ring_batch(ring, fd, len(args[0]), *args[:3], align, *args[3:])
        return rc, args[3], args[4]

    def copy_batch(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        self._lib.ei_copy_batch(len(src), np.ascontiguousarray(src, dtype=np.uint64),
                                np.ascontiguousarray(dst, dtype=np.uint64),
                                np.ascontiguousarray(lengths, dtype=np.int64))


def _batch(offsets, lengths, dests) -> tuple:
    """C-contiguous (offsets, lengths, dests) and zeroed (status, calls) for one batch."""
    n = len(offsets)
    return (np.ascontiguousarray(offsets, dtype=np.int64), np.ascontiguousarray(lengths, dtype=np.int64),
            np.ascontiguousarray(dests, dtype=np.uint64), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgeinfer"


def load_fastread() -> FastRead | None:
    """The native reader, or None when disabled (EDGEINFER_NATIVE=0) or unbuildable."""
    if os.environ.get("EDGEINFER_NATIVE", "1").strip() in ("0", "false", "no", "off"):
        return None
    if os.name != "posix":
        return None
    compiler = os.environ.get("CC", "cc")
    return _load(str(cache_dir()), compiler)


@functools.lru_cache(maxsize=None)
def _load(directory: str, compiler: str) -> FastRead | None:
    try:
        lib_path = build(Path(directory), compiler)
        if lib_path is None:
            return None
        lib = ctypes.CDLL(str(lib_path))
        if lib.ei_abi_version() != ABI_VERSION:
            log.warning("native fastread %s has the wrong ABI version; not used", lib_path)
            return None
        return FastRead(lib, lib_path)
    except Exception as exc:    # a native helper must never break edgeinfer
        log.warning("native fastread unavailable (%s); using Python reads", exc)
        return None


def build(directory: Path, compiler: str = "cc") -> Path | None:
    """Compile fastread.c into `directory` unless an up-to-date build is there."""
    cmd = shlex.split(compiler)
    if not cmd or shutil.which(cmd[0]) is None:
        log.info("no C compiler (%s); native fastread disabled", compiler)
        return None
    source = importlib.resources.files("edgeinfer.native").joinpath(SOURCE).read_bytes()
    key = hashlib.sha256(
        source + " ".join(cmd + CFLAGS).encode() + platform.machine().encode()
    ).hexdigest()[:16]
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    target = directory / f"fastread-{key}{suffix}"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fastread-", dir=directory) as tmp:
        src = Path(tmp) / SOURCE
        src.write_bytes(source)
        out = Path(tmp) / target.name
        proc = subprocess.run(cmd + CFLAGS + ["-o", str(out), str(src)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or not out.exists():
            log.warning("building native fastread failed (%s): %s",
                        " ".join(cmd), (proc.stderr or proc.stdout).strip()[:500])
            return None
        os.replace(out, target)
    return target
