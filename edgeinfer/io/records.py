"""Verified records: the crc32 the export wrote for each record of a streamed tensor
(FFN neuron bundles, expert records), checked the first time this process reads it.

Corruption on flash persists, so a record that matched once is trusted: an evicted
neuron or expert coming back skips the crc32 pass (~1 GB/s here) over its bytes, and
corruption at rest is still caught before a record is ever used. A record may be split
into stages (an expert record: the low-precision prefix, then the rest) with one crc32
each, so a read that covers part of a record checks the stages it covers.
"""
from __future__ import annotations

import zlib

import numpy as np

from edgeinfer.errors import ChecksumError


class VerifiedRecords:
    """The crc32 of every record (or record stage) of one tensor, and which of them a read
    has matched.

    crcs:   [records] or [records, stages] uint32 from the export.
    path:   the weight file (named in errors); base: the tensor's offset in it.
    kind:   what a record is ("neuron", "expert"), for error messages.
    stages: byte offsets where each stage starts within a record (default: one stage).
    """

    def __init__(self, crcs: np.ndarray, *, path, tensor: str, kind: str, base: int, record_bytes: int,
                 stages=(0,)):
        self.crcs = np.asarray(crcs).reshape(len(crcs), -1)
        self.checked = np.zeros(self.crcs.shape, dtype=bool)
        self.bounds = [int(s) for s in stages] + [int(record_bytes)]
        if self.crcs.shape[1] != len(self.bounds) - 1:
            raise ChecksumError(f"{path}: {tensor} has {self.crcs.shape[1]} checksums per {kind} but its layout has "
                                f"{len(self.bounds) - 1} stages: the export is inconsistent; re-export the model")
        self.path, self.tensor, self.kind = path, tensor, kind
        self.base, self.record_bytes = int(base), int(record_bytes)

    def check_whole(self, rows: np.ndarray, slots: np.ndarray, records: np.ndarray) -> None:
        """Check records read whole: record records[i] is in rows[slots[i]] (rows: uint8
        [slots, record_bytes]). Only the records not matched before are hashed."""
        new = ~self.checked[records, 0]
        for s, r in zip(slots[new], records[new]):
            if zlib.crc32(rows[s]) != self.crcs[r, 0]:
                self._mismatch(int(r), 0)
        self.checked[records, 0] = True

    def check_range(self, buf: np.ndarray, at: int, record: int, start: int, length: int) -> None:
        """Check the stages of `record` (its bytes at buf[at:at + record_bytes]) that a read
        of `length` bytes starting `start` bytes into the record covered whole."""
        checked, crcs = self.checked[record], self.crcs[record]
        for s, (a, z) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
            if a < start or z > start + length or checked[s]:
                continue
            if zlib.crc32(buf[at + a:at + z]) != crcs[s]:
                self._mismatch(record, s)
            checked[s] = True

    def _mismatch(self, record: int, stage: int):
        at = self.base + record * self.record_bytes + self.bounds[stage]
        n = self.bounds[stage + 1] - self.bounds[stage]
        where = (f"at offset {at} ({n} bytes)" if len(self.bounds) == 2
                 else f"(stage {stage}, offset {at}, {n} bytes)")
        raise ChecksumError(f"{self.path}: checksum mismatch in {self.kind} {record} of {self.tensor} {where}: "
                            "the file is corrupted; re-export the model")
