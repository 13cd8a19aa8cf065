"""The worker's store path: a step's newly computed blocks compressed into the store's rows.

:class:`StorePath` is the part of :class:`~.worker.PolyKVWorker` that writes (a mixin: the
worker owns the state, these methods only use it). Per platform and placement:

- GPU slab on CUDA: the bound kernels encode each run of rows in place, by address;
- pinned host slab on CUDA (``placement="cpu"``): staged (:mod:`~.staging`): a step's blocks are
  packed into staging slots across requests, compressed there on the current stream, copied to
  the rows on a side stream by the copy engine, and confirmed once that copy's fence passed; a
  small piece (at most :attr:`StorePath.DIRECT_STORE_TOKENS`) is encoded straight into its
  pinned rows over PCIe instead;
- CPU builds: compressed and written at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from polykv_vllm.connector.metadata import BlockJob
from polykv_vllm.connector.paged_io import PagedIO
from polykv_vllm.connector.slab import BlockSlab, Run, runs
from polykv_vllm.connector.staging import Fence, StagedStores
from polykv_vllm.connector.transfers import Span
from polykv_vllm.core import PackedKV

if TYPE_CHECKING:
    from polykv_vllm.connector.worker import WorkerCounters

__all__ = ["StorePath"]


class StorePath:
    """Writes stores into the worker's slab (mixed into :class:`~.worker.PolyKVWorker`)."""

    #: tokens of one staging slot: a larger store is staged in pieces of this size
    STAGING_TOKENS = 4096
    #: a staged piece of at most this many tokens is encoded straight into its pinned host rows
    #: (no staging buffer or copies: :mod:`~.staging`); 0: never
    DIRECT_STORE_TOKENS = 256

    # the worker's state these methods use (set in PolyKVWorker.__init__)
    block_size: int
    io: PagedIO | None
    stage_stores: bool | None
    host_fence: Callable[[], Fence]
    counters: WorkerCounters
    totals: WorkerCounters
    _staged: StagedStores
    _side: torch.cuda.Stream | None

    if TYPE_CHECKING:

        @property
        def store(self) -> BlockSlab: ...

        def _confirm(self, rows: Sequence[int]) -> None: ...

        def _record(self, kind: str, span: Span, blocks: int) -> None: ...

    def _stages(self, jobs: Sequence[BlockJob]) -> bool:
        """Whether stores are staged (:mod:`~.staging`): ``stage_stores``, or when unset exactly
        when the caches are on CUDA and the store in host memory."""
        if not jobs:
            return False
        assert self.io is not None, "register_kv_caches must run before the first store"
        if self.stage_stores is not None:
            return self.stage_stores
        return self.store.device.type == "cpu" and self.io.device.type == "cuda"

    def _save(self, job: BlockJob) -> None:
        assert self.io is not None, "register_kv_caches must run before the first store"
        store = self.store
        store.check_rows(job.rows)
        timer = Span.start(self.io.device)
        row_runs = runs(job.rows)
        if self._save_in_place(job, row_runs):
            self._confirm(job.rows)
        elif len(row_runs) == 1 and store.device == self.io.device:
            # one run on the cache's device: the kernels encode straight into it
            run = row_runs[0]
            self.io.store(job.block_ids, out=store.view(run.row, run.length))
            self._confirm(job.rows)
        else:
            store.write_rows(job.rows, self.io.store(job.block_ids))
            self._confirm(job.rows)
        self._record("store", timer.stop(), len(job.rows))

    def _save_in_place(self, job: BlockJob, row_runs: list[Run]) -> bool:
        """CUDA, GPU slab: the bound kernels encode each run straight into its rows, by address
        (no views, no copies). False where this does not apply (CPU builds, a host slab, an
        unusable fp8 scale: nothing was written, the caller takes the per-call path)."""
        io, store = self.io, self.store
        if io is None or getattr(io, "bound", None) is None or store.device != io.device:
            return False
        return all(
            io.store_at(  # type: ignore[attr-defined]
                store.addresses(run.row, run.length),
                job.block_ids[run.offset : run.offset + run.length],
            )
            for run in row_runs
        )

    def _save_staged(self, jobs: Sequence[BlockJob]) -> None:
        """Compress a step's stores into staging slots on the current stream, copy each slot
        into the slab's rows on a side stream, and confirm the rows once that copy's fence
        passed (:mod:`~.staging`). The step's blocks are packed in store order, up to
        :attr:`STAGING_TOKENS` tokens per slot, whatever request they belong to: a wave of
        revisits storing a few query blocks each takes one slot, not one slot per request."""
        assert self.io is not None
        store, bs = self.store, self.block_size
        rows = [r for job in jobs for r in job.rows]
        block_ids = [b for job in jobs for b in job.block_ids]
        store.check_rows(rows)
        step = max(1, self.STAGING_TOKENS // bs)
        for lo in range(0, len(rows), step):
            timer = Span.start(self.io.device)
            piece_rows, piece_ids = rows[lo : lo + step], block_ids[lo : lo + step]
            if self._store_direct(piece_rows, piece_ids):
                self._record("store", timer.stop(), len(piece_rows))
                continue
            slot = self._staged.acquire()
            if slot is None:  # every slot in flight: wait for the oldest (synchronous)
                self._staged.wait_oldest(self._confirm)
                for c in (self.counters, self.totals):
                    c.store_stalls += 1
                slot = self._staged.acquire()
                assert slot is not None
            tokens = len(piece_rows) * bs
            if slot.capacity < tokens:  # grow (the slot is free): powers of two, up to a piece
                blocks = min(step, 1 << (len(piece_rows) - 1).bit_length())
                slot.buffers = store.staging(blocks * bs, self.io.device)
                slot.capacity = blocks * bs
            out = slot.view(tokens)
            self.io.store(piece_ids, out=out)
            self._staged.add(tuple(piece_rows), slot, self._copy_to_slab(piece_rows, out))
            self._record("store", timer.stop(), len(piece_rows))

    def _store_direct(self, rows: Sequence[int], block_ids: Sequence[int]) -> bool:
        """A small staged piece on CUDA: the bound kernels encode each run straight into its
        pinned host rows (over PCIe) on the current stream; the piece is confirmed once that
        stream's event passed. False where this does not apply (too large, no bound kernels,
        an unusable fp8 scale: nothing was written)."""
        io, store = self.io, self.store
        if (
            io is None
            or len(rows) * self.block_size > self.DIRECT_STORE_TOKENS
            or getattr(io, "bound", None) is None
            or not store.is_pinned
        ):
            return False
        for i, run in enumerate(runs(rows)):
            ids = block_ids[run.offset : run.offset + run.length]
            if not io.store_at(store.addresses(run.row, run.length), ids):  # type: ignore[attr-defined]
                # an unusable fp8 scale is refused before anything is written, and the scales
                # are the same for every run of one call
                assert i == 0, "fp8 scales changed within one store"
                return False
        fence = torch.cuda.current_stream(io.device).record_event()
        self._staged.add(tuple(rows), None, fence)
        return True

    def _copy_to_slab(self, rows: Sequence[int], staged: list[PackedKV]) -> Fence:
        """Copy ``staged`` into ``rows``: on CUDA on the side stream after the current stream's
        work so far (the compression, and every earlier reader of these rows); its fence."""
        store = self.store
        if not staged[0].k_codes.is_cuda:
            store.write_rows(rows, staged)
            return self.host_fence()
        device = staged[0].k_codes.device
        if self._side is None:
            self._side = torch.cuda.Stream(device)
        self._side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._side):
            store.write_rows(rows, staged)  # the copy engine: no SMs taken from the forward
        return self._side.record_event()
