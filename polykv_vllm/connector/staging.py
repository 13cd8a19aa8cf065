"""Stores into a pinned host slab off the critical path: staging buffers and deferred confirms.

With the CPU tier on CUDA, :meth:`~.worker.PolyKVWorker.save` compresses a step's new blocks
into a GPU **staging buffer** on the current stream (the kernel reads the paged blocks before
any later step can overwrite them, and it is fast), then copies the buffer into the slab's rows
on a side stream (``non_blocking``, device to pinned host) and records a :class:`Fence` there.
The rows are **confirmed** to the scheduler (:attr:`~.metadata.WorkerReport.stored`, after which
their entries become ready and may be loaded) only in a later step's hook, once the fence has
passed: nothing reads a row before its bytes landed, so a load never waits for a store.

:class:`StagedStores` is that bookkeeping, with no CUDA in it: a small ring of staging slots,
each reused only after its fence passed, and the stores in flight. The fence is anything with
``query()`` and ``synchronize()`` (a CUDA event; tests pass their own).

A small piece (at most ``PolyKVWorker.DIRECT_STORE_TOKENS``, e.g. an agent's query blocks) skips
the staging buffer: the kernels encode it straight into the pinned rows over PCIe, on the
current stream, and it is confirmed the same way once that stream's fence passed. It costs one
launch instead of a buffer, a view per tensor and a copy per tensor and layer (host time that a
prefix-cache hit, whose forward is short, would wait for).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from polykv_vllm.core import PackedKV

__all__ = ["Fence", "StagedStores", "StagingSlot"]


class Fence(Protocol):
    """The end of some asynchronous work (``torch.cuda.Event``'s interface)."""

    def query(self) -> bool:
        """Whether the work is done (no wait)."""

    def synchronize(self) -> None:
        """Wait until the work is done."""


@dataclass(eq=False)
class StagingSlot:
    """One reusable staging buffer: per layer, ``capacity`` tokens (allocated on first use and
    grown by the owner, only while the slot is free)."""

    buffers: list[PackedKV] | None = None
    capacity: int = 0

    def view(self, tokens: int) -> list[PackedKV]:
        """The first ``tokens`` tokens of every layer's buffer (contiguous views)."""
        assert self.buffers is not None and tokens <= self.capacity
        return [p.slice(0, tokens) for p in self.buffers]


@dataclass(eq=False)
class _InFlight:
    rows: tuple[int, ...]
    slot: StagingSlot | None  # None: written straight into the rows, no staging buffer
    fence: Fence


class StagedStores:
    """``slots`` staging slots and the stores whose copies are in flight, oldest first.

    :meth:`acquire` a free slot (None when all are busy: the caller then :meth:`wait_oldest`,
    a synchronous fallback it counts), :meth:`add` the store with its fence, and every step
    :meth:`poll` the rows whose copies landed (in store order, so a document's prefix is never
    confirmed after its suffix); :meth:`flush` waits for all.
    """

    def __init__(self, slots: int) -> None:
        assert slots >= 1
        self.slots = [StagingSlot() for _ in range(slots)]
        self._busy: set[int] = set()  # id() of the slots in flight
        self._flight: deque[_InFlight] = deque()

    def __len__(self) -> int:
        """Stores in flight."""
        return len(self._flight)

    def acquire(self) -> StagingSlot | None:
        """A slot no store in flight uses, or None."""
        return next((s for s in self.slots if id(s) not in self._busy), None)

    def add(self, rows: tuple[int, ...], slot: StagingSlot | None, fence: Fence) -> None:
        """A store into ``rows`` staged in ``slot`` (None: written into the rows directly, by
        work that ends at ``fence`` too) whose copies end at ``fence``."""
        if slot is not None:
            assert id(slot) not in self._busy, "slot reused before its copies finished"
            self._busy.add(id(slot))
        self._flight.append(_InFlight(rows, slot, fence))

    def poll(self, confirm: Callable[[tuple[int, ...]], None]) -> int:
        """``confirm`` the rows of every finished store, from the oldest up to the first one
        still in flight; returns how many stores completed."""
        n = 0
        while self._flight and self._flight[0].fence.query():
            self._complete(confirm)
            n += 1
        return n

    def wait_oldest(self, confirm: Callable[[tuple[int, ...]], None]) -> None:
        """Block until the oldest store's copies finished, and ``confirm`` it."""
        self._flight[0].fence.synchronize()
        self._complete(confirm)

    def flush(self, confirm: Callable[[tuple[int, ...]], None]) -> None:
        """Wait for every store in flight and ``confirm`` them all."""
        while self._flight:
            self.wait_oldest(confirm)

    def _complete(self, confirm: Callable[[tuple[int, ...]], None]) -> None:
        done = self._flight.popleft()
        if done.slot is not None:
            self._busy.discard(id(done.slot))
        confirm(done.rows)
