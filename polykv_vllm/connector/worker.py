"""Worker side of the connector: the compressed store and the transfers into/out of the cache.

The store (:class:`~.slab.BlockSlab`) has one row per layer for each stored block, this rank's
kv heads. It lives on the cache's device (``placement="gpu"``) or in pinned host memory
(``placement="cpu"`` on CUDA; on a CPU build both are host memory). The worker is a stateless
executor: the scheduler side decides every row (:mod:`~.scheduler.rows`), and each
:class:`~.metadata.StepPlan` names the rows to read, to write and to mark empty.

Per step (the plan bound by vLLM): :meth:`PolyKVWorker.start_load` decompresses the planned loads
into their paged blocks, then marks the freed rows empty; :meth:`PolyKVWorker.save` compresses
the blocks the step just computed into their rows. With the store in pinned host memory on
CUDA a store is staged (:mod:`~.staging`): compressed into a GPU staging buffer on the current
stream, copied to the host on a side stream, and reported stored only in a later step's report
(:meth:`PolyKVWorker.take_report`), once that copy landed.

A row that holds no block or whose scales are not finite is not loaded: it is reported
(:attr:`~.metadata.WorkerReport.failed_rows`; the scheduler drops its entry, the worker changes
nothing), and its blocks and every later block of that load go to
:meth:`PolyKVWorker.take_load_errors`, so vLLM (``kv_load_failure_policy="recompute"``)
recomputes them.

Async loads (:attr:`~.metadata.LoadJob.async_load`) only start in :meth:`PolyKVWorker.start_load`:
on CUDA on a side stream that first waits for the current stream (everything vLLM enqueued
before, e.g. earlier users of the destination blocks), then copies the rows to the GPU, checks
their scales and decodes into the blocks, all without a host sync; on a CPU build in one
background thread (torch releases the GIL). :meth:`PolyKVWorker.get_finished` polls them
(``Event.query()`` / ``Future.done()``) and, for each finished one, adds its report and its load
errors exactly as a synchronous load would, in that step. Their blocks belong to a request vLLM
holds in WAITING_FOR_REMOTE_KVS (even if it was aborted) until that step: nothing else writes or
reads them meanwhile, and their slab rows stay referenced (never freed or rewritten) until the
scheduler side heard of the load. A load whose last blocks come from the tiers below the store
(``docs/TIERS.md``; the scheduler makes every such load async) first reads them on the fetch
thread (:meth:`PolyKVWorker._start_fetch`): a disk or Redis read never stalls a step. A CUDA
load decodes every block it could read and reports
the ones whose scales are not finite as errors (blocks past the first bad one included), so
vLLM recomputes them and never treats their contents as valid.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import torch

from polykv_vllm.connector.metadata import FetchJob, LoadJob, StepPlan, WorkerReport
from polykv_vllm.connector.paged_io import PagedIO
from polykv_vllm.connector.slab import BlockSlab, first_invalid_block, runs
from polykv_vllm.connector.staging import Fence, StagedStores
from polykv_vllm.connector.store_path import StorePath
from polykv_vllm.connector.tiers.worker_io import TierIO, write_row
from polykv_vllm.connector.transfers import AsyncLoad, DoneFence, Fetched, Span, finite_blocks
from polykv_vllm.core import PackedKV

__all__ = ["PolyKVWorker", "WorkerCounters"]

logger = logging.getLogger(__name__)

_FETCH_YIELD_S = 0.002  # the most get_finished waits for a fetch in flight
_NO_TIER = "in no tier"  # why a fetched block was not loaded (its row is reported failed)


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
    #: staged stores that found every staging slot busy and waited for the oldest copy
    store_stalls: int = 0


class PolyKVWorker(StorePath):
    """Holds one rank's compressed store and applies step plans to the paged cache.

    ``io`` (the platform's :class:`~.paged_io.PagedIO`) and ``store`` (the
    :class:`~.slab.BlockSlab`) are set by :meth:`bind` once vLLM registered its caches.
    ``block_size``: logical tokens per block.
    """

    def __init__(self, block_size: int, staging_slots: int = 4) -> None:
        self.block_size = block_size
        self._staged = StagedStores(staging_slots)
        #: stage stores and confirm them later (:mod:`~.staging`); None: exactly when the
        #: caches are on CUDA and the store in host memory
        self.stage_stores: bool | None = None
        #: the fence of a staged copy made on the CPU (synchronous: done); tests inject theirs
        self.host_fence: Callable[[], Fence] = DoneFence
        self._side: torch.cuda.Stream | None = None
        self.io: PagedIO | None = None
        self._store: BlockSlab | None = None
        self._report = WorkerReport()
        self._load_errors: set[int] = set()
        self.counters = WorkerCounters()
        #: the same, never reset (for tests and benchmarks in the engine's process)
        self.totals = WorkerCounters()
        self._spans: list[tuple[str, Span]] = []  # timings the GPU has not finished yet
        self._in_flight: list[AsyncLoad] = []  # async loads not yet reported, in start order
        self._load_side: torch.cuda.Stream | None = None  # CUDA async loads
        self._thread: ThreadPoolExecutor | None = None  # CPU async loads
        self._fetch_thread: ThreadPoolExecutor | None = None  # tier fetches (docs/TIERS.md)
        #: the tiers below the store (docs/TIERS.md), set by the connector; None: no tiers
        self.tiers: TierIO | None = None
        #: this worker's tensor-parallel rank (its slab holds that rank's kv heads), set by the
        #: connector; its report names the rank's store bytes (:meth:`_report_rank_bytes`)
        self.rank = 0
        self._reported_bytes = 0  # an empty store is not news

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
        """Decompress ``plan.loads`` into the paged cache (start the async ones), then mark
        ``plan.freed_rows`` empty (after the loads: no load reads a freed row, and a store may
        reuse it this step; an unfinished async load's rows are never among them). Tiers first:
        rows stored by the last plan and not yet written through are (before anything
        overwrites them); a load with tier blocks (always async) starts its fetch thread."""
        if self.tiers is not None:
            self.tiers.put_pending()
            if plan.tier_pins:
                self.tiers.pin(plan.tier_pins)
        for job in plan.loads:
            fetch = plan.fetches.get(job.load_id)
            if fetch is not None:
                assert job.async_load, "the scheduler makes every tier fetch asynchronous"
                self._in_flight.append(self._start_fetch(job, fetch))
            elif job.async_load:
                self._in_flight.append(self._start_async(job))
            else:
                self._load(job)
        self.store.check_rows(plan.freed_rows)
        self.store.mark_empty(plan.freed_rows)

    def get_finished(self) -> set[str]:
        """Request ids of the async loads that finished since the last call (each reported
        once); their reports and load errors are added for this step."""
        if not self._in_flight:
            return set()
        fetching = [load.fetch for load in self._in_flight if load.fetch is not None]
        if fetching:  # release the GIL to the fetch thread a moment (an idle engine's empty
            # steps otherwise starve it: docs/TIERS.md); returns as soon as one is done
            wait(fetching, timeout=_FETCH_YIELD_S, return_when=FIRST_COMPLETED)
        finished: set[str] = set()
        pending = []
        for load in self._in_flight:
            while load.fetch is not None and load.done():
                load = self._fetch_landed(load)
            if not load.done():
                pending.append(load)
                continue
            good, reason, seconds = load.result()
            self._conclude(load.job, good, reason, drop_row=reason not in ("error", _NO_TIER))
            self._report.failed_rows |= load.fetch_failed
            if good:
                self._record("load", load.span or Span.of(seconds), good)
            finished.add(load.job.req_id)
        self._in_flight = pending
        return finished

    @property
    def loads_in_flight(self) -> int:
        """Async loads started and not yet reported by :meth:`get_finished`."""
        return len(self._in_flight)

    def shutdown(self) -> None:
        """Wait for the async loads in flight (the engine is going away)."""
        for pool in (self._fetch_thread, self._thread):  # fetches first: they may load
            if pool is not None:
                pool.shutdown(wait=True)
        self._fetch_thread = self._thread = None
        if self._load_side is not None:
            self._load_side.synchronize()

    def save(self, plan: StepPlan) -> None:
        """Compress ``plan.stores`` (blocks computed by this step's forward) into the store."""
        if self._staged:
            self._staged.poll(self._confirm)
        if self.tiers is not None and plan.tier_puts:  # written through once confirmed
            self.tiers.expect(plan.tier_puts)
        if self._stages(plan.stores):
            self._save_staged(plan.stores)
            return
        for job in plan.stores:
            self._save(job)

    def take_report(self) -> WorkerReport | None:
        """This step's report: loads run, and stores confirmed (staged ones once their copies
        landed, so possibly a later step's)."""
        if self._staged:
            self._staged.poll(self._confirm)
        self._report_rank_bytes()
        report = self._report
        if report.is_empty():
            return None
        self._report = WorkerReport()
        return report

    def _report_rank_bytes(self) -> None:
        """Name this rank's store bytes in the report when they changed since the last one
        (stores confirmed, rows freed): the scheduler side keeps the figure per rank."""
        nbytes = self.nbytes
        if nbytes != self._reported_bytes:
            self._report.rank_bytes[self.rank] = nbytes
            self._reported_bytes = nbytes

    @property
    def stores_in_flight(self) -> int:
        """Staged stores whose copies have not been confirmed yet."""
        return len(self._staged)

    def flush_stores(self) -> None:
        """Wait for every staged store's copies and confirm them (into the next report)."""
        self._staged.flush(self._confirm)

    def close(self) -> None:
        """At shutdown: let the copies in flight land, then empty the store."""
        self.flush_stores()
        if self._store is not None:
            self._store.clear()

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_counters(self) -> WorkerCounters:
        self._drain_spans(wait=False)
        out, self.counters = self.counters, WorkerCounters()
        return out

    def flush_timers(self) -> None:
        """Wait for the GPU work of every timed load/store and staged copy; record the times."""
        self.flush_stores()
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
        if getattr(self.io, "bound", None) is not None:
            self._load_at(job)
            return
        timer = Span.start(self.io.device)
        good, reason = self._loadable(job)
        per_layer: list[PackedKV] = []
        if good:
            per_layer = self._read(job.rows[:good])
            bad = first_invalid_block(good, per_layer)
            if bad is not None:
                good, reason = bad, "invalid"
        self._conclude(job, good, reason)
        if good == 0:
            return
        self._write(per_layer, job.block_ids[:good])
        self._record("load", timer.stop(), good)

    def _loadable(self, job: LoadJob) -> tuple[int, str]:
        """How many of the job's blocks (from the first) its rows hold, and why not the rest."""
        assert self.io is not None
        store = self.store
        store.check_rows(job.rows)
        good = next((i for i, r in enumerate(job.rows) if r not in store), len(job.rows))
        reason = "missing"
        unusable = self.io.unusable()  # e.g. an fp8 layer scale that is not finite: recompute
        if unusable is not None:
            good, reason = 0, f"not loadable now ({unusable})"
        return good, reason

    def _read(self, rows: Sequence[int]) -> list[PackedKV]:
        """The rows on the cache's device, per layer: views of a GPU slab, one copy per tensor
        and layer from a pinned host slab (on the current stream)."""
        assert self.io is not None
        store = self.store
        if self.io.device.type == "cuda":
            store.ready_for_device()
        else:
            store.ready_for_host()
        parts = [
            [p.to(self.io.device, non_blocking=True) for p in store.view(r.row, r.length)]
            for r in runs(rows)
        ]
        return [
            PackedKV.cat(list(layer)) if len(parts) > 1 else layer[0]
            for layer in zip(*parts, strict=True)
        ]

    def _write(self, per_layer: list[PackedKV], block_ids: Sequence[int]) -> None:
        """Decode the first ``len(block_ids)`` blocks of ``per_layer`` into ``block_ids``."""
        assert self.io is not None
        if len(block_ids) * self.block_size < per_layer[0].tokens:
            per_layer = [p.slice(0, len(block_ids) * self.block_size) for p in per_layer]
        self.io.load(per_layer, block_ids)

    def _conclude(self, job: LoadJob, good: int, reason: str, drop_row: bool = True) -> None:
        """Report ``job``: ``good`` blocks loaded; the rest are load errors (recomputed), and
        the first of them a failed row (its entry dropped) unless ``drop_row`` is False."""
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
            if drop_row:
                self._report.failed_rows.add(row)
            self._load_errors.update(job.block_ids[good:])
            self.counters.load_failures += 1
            self.totals.load_failures += 1

    # --- async loads -------------------------------------------------------------------------

    def _start_fetch(self, job: LoadJob, fetch: FetchJob) -> AsyncLoad:
        """An async load whose last rows come from the tiers: their blocks are read on the
        fetch thread (a disk or network read never stalls the step); once they landed,
        :meth:`get_finished` loads them (:meth:`_fetch_landed`: on CUDA on the side stream, on
        a CPU build in the step's thread, as a synchronous memory hit is: decoding in a second
        Python thread while the engine steps was measured slower, the two threads trading the
        GIL)."""
        assert self.io is not None and self.tiers is not None
        store = self.store
        store.check_rows(job.rows)
        store.mark_empty(job.rows[fetch.first :])  # until fetched (a stale block may be there)
        good, reason = self._loadable(job)  # the rows from memory (the fetched ones are after)
        if self._fetch_thread is None:
            self._fetch_thread = ThreadPoolExecutor(1, thread_name_prefix="polykv-fetch")
        future = self._fetch_thread.submit(self._fetch_in_thread, job, fetch)
        return AsyncLoad(job, good, reason, fetch=future)

    def _fetch_in_thread(self, job: LoadJob, fetch: FetchJob) -> Fetched:
        assert self.tiers is not None
        store = self.store
        try:
            with torch.inference_mode():  # vLLM's tensors are inference tensors
                return self.tiers.read_rows(store, job, fetch, write=store.device.type == "cpu")
        except Exception:  # tiers never raise for their medium: this is a bug, say so loudly
            logger.exception("polykv: the tier fetch of request %s failed", job.req_id)
            return Fetched(rows=(), missing=job.rows[fetch.first :], first=fetch.first)

    def _fetch_landed(self, load: AsyncLoad) -> AsyncLoad:
        """The tier reads of ``load`` are done: its fetched rows are filled and reported stored,
        the others failed; returns the load that follows (done at once on a CPU build)."""
        assert load.fetch is not None
        got = load.fetch.result()
        store = self.store
        for row, payload in zip(got.rows, got.payloads, strict=False):  # a device slab
            write_row(store, row, payload)
        store.mark_filled(got.rows)
        for row in got.rows:
            self._report.stored[row] = [store.row_bytes, 1]
        assert self.io is not None
        if self.io.device.type == "cpu":
            good, reason = load.good, "missing"
            if good == got.first:  # every row from memory is there: then the fetched ones
                good, reason = good + len(got.rows), _NO_TIER
            done: Future[tuple[int, str, float]] = Future()
            done.set_result(
                self._load_in_thread(load.job, good, reason) if good else (0, reason, 0)
            )
            out = AsyncLoad(load.job, load.good, load.reason, future=done)
        else:
            out = self._start_async(load.job)
        out.fetch_failed = set(got.missing)
        return out

    def _start_async(self, job: LoadJob) -> AsyncLoad:
        assert self.io is not None, "register_kv_caches must run before the first load"
        good, reason = self._loadable(job)
        if good == 0:
            return AsyncLoad(job, good, reason)
        if self.io.device.type == "cuda":
            return self._start_on_side_stream(job, good, reason)
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="polykv-load")
        future = self._thread.submit(self._load_in_thread, job, good, reason)
        return AsyncLoad(job, good, reason, future=future)

    def _start_on_side_stream(self, job: LoadJob, good: int, reason: str) -> AsyncLoad:
        """Copy, check and decode on a side stream that first waits for the current stream;
        the scale check's flags come back to pinned host memory, read once the event is done."""
        assert self.io is not None
        device = self.io.device
        if self._load_side is None:
            self._load_side = torch.cuda.Stream(device)
        self._load_side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._load_side):
            span = Span.start(device)
            per_layer = self._read(job.rows[:good])
            finite = finite_blocks(good, per_layer)
            flags = torch.empty(good, dtype=torch.bool, pin_memory=True)
            flags.copy_(finite, non_blocking=True)
            self._write(per_layer, job.block_ids[:good])
            span.stop()
            event = torch.cuda.Event()
            event.record(self._load_side)
        return AsyncLoad(job, good, reason, event=event, flags=flags, span=span)

    def _load_in_thread(self, job: LoadJob, good: int, reason: str) -> tuple[int, str, float]:
        """A CPU build's async load, in the background thread: only valid blocks are written."""
        start = time.perf_counter()
        try:
            with torch.inference_mode():  # vLLM's tensors are inference tensors
                per_layer = self._read(job.rows[:good])
                bad = first_invalid_block(good, per_layer)
                if bad is not None:
                    good, reason = bad, "invalid"
                if good:
                    self._write(per_layer, job.block_ids[:good])
        except Exception:  # a lost load is recomputed, not an engine crash: say why, loudly
            logger.exception("polykv: the async load of request %s failed", job.req_id)
            return 0, "error", 0.0
        return good, reason, time.perf_counter() - start

    def _load_at(self, job: LoadJob) -> None:
        """CUDA, synchronous: the bound kernels decode each run straight from the store's rows
        (a GPU slab, or a pinned host slab read over PCIe: no staging copies), after one
        validity check per run."""
        io, store = self.io, self.store
        assert io is not None
        timer = Span.start(io.device)
        good, reason = self._loadable(job)
        todo = []
        for run in runs(job.rows[:good]):
            bad = store.first_invalid_row(run.row, run.length)
            if bad is not None:
                good, reason = run.offset + bad, "invalid"
                if bad:
                    todo.append(dataclasses.replace(run, length=bad))
                break
            todo.append(run)
        self._conclude(job, good, reason)
        if not todo:
            return
        store.ready_for_device()  # after pending side-stream writes into a host slab
        for run in todo:
            ids = job.block_ids[run.offset : run.offset + run.length]
            io.load_at(store.addresses(run.row, run.length), ids)  # type: ignore[attr-defined]
        self._record("load", timer.stop(), good)

    def _confirm(self, rows: Sequence[int]) -> None:
        """The blocks in ``rows`` are in the slab: mark them and report them stored."""
        store = self.store
        store.mark_filled(rows)
        row_bytes = store.row_bytes
        for row in rows:
            self._report.stored[row] = [row_bytes, 1]
        if self.tiers is not None:  # write-through: docs/TIERS.md
            self.tiers.stored(rows, now=self.io is not None and self.io.device.type == "cpu")

    def _record(self, kind: str, span: Span, blocks: int) -> None:
        self._spans.append((kind, span))
        if kind == "load":
            for c in (self.counters, self.totals):
                c.tokens_decompressed += blocks * self.block_size
