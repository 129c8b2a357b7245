"""The neuron window (LLM in a flash §3.3): a preallocated buffer of neuron
records for one FFN layer, holding the neurons active in the last k tokens.

Slots are handed out from a stack of free slots: inserting pops, deleting
pushes, O(1) per neuron and no record ever moves. The paper keeps occupied
slots a dense prefix (a delete moves the last record into the hole) because its
matmul runs over a contiguous block; the sparse FFN kernel here gathers records
by slot, so the moves would only cost copies (measured: ~10 ms of a 200 ms
token on a 7B-wide layer). This is where a neuron is evicted.
"""
from __future__ import annotations

import numpy as np

from edgeinfer.errors import InternalError
from edgeinfer.io import aligned_empty


class NeuronWindow:
    def __init__(self, ffn: int, record_bytes: int, capacity: int, window: int, dtype=np.uint8):
        self.capacity = int(capacity)
        self.window = int(window)              # 0: keep whatever fits (LRU)
        self.record_bytes = record_bytes
        raw = aligned_empty(self.capacity * record_bytes)
        self.buf = raw.view(dtype).reshape(self.capacity, -1)
        self.slot_of = np.full(ffn, -1, dtype=np.int64)        # neuron -> slot
        self.neuron_at = np.full(self.capacity, -1, dtype=np.int64)  # slot -> neuron
        self.last_used = np.zeros(self.capacity, dtype=np.int64)
        # free slots: a stack whose top is free[nfree - 1]; low slots first
        self.free = np.arange(self.capacity - 1, -1, -1, dtype=np.int64)
        self.nfree = self.capacity
        self.step = 0

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes

    @property
    def count(self) -> int:
        """Neurons held."""
        return self.capacity - self.nfree

    def begin_step(self) -> None:
        self.step += 1

    def touch(self, neurons: np.ndarray) -> np.ndarray:
        """Mark resident neurons used now; return the ones not resident (to load)."""
        slots = self.slot_of[neurons]
        hit = slots >= 0
        self.last_used[slots[hit]] = self.step
        return neurons[~hit]

    def drop_stale(self) -> int:
        """Window eviction: neurons not active in the last k tokens leave."""
        if self.window <= 0 or self.nfree == self.capacity:
            return 0
        stale = np.flatnonzero((self.neuron_at >= 0) & (self.last_used <= self.step - self.window))
        return self._delete_slots(stale)

    def make_room(self, n: int, keep: np.ndarray) -> int:
        """Free slots for n new neurons, evicting least recently used ones not in `keep`."""
        if n <= self.nfree:
            return 0
        candidate = self.neuron_at >= 0
        ks = self.slot_of[keep]
        candidate[ks[ks >= 0]] = False
        cand = np.flatnonzero(candidate)
        need = min(n - self.nfree, cand.size)
        if need <= 0:
            return 0
        if need < cand.size:
            victims = cand[np.argpartition(self.last_used[cand], need - 1)[:need]]
        else:
            victims = cand
        return self._delete_slots(victims)

    def reserve(self, neurons: np.ndarray) -> np.ndarray:
        """Assign free slots to new neurons (ascending, so neurons adjacent in the file get
        adjacent slots when free slots are); the caller reads their records there."""
        n = neurons.size
        if n > self.nfree:
            raise InternalError("neuron window overflow: callers make room first (a bug in edgeinfer; please report it)")
        slots = np.sort(self.free[self.nfree - n:self.nfree])
        self.nfree -= n
        self.slot_of[neurons] = slots
        self.neuron_at[slots] = neurons
        self.last_used[slots] = self.step
        return slots

    def unreserve(self, neurons: np.ndarray) -> None:
        """Undo reserve() (its read failed or was interrupted): the records there are not
        valid, so the neurons must not look resident."""
        self._delete_slots(self.slot_of[neurons])

    def _delete_slots(self, slots: np.ndarray) -> int:
        """Delete the neurons at `slots` (occupied, distinct): their slots go on the free stack."""
        slots = np.asarray(slots, dtype=np.int64)
        n = int(slots.size)
        if n == 0:
            return 0
        self.slot_of[self.neuron_at[slots]] = -1
        self.neuron_at[slots] = -1
        self.free[self.nfree:self.nfree + n] = slots[::-1]
        self.nfree += n
        return n
