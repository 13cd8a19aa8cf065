"""Worker side of the connector: the compressed store and the transfers into/out of the cache.

The store maps a slot (an int from the scheduler, never reused) to one block of one document:
a list of :class:`~polykv_vllm.core.PackedKV`, one per layer, each ``block_size`` tokens of this
rank's kv heads. It lives on the cache's device (``placement="gpu"``) or in pinned host memory
(``placement="cpu"`` on CUDA; on a CPU build both are host memory).

Per step (the :class:`~.metadata.StepPlan` bound by vLLM): :meth:`PolyKVWorker.start_load`
decompresses the planned loads into their paged blocks and drops evicted slots;
:meth:`PolyKVWorker.save` compresses the blocks the step just computed. A slot that is missing
or fails validation is not loaded: its blocks and every later block of that request are reported
through :meth:`PolyKVWorker.take_load_errors`, so vLLM (``kv_load_failure_policy="recompute"``)
recomputes them.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from polykv_vllm.connector.metadata import BlockJob, StepPlan, WorkerReport
from polykv_vllm.connector.paged_io import PagedIO
from polykv_vllm.core import PackedKV

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

    ``io``: the platform's :class:`~.paged_io.PagedIO`, set by :meth:`bind` once vLLM registered
    its caches. ``block_size``: logical tokens per block; ``kv_heads``/``head_dim``: this rank's
    cache shape (used to validate entries); ``pin_host``: keep entries in pinned host memory.
    """

    def __init__(
        self, block_size: int, num_layers: int, kv_heads: int, head_dim: int, pin_host: bool
    ) -> None:
        self.block_size = block_size
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.pin_host = pin_host
        self.io: PagedIO | None = None
        self.store: dict[int, list[PackedKV]] = {}
        self._report = WorkerReport()
        self._load_errors: set[int] = set()
        self.counters = WorkerCounters()
        #: the same, never reset (for tests and benchmarks in the engine's process)
        self.totals = WorkerCounters()

    def bind(self, io: PagedIO) -> None:
        self.io = io

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors in this rank's store (measured)."""
        return sum(p.nbytes for parts in self.store.values() for p in parts)

    # --- per-step hooks --------------------------------------------------------------------

    def start_load(self, plan: StepPlan) -> None:
        """Decompress ``plan.loads`` into the paged cache, then drop ``plan.evictions``."""
        for job in plan.loads:
            self._load(job)
        for slot in plan.evictions:
            self.store.pop(slot, None)

    def save(self, plan: StepPlan) -> None:
        """Compress ``plan.stores`` (blocks computed by this step's forward) into the store."""
        for job in plan.stores:
            self._store(job)

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
        good = 0
        for slot in job.slots:
            if not self._valid(slot):
                break
            good += 1
        if good < len(job.slots):
            bad = job.slots[good]
            logger.warning(
                "polykv: store entry %d (block %d of request %s) is %s; recomputing %d blocks",
                bad,
                good,
                job.req_id,
                "missing" if bad not in self.store else "invalid",
                len(job.slots) - good,
            )
            self.store.pop(bad, None)
            self._report.failed_slots.add(bad)
            self._load_errors.update(job.block_ids[good:])
            self._report.unloaded_tokens[job.req_id] = (len(job.slots) - good) * self.block_size
            self.counters.load_failures += 1
            self.totals.load_failures += 1
        if good == 0:
            return
        start = time.perf_counter()
        parts = [self.store[s] for s in job.slots[:good]]
        per_layer = [PackedKV.cat([p[layer] for p in parts]) for layer in range(self.num_layers)]
        self.io.load(per_layer, job.block_ids[:good])
        _sync(per_layer[0].device)
        seconds = time.perf_counter() - start
        for c in (self.counters, self.totals):
            c.load_seconds.append(seconds)
            c.tokens_decompressed += good * self.block_size

    def _store(self, job: BlockJob) -> None:
        assert self.io is not None, "register_kv_caches must run before the first store"
        start = time.perf_counter()
        per_layer = self.io.store(job.block_ids)
        bs = self.block_size
        for i, slot in enumerate(job.slots):
            parts = [_own(p.slice(i * bs, (i + 1) * bs), self.pin_host) for p in per_layer]
            self.store[slot] = parts
            self._report.stored[slot] = [sum(p.nbytes for p in parts), 1]
        _sync(per_layer[0].device)
        seconds = time.perf_counter() - start
        for c in (self.counters, self.totals):
            c.store_seconds.append(seconds)
            c.tokens_compressed += len(job.slots) * bs

    def _valid(self, slot: int) -> bool:
        parts = self.store.get(slot)
        if parts is None or len(parts) != self.num_layers:
            return False
        for p in parts:
            t, h, d = self.block_size, self.kv_heads, self.head_dim
            if (p.tokens, p.kv_heads, p.head_dim) != (t, h, d):
                return False
            if p.k_codes.shape[:2] != (t, h) or p.v_codes.shape[:2] != (t, h):
                return False
            if p.k_scale.shape != (t, h) or p.v_norm.shape != (t, h):
                return False
            if not (bool(torch.isfinite(p.k_scale).all()) and bool(torch.isfinite(p.v_norm).all())):
                return False
        return True


def _own(packed: PackedKV, pin_host: bool) -> PackedKV:
    """A copy of ``packed`` owning its memory (a slice must not keep its parent alive), moved to
    pinned host memory when ``pin_host``."""

    def own(t: torch.Tensor) -> torch.Tensor:
        if pin_host:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
        return t.clone()

    return dataclasses.replace(
        packed,
        k_codes=own(packed.k_codes),
        k_scale=own(packed.k_scale),
        v_codes=own(packed.v_codes),
        v_norm=own(packed.v_norm),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
