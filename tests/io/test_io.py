"""Storage layer: exact bytes on every path, coalescing, faults, checksums."""
from __future__ import annotations

import concurrent.futures
import errno
import os
import sys
import threading
import warnings
import zlib

import numpy as np
import pytest
from edgeinfer.native import loader
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeinfer.errors import BufferedFallbackWarning, StorageError
from edgeinfer.io import (
    ALIGN,
    FaultInjector,
    IOStats,
    WeightFile,
    aligned_empty,
    crc32_bytes,
    crc32_file,
    plan_reads,
)
from edgeinfer.io import direct as direct_mod

SIZE = 3 * (1 << 20) + 123          # not a multiple of 4096: the last block is partial
HAVE_NATIVE = loader.load_fastread() is not None
LINUX = sys.platform.startswith("linux")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8)
    path = tmp_path_factory.mktemp("storage") / "weights.bin"
    data.tofile(path)
    return path, data


def random_requests(rng, n, size, max_len=20000):
    lengths = rng.integers(0, max_len, n)
    offsets = rng.integers(0, size - lengths + 1)
    return np.stack([offsets, lengths], axis=1)


MODES = [
    pytest.param(True, False, id="direct-python"),
    pytest.param(False, False, id="buffered-python"),
    pytest.param(True, True, id="direct-native",
                 marks=pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")),
    pytest.param(False, True, id="buffered-native",
                 marks=pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")),
]


@pytest.mark.parametrize("direct,native", MODES)
def test_read_batch_returns_exact_bytes(weights, direct, native):
    path, data = weights
    rng = np.random.default_rng(1)
    with WeightFile(path, direct=direct, native=native, threads=3) as wf:
        if direct and LINUX:
            assert wf.read_mode == "direct"
        assert wf.native is native
        for _ in range(25):
            reqs = random_requests(rng, int(rng.integers(1, 300)), SIZE)
            batch = wf.read_batch(reqs, max_gap=int(rng.choice([0, 100, 8192])))
            assert len(batch) == len(reqs)
            for i, (off, length) in enumerate(reqs):
                np.testing.assert_array_equal(batch[i], data[off:off + length])
        # the partial last block and single reads
        np.testing.assert_array_equal(wf.read(SIZE - 7, 7), data[-7:])
        np.testing.assert_array_equal(wf.read(SIZE - 5000, 5000), data[-5000:])
        np.testing.assert_array_equal(wf.read(1, 2_500_000), data[1:2_500_001])
        assert wf.read(10, 0).size == 0
        out = np.empty(777, dtype=np.uint8)
        assert wf.read_into(4095, out) is out
        np.testing.assert_array_equal(out, data[4095:4095 + 777])


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
@pytest.mark.parametrize("direct", [True, False])
def test_native_and_python_paths_give_identical_bytes(weights, direct):
    path, data = weights
    rng = np.random.default_rng(2)
    reqs = random_requests(rng, 2000, SIZE, max_len=3000)
    with WeightFile(path, direct=direct) as wf:
        assert wf.native
        fast = wf.read_batch(reqs, native=True)
        slow = wf.read_batch(reqs, native=False)
    np.testing.assert_array_equal(fast.data, slow.data)
    np.testing.assert_array_equal(fast.starts, slow.starts)
    expect = np.concatenate([data[o:o + n] for o, n in reqs])
    np.testing.assert_array_equal(fast.data, expect)


def _have_uring() -> bool:
    fr = loader.load_fastread()
    ring = fr.ring_open(4) if fr is not None else None
    if ring is not None:
        fr.ring_close(ring)
    return ring is not None


HAVE_URING = HAVE_NATIVE and _have_uring()


@pytest.mark.skipif(not HAVE_URING, reason="no io_uring on this kernel (or no C compiler)")
@pytest.mark.parametrize("direct", [True, False])
def test_io_uring_reads_match_pread_threads(weights, direct):
    """A shallow ring (4 in flight) over many small pieces: its refill and completion
    handling, the partial last block and scattered destinations give the bytes the
    threaded pread loop gives."""
    path, data = weights
    rng = np.random.default_rng(5)
    reqs = random_requests(rng, 700, SIZE, max_len=9000)
    reqs = np.concatenate([reqs, [[SIZE - 100, 100], [SIZE - 4097, 4097]]])
    with WeightFile(path, direct=direct, queue_depth=4, max_read=8192) as ring_f, \
            WeightFile(path, direct=direct, queue_depth=0, threads=3) as pread_f:
        ring = ring_f.read_batch(reqs)
        assert ring_f._rings, "the batch did not go through io_uring"
        plain = pread_f.read_batch(reqs)
        assert not pread_f._rings
    np.testing.assert_array_equal(ring.data, plain.data)
    expect = np.concatenate([data[o:o + n] for o, n in reqs])
    np.testing.assert_array_equal(ring.data, expect)


@pytest.mark.skipif(not HAVE_URING, reason="no io_uring on this kernel (or no C compiler)")
def test_io_uring_one_ring_per_thread(weights):
    path, data = weights
    with WeightFile(path, queue_depth=16) as wf:
        def work(seed):
            reqs = random_requests(np.random.default_rng(seed), 200, SIZE, max_len=5000)
            got = wf.read_batch(reqs, max_gap=-1)
            return all(np.array_equal(got[i], data[o:o + n]) for i, (o, n) in enumerate(reqs))
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            assert all(pool.map(work, range(12)))
        assert 1 < len(wf._rings) <= 4          # the main thread's is not made; 3 workers'
    assert not wf._rings                        # closed with the file


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
def test_io_uring_refused_falls_back_to_threads(weights, monkeypatch):
    """A kernel that opens rings but fails io_uring_enter (seccomp, say): the batch is
    redone with pread threads, the bytes are right, and later batches skip the ring."""
    path, data = weights
    fr = loader.load_fastread()
    monkeypatch.setattr(type(fr), "ring_open", lambda self, entries: 12345)
    monkeypatch.setattr(type(fr), "ring_close", lambda self, ring: None)
    monkeypatch.setattr(type(fr), "ring_batch",
                        lambda self, *a: (-38, np.zeros(0, np.int64), np.zeros(0, np.int64)))
    reqs = random_requests(np.random.default_rng(6), 50, SIZE)
    with WeightFile(path, queue_depth=8) as wf:
        got = wf.read_batch(reqs, max_gap=-1)
        assert wf.queue_depth == 0
        for i, (o, n) in enumerate(reqs):
            np.testing.assert_array_equal(got[i], data[o:o + n])


@pytest.mark.parametrize("direct,native", MODES)
def test_scatter_into_caller_buffer(weights, direct, native):
    """Neuron records land in the given slots; bytes outside them stay untouched."""
    path, data = weights
    record, slots = 1500, 64
    rng = np.random.default_rng(3)
    neurons = rng.choice(SIZE // record, 40, replace=False)
    slot = rng.choice(slots, 40, replace=False)
    window = np.full(slots * record, 0xAB, dtype=np.uint8)
    reqs = np.stack([neurons * record, np.full(40, record)], axis=1)
    with WeightFile(path, direct=direct, native=native) as wf:
        batch = wf.read_batch(reqs, out=window, dest=slot * record)
    assert batch.data is window
    expect = np.full_like(window, 0xAB)
    for n, s in zip(neurons, slot):
        expect[s * record:(s + 1) * record] = data[n * record:(n + 1) * record]
    np.testing.assert_array_equal(window, expect)


def test_aligned_records_are_read_without_staging(weights):
    """4 KiB-aligned records into an aligned buffer: every piece is direct (no copy)."""
    path, data = weights
    offsets = np.array([0, 8 * ALIGN, 100 * ALIGN], dtype=np.int64)
    lengths = np.array([2 * ALIGN, ALIGN, 64 * ALIGN], dtype=np.int64)
    out = aligned_empty(int(lengths.sum()))
    dest = np.cumsum(lengths) - lengths
    plan = plan_reads(offsets, lengths, dest, file_size=SIZE, align=ALIGN, max_gap=0,
                      max_read=1 << 20, dest_address=out.ctypes.data)
    assert plan.piece_direct.all() and plan.staging_bytes == 0
    with WeightFile(path) as wf:
        batch = wf.read_batch(np.stack([offsets, lengths], 1), out=out)
    for i, (o, n) in enumerate(zip(offsets, lengths)):
        np.testing.assert_array_equal(batch[i], data[o:o + n])
    # an unaligned destination forces staging
    plan = plan_reads(offsets, lengths, dest, file_size=SIZE, align=ALIGN, max_gap=0,
                      max_read=1 << 20, dest_address=out.ctypes.data + 1)
    assert not plan.piece_direct.any() and plan.staging_bytes == int(lengths.sum())


@given(st.lists(st.tuples(st.integers(0, 40000), st.integers(0, 9000)), min_size=1,
                max_size=40),
       st.sampled_from([1, 512, 4096]), st.sampled_from([0, 1, 3000]),
       st.sampled_from([4096, 8192, 65536]))
@settings(max_examples=200, deadline=None)
def test_plan_reproduces_requests(reqs, align, max_gap, max_read):
    """Executing a plan against an in-memory file yields each request's bytes."""
    size = 50000
    file = np.random.default_rng(len(reqs)).integers(0, 256, size, dtype=np.uint8)
    offsets = np.array([o for o, _ in reqs], dtype=np.int64)
    lengths = np.array([min(n, size - o) for o, n in reqs], dtype=np.int64)
    dest = np.cumsum(lengths) - lengths
    plan = plan_reads(offsets, lengths, dest, file_size=size, align=align, max_gap=max_gap,
                      max_read=max_read, dest_address=0)
    assert (plan.piece_offset % align == 0).all() and (plan.piece_length <= max_read).all()
    assert (np.diff(plan.piece_offset) >= plan.piece_length[:-1]).all()  # no byte read twice
    out = np.zeros(int(lengths.sum()), np.uint8)
    staging = np.zeros(max(plan.staging_bytes, 1), np.uint8)
    padded = np.concatenate([file, np.zeros(max_read + align, np.uint8)])
    for off, length, need, direct, d in zip(plan.piece_offset, plan.piece_length,
                                            plan.piece_need, plan.piece_direct,
                                            plan.piece_dest):
        assert need <= length
        (out if direct else staging)[d:d + length] = padded[off:off + length]
    for p, src, d, n in zip(plan.seg_piece, plan.seg_src, plan.seg_dest, plan.seg_length):
        base = plan.piece_dest[p]
        out[d:d + n] = staging[base + src:base + src + n]
    for o, n, d in zip(offsets, lengths, dest):
        np.testing.assert_array_equal(out[d:d + n], file[o:o + n])


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("native", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HAVE_NATIVE, reason="no C compiler"))])
def test_adjacent_requests_coalesce_into_one_read(weights, direct, native):
    path, data = weights
    with WeightFile(path, direct=direct, native=native) as wf:
        base = 3 * ALIGN
        batch = wf.read_batch([(base + 2000, 1000), (base, 1000), (base + 1000, 1000)])
        assert wf.stats.requests == 3 and wf.stats.read_calls == 1
        assert wf.stats.bytes_requested == 3000
        assert wf.stats.bytes_read == (ALIGN if wf.read_mode == "direct" else 3000)
        np.testing.assert_array_equal(batch[1], data[base:base + 1000])
        np.testing.assert_array_equal(batch.data, data[[*range(base + 2000, base + 3000),
                                                        *range(base, base + 2000)]])
        # a hole of 3 blocks: two reads, unless max_gap allows reading through it
        far = [(0, 100), (4 * ALIGN, 100)]
        before = wf.stats.snapshot()
        wf.read_batch(far)
        assert wf.stats.delta(before).read_calls == 2
        before = wf.stats.snapshot()
        wf.read_batch(far, max_gap=4 * ALIGN)
        d = wf.stats.delta(before)
        assert d.read_calls == 1 and d.bytes_read >= 4 * ALIGN + 100


