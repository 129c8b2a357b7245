"""The neuron window (LLM in a flash §3.3): a preallocated buffer of neuron
records for one FFN layer, holding the neurons active in the last k tokens.

Occupied slots are always the dense prefix [0, count): inserting appends,
deleting moves the last record into the freed slot — both O(1) per neuron —
so the sparse FFN kernel runs over a compact buffer. This is where a neuron is
evicted.
"""
from __future__ import annotations

import numpy as np

from ..storage import aligned_empty


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
        self.count = 0
        self.step = 0

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes

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
        if self.window <= 0 or self.count == 0:
            return 0
        stale = np.flatnonzero(self.last_used[:self.count] <= self.step - self.window)
        return self._delete_slots(stale)

    def make_room(self, n: int, keep: np.ndarray) -> int:
        """Free slots for n new neurons, evicting least recently used ones not in `keep`."""
        free = self.capacity - self.count
        if n <= free:
            return 0
        occupied = np.arange(self.count)
        protected = np.zeros(self.count, dtype=bool)
        ks = self.slot_of[keep]
        protected[ks[ks >= 0]] = True
        cand = occupied[~protected]
        need = min(n - free, cand.size)
        if need <= 0:
            return 0
        if need < cand.size:
            victims = cand[np.argpartition(self.last_used[cand], need - 1)[:need]]
        else:
            victims = cand
        return self._delete_slots(victims)

    def reserve(self, neurons: np.ndarray) -> np.ndarray:
        """Assign slots [count, count+n) to new neurons; the caller reads their records there."""
        n = neurons.size
        if self.count + n > self.capacity:
            raise RuntimeError("neuron window overflow")   # callers make room first
        slots = np.arange(self.count, self.count + n)
        self.slot_of[neurons] = slots
        self.neuron_at[slots] = neurons
        self.last_used[slots] = self.step
        self.count += n
        return slots

    def unreserve(self, neurons: np.ndarray) -> None:
        """Undo the last reserve() (its read failed or was interrupted): the records there
        are not valid, so the neurons must not look resident."""
        slots = self.slot_of[neurons]
        assert slots.size == 0 or slots.min() == self.count - neurons.size
        self.slot_of[neurons] = -1
        self.neuron_at[slots] = -1
        self.count -= neurons.size

    def _delete_slots(self, slots: np.ndarray) -> int:
        """Delete the neurons at `slots` (distinct), keeping occupied slots a dense prefix:
        the survivors above the new end move into the holes below it (vectorised: one
        gather/scatter of records, not one Python step per neuron)."""
        slots = np.unique(np.asarray(slots, dtype=np.int64))
        n = int(slots.size)
        if n == 0:
            return 0
        end = self.count - n
        self.slot_of[self.neuron_at[slots]] = -1
        holes = slots[slots < end]
        if holes.size:
            tail = np.ones(self.count - end, dtype=bool)
            tail[slots[slots >= end] - end] = False
            movers = np.flatnonzero(tail) + end          # survivors above the new end, as many as holes
            self.buf[holes] = self.buf[movers]
            moved = self.neuron_at[movers]
            self.neuron_at[holes] = moved
            self.slot_of[moved] = holes
            self.last_used[holes] = self.last_used[movers]
        self.neuron_at[end:self.count] = -1
        self.count = end
        return n
