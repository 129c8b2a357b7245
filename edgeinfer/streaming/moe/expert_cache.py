"""The expert cache of one MoE layer, and where an expert is evicted (HOBBIT, 2024:
"sequence-level multidimensional expert caching").

Slots. The cache owns one preallocated, 4 KiB-aligned buffer of `blocks`, each big
enough for one expert at high precision. A block holds either one high-precision copy or
up to `pages` low-precision copies (a page is one low record), so a cache of low copies
holds 2-4x more experts in the same bytes. Reads go straight from flash into a slot
(O_DIRECT into the buffer); nothing is allocated per token.

One entry per expert (its high or its low copy). An entry is *pinned* while a kernel
reads it or a read fills it; pinned entries are never evicted.

Eviction. When a slot is needed and none is free, the policy's `value` of every
unpinned entry decides: the entry (for a low copy) or the block (for a high copy; a
block of low copies is worth the sum of its entries) of least value is evicted.

- `lru`: value = when the expert was last used. The baseline.
- `hobbit`: multidimensional, after HOBBIT's sequence-level caching: value = f x saved.
  f (recency and frequency in one number) is the expert's use count with each use
  decaying by half every `half_life` layer calls; saved (precision) is the bytes a hit
  on this copy would save, given how often this expert's gate weight was below the
  low-precision threshold. Nested records (the low copy is the high record's prefix):
  a cached prefix saves its read on *every* use (an important token then reads only the
  rest of the record), and the rest saves its read on important tokens. Separate low
  records: a high copy saves a high read on an important token and a low read
  otherwise; a low copy only ever saves a low read.

Precision held is a dimension of eviction, not only of value (hobbit, nested records):
when a low page is needed, a high copy may be *downgraded* (its rest pages freed, its
prefix kept as the low copy) if the rest is what is worth least; and a low copy at the
start of a block is upgraded *in place* (the rest read into the pages after it, no copy).
LRU evicts whole experts only (the baseline).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from edgeinfer.errors import BudgetError
from edgeinfer.format.experts import HIGH, LOW, ExpertLayout
from edgeinfer.io import aligned_empty


def block_geometry(layout: ExpertLayout) -> tuple[int, int, int]:
    """(page bytes, pages per block, block bytes) of a layer's cache."""
    if not layout.low_bits:
        return layout.high_bytes, 1, layout.high_bytes
    page = layout.low_bytes
    pages = -(-layout.high_bytes // page)
    return page, pages, page * pages


@dataclass(eq=False)
class Entry:
    expert: int
    precision: str
    block: int
    page: int
    pages: int
    pins: int = 1
    ready: bool = False
    dropped: bool = False           # forgotten while pinned: its pages are freed at the last release
    prefetched: bool = False        # read by the prefetcher and not yet used


@dataclass
class _Use:
    last: int = -1
    freq: float = 0.0
    low: float = 0.0                # decayed count of uses whose gate weight was below the threshold
    at: int = 0


class LRUPolicy:
    name = "lru"
    downgrades = False

    def __init__(self, layout: ExpertLayout, half_life: float = 0.0):
        self.last: dict[int, int] = {}

    def used(self, expert: int, now: int, low_eligible: bool) -> None:
        self.last[expert] = now

    def inserted(self, expert: int, now: int) -> None:
        self.last[expert] = now

    def entry_value(self, entry: Entry, now: int) -> float:
        return float(self.last.get(entry.expert, -1))

    def block_value(self, entries, now: int) -> float:
        return max(self.entry_value(e, now) for e in entries)


class HobbitPolicy:
    name = "hobbit"

    def __init__(self, layout: ExpertLayout, half_life: float = 32.0):
        self.decay = math.log(2.0) / half_life
        self.high_bytes = float(layout.high_bytes)
        self.low_bytes = float(layout.low_bytes or layout.high_bytes)
        self.nested = bool(layout.low_bits and layout.low_nested)
        self.downgrades = self.nested
        self.uses: dict[int, _Use] = {}

    def _u(self, expert: int, now: int) -> _Use:
        u = self.uses.get(expert)
        if u is None:
            u = self.uses[expert] = _Use(at=now)
        elif u.at != now:
            k = math.exp(-self.decay * (now - u.at))
            u.freq *= k
            u.low *= k
            u.at = now
        return u

    def used(self, expert: int, now: int, low_eligible: bool) -> None:
        u = self._u(expert, now)
        u.freq += 1.0
        u.low += 1.0 if low_eligible else 0.0
        u.last = now

    def inserted(self, expert: int, now: int) -> None:
        u = self._u(expert, now)
        u.last = max(u.last, now - 1)

    def value(self, entry: Entry, now: int) -> float:
        """Expected bytes saved by keeping this copy (see the module docstring)."""
        return self._value(entry.expert, entry.precision, now)

    def _value(self, expert: int, precision: str, now: int) -> float:
        u = self._u(expert, now)
        share_low = u.low / u.freq if u.freq > 0 else 0.0
        if self.nested:          # the prefix serves every use; the rest only important tokens
            saved = self.low_bytes + ((1.0 - share_low) * (self.high_bytes - self.low_bytes)
                                      if precision == HIGH else 0.0)
        elif precision == HIGH:
            saved = (1.0 - share_low) * self.high_bytes + share_low * self.low_bytes
        else:
            saved = share_low * self.low_bytes
        # recency breaks ties between equally frequent experts (and ranks unused ones)
        return u.freq * saved + 1e-6 * saved * (u.last + 1) / (now + 1)

    def downgrade_value(self, entry: Entry, now: int) -> float:
        """What dropping a high copy's rest (keeping its prefix as the low copy) loses, per page freed."""
        lost = self._value(entry.expert, HIGH, now) - self._value(entry.expert, LOW, now)
        return lost / max(1, entry.pages - 1)

    def entry_value(self, entry: Entry, now: int) -> float:
        return self.value(entry, now) / entry.pages

    def block_value(self, entries, now: int) -> float:
        return sum(self.value(e, now) for e in entries)


POLICIES = {"lru": LRUPolicy, "hobbit": HobbitPolicy}


@dataclass
class CacheCounts:
    evicted: int = 0
    inserted: int = 0
    downgraded: int = 0         # high copies whose rest was dropped, their prefix kept
    upgraded_in_place: int = 0  # low copies whose rest was read into the pages after them


class ExpertCache:
    def __init__(self, layout: ExpertLayout, capacity_bytes: int, policy: str = "hobbit", *,
                 min_blocks: int = 1, half_life: float = 32.0):
        self.layout = layout
        self.page_bytes, self.pages, self.block_bytes = block_geometry(layout)
        self.blocks = min(int(capacity_bytes) // self.block_bytes, layout.num_experts)
        if self.blocks < min_blocks:
            raise BudgetError(f"an expert cache of {capacity_bytes} bytes holds {self.blocks} experts; "
                              f"this layer needs at least {min_blocks} ({min_blocks * self.block_bytes} bytes)")
        # bytes left over after whole blocks still hold low copies: a shorter last block
        tail = 0 if self.blocks == layout.num_experts else (int(capacity_bytes) - self.blocks * self.block_bytes) \
            // self.page_bytes
        self.block_pages = [self.pages] * self.blocks + ([tail] if 0 < tail < self.pages else [])
        self.buffer = aligned_empty(sum(self.block_pages) * self.page_bytes)
        self._policy_args = (policy, layout, half_life)
        self.entries: dict[int, Entry] = {}
        # per block: None (free), or the entry in each page (a high copy fills every page)
        self._slots: list[list[Entry | None] | None] = [None] * len(self.block_pages)
        self.counts = CacheCounts()
        self.lock = threading.RLock()
        self.clear()

    def clear(self) -> None:
        """Forget every entry and the policy's history (a cold cache)."""
        with self.lock:
            policy, layout, half_life = self._policy_args
            self.policy = POLICIES[policy](layout, half_life)
            self.entries.clear()
            self._slots = [None] * len(self.block_pages)
            self.now = 0

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    # -- lookups -----------------------------------------------------------------------
    def get(self, expert: int) -> Entry | None:
        e = self.entries.get(expert)
        return e if e is not None and e.ready else None

    def offset(self, entry: Entry) -> int:
        return (entry.block * self.pages + entry.page) * self.page_bytes

    def view(self, entry: Entry) -> np.ndarray:
        nbytes = self.layout.high_bytes if entry.precision == HIGH else self.layout.low_bytes
        at = self.offset(entry)
        return self.buffer[at:at + nbytes]

    def pin(self, entry: Entry) -> Entry:
        entry.pins += 1
        return entry

    def release(self, entry: Entry) -> None:
        with self.lock:
            entry.pins -= 1
            if entry.dropped and entry.pins <= 0:
                self._free(entry)

    def used(self, expert: int, low_eligible: bool) -> None:
        self.policy.used(expert, self.now, low_eligible)

    def tick(self) -> None:
        """One layer call passed (the clock of recency and frequency decay)."""
        self.now += 1

    # -- allocation and eviction -------------------------------------------------------
    def reserve(self, expert: int, precision: str, keep: Entry | None = None) -> Entry:
        """A pinned, not yet ready slot for `expert` at `precision`, evicting as needed.

        keep: the expert's copy at the other precision, kept (pinned) while the slot is found,
        so the caller can copy from it, then `drop` it. Raises BudgetError when every slot is pinned.
        """
        with self.lock:
            pages = self.pages if precision == HIGH else 1
            old = self.entries.get(expert)
            if old is not None and old is not keep:      # one entry per expert: the new copy replaces it
                self.drop(old)
            if keep is not None:
                self.pin(keep)
            try:
                slot = self._free_slot(pages)
                while slot is None:
                    self._evict_for(pages)
                    slot = self._free_slot(pages)
            except BudgetError:
                if keep is not None:
                    self.release(keep)
                raise
            if keep is not None:
                self.release(keep)
            block, page = slot
            entry = Entry(expert, precision, block, page, pages)
            if self._slots[block] is None:
                self._slots[block] = [None] * self.block_pages[block]
            for p in range(page, page + pages):
                self._slots[block][p] = entry
            self.entries[expert] = entry
            self.policy.inserted(expert, self.now)
            self.counts.inserted += 1
            return entry

    def upgrade_in_place(self, entry: Entry) -> Entry | None:
        """Turn a ready low copy (nested records) into a pinned, not yet ready high copy in
        the same place, when it starts a block: the pages after it must be free or hold
        unpinned low copies worth less than the cheapest whole block elsewhere (those are
        evicted). The caller reads the rest of the record after the prefix. None: not possible."""
        with self.lock:
            L = self.layout
            if (not L.low_nested or entry.precision == HIGH or entry.pins or entry.page != 0
                    or self.block_pages[entry.block] < self.pages or self.entries.get(entry.expert) is not entry):
                return None
            slots = self._slots[entry.block]
            others = list({id(s): s for s in slots[1:self.pages] if s is not None}.values())
            if any(s.pins or s is entry for s in others):
                return None
            if others:
                now, policy = self.now, self.policy
                loss = sum(policy.entry_value(s, now) for s in others)
                if any(s is None for s in self._slots):          # a free block: copy there instead
                    return None
                for b, other in enumerate(self._slots):
                    if b == entry.block or other is None or self.block_pages[b] < self.pages:
                        continue
                    held = list({id(s): s for s in other if s is not None}.values())
                    if not any(s.pins for s in held) and policy.block_value(held, now) < loss:
                        return None
                for s in others:
                    self._evict(s)
            for p in range(1, self.pages):
                slots[p] = entry
            entry.precision, entry.pages, entry.ready = HIGH, self.pages, False
            entry.pins += 1
            self.policy.inserted(entry.expert, self.now)
            self.counts.upgraded_in_place += 1
            return entry

    def commit(self, entry: Entry) -> None:
        """The read into `entry` finished: it serves lookups."""
        entry.ready = True

    def drop(self, entry: Entry) -> None:
        """Forget an entry (a replaced low copy, a failed read, naive mode's discard after use)."""
        with self.lock:
            if self.entries.get(entry.expert) is entry:
                del self.entries[entry.expert]
            if entry.pins > 0:               # a kernel (or a read) still uses it: free at the last release
                entry.dropped = True
            else:
                self._free(entry)

    def _free(self, entry: Entry) -> None:
        slots = self._slots[entry.block]
        if slots is None:
            return
        for p in range(entry.page, entry.page + entry.pages):
            if slots[p] is entry:
                slots[p] = None
        if all(s is None for s in slots):
            self._slots[entry.block] = None

    def _free_slot(self, pages: int):
        if pages == 1 and self.pages > 1:       # a low copy: fill a block of low copies first
            for b, slots in enumerate(self._slots):
                if slots is not None and None in slots:
                    return b, slots.index(None)
        for b, slots in enumerate(self._slots):
            if slots is None and self.block_pages[b] >= pages:
                return b, 0
        return None

    def _evict_for(self, pages: int) -> None:
        """Evict the least valuable unpinned block (for a high copy) or entry (for a low one)."""
        now, policy = self.now, self.policy
        best, best_v = None, math.inf
        for slots in self._slots:
            if slots is None:
                continue
            held = list({id(s): s for s in slots if s is not None}.values())
            if pages == self.pages:
                if any(s.pins for s in held) or len(slots) < pages:
                    continue
                v, victims = policy.block_value(held, now), held
            else:
                for s in held:
                    if s.pins:
                        continue
                    if s.pages > 1 and policy.downgrades:       # free its rest, keep its prefix
                        v, act = policy.downgrade_value(s, now), ("downgrade", s)
                    else:
                        v, act = policy.entry_value(s, now), ("evict", [s])
                    if v < best_v:
                        best, best_v = act, v
                continue
            if v < best_v:
                best, best_v = ("evict", victims), v
        if best is None:
            raise BudgetError(f"the expert cache ({self.blocks} slots) has no room: every slot is in use; "
                              "raise the memory budget")
        if best[0] == "downgrade":
            self._downgrade(best[1])
            return
        for s in best[1]:
            self._evict(s)

    def _downgrade(self, entry: Entry) -> None:
        """A high copy keeps only its prefix (nested records): the low copy, in the same place."""
        slots = self._slots[entry.block]
        for p in range(entry.page + 1, entry.page + entry.pages):
            if slots[p] is entry:
                slots[p] = None
        entry.precision, entry.pages = LOW, 1
        self.counts.downgraded += 1

    def _evict(self, entry: Entry) -> None:
        if self.entries.get(entry.expert) is entry:
            del self.entries[entry.expert]
        self._free(entry)
        self.counts.evicted += 1
