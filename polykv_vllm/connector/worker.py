"""Worker side of the connector: the compressed store and the transfers into/out of the cache.

The store (:class:`~.slab.BlockSlab`) maps a slot (an int from the scheduler, never reused) to
one row per layer holding one block of one document, this rank's kv heads. It lives on the
cache's device (``placement="gpu"``) or in pinned host memory (``placement="cpu"`` on CUDA; on
a CPU build both are host memory).

Per step (the :class:`~.metadata.StepPlan` bound by vLLM): :meth:`PolyKVWorker.start_load`
decompresses the planned loads into their paged blocks and drops evicted slots;
:meth:`PolyKVWorker.save` compresses the blocks the step just computed. A slot that is missing
or whose scales are not finite is not loaded: its blocks and every later block of that request
are reported through :meth:`PolyKVWorker.take_load_errors`, so vLLM
(``kv_load_failure_policy="recompute"``) recomputes them.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from polykv_vllm.connector.metadata import BlockJob, StepPlan, WorkerReport
from polykv_vllm.connector.paged_io import PagedIO
from polykv_vllm.connector.slab import BlockSlab

__all__ = ["PolyKVWorker", "WorkerCounters"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class WorkerCounters:
    """What this worker did since the last :meth:`PolyKVWorker.take_counters`."""

    load_seconds: list[float] = dataclasses.field(default_factory=list)
    store_seconds: list[float] = dataclasses.field(default_factory=list)
    load_failures: int = 0
    tokens_decompressed: int = 0
    tokens_compressed: int = 0


class PolyKVWorker:
    """Holds one rank's compressed store and applies step plans to the paged cache.

    ``io`` (the platform's :class:`~.paged_io.PagedIO`) and ``store`` (the
    :class:`~.slab.BlockSlab`) are set by :meth:`bind` once vLLM registered its caches.
    ``block_size``: logical tokens per block.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.io: PagedIO | None = None
        self._store: BlockSlab | None = None
        self._report = WorkerReport()
        self._load_errors: set[int] = set()
        self.counters = WorkerCounters()
        #: the same, never reset (for tests and benchmarks in the engine's process)
        self.totals = WorkerCounters()

    def bind(self, io: PagedIO, store: BlockSlab) -> None:
        self.io = io
        self._store = store

    @property
    def store(self) -> BlockSlab:
        assert self._store is not None, "register_kv_caches must run first"
        return self._store

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's stored blocks (measured row size times rows in use)."""
        return self._store.nbytes if self._store is not None else 0

    # --- per-step hooks --------------------------------------------------------------------

    def start_load(self, plan: StepPlan) -> None:
        """Decompress ``plan.loads`` into the paged cache, then drop ``plan.evictions``."""
        for job in plan.loads:
            self._load(job)
        for slot in plan.evictions:
            self.store.drop(slot)

    def save(self, plan: StepPlan) -> None:
        """Compress ``plan.stores`` (blocks computed by this step's forward) into the store."""
        for job in plan.stores:
            self._save(job)

    def take_report(self) -> WorkerReport | None:
        report, self._report = self._report, WorkerReport()
        return None if report.is_empty() else report

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_counters(self) -> WorkerCounters:
        out, self.counters = self.counters, WorkerCounters()
        return out

    # --- transfers -------------------------------------------------------------------------

    def _load(self, job: BlockJob) -> None:
        assert self.io is not None, "register_kv_caches must run before the first load"
        start = time.perf_counter()
        store = self.store
        good = next((i for i, s in enumerate(job.slots) if s not in store), len(job.slots))
        reason = "missing"
        per_layer = store.get(job.slots[:good]) if good else []
        if good:
            bad = store.first_invalid(job.slots[:good], per_layer)
            if bad is not None:
                good, reason = bad, "invalid"
                per_layer = [p.slice(0, good * self.block_size) for p in per_layer]
        if good < len(job.slots):
            slot = job.slots[good]
            logger.warning(
                "polykv: store entry %d (block %d of request %s) is %s; recomputing %d blocks",
                slot,
                good,
                job.req_id,
                reason,
                len(job.slots) - good,
            )
            store.drop(slot)
            self._report.failed_slots.add(slot)
            self._report.unloaded_tokens[job.req_id] = (len(job.slots) - good) * self.block_size
            self._load_errors.update(job.block_ids[good:])
            self.counters.load_failures += 1
            self.totals.load_failures += 1
        if good == 0:
            return
        self.io.load(per_layer, job.block_ids[:good])
        _sync()
        seconds = time.perf_counter() - start
        for c in (self.counters, self.totals):
            c.load_seconds.append(seconds)
            c.tokens_decompressed += good * self.block_size

    def _save(self, job: BlockJob) -> None:
        assert self.io is not None, "register_kv_caches must run before the first store"
        start = time.perf_counter()
        per_layer = self.io.store(job.block_ids)
        self.store.put(job.slots, per_layer)
        row_bytes = self.store.row_bytes
        for slot in job.slots:
            self._report.stored[slot] = [row_bytes, 1]
        _sync()
        seconds = time.perf_counter() - start
        for c in (self.counters, self.totals):
            c.store_seconds.append(seconds)
            c.tokens_compressed += len(job.slots) * self.block_size


def _sync() -> None:
    """Wait for queued GPU work, so the timers measure it (a no-op on CPU builds)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
