"""Placement: which slab row each stored block lives in (the scheduler side decides).

Every worker rank holds a slab of the same :func:`~.geometry.store_rows` rows; a row number in a
:class:`~polykv_vllm.connector.metadata.StepPlan` names the same block on every rank. The worker
reads and writes one run of consecutive rows through one zero-copy view (one copy per tensor and
layer), so the blocks a request stores in one step are placed as **extents**: as few runs of
consecutive rows as the free rows allow.

- The free rows are kept as free extents (maximal runs), coalesced on every free: the rows of
  evicted neighbours (an LRU victim list is usually one document's tail) join into one extent.
- :meth:`RowAllocator.alloc` of ``n`` rows first continues right after ``after`` (the row of the
  block before them, when that row's successor starts a free extent), then takes the smallest
  free extent that holds the rest (best fit, lowest row on ties), and only when none does, the
  largest extent and goes on with the rest: the fewest runs the free extents allow.
"""

from __future__ import annotations

import bisect

__all__ = ["RowAllocator"]


class RowAllocator:
    """Free/used bookkeeping of ``capacity`` rows as free extents (pure Python, scheduler side
    only; module docstring)."""

    def __init__(self, capacity: int) -> None:
        assert capacity >= 1
        self.capacity = capacity
        self._starts: list[int] = [0]  # starts of the free extents, sorted
        self._length: dict[int, int] = {0: capacity}  # free extent start -> length
        self._start_of_end: dict[int, int] = {capacity: 0}  # free extent end (excl.) -> start
        self._by_size: list[tuple[int, int]] = [(capacity, 0)]  # (length, start), sorted
        self._used = 0

    @property
    def free_rows(self) -> int:
        return self.capacity - self._used

    @property
    def extents(self) -> list[tuple[int, int]]:
        """The free extents as ``(start, length)``, by start."""
        return [(s, self._length[s]) for s in self._starts]

    def alloc(self, n: int, after: int | None = None) -> list[int]:
        """``n`` free rows (the caller checked :attr:`free_rows`), in as few runs as the free
        extents allow: first the rows right after row ``after`` if free, then best fit (module
        docstring). Rows come in run order: the continuation of ``after``, then by row."""
        assert 0 <= n <= self.free_rows, f"{n} rows asked, {self.free_rows} free"
        need = n
        first: list[int] = []
        if need and after is not None and after + 1 in self._length:
            take = min(need, self._length[after + 1])
            self._take(after + 1, take)
            first = list(range(after + 1, after + 1 + take))
            need -= take
        pieces: list[tuple[int, int]] = []
        while need:
            i = bisect.bisect_left(self._by_size, (need, -1))
            length, start = self._by_size[i] if i < len(self._by_size) else self._by_size[-1]
            take = min(need, length)
            self._take(start, take)
            pieces.append((start, take))
            need -= take
        pieces.sort()
        self._used += n
        return first + [r for start, take in pieces for r in range(start, start + take)]

    def free(self, row: int) -> None:
        """Give ``row`` back (it must be in use); it joins the free extents around it."""
        assert 0 <= row < self.capacity and not self._is_free(row), f"row {row} is not in use"
        start, end = row, row + 1
        left = self._start_of_end.get(row)
        if left is not None:  # a free extent ends right before row
            start = left
            self._remove(left)
        if end in self._length:  # a free extent starts right after row
            end += self._length[end]
            self._remove(row + 1)
        self._insert(start, end - start)
        self._used -= 1

    # --- internals -------------------------------------------------------------------------

    def _is_free(self, row: int) -> bool:
        i = bisect.bisect_right(self._starts, row) - 1
        return i >= 0 and row < self._starts[i] + self._length[self._starts[i]]

    def _take(self, start: int, k: int) -> None:
        """Take the first ``k`` rows of the free extent at ``start``."""
        length = self._length[start]
        self._remove(start)
        if k < length:
            self._insert(start + k, length - k)

    def _insert(self, start: int, length: int) -> None:
        bisect.insort(self._starts, start)
        bisect.insort(self._by_size, (length, start))
        self._length[start] = length
        self._start_of_end[start + length] = start

    def _remove(self, start: int) -> None:
        length = self._length.pop(start)
        del self._start_of_end[start + length]
        del self._starts[bisect.bisect_left(self._starts, start)]
        del self._by_size[bisect.bisect_left(self._by_size, (length, start))]
