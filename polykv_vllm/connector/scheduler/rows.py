"""Placement: which slab row each stored block lives in (the scheduler side decides).

Every worker rank holds a slab of the same :func:`~.geometry.store_rows` rows; a row number in a
:class:`~polykv_vllm.connector.metadata.StepPlan` names the same block on every rank. Rows are
handed out in runs of consecutive rows where possible (never-used rows first, then the first
free run that fits, else any free rows), so the blocks of a document stored by one request are
usually one run, which the worker reads and writes through one zero-copy view per tensor.
"""

from __future__ import annotations

import bisect

__all__ = ["RowAllocator"]


class RowAllocator:
    """Free/used bookkeeping of ``capacity`` rows (pure Python, scheduler side only)."""

    def __init__(self, capacity: int) -> None:
        assert capacity >= 1
        self.capacity = capacity
        self._fresh = 0  # rows >= this were never used
        self._free: list[int] = []  # recycled rows, sorted
        self._used = 0

    @property
    def free_rows(self) -> int:
        return self.capacity - self._used

    def alloc(self, n: int) -> list[int]:
        """``n`` free rows (the caller checked :attr:`free_rows`), consecutive where possible."""
        assert 0 <= n <= self.free_rows, f"{n} rows asked, {self.free_rows} free"
        if self._fresh + n <= self.capacity:
            rows = list(range(self._fresh, self._fresh + n))
            self._fresh += n
        else:
            free = self._free + list(range(self._fresh, self.capacity))  # sorted
            last = len(free) - n
            start = next((i for i in range(last + 1) if free[i + n - 1] - free[i] == n - 1), 0)
            rows = free[start : start + n]
            taken = set(rows)
            self._fresh = self.capacity
            self._free = [r for r in free if r not in taken]
        self._used += n
        return rows

    def free(self, row: int) -> None:
        """Give ``row`` back (it must be in use)."""
        assert 0 <= row < self._fresh and row not in self._free, f"row {row} is not in use"
        bisect.insort(self._free, row)
        self._used -= 1