def test_long_ranges_split_by_max_read(weights):
    path, data = weights
    with WeightFile(path, max_read=1 << 20, native=False) as wf:
        got = wf.read(0, 3 << 20)
        assert wf.stats.read_calls == 3
    np.testing.assert_array_equal(got, data[:3 << 20])


@pytest.mark.parametrize("direct", [True, False])
def test_short_reads_are_continued(weights, direct):
    path, data = weights
    rng = np.random.default_rng(4)
    reqs = random_requests(rng, 100, SIZE)
    block = ALIGN if direct else 1
    faults = FaultInjector().short_reads(every=2, fraction=0.3, block=block)
    with WeightFile(path, direct=direct, faults=faults, threads=2) as wf:
        assert not wf.native            # faults force the Python path
        batch = wf.read_batch(reqs)
        whole = wf.read(5, SIZE - 5)
        pieces = wf.stats.read_calls
    assert faults.injected_short > 10 and pieces > faults.injected_short
    for i, (o, n) in enumerate(reqs):
        np.testing.assert_array_equal(batch[i], data[o:o + n])
    np.testing.assert_array_equal(whole, data[5:])
    # every call short (a few times in a row) still converges
    faults = FaultInjector().short_reads(every=1, fraction=0.5, limit=3, block=block)
    with WeightFile(path, direct=direct, faults=faults) as wf:
        np.testing.assert_array_equal(wf.read(70000, 300000), data[70000:370000])
    assert faults.injected_short == 3


