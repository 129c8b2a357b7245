"""Storage: where every byte of a weight file is read (aligned, uncached, batched)."""
from edgeinfer.format.checksum import crc32_bytes, crc32_file
from edgeinfer.io.direct import (
    ALIGN,
    Batch,
    WeightFile,
    aligned_empty,
)
from edgeinfer.io.faults import FaultInjector
from edgeinfer.io.measure import DEFAULT_CHUNKS, ReadBandwidth, measure_read_bandwidth
from edgeinfer.io.read_plan import ReadPlan, plan_reads
from edgeinfer.io.stats import IOStats

__all__ = [
    "ALIGN",
    "DEFAULT_CHUNKS",
    "Batch",
    "FaultInjector",
    "IOStats",
    "ReadBandwidth",
    "ReadPlan",
    "WeightFile",
    "aligned_empty",
    "crc32_bytes",
    "crc32_file",
    "measure_read_bandwidth",
    "plan_reads",
]
