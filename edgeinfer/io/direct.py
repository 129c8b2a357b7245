"""Page-cache-bypassing reads of weight files: every streamed weight byte comes from here.

Weights streamed per token must not pile up in the page cache: the memory
budget would be a fiction and the OS would evict what the runtime keeps
resident. So a WeightFile opens with O_DIRECT on Linux (aligned buffers,
offsets and lengths: everything is widened to 4096 and copied out), F_NOCACHE
on macOS, and otherwise falls back to buffered reads with
posix_fadvise(DONTNEED) after each batch, with one warning saying why.

A batch (`read_batch`) is one token's reads for one layer: sorted, coalesced,
split over threads (os.preadv releases the GIL), or handed whole to the
native C loop (`native/fastread.c`), which pays no Python cost per read: an
io_uring keeping `queue_depth` reads in flight from the calling thread (small
random reads are latency-bound; more in flight, more per second), else pread on
`threads` threads.

Scatter API: the caller may pass its own destination `out` and per-request
destination offsets `dest`, e.g. the slots of a neuron window's preallocated
buffer (LLM in a flash §3.3). Pieces whose bytes map 1:1 onto an aligned part
of `out` (the whole of a 4 KiB-aligned expert record, say; allocate `out` with
`aligned_empty`) are read straight into it; the rest go through a reused
staging buffer and one memcpy each.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import logging
import os
import sys
import threading
import time
import warnings
import weakref

import numpy as np

from edgeinfer.errors import BufferedFallbackWarning, ModelClosedError, StorageError
from edgeinfer.format.constants import ALIGN, find_multiple
from edgeinfer.io.faults import FaultInjector
from edgeinfer.io.read_plan import ReadPlan, as_requests, plan_reads
from edgeinfer.io.stats import IOStats

RETRYABLE = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT}
STAGING_KEEP = 16 << 20     # staging buffers up to this size are kept for the next batch
NATIVE_THREADS_MIN_BYTES = 256 << 10   # below this a batch runs on the calling thread

log = logging.getLogger(__name__)
_warned: set = set()        # (st_dev, reason): warn once per filesystem and reason


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """An uninitialised uint8 array of `nbytes` whose first byte is `align`-aligned."""
    raw = np.empty(int(nbytes) + align, dtype=np.uint8)
    shift = (-raw.ctypes.data) % align
    return raw[shift:shift + int(nbytes)]


def _address(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


@dataclasses.dataclass(frozen=True)
class Batch:
    """Bytes of a batch of requests: request i is data[starts[i]:starts[i] + lengths[i]]."""

    data: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(self.starts[i])
        return self.data[s:s + int(self.lengths[i])]


class WeightFile:
    """One weight file opened for uncached, aligned, batched reads.

    direct:   bypass the page cache (False: plain buffered reads, no warning).
    stats:    IOStats to count into (share one per model); a new one if None.
    faults:   FaultInjector for tests; forces the pure Python path.
    retries:  EIO (and reads making no progress) are retried this many times.
    threads:  reads of one batch run on up to this many threads.
    queue_depth: native io_uring reads in flight per batch (0: threads only).
    max_gap:  coalesce requests whose holes are at most this many bytes (read and
              dropped: one larger read beats two small ones on flash).
    max_read: largest single read call; longer ranges are split.
    native:   None: use native/fastread.c when it builds; True: require it;
              False: pure Python. Both give identical bytes.
    """

    def __init__(self, path: str | os.PathLike, *, direct: bool = True,
                 stats: IOStats | None = None, faults: FaultInjector | None = None,
                 retries: int = 3, threads: int = 4, max_gap: int = 0,
                 max_read: int = 1 << 20, native: bool | None = None,
                 queue_depth: int = 128) -> None:
        if native is True and faults is not None:
            raise ValueError("a FaultInjector needs the Python read path: pass native=None")
        if retries < 0 or threads < 1 or max_gap < 0 or queue_depth < 0:
            raise ValueError("retries, max_gap and queue_depth must be >= 0, threads >= 1")
        if max_read < ALIGN or max_read % ALIGN:
            raise ValueError(f"max_read must be a positive multiple of {ALIGN}")
        self.path = os.fspath(path)
        self.stats = stats if stats is not None else IOStats()
        self.faults = faults
        self.retries = retries
        self.threads = threads
        self.max_gap = max_gap
        self.max_read = max_read
        self.queue_depth = queue_depth
        self.read_mode = "buffered"     # "direct" (O_DIRECT), "nocache" (F_NOCACHE), "buffered"
        self.fallback_reason: str | None = None
        self._fd = self._open(direct)
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        real_size = os.fstat(self._fd).st_size
        self.size = faults.file_size(real_size) if faults is not None else real_size
        self.align = ALIGN if self.read_mode == "direct" else 1
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._native = None
        if native is not False and faults is None:
            from edgeinfer.native import load_fastread
            self._native = load_fastread()
        self._rings: list[int] = []     # io_uring handles, one per reading thread
        if self._native is not None:
            weakref.finalize(self, _close_rings, self._native, self._rings)
        if native is True and self._native is None:
            self.close()
            raise StorageError(
                "the native fastread helper is unavailable (no C compiler, a build "
                "failure, or EDGEINFER_NATIVE=0); open with native=None to fall back "
                "to Python reads"
            )

    # -- opening -------------------------------------------------------------

    def _open(self, direct: bool) -> int:
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        try:
            if not direct:
                return self._open_buffered(flags)
            if hasattr(os, "O_DIRECT"):
                try:
                    fd = os.open(self.path, flags | os.O_DIRECT)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    reason = "the filesystem refuses O_DIRECT (EINVAL at open)"
                else:
                    reason = self._check_direct(fd)
                    if reason is None:
                        self.read_mode = "direct"
                        return fd
                    os.close(fd)
            elif sys.platform == "darwin":
                import fcntl
                fd = os.open(self.path, flags)
                try:
                    fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
                    self.read_mode = "nocache"
                    return fd
                except OSError as exc:
                    os.close(fd)
                    reason = f"fcntl(F_NOCACHE) failed: {exc.strerror}"
            else:
                reason = f"{sys.platform} has neither O_DIRECT nor F_NOCACHE"
            fd = self._open_buffered(flags)
        except OSError as exc:
            raise StorageError(f"cannot open weight file {self.path}: {exc.strerror}") from exc
        self.fallback_reason = reason
        self._warn_fallback(fd, reason)
        return fd

    def _open_buffered(self, flags: int) -> int:
        fd = os.open(self.path, flags)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)   # no readahead of neighbours
        return fd

    @staticmethod
    def _check_direct(fd: int) -> str | None:
        """Some filesystems accept O_DIRECT at open and refuse the reads: try one."""
        if os.fstat(fd).st_size == 0:
            return None
        try:
            os.preadv(fd, [aligned_empty(ALIGN)], 0)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return "the filesystem refuses O_DIRECT reads (EINVAL)"
            raise
        return None

    def _warn_fallback(self, fd: int, reason: str) -> None:
        key = (os.fstat(fd).st_dev, reason)
        if key in _warned:
            return
        _warned.add(key)
        drop = ("with posix_fadvise(DONTNEED) after each batch"
                if hasattr(os, "posix_fadvise") else "without cache control")
        warnings.warn(
            f"edgeinfer: {self.path}: {reason}; reading through the page cache {drop}. "
            "Cached weights count against system memory, not the memory budget; "
            "put the model on a filesystem with direct I/O (ext4, xfs, apfs) for "
            "honest streaming.",
            BufferedFallbackWarning, stacklevel=4,
        )

    # -- public reads --------------------------------------------------------

    def read(self, offset: int, length: int) -> np.ndarray:
        """`length` bytes at `offset` as a uint8 array (a view into an aligned buffer)."""
        self._check_range(offset, length)
        if self.align == 1 or length == 0:
            out = np.empty(length, dtype=np.uint8)
            return self.read_batch([(offset, length)], out=out).data
        start = offset - offset % self.align
        span = find_multiple(offset + length, self.align) - start
        buf = aligned_empty(span)
        readable = min(start + span, self.size) - start
        # The whole aligned span is read straight into buf; only an EOF tail is staged.
        one = np.array([start], dtype=np.int64)
        self._execute(one, np.array([readable], dtype=np.int64), np.zeros(1, np.int64),
                      buf, max_gap=None, native=None, requested=length)
        return buf[offset - start:offset - start + length]

    def read_into(self, offset: int, out: np.ndarray) -> np.ndarray:
        """Fill the uint8 array `out` with the bytes at `offset`; returns `out`."""
        self.read_batch([(offset, out.nbytes)], out=out)
        return out

    def read_batch(self, requests, out: np.ndarray | None = None, *,
                   dest=None, max_gap: int | None = None,
                   native: bool | None = None) -> Batch:
        """Read many (offset, length) requests as one batch.

        requests: [(offset, length), ...] or an int64 array [n, 2].
        out:      destination uint8 array (C-contiguous); allocated, aligned, if None.
        dest:     destination offset in `out` of each request (a scatter: e.g. neuron
                  record i to slot k of a window buffer); if None, requests are
                  packed back to back in request order.
        max_gap:  override of the file's max_gap; negative: not even adjacent
                  requests merge (one read per request, for measurements).
        Returns a Batch whose item i is request i's bytes (a view of `out`).
        """
        offsets, lengths = as_requests(requests)
        n = len(offsets)
        if n and int((offsets + lengths).max()) > self.size:
            bad = int(np.argmax(offsets + lengths > self.size))
            self._check_range(int(offsets[bad]), int(lengths[bad]))
        if dest is None:
            starts = np.cumsum(lengths) - lengths
            need = int(lengths.sum())
        else:
            starts = np.asarray(dest, dtype=np.int64).reshape(-1)
            if len(starts) != n:
                raise ValueError(f"dest has {len(starts)} offsets for {n} requests")
            if n and int(starts.min()) < 0:
                raise ValueError("dest offsets must be >= 0")
            need = int((starts + lengths).max()) if n else 0
            _check_disjoint(starts, lengths)
        if out is None:
            out = aligned_empty(need)
        elif (not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 1
              or not out.flags.c_contiguous or not out.flags.writeable):
            raise ValueError("out must be a writeable, C-contiguous, 1-D uint8 array")
        elif out.size < need:
            raise ValueError(f"out holds {out.size} bytes, the requests need {need}")
        self._execute(offsets, lengths, starts, out, max_gap=max_gap, native=native,
                      requested=int(lengths.sum()))
        return Batch(out, starts, lengths)

    # -- execution -----------------------------------------------------------

    def _execute(self, offsets: np.ndarray, lengths: np.ndarray, starts: np.ndarray,
                 out: np.ndarray, *, max_gap: int | None, native: bool | None,
                 requested: int) -> None:
        if self.closed:
            raise ModelClosedError(f"I/O on closed weight file {self.path}: the model was closed (Model.close()); "
                                   "load it again to generate")
        t0 = time.perf_counter()
        plan = plan_reads(
            offsets, lengths, starts, file_size=self.size, align=self.align,
            max_gap=self.max_gap if max_gap is None else int(max_gap),
            max_read=self.max_read, dest_address=_address(out),
        )
        use_native = self._native is not None and native is not False and self.faults is None
        if native is True and self._native is None:
            raise StorageError(f"{self.path}: the native fastread helper is unavailable")
        tally = [0, 0, 0]       # read calls, retries, bytes delivered: kept if a read fails
        try:
            if plan.pieces:
                staging = self._staging(plan.staging_bytes)
                if use_native:
                    self._run_native(plan, out, staging, tally)
                else:
                    self._run_python(plan, out, staging, tally)
                if self.read_mode == "buffered" and hasattr(os, "posix_fadvise"):
                    lo = int(plan.piece_offset[0])
                    hi = int((plan.piece_offset + plan.piece_length).max())
                    os.posix_fadvise(self._fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        finally:
            self.stats.add(bytes_requested=requested, bytes_read=tally[2],
                           requests=len(offsets), read_calls=tally[0], retries=tally[1],
                           seconds=time.perf_counter() - t0)

    def _staging(self, nbytes: int) -> np.ndarray:
        if nbytes > STAGING_KEEP:
            return aligned_empty(nbytes)
        buf = getattr(self._local, "staging", None)
        if buf is None or buf.size < nbytes:
            buf = aligned_empty(max(nbytes, ALIGN))
            self._local.staging = buf
        return buf

    def _run_python(self, plan: ReadPlan, out: np.ndarray, staging: np.ndarray,
                    tally: list[int]) -> None:
        groups = _split_by_bytes(plan.piece_length, self.threads)
        tallies = [[0, 0, 0] for _ in groups]
        if len(groups) == 1:
            futures = []
        else:
            pool = self._thread_pool()
            futures = [pool.submit(self._run_group, plan, out, staging, lo, hi, t)
                       for (lo, hi), t in zip(groups[1:], tallies[1:])]
        try:
            self._run_group(plan, out, staging, *groups[0], tallies[0])
        finally:
            # never return (or raise) while a worker still writes into `out`
            concurrent.futures.wait(futures)
            for t in tallies:
                for i in range(3):
                    tally[i] += t[i]
        for f in futures:
            f.result()

    def _run_group(self, plan: ReadPlan, out: np.ndarray, staging: np.ndarray,
                   lo: int, hi: int, tally: list[int]) -> None:
        offs = plan.piece_offset[lo:hi].tolist()
        lens = plan.piece_length[lo:hi].tolist()
        needs = plan.piece_need[lo:hi].tolist()
        dests = plan.piece_dest[lo:hi].tolist()
        direct = plan.piece_direct[lo:hi].tolist()
        for off, length, need, d, to_out in zip(offs, lens, needs, dests, direct):
            self._fill((out if to_out else staging)[d:d + length], off, need, tally)
        s0, s1 = np.searchsorted(plan.seg_piece, (lo, hi))
        if s1 > s0:
            base = plan.piece_dest[plan.seg_piece[s0:s1]] + plan.seg_src[s0:s1]
            for src, dst, n in zip(base.tolist(), plan.seg_dest[s0:s1].tolist(),
                                   plan.seg_length[s0:s1].tolist()):
                out[dst:dst + n] = staging[src:src + n]

    def _run_native(self, plan: ReadPlan, out: np.ndarray, staging: np.ndarray,
                    tally: list[int]) -> None:
        out_addr, stage_addr = _address(out), _address(staging)
        dests = np.where(plan.piece_direct, out_addr, stage_addr) + plan.piece_dest
        dests = dests.astype(np.uint64)
        ring = self._ring() if plan.pieces > 1 else None
        rc = -1
        if ring is not None:
            rc, status, calls = self._native.ring_batch(
                ring, self._fd, plan.piece_offset, plan.piece_length, dests, self.align)
            if rc < 0:      # io_uring refused at run time: threads from now on, and say so once
                self.queue_depth = 0
                self._drop_ring(ring)       # closing it also ends any read it still had in flight
                log.warning("%s: io_uring reads failed (%s); using pread threads",
                            self.path, os.strerror(-rc))
        if rc < 0:
            nthreads = 1
            if plan.pieces > 1 and plan.bytes_to_read >= NATIVE_THREADS_MIN_BYTES:
                nthreads = min(self.threads, plan.pieces)
            status, calls = self._native.pread_batch(
                self._fd, plan.piece_offset, plan.piece_length, dests, self.align, nthreads)
        tally[0] += int(calls.sum())
        tally[2] += int(np.maximum(status, 0).sum())
        for p in np.flatnonzero(status < plan.piece_need).tolist():
            # Short, failed or at EOF: redo in Python, which retries and names the error.
            d, length = int(plan.piece_dest[p]), int(plan.piece_length[p])
            buf = (out if plan.piece_direct[p] else staging)[d:d + length]
            prior = 1 if status[p] < 0 else 0
            tally[1] += prior
            self._fill(buf, int(plan.piece_offset[p]), int(plan.piece_need[p]), tally,
                       failures=prior)
        if len(plan.seg_piece):
            src = stage_addr + plan.piece_dest[plan.seg_piece] + plan.seg_src
            dst = out_addr + plan.seg_dest
            self._native.copy_batch(src.astype(np.uint64), dst.astype(np.uint64),
                                    plan.seg_length)

    def _fill(self, buf: np.ndarray, offset: int, need: int, tally: list[int],
              failures: int = 0) -> None:
        """Read until the first `need` bytes of buf hold the file's bytes at `offset`.

        Short reads continue (from the last aligned point, as O_DIRECT needs); EIO
        and reads that make no progress are retried up to self.retries times in all.
        Adds (read calls, retries, bytes delivered) to tally.
        """
        length = len(buf)
        got = 0
        while got < need:
            start = got - got % self.align
            want, pos = length - start, offset + start
            tally[0] += 1
            try:
                allowed = want if self.faults is None else self.faults.on_read(pos, want)
                n = min(self._pread(buf[start:], pos), allowed)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                if exc.errno == errno.EINVAL and self.read_mode == "direct":
                    raise StorageError(
                        f"O_DIRECT read of {want} bytes at offset {pos} of {self.path} "
                        f"was refused (EINVAL): the device may need an alignment above "
                        f"{ALIGN}; open the file with direct=False"
                    ) from exc
                failures += 1
                if exc.errno not in RETRYABLE or failures > self.retries:
                    raise StorageError(
                        f"cannot read {want} bytes at offset {pos} of {self.path}: "
                        f"{exc.strerror} (errno {exc.errno}) after {failures} attempt(s); "
                        "the storage may be failing: check the kernel log, or copy the "
                        "model folder to another device"
                    ) from exc
                tally[1] += 1
                time.sleep(0.001 * failures)
                continue
            tally[2] += n
            if start + n <= got:
                failures += 1
                if failures > self.retries:
                    raise StorageError(
                        f"read of {want} bytes at offset {pos} of {self.path} returned no "
                        f"data after {failures} attempt(s): the file ends before byte "
                        f"{offset + need} (was it truncated or replaced while open?)"
                    )
                tally[1] += 1
                continue
            got = start + n

    def _pread(self, buf: np.ndarray, pos: int) -> int:
        if hasattr(os, "preadv"):
            return os.preadv(self._fd, [buf], pos)
        with self._lock:            # platforms without positional reads
            os.lseek(self._fd, pos, os.SEEK_SET)
            data = os.read(self._fd, len(buf))
        buf[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        return len(data)

    def _ring(self) -> int | None:
        """This thread's io_uring (made at first use), or None: disabled or unavailable."""
        if self.queue_depth <= 0:
            return None
        ring, pid = getattr(self._local, "ring", (None, None))
        if ring is None or pid != os.getpid():     # a forked child must not share its parent's ring
            ring = self._native.ring_open(self.queue_depth)
            if ring is None:
                self.queue_depth = 0
                return None
            with self._lock:
                self._rings.append(ring)
            self._local.ring = (ring, os.getpid())
        return ring

    def _drop_ring(self, ring: int) -> None:
        with self._lock:
            if ring in self._rings:
                self._rings.remove(ring)
                self._native.ring_close(ring)
        self._local.ring = (None, None)

    def _thread_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.threads - 1 or 1, thread_name_prefix="edgeinfer-read")
            return self._pool

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise ValueError(f"offset and length must be >= 0, got {offset}, {length}")
        if offset + length > self.size:
            raise StorageError(
                f"{self.path} is {self.size} bytes: cannot read {length} bytes at offset "
                f"{offset}; the file is truncated or the manifest's offsets are wrong "
                "(re-export or re-copy the model)"
            )

    # -- lifetime ------------------------------------------------------------

    @property
    def native(self) -> bool:
        """Whether batches use the native C reader."""
        return self._native is not None

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._native is not None:
            with self._lock:
                _close_rings(self._native, self._rings)
        self._finalizer()

    def __enter__(self) -> WeightFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"WeightFile({self.path!r}, read_mode={self.read_mode}, size={self.size}, "
                f"native={self.native})")


def _close_rings(native, rings: list[int]) -> None:
    while rings:
        native.ring_close(rings.pop())


def _split_by_bytes(lengths: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Split pieces into at most `parts` contiguous groups of similar byte counts."""
    n = len(lengths)
    parts = min(parts, n)
    if parts <= 1:
        return [(0, n)]
    cum = np.cumsum(lengths)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts, side="left") + 1
    bounds = np.unique(np.concatenate(([0], np.minimum(cuts, n), [n]))).tolist()
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _check_disjoint(starts: np.ndarray, lengths: np.ndarray) -> None:
    nonempty = lengths > 0
    starts, lengths = starts[nonempty], lengths[nonempty]
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], starts[order] + lengths[order]
    if len(s) > 1 and (s[1:] < e[:-1]).any():
        raise ValueError("destination regions of a batch must not overlap")
