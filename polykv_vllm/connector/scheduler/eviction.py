"""Eviction order behind one interface: which stored block to give up first.

The :class:`~.entries.EntryTable` asks its policy for candidates, oldest first, and evicts the
first ones it is allowed to (ready, unpinned, not being loaded). A policy only orders keys; it
never decides what may be evicted. :class:`LRUPolicy` is the one in use; admission or
scan-resistant policies (LFU, S3-FIFO, ...) implement the same four methods.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from typing import Protocol

__all__ = ["EvictionPolicy", "LRUPolicy"]


class EvictionPolicy(Protocol):
    """Orders the keys of stored entries for eviction."""

    def insert(self, key: Hashable) -> None:
        """A new entry (counts as just used)."""

    def touch(self, keys: Iterable[Hashable]) -> None:
        """Entries used now, in order: the last one given is the most recently used."""

    def remove(self, key: Hashable) -> None:
        """An entry left the store."""

    def candidates(self) -> Iterator[Hashable]:
        """All keys, the first to evict first (the caller may stop early)."""


class LRUPolicy:
    """Least recently used first."""

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
