"""Eviction order and admission behind one interface: which stored block to give up first, and
whether a new block is worth giving one up for.

The :class:`~.entries.EntryTable` asks its policy for candidates, first to evict first, and
picks the first ones it is allowed to (ready, unpinned, not being loaded). A policy only orders
keys and, once the victims are chosen, may refuse the trade (:meth:`EvictionPolicy.admit`); it
never decides what may be evicted. The index tells it what requests asked for
(:meth:`EvictionPolicy.record`, hits and misses alike) so that a policy can count frequency.

- :class:`LRUPolicy` (``eviction="lru"``): least recently used first, every new block admitted.
  On a cycle of documents larger than the store it evicts each document just before its reuse.
- :class:`TinyLFUPolicy` (``eviction="tinylfu"``): the same LRU order, plus TinyLFU admission:
  a new block may evict a stored one only if it was asked for more often (in a decaying count
  over the last ``10 x capacity`` block requests). One-shot blocks (scans, unique queries) never
  push out reused ones, and on a cycle larger than the store the documents already stored stay
  (frequencies tie), so the store serves a fixed part of the cycle instead of nothing.

Both are document-aware through the order the index touches a chain in (last block first, see
:meth:`~.entries.EntryTable.touch_chain`): a document loses its tail before its prefix.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from typing import Literal, Protocol

__all__ = [
    "EVICTION_POLICIES",
    "EvictionName",
    "EvictionPolicy",
    "LRUPolicy",
    "TinyLFUPolicy",
    "make_eviction_policy",
]

EvictionName = Literal["lru", "tinylfu"]


class EvictionPolicy(Protocol):
    """Orders the keys of stored entries for eviction, and admits new ones."""

    def insert(self, key: Hashable) -> None:
        """A new entry (counts as just used)."""

    def touch(self, keys: Iterable[Hashable]) -> None:
        """Entries used now, in order: the last one given is the most recently used."""

    def remove(self, key: Hashable) -> None:
        """An entry left the store."""

    def candidates(self) -> Iterator[Hashable]:
        """All keys, the first to evict first (the caller may stop early)."""

    def record(self, keys: Iterable[Hashable]) -> None:
        """A request asked for the blocks ``keys`` (stored or not), once per admission."""

    def admit(self, key: Hashable, victims: list[Hashable]) -> bool:
        """May the new block ``key`` take the room of ``victims`` (stored, evictable, chosen in
        candidate order)? Only asked when something must be evicted."""


class LRUPolicy:
    """Least recently used first; every new block is admitted."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key: Hashable) -> None:
        self._order[key] = None

    def touch(self, keys: Iterable[Hashable]) -> None:
        for key in keys:
            if key in self._order:
                self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        del self._order[key]

    def candidates(self) -> Iterator[Hashable]:
        return iter(self._order)

    def record(self, keys: Iterable[Hashable]) -> None:
        """LRU counts nothing."""

    def admit(self, key: Hashable, victims: list[Hashable]) -> bool:
        return True


class TinyLFUPolicy(LRUPolicy):
    """LRU order with TinyLFU admission (module docstring).

    ``capacity_blocks``: rows of the store. Frequencies are exact counts in a dict (not a
    sketch: block hashes are already unique, and the dict holds at most ``window`` keys), capped
    at ``max_count`` and halved every ``window = window_factor * capacity_blocks`` recorded
    blocks, so a once-hot document fades. A new block is admitted when its count is greater
    than the largest count among its victims; on a tie the stored block stays.
    """

    def __init__(self, capacity_blocks: int, window_factor: int = 10, max_count: int = 15) -> None:
        super().__init__()
        if capacity_blocks < 1 or window_factor < 1 or max_count < 1:
            raise ValueError(
                f"TinyLFUPolicy(capacity_blocks={capacity_blocks}, window_factor={window_factor}, "
                f"max_count={max_count}): all must be >= 1."
            )
        self.window = window_factor * capacity_blocks
        self.max_count = max_count
        self._counts: dict[Hashable, int] = {}
        self._recorded = 0

    def count(self, key: Hashable) -> int:
        """The decayed number of requests for ``key``."""
        return self._counts.get(key, 0)

    def record(self, keys: Iterable[Hashable]) -> None:
        counts, cap = self._counts, self.max_count
        for key in keys:
            n = counts.get(key, 0)
            if n < cap:
                counts[key] = n + 1
            self._recorded += 1
            if self._recorded >= self.window:
                self._age()

    def admit(self, key: Hashable, victims: list[Hashable]) -> bool:
        return self.count(key) > max((self.count(v) for v in victims), default=0)

    def _age(self) -> None:
        """Halve every count (dropping zeros): the reset of TinyLFU."""
        self._counts = {k: n // 2 for k, n in self._counts.items() if n > 1}
        self._recorded = 0


EVICTION_POLICIES: tuple[EvictionName, ...] = ("lru", "tinylfu")


def make_eviction_policy(name: str, capacity_blocks: int) -> EvictionPolicy:
    """The policy ``name`` (one of :data:`EVICTION_POLICIES`) for a store of
    ``capacity_blocks`` rows."""
    if name == "lru":
        return LRUPolicy()
    if name == "tinylfu":
        return TinyLFUPolicy(capacity_blocks)
    raise ValueError(
        f"polykv option eviction={name!r} is unknown: allowed are {list(EVICTION_POLICIES)}."
    )