def test_eio_is_retried(weights):
    path, data = weights
    faults = FaultInjector().eio_on_call(1, times=2)
    with WeightFile(path, faults=faults, retries=3) as wf:
        got = wf.read(5000, 100)
        assert wf.stats.retries == 2 and wf.stats.read_calls == 3
    assert faults.injected_eio == 2
    np.testing.assert_array_equal(got, data[5000:5100])


def test_eio_after_retries_raises_storage_error_naming_file_and_offset(weights):
    path, _ = weights
    faults = FaultInjector().eio_on_call(1, times=10)
    with WeightFile(path, direct=False, faults=faults, retries=3) as wf:
        with pytest.raises(StorageError) as info:
            wf.read(5000, 100)
    assert str(info.value) == (
        f"cannot read 100 bytes at offset 5000 of {path}: Input/output error (errno 5) "
        "after 4 attempt(s); the storage may be failing: check the kernel log, or copy "
        "the model folder to another device"
    )
    assert faults.injected_eio == 4
    # O_DIRECT names the aligned read that failed; a dead range fails every retry
    faults = FaultInjector().eio_on_range(9000, 9001)
    with WeightFile(path, faults=faults, retries=2) as wf:
        with pytest.raises(StorageError, match=rf"4096 bytes at offset 8192 of {path}:"):
            wf.read_batch([(100, 50), (9000, 10)])
        assert wf.read_mode != "direct" or wf.stats.retries == 2


