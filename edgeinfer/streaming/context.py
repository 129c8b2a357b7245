"""What the streamed nodes of one model share: the weight files they read, the read queue,
the budget shares, the naive mode's scratch buffers and the MoE layers' runtime."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edgeinfer.format.manifest import Manifest
from edgeinfer.io import WeightFile, aligned_empty
from edgeinfer.io.read_queue import ReadQueue
from edgeinfer.runtime.options import RuntimeOptions
from edgeinfer.runtime.stats import RuntimeStats

if TYPE_CHECKING:
    from edgeinfer.runtime.executor.graph import Node
    from edgeinfer.streaming.moe.op import MoERuntime


@dataclass(eq=False)
class StreamContext:
    manifest: Manifest
    options: RuntimeOptions
    mode: str
    stats: RuntimeStats
    shares: dict[str, int] = field(default_factory=dict)      # node name -> bytes of buffers it may hold
    files: dict[str, WeightFile] = field(default_factory=dict)  # relative path -> open streamed weight file
    reads: ReadQueue = field(default_factory=ReadQueue)
    # Windows, caches and scratch buffers are shared by every sequence generating on the
    # model: streamed layers run one at a time (threads still overlap in resident layers).
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The MoE layers' shared state (layer order, counters); set by the first MoE layer built.
    moe: MoERuntime | None = None
    _scratch: dict[int, np.ndarray] = field(default_factory=dict)

    def share_of(self, node: Node) -> int:
        return self.shares[node.name]

    def file(self, rel: str) -> WeightFile:
        """The weight file `rel` (relative to the model folder), opened once per model."""
        f = self.files.get(rel)
        if f is None:
            f = self.files[rel] = WeightFile(self.manifest.path(rel), direct=self.options.direct_io,
                                             stats=self.stats.io, threads=self.options.io_threads,
                                             queue_depth=self.options.io_depth)
        return f

    def scratch(self, nbytes: int) -> np.ndarray:
        """An aligned buffer of `nbytes` shared by every layer that asks for that size: the
        naive mode reads a whole layer into it, one layer at a time (under `lock`)."""
        buf = self._scratch.get(nbytes)
        if buf is None:
            buf = self._scratch[nbytes] = aligned_empty(nbytes)
        return buf

    @property
    def scratch_bytes(self) -> int:
        return sum(b.nbytes for b in self._scratch.values())

    def close(self) -> None:
        """End the read queue (after its read in progress), then close the files."""
        self.reads.close()
        for f in self.files.values():
            f.close()
