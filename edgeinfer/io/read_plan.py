"""Turn a batch of (offset, length) requests into few large aligned reads.

One token's reads for one layer arrive as a batch (LLM in a flash §3.2: bundled
neuron records, and consecutive active neurons, coalesce into larger reads).
The plan is computed with numpy, not a Python loop per request:

1. sort by file offset; requests contiguous both in the file and in the
   destination merge into one *run* (one copy instead of many);
2. runs are widened to the alignment (4096 for O_DIRECT) and merged into
   *ranges* when the hole between them is at most `max_gap` bytes;
3. ranges are split into *pieces* of at most `max_read` bytes, the unit of
   one read call and of work given to one thread;
4. each run is cut into *segments*, one per piece it overlaps: (piece,
   offset in piece, destination offset, length) copies.

A piece covered by exactly one segment whose destination is suitably aligned is
*direct*: it is read straight into the destination, no staging copy.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from edgeinfer.format.constants import find_multiple


@dataclasses.dataclass(frozen=True)
class ReadPlan:
    piece_offset: np.ndarray   # int64 file offset of each read (aligned)
    piece_length: np.ndarray   # int64 bytes to read (aligned; may run past EOF)
    piece_need: np.ndarray     # int64 bytes that must arrive (less than length at EOF)
    piece_direct: np.ndarray   # bool: read straight into the destination
    piece_dest: np.ndarray     # int64 destination offset (direct) or staging offset
    seg_piece: np.ndarray      # int64 piece of each staged segment, ascending
    seg_src: np.ndarray        # int64 offset of the segment inside its piece
    seg_dest: np.ndarray       # int64 destination offset
    seg_length: np.ndarray     # int64 bytes
    staging_bytes: int         # staging buffer the non-direct pieces need

    @property
    def pieces(self) -> int:
        return len(self.piece_offset)

    @property
    def bytes_to_read(self) -> int:
        return int(self.piece_length.sum())


def as_requests(requests) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) int64 arrays from [(offset, length), ...] or an [n, 2] array."""
    arr = np.asarray(requests, dtype=np.int64)
    if arr.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"requests must be (offset, length) pairs, got shape {arr.shape}")
    offsets = np.ascontiguousarray(arr[:, 0])
    lengths = np.ascontiguousarray(arr[:, 1])
    if (offsets < 0).any() or (lengths < 0).any():
        raise ValueError("request offsets and lengths must be >= 0")
    return offsets, lengths


def plan_reads(offsets: np.ndarray, lengths: np.ndarray, dest: np.ndarray, *,
               file_size: int, align: int, max_gap: int, max_read: int,
               dest_address: int) -> ReadPlan:
    """Plan the reads of requests i = (offsets[i], lengths[i]) into dest[i].

    dest_address is the memory address of destination offset 0; a piece is direct
    only if its destination address is a multiple of `align`.
    """
    if max_read < align or max_read % align:
        raise ValueError(f"max_read must be a positive multiple of {align}")
    keep = lengths > 0
    if not keep.all():
        offsets, lengths, dest = offsets[keep], lengths[keep], dest[keep]
    empty = np.zeros(0, np.int64)
    if len(offsets) == 0:
        return ReadPlan(empty, empty, empty, np.zeros(0, bool), empty,
                        empty, empty, empty, empty, 0)

    order = np.argsort(offsets, kind="stable")
    start, length, dst = offsets[order], lengths[order], dest[order]
    end = start + length

    # 1. runs: contiguous in the file and in the destination
    cont = (start[1:] == end[:-1]) & (dst[1:] == dst[:-1] + length[:-1])
    first = np.flatnonzero(np.concatenate(([True], ~cont)))
    last = np.concatenate((first[1:], [len(start)])) - 1
    run_start, run_end, run_dst = start[first], end[last], dst[first]

    # 2. ranges: aligned runs whose holes are at most max_gap bytes
    a_start = run_start - run_start % align
    a_end = find_multiple(run_end, align)
    reach = np.maximum.accumulate(a_end)
    new_range = np.concatenate(([True], a_start[1:] > reach[:-1] + max_gap))
    rfirst = np.flatnonzero(new_range)
    rlast = np.concatenate((rfirst[1:], [len(a_start)])) - 1
    range_start, range_end = a_start[rfirst], reach[rlast]

    # 3. pieces of at most max_read bytes
    counts = -(-(range_end - range_start) // max_read)
    piece_range = np.repeat(np.arange(len(range_start)), counts)
    k = np.arange(len(piece_range)) - np.repeat(np.cumsum(counts) - counts, counts)
    piece_offset = range_start[piece_range] + k * max_read
    piece_end = np.minimum(piece_offset + max_read, range_end[piece_range])
    piece_length = piece_end - piece_offset
    piece_need = np.minimum(piece_end, file_size) - piece_offset

    # 4. segments: each run cut at piece boundaries
    p0 = np.searchsorted(piece_offset, run_start, side="right") - 1
    p1 = np.searchsorted(piece_offset, run_end - 1, side="right") - 1
    nseg = p1 - p0 + 1
    seg_run = np.repeat(np.arange(len(run_start)), nseg)
    seg_piece = p0[seg_run] + np.arange(len(seg_run)) - np.repeat(np.cumsum(nseg) - nseg, nseg)
    s = np.maximum(run_start[seg_run], piece_offset[seg_piece])
    e = np.minimum(run_end[seg_run], piece_end[seg_piece])
    seg_src = s - piece_offset[seg_piece]
    seg_dest = run_dst[seg_run] + (s - run_start[seg_run])
    seg_length = e - s
    by_piece = np.argsort(seg_piece, kind="stable")
    seg_piece, seg_src = seg_piece[by_piece], seg_src[by_piece]
    seg_dest, seg_length = seg_dest[by_piece], seg_length[by_piece]

    # direct pieces: one segment covering the whole piece, at an aligned address
    per_piece = np.bincount(seg_piece, minlength=len(piece_offset))
    first_seg = np.cumsum(per_piece) - per_piece
    direct = (
        (per_piece == 1)
        & (seg_src[first_seg] == 0)
        & (seg_length[first_seg] == piece_length)
        & ((dest_address + seg_dest[first_seg]) % align == 0)
    )
    staged_len = np.where(direct, 0, piece_length)
    piece_dest = np.where(direct, seg_dest[first_seg], np.cumsum(staged_len) - staged_len)
    staged_seg = ~direct[seg_piece]
    return ReadPlan(
        piece_offset=piece_offset,
        piece_length=piece_length,
        piece_need=piece_need,
        piece_direct=direct,
        piece_dest=piece_dest,
        seg_piece=seg_piece[staged_seg],
        seg_src=seg_src[staged_seg],
        seg_dest=seg_dest[staged_seg],
        seg_length=seg_length[staged_seg],
        staging_bytes=int(staged_len.sum()),
    )
