"""Storage: where every byte of a weight file is read (aligned, uncached, batched)."""
from .direct import ALIGN, Batch, BufferedFallbackWarning, WeightFile, aligned_empty
from .faults import FaultInjector
from .integrity import crc32_bytes, crc32_file
from .measure import DEFAULT_CHUNKS, ReadBandwidth, measure_read_bandwidth
from .plan import ReadPlan, plan_reads
from .stats import IOStats

__all__ = [
    "ALIGN",
    "DEFAULT_CHUNKS",
    "Batch",
    "BufferedFallbackWarning",
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
