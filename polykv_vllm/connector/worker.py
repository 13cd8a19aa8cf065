"""Worker side of the connector: the compressed store and the transfers into/out of the cache.

The store (:class:`~.slab.BlockSlab`) has one row per layer for each stored block, this rank's
kv heads. It lives on the cache's device (``placement="gpu"``) or in pinned host memory
(``placement="cpu"`` on CUDA; on a CPU build both are host memory). The worker is a stateless
executor: the scheduler side decides every row (:mod:`~.scheduler.rows`), and each
:class:`~.metadata.StepPlan` names the rows to read, to write and to mark empty.

Per step (the plan bound by vLLM): :meth:`PolyKVWorker.start_load` decompresses the planned loads
into their paged blocks, then marks the freed rows empty; :meth:`PolyKVWorker.save` compresses
the blocks the step just computed into their rows. A row that holds no block or whose scales are
not finite is not loaded: it is reported (:attr:`~.metadata.WorkerReport.failed_rows`; the
scheduler drops its entry, the worker changes nothing), and its blocks and every later block of
that load go to :meth:`PolyKVWorker.take_load_errors`, so vLLM
(``kv_load_failure_policy="recompute"``) recomputes them.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from polykv_vllm.connector.metadata import BlockJob, FetchJob, LoadJob, StepPlan, WorkerReport
from polykv_vllm.connector.paged_io import PagedIO
from polykv_vllm.connector.slab import BlockSlab, first_invalid_block, runs
from polykv_vllm.connector.tiers.worker_io import TierIO
from polykv_vllm.core import PackedKV

__all__ = ["PolyKVWorker", "WorkerCounters"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class WorkerCounters:
    """What this worker did since the last :meth:`PolyKVWorker.take_counters`.

    Load and store times are the work's time on the device's stream (CUDA events, no host sync)
    or wall time (CPU builds); a time appears once the GPU has finished that work
    (:meth:`PolyKVWorker.flush_timers` waits for all).
    """

    load_seconds: list[float] = dataclasses.field(default_factory=list)
    store_seconds: list[float] = dataclasses.field(default_factory=list)
    load_failures: int = 0
    tokens_decompressed: int = 0


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
        self._spans: list[tuple[str, _Span]] = []  # timings the GPU has not finished yet
        #: the tiers below the store (docs/TIERS.md), set by the connector; None: no tiers
        self.tiers: TierIO | None = None

    def bind(self, io: PagedIO, store: BlockSlab) -> None:
        self.io = io
        self._store = store

    @property
    def store(self) -> BlockSlab:
        assert self._store is not None, "register_kv_caches must run first"
        return self._store

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's stored blocks (measured row size times rows holding a block)."""
        return self._store.nbytes if self._store is not None else 0

    # --- per-step hooks --------------------------------------------------------------------

    def start_load(self, plan: StepPlan) -> None:
        """Decompress ``plan.loads`` into the paged cache, then mark ``plan.freed_rows`` empty
        (after the loads: no load reads a freed row, and a store may reuse it this step).
        Tiers first: rows stored by the last plan and not yet written through are (before
        anything overwrites them), and a load's tier blocks are fetched before it runs."""
        if self.tiers is not None:
            self.tiers.put_pending()
        for job in plan.loads:
            fetch = plan.fetches.get(job.load_id)
            if fetch is not None:
                self.fetch(job, fetch)
            self._load(job)
        self.store.check_rows(plan.freed_rows)
        self.store.mark_empty(plan.freed_rows)

    def fetch(self, job: LoadJob, fetch: FetchJob) -> None:
        """Read ``job``'s tier blocks into their rows (synchronous; docs/TIERS.md). Rows not
        fetched are reported failed and left empty, so :meth:`_load` recomputes them."""
        assert self.tiers is not None, "a fetch was planned without tiers"
        self.tiers.fetch(self.store, job, fetch, self._report)

    def save(self, plan: StepPlan) -> None:
        """Compress ``plan.stores`` (blocks computed by this step's forward) into the store."""
        for job in plan.stores:
            self._save(job)
        if self.tiers is not None and plan.tier_puts:  # write-through: docs/TIERS.md
            assert self.io is not None
            self.tiers.queue_puts(plan.tier_puts, now=self.io.device.type == "cpu")

    def take_report(self) -> WorkerReport | None:
        report, self._report = self._report, WorkerReport()
        return None if report.is_empty() else report

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_counters(self) -> WorkerCounters:
        self._drain_spans(wait=False)
        out, self.counters = self.counters, WorkerCounters()
        return out

    def flush_timers(self) -> None:
        """Wait for the GPU work of every timed load/store and record the times."""
        self._drain_spans(wait=True)

    def _drain_spans(self, wait: bool) -> None:
        pending = []
        for kind, span in self._spans:
            if wait or span.done():
                seconds = span.seconds()
                for c in (self.counters, self.totals):
                    getattr(c, f"{kind}_seconds").append(seconds)
            else:
                pending.append((kind, span))
        self._spans = pending

    # --- transfers -------------------------------------------------------------------------

    def _load(self, job: LoadJob) -> None:
        assert self.io is not None, "register_kv_caches must run before the first load"
        store = self.store
        store.check_rows(job.rows)
        timer = _Span.start(self.io.device)
        good = next((i for i, r in enumerate(job.rows) if r not in store), len(job.rows))
        reason = "missing"
        per_layer: list[PackedKV] = []
        unusable = self.io.unusable()  # e.g. an fp8 layer scale that is not finite: recompute
        if unusable is not None:
            good, reason = 0, f"not loadable now ({unusable})"
        if good:
            # the runs' rows on the cache's device: views of a GPU slab, one copy per tensor and
            # layer from a pinned host slab
            if self.io.device.type == "cuda":
                store.ready_for_device()
            else:
                store.ready_for_host()
            parts = [
                [p.to(self.io.device, non_blocking=True) for p in store.view(r.row, r.length)]
                for r in runs(job.rows[:good])
            ]
            per_layer = [
                PackedKV.cat(list(layer)) if len(parts) > 1 else layer[0]
                for layer in zip(*parts, strict=True)
            ]
            bad = first_invalid_block(good, per_layer)
            if bad is not None:
                good, reason = bad, "invalid"
        self._report.loads[job.load_id] = [1, good]
        if good < len(job.rows):
            row = job.rows[good]
            logger.warning(
                "polykv: store row %d (block %d of request %s) is %s; recomputing %d blocks",
                row,
                good,
                job.req_id,
                reason,
                len(job.rows) - good,
            )
            self._report.failed_rows.add(row)
            self._load_errors.update(job.block_ids[good:])
            self.counters.load_failures += 1
            self.totals.load_failures += 1
        if good == 0:
            return
        if good * self.block_size < per_layer[0].tokens:
            per_layer = [p.slice(0, good * self.block_size) for p in per_layer]
        self.io.load(per_layer, job.block_ids[:good])
        self._record("load", timer.stop(), good)

    def _save(self, job: BlockJob) -> None:
        assert self.io is not None, "register_kv_caches must run before the first store"
        store = self.store
        store.check_rows(job.rows)
        timer = _Span.start(self.io.device)
        row_runs = runs(job.rows)
        direct = len(row_runs) == 1 and store.device == self.io.device
        if direct:  # one run on the cache's device: the kernels encode straight into it
            run = row_runs[0]
            self.io.store(job.block_ids, out=store.view(run.row, run.length))
        else:
            per_layer = self.io.store(job.block_ids)
            for run in row_runs:
                store.write(run, per_layer, offset=run.offset * self.block_size)
        store.mark_filled(job.rows)
        row_bytes = store.row_bytes
        for row in job.rows:
            self._report.stored[row] = [row_bytes, 1]
        self._record("store", timer.stop(), len(job.rows))

    def _record(self, kind: str, span: _Span, blocks: int) -> None:
        self._spans.append((kind, span))
        if kind == "load":
            for c in (self.counters, self.totals):
                c.tokens_decompressed += blocks * self.block_size


class _Span:
    """Time of a piece of work on the device's current stream (CUDA events: no host sync), or
    wall time on the CPU. :meth:`seconds` waits for the end event."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._t0 = time.perf_counter()
        self._t1: float | None = None
        if self._cuda:
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            self._events = (begin, torch.cuda.Event(enable_timing=True))

    @classmethod
    def start(cls, device: torch.device) -> _Span:
        return cls(device)

    def stop(self) -> _Span:
        if self._events is not None:
            self._events[1].record()
        else:
            self._t1 = time.perf_counter()
        return self

    def done(self) -> bool:
        return self._events is None or self._events[1].query()

    def seconds(self) -> float:
        if self._events is not None:
            self._events[1].synchronize()
            return self._events[0].elapsed_time(self._events[1]) / 1000
        assert self._t1 is not None
        return self._t1 - self._t0
