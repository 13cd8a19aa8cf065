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
- :class:`S3FIFOPolicy` (``eviction="s3fifo"``): S3-FIFO (Yang et al., SOSP'23) at block
  granularity: new blocks enter a small FIFO (10% of the rows); a block asked for again before
  it leaves it moves to the main FIFO, the others leave the store and their keys wait in a ghost
  FIFO, so that a block stored again soon after goes straight to main; main gives a block whose
  access count is not zero another round (lazy promotion, count minus one). One-shot blocks
  only pass through the small queue (scans), and a new document enters at once (recency).

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
    "S3FIFOPolicy",
    "TinyLFUPolicy",
    "make_eviction_policy",
]

EvictionName = Literal["lru", "tinylfu", "s3fifo"]


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


class S3FIFOPolicy:
    """S3-FIFO at block granularity (module docstring).

    ``capacity_blocks``: rows of the store; the small FIFO's share is ``small_ratio`` of them
    (at least one), the ghost FIFO remembers as many evicted keys as main holds rows. Access
    counts come from :meth:`record` (one per request that asks for a stored block, capped at
    ``max_freq``); a block recorded by several requests before it was stored (a wave of agents
    reading one new document) enters with the extra ones counted. A block leaves the small
    FIFO for main once its count reaches ``promote_after``.

    Prefix order: the blocks a request stores are in its queue in the order of the index's
    touches (last block first, so a document loses its tail first) until some request asks for
    them again; from then on queues are FIFO. :meth:`candidates` runs the algorithm's eviction
    scan lazily (its promotions are kept even if the caller stops early); it yields every
    stored key at most once, and all of them if the caller keeps asking, so a caller skipping
    pinned or in-use blocks still finds every evictable one.
    """

    def __init__(
        self,
        capacity_blocks: int,
        small_ratio: float = 0.1,
        max_freq: int = 3,
        promote_after: int = 1,
    ) -> None:
        if capacity_blocks < 1 or not 0 < small_ratio < 1 or max_freq < 1 or promote_after < 1:
            raise ValueError(
                f"S3FIFOPolicy(capacity_blocks={capacity_blocks}, small_ratio={small_ratio}, "
                f"max_freq={max_freq}, promote_after={promote_after}): capacity, max_freq and "
                "promote_after must be >= 1, small_ratio in (0, 1)."
            )
        self.small_target = max(1, round(small_ratio * capacity_blocks))
        self.ghost_capacity = max(1, capacity_blocks - self.small_target)
        self.max_freq = max_freq
        self.promote_after = promote_after
        self._small: OrderedDict[Hashable, None] = OrderedDict()
        self._main: OrderedDict[Hashable, None] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._freq: dict[Hashable, int] = {}
        self._fresh: set[Hashable] = set()  # stored, asked for by no request since
        self._asked: OrderedDict[Hashable, int] = OrderedDict()  # requests for absent blocks
        #: running totals: blocks moved small -> main, blocks stored into main by a ghost hit
        self.promoted = 0
        self.ghost_hits = 0

    def queue_of(self, key: Hashable) -> str | None:
        """``"small"``, ``"main"``, ``"ghost"`` (evicted, remembered) or None."""
        for name, q in (("small", self._small), ("main", self._main), ("ghost", self._ghost)):
            if key in q:
                return name
        return None

    def freq(self, key: Hashable) -> int:
        return self._freq.get(key, 0)

    def insert(self, key: Hashable) -> None:
        asked = self._asked.pop(key, 0)
        self._freq[key] = min(self.max_freq, max(0, asked - 1))
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
            self.ghost_hits += 1
        else:
            self._small[key] = None
        self._fresh.add(key)

    def touch(self, keys: Iterable[Hashable]) -> None:
        """Only blocks no request asked for since they were stored move (to the end of their
        queue, in the order given): a request's own chain, in chunks, keeps its tail first."""
        fresh = self._fresh
        for key in keys:
            if key in fresh:
                (self._small if key in self._small else self._main).move_to_end(key)

    def remove(self, key: Hashable) -> None:
        if key in self._small:
            del self._small[key]
            self._ghost[key] = None
            if len(self._ghost) > self.ghost_capacity:
                self._ghost.popitem(last=False)
        else:
            del self._main[key]
        del self._freq[key]
        self._fresh.discard(key)

    def record(self, keys: Iterable[Hashable]) -> None:
        freq, cap, asked = self._freq, self.max_freq, self._asked
        for key in keys:
            n = freq.get(key)
            if n is not None:
                if n < cap:
                    freq[key] = n + 1
                self._fresh.discard(key)
            else:
                asked[key] = asked.pop(key, 0) + 1
                if len(asked) > self.ghost_capacity:
                    asked.popitem(last=False)

    def admit(self, key: Hashable, victims: list[Hashable]) -> bool:
        return True

    def candidates(self) -> Iterator[Hashable]:
        small, main, freq = self._small, self._main, self._freq
        seen: set[Hashable] = set()
        seen_small = seen_main = 0
        while True:
            small_left, main_left = len(small) - seen_small, len(main) - seen_main
            if small_left <= 0 and main_left <= 0:
                return
            from_small = small_left > 0 and (len(small) >= self.small_target or main_left <= 0)
            q = small if from_small else main
            key = next(iter(q))
            while key in seen:  # yielded before (skipped by the caller): behind the others
                q.move_to_end(key)
                key = next(iter(q))
            if from_small and freq[key] >= self.promote_after:
                del small[key]
                main[key] = None
                self._fresh.discard(key)
                self.promoted += 1
                continue
            if not from_small and freq[key] > 0:
                freq[key] -= 1
                main.move_to_end(key)
                continue
            q.move_to_end(key)
            seen.add(key)
            if from_small:
                seen_small += 1
            else:
                seen_main += 1
            yield key


EVICTION_POLICIES: tuple[EvictionName, ...] = ("lru", "tinylfu", "s3fifo")


def make_eviction_policy(name: str, capacity_blocks: int) -> EvictionPolicy:
    """The policy ``name`` (one of :data:`EVICTION_POLICIES`) for a store of
    ``capacity_blocks`` rows."""
    if name == "lru":
        return LRUPolicy()
    if name == "tinylfu":
        return TinyLFUPolicy(capacity_blocks)
    if name == "s3fifo":
        return S3FIFOPolicy(capacity_blocks)
    raise ValueError(
        f"polykv option eviction={name!r} is unknown: allowed are {list(EVICTION_POLICIES)}."
    )