def test_truncated_file_raises_storage_error(weights, tmp_path):
    path, data = weights
    faults = FaultInjector().truncate(10000)
    with WeightFile(path, faults=faults) as wf:
        assert wf.size == 10000
        np.testing.assert_array_equal(wf.read(9000, 1000), data[9000:10000])
        with pytest.raises(StorageError, match=rf"{path} is 10000 bytes: cannot read "
                                               r"2000 bytes at offset 9000"):
            wf.read_batch([(0, 10), (9000, 2000)])
    # a file cut short after it was opened: reads return nothing -> StorageError
    short = tmp_path / "short.bin"
    data[:1 << 20].tofile(short)
    with WeightFile(short, retries=1, native=False) as wf:
        os.truncate(short, 4096)
        with pytest.raises(StorageError, match=r"returned no data .* truncated"):
            wf.read(500000, 100)
    if HAVE_NATIVE:
        data[:1 << 20].tofile(short)
        with WeightFile(short, retries=1) as wf:
            os.truncate(short, 4096)
            with pytest.raises(StorageError, match=r"returned no data"):
                wf.read_batch([(500000, 100), (600000, 100)])


def test_buffered_fallback_warns_once_with_reason(weights, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    path, data = weights
    real_open = os.open

    def refuse_direct(p, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    monkeypatch.setattr(direct_mod, "_warned", set())
    with pytest.warns(BufferedFallbackWarning, match="refuses O_DIRECT") as record:
        wf = WeightFile(path)
    assert len(record) == 1 and str(path) in str(record[0].message)
    assert wf.read_mode == "buffered" and "EINVAL" in wf.fallback_reason
    np.testing.assert_array_equal(wf.read(12345, 678), data[12345:13023])
    wf.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second file on that filesystem stays quiet
        WeightFile(path).close()


def test_bad_arguments(weights, tmp_path):
    path, _ = weights
    with pytest.raises(StorageError, match="cannot open weight file"):
        WeightFile(tmp_path / "missing.bin")
    wf = WeightFile(path)
    with pytest.raises(ValueError, match="out holds 10 bytes"):
        wf.read_batch([(0, 20)], out=np.empty(10, np.uint8))
    with pytest.raises(ValueError, match="must not overlap"):
        wf.read_batch([(0, 20), (100, 20)], out=np.empty(100, np.uint8), dest=[0, 10])
    with pytest.raises(ValueError, match="pairs"):
        wf.read_batch([1, 2, 3])
    wf.close()
    assert wf.closed
    with pytest.raises(ValueError, match="closed"):
        wf.read(0, 10)


def test_stats_counters_are_thread_safe():
    stats = IOStats()
    before = stats.snapshot()

    def work():
        for _ in range(2000):
            stats.add(bytes_requested=3, bytes_read=4096, requests=1, read_calls=1,
                      seconds=0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    d = stats.delta(before)
    assert (d.requests, d.read_calls, d.bytes_requested, d.bytes_read) == (
        8000, 8000, 24000, 8000 * 4096)
    assert d.seconds == pytest.approx(8.0)
    assert stats.read_amplification == pytest.approx(4096 / 3)
    stats.reset()
    assert stats.as_dict() == {k: 0 for k in stats.as_dict()}


def test_crc32_helpers(weights):
    path, data = weights
    raw = path.read_bytes()
    assert crc32_file(path) == zlib.crc32(raw)
    assert crc32_file(path, chunk=1000) == zlib.crc32(raw)
    assert crc32_bytes(data) == zlib.crc32(raw)
    assert crc32_bytes(raw[100:], crc32_bytes(raw[:100])) == zlib.crc32(raw)
    assert crc32_bytes(data[:40].view(np.uint32)) == zlib.crc32(raw[:40])
    assert crc32_bytes(b"") == 0
    with pytest.raises(ValueError):
        crc32_file(path, chunk=0)


def test_native_loader_degrades_to_none(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEINFER_NATIVE", "0")
    assert loader.load_fastread() is None
    monkeypatch.delenv("EDGEINFER_NATIVE")
    assert loader.build(tmp_path, "no-such-compiler-xyz") is None
    assert loader.build(tmp_path, "false") is None           # compiler that fails
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert loader.load_fastread() is None
    with WeightFile(__file__) as wf:                         # still reads, in Python
        assert not wf.native
        assert bytes(wf.read(0, 3)) == b'"""'


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler")
def test_native_builds_into_cache_keyed_by_source(tmp_path):
    lib = loader.build(tmp_path / "cache", "cc")
    assert lib is not None and lib.parent == tmp_path / "cache"
    assert lib.name.startswith("fastread-") and lib.stat().st_size > 0
    assert loader.build(tmp_path / "cache", "cc") == lib      # cached, not rebuilt
    fast = loader._load(str(tmp_path / "cache"), "cc")
    src = np.arange(100, dtype=np.uint8)
    dst = np.zeros(100, dtype=np.uint8)
    fast.copy_batch(np.array([src.ctypes.data + 10], np.uint64),
                    np.array([dst.ctypes.data], np.uint64), np.array([5], np.int64))
    assert dst[:5].tolist() == [10, 11, 12, 13, 14] and dst[5:].sum() == 0


# ---- verified records and the read queue ---------------------------------------------------
def test_verified_records_check_each_record_once_and_name_the_bad_one():
    from edgeinfer.errors import ChecksumError
    from edgeinfer.io.records import VerifiedRecords
    rows = np.arange(4 * 8, dtype=np.uint8).reshape(4, 8)       # slot k holds record 3 - k
    crcs = np.array([zlib.crc32(rows[3 - r]) for r in range(4)], dtype=np.uint32)
    v = VerifiedRecords(crcs, path="ffn.bin", tensor="t", kind="neuron", base=100, record_bytes=8)
    v.check_whole(rows, np.array([0, 1]), np.array([3, 2]))
    assert v.checked[:, 0].tolist() == [False, False, True, True]
    rows[0, 0] ^= 1                                             # record 3 was checked: not hashed again
    v.check_whole(rows, np.array([0]), np.array([3]))
    rows[3, 0] ^= 1
    with pytest.raises(ChecksumError, match=r"ffn.bin: checksum mismatch in neuron 0 of t at offset 100 \(8 bytes\)"):
        v.check_whole(rows, np.array([3]), np.array([0]))
    assert not v.checked[0, 0]


def test_verified_records_check_only_the_stages_a_read_covered():
    from edgeinfer.errors import ChecksumError
    from edgeinfer.io.records import VerifiedRecords
    rec = np.arange(12, dtype=np.uint8)                         # stages [0, 4) and [4, 12)
    crcs = np.array([[zlib.crc32(rec[:4]), zlib.crc32(rec[4:])]], dtype=np.uint32)
    v = VerifiedRecords(crcs, path="e.bin", tensor="x", kind="expert", base=0, record_bytes=12, stages=(0, 4))
    bad = rec.copy()
    bad[6] ^= 1
    v.check_range(bad, 0, 0, 0, 4)                              # read the prefix only: stage 1 untouched
    assert v.checked[0].tolist() == [True, False]
    with pytest.raises(ChecksumError, match=r"e.bin: checksum mismatch in expert 0 of x \(stage 1, offset 4"):
        v.check_range(bad, 0, 0, 4, 8)


def test_read_queue_undoes_a_failed_read_after_it_ended():
    from edgeinfer.io.read_queue import ReadQueue
    q = ReadQueue()
    events = []

    def read():
        events.append("read")
        raise StorageError("boom")

    pending = q.submit(read, undo=lambda fut: events.append(("undo", fut.done())))
    with pytest.raises(StorageError, match="boom"):
        pending.wait()
    assert events == ["read", ("undo", True)]
    assert q.submit(lambda: 7).wait() == 7
    q.close()


def test_read_queue_runs_one_prefetch_per_key_and_relays_its_error():
    from edgeinfer.io.read_queue import ReadQueue
    q = ReadQueue()
    gate = threading.Event()
    assert q.prefetch(1, gate.wait)
    assert not q.prefetch(1, gate.wait)          # still in flight
    q.collect(1)                                 # not done: goes on
    gate.set()
    assert q.wait(1) >= 0.0
    def failing():
        raise StorageError("bad prefetch")

    assert q.prefetch(2, failing)
    with pytest.raises(StorageError, match="bad prefetch"):
        q.wait(2)
    q.close()
