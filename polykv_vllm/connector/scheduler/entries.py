"""The index proper: one entry per stored block, the byte budget, placement and eviction.

Rules it keeps (the scheduler side's whole truth about the store):

- An entry is keyed by vLLM's chained block hash and lives in one slab row (:mod:`.rows`)
  from :meth:`EntryTable.place` (the blocks one request stores in a step are placed together,
  in as few runs of rows as possible) until its row is freed; a freed row goes to the workers
  exactly once (:meth:`EntryTable.take_freed_rows`), so a row number in a plan or a report
  always names the entry this table gave it to.
- It is **pending** until every rank confirmed its store (:meth:`EntryTable.confirm`), then
  **ready**; only ready entries serve lookups.
- **Budget**: the bytes of all entries holding a row (pending, ready, or failed and still being
  loaded) never exceed ``budget_bytes``;
  ``budget_bytes // block_bytes`` rows exist, so budget room always means a free row.
- **Eviction rule**: an entry may be evicted only when ready, unpinned (``pins == 0``) and not
  being loaded (``refs == 0``); the :class:`~.eviction.EvictionPolicy` only orders candidates
  and, through the index, may refuse to admit a new block in their place.
- A **failed** entry (its load found it missing or corrupt) leaves the lookups at once and frees
  its row when its last load completes (:meth:`EntryTable.unref`).
- Running totals (ready entries, their measured bytes) are kept here, never recomputed by a scan.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from polykv_vllm.connector.scheduler.eviction import EvictionPolicy, LRUPolicy
from polykv_vllm.connector.scheduler.geometry import StoreGeometry, store_rows
from polykv_vllm.connector.scheduler.rows import RowAllocator

__all__ = ["UNPLACED", "DocKey", "Entry", "EntryTable"]

#: the row of an entry added but not placed yet (:meth:`EntryTable.add`, :meth:`EntryTable.place`)
UNPLACED = -1

#: a document's identity: (tenant, name); the tenant is the request's ``cache_salt`` or None
DocKey = tuple[str | None, str]


@dataclass(eq=False)
class Entry:
    """One stored block. ``row``: its slab row on every rank; ``nbytes``: what it counts against
    the budget; ``real_bytes``: what the ranks measured; ``docs``: the documents naming it."""

    key: Hashable
    row: int
    nbytes: int
    ready: bool = False
    failed: bool = False
    refs: int = 0
    pins: int = 0
    ranks_confirmed: int = 0
    real_bytes: int = 0
    docs: set[DocKey] = field(default_factory=set)
    tier_key: bytes | None = None  # its chain key in the tiers, once written or fetched

    @property
    def evictable(self) -> bool:
        return self.ready and not self.failed and self.refs == 0 and self.pins == 0


class EntryTable:
    """Entries by key and by row, their budget, rows and eviction order (module docstring)."""

    def __init__(
        self, geometry: StoreGeometry, budget_bytes: int, policy: EvictionPolicy | None = None
    ) -> None:
        self.geometry = geometry
        self.budget_bytes = budget_bytes
        self.rows = RowAllocator(store_rows(budget_bytes, geometry.block_bytes))
        self.policy: EvictionPolicy = policy if policy is not None else LRUPolicy()
        self._by_key: dict[Hashable, Entry] = {}
        self._by_row: dict[int, Entry] = {}
        self._freed_rows: list[int] = []
        self.used_bytes = 0
        self.ready_entries = 0
        self.ready_real_bytes = 0

    # --- lookup ----------------------------------------------------------------------------

    def get(self, key: Hashable) -> Entry | None:
        """The listed (not failed) entry of ``key``, pending or ready."""
        return self._by_key.get(key)

    def at_row(self, row: int) -> Entry | None:
        return self._by_row.get(row)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    def values(self) -> Iterator[Entry]:
        return iter(list(self._by_key.values()))

    def keys_present(self, keys: Iterable[Hashable]) -> int:
        """How many of ``keys`` have a listed entry."""
        return sum(1 for k in keys if k in self._by_key)

    # --- life of an entry ------------------------------------------------------------------

    def add(self, key: Hashable) -> Entry:
        """A pending entry, its bytes counted, without a row until :meth:`place` (the caller
        made room, :meth:`make_room`)."""
        assert key not in self._by_key, "block stored twice"
        nbytes = self.geometry.block_bytes
        assert self.used_bytes + nbytes <= self.budget_bytes, "make room before adding"
        entry = Entry(key=key, row=UNPLACED, nbytes=nbytes)
        self._by_key[key] = entry
        self.policy.insert(key)
        self.used_bytes += nbytes
        return entry

    def place(self, entries: Sequence[Entry], after: int | None = None) -> None:
        """Rows for ``entries`` (just added, in token order) in as few runs of consecutive rows
        as the free rows allow, continuing right after row ``after`` where it can
        (:meth:`~.rows.RowAllocator.alloc`). Every added entry's bytes are counted, and the
        budget holds as many rows, so there are enough free rows."""
        rows = self.rows.alloc(len(entries), after)
        for entry, row in zip(entries, rows, strict=True):
            assert entry.row == UNPLACED, "placed twice"
            entry.row = row
            self._by_row[row] = entry

    def confirm(self, entry: Entry, nbytes: int, ranks: int) -> bool:
        """Count ``ranks`` confirmations of the store (``nbytes`` measured); True when this
        made the entry ready."""
        entry.ranks_confirmed += ranks
        entry.real_bytes += nbytes
        if entry.ready or entry.failed or entry.ranks_confirmed < self.geometry.world_size:
            return False
        entry.ready = True
        self.ready_entries += 1
        self.ready_real_bytes += entry.real_bytes
        return True

    def make_room(self, nbytes: int, protect: set[Hashable]) -> list[Entry] | None:
        """Evict entries (policy order, evictable, not in ``protect``) until ``nbytes`` more fit;
        the evicted entries (already removed), or None (and nothing evicted) if they cannot."""
        victims = self.choose_victims(nbytes, protect)
        if victims is not None:
            self.evict(victims)
        return victims

    def choose_victims(self, nbytes: int, protect: set[Hashable]) -> list[Entry] | None:
        """The entries to evict (policy order, evictable, not in ``protect``) so that ``nbytes``
        more fit, nothing evicted yet; ``[]`` if they fit already, None if they cannot."""
        if self.used_bytes + nbytes <= self.budget_bytes:
            return []
        victims: list[Entry] = []
        freed = 0
        for key in self.policy.candidates():
            entry = self._by_key[key]
            if entry.evictable and key not in protect:
                victims.append(entry)
                freed += entry.nbytes
                if self.used_bytes - freed + nbytes <= self.budget_bytes:
                    return victims
        return None

    def evict(self, victims: list[Entry]) -> None:
        """Remove ``victims`` (from :meth:`choose_victims`, in the same step)."""
        for entry in victims:
            self.remove(entry)

    def fail(self, entry: Entry) -> None:
        """Its load failed: unlist it now, free its row once no load holds it."""
        if entry.failed:
            return
        self._unlist(entry)
        entry.failed = True
        if entry.refs == 0:
            self._free_row(entry)

    def unref(self, entry: Entry) -> None:
        """One load of ``entry`` completed."""
        assert entry.refs > 0
        entry.refs -= 1
        if entry.failed and entry.refs == 0:
            self._free_row(entry)

    def remove(self, entry: Entry) -> None:
        """Evict ``entry`` (evictable): unlist it and free its row."""
        self._unlist(entry)
        self._free_row(entry)

    def touch_chain(self, keys: Sequence[Hashable]) -> None:
        """A chain of blocks was used: touch it from its last block to its first, so a document's
        first blocks are always more recent than its later ones and eviction trims its tail (a
        stored suffix without its prefix would be useless)."""
        self.policy.touch(reversed(keys))

    def take_freed_rows(self) -> list[int]:
        """Rows freed since the last call (for the workers' next plan)."""
        rows, self._freed_rows = self._freed_rows, []
        return rows

    # --- internals -------------------------------------------------------------------------

    def _unlist(self, entry: Entry) -> None:
        del self._by_key[entry.key]
        self.policy.remove(entry.key)
        if entry.ready:
            self.ready_entries -= 1
            self.ready_real_bytes -= entry.real_bytes

    def _free_row(self, entry: Entry) -> None:
        del self._by_row[entry.row]
        self.rows.free(entry.row)
        self.used_bytes -= entry.nbytes  # a failed entry's bytes count until its row is free
        self._freed_rows.append(entry.row)
