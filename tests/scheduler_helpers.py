"""A fake engine driving the scheduler-side index like vLLM's scheduler, with a fake worker
(pure Python: no vLLM, no tensors). Shared by the scheduler and tenancy tests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from polykv_vllm.connector.metadata import LoadJob, StepPlan, WorkerReport
from polykv_vllm.connector.scheduler import PinPolicy, ScheduledReq, StoreGeometry, StoreIndex

BS = 16
BLOCK_BYTES = 1000
RAW_BYTES = 5000


def chain(tokens: list[int], salt: str | None = None) -> list[bytes]:
    """Chained block hashes of full blocks, like vLLM's (salt in the first block)."""
    out: list[bytes] = []
    prev = b""
    for i in range(len(tokens) // BS):
        extra = f"salt={salt}" if (i == 0 and salt) else ""
        prev = hashlib.sha256(prev + repr((tokens[i * BS : (i + 1) * BS], extra)).encode()).digest()
        out.append(prev)
    return out


@dataclass
class FakeRequest:
    request_id: str
    prompt: list[int]
    kv_transfer_params: dict[str, Any] | None = None
    salt: str | None = None
    block_hashes: list[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.block_hashes = chain(self.prompt, self.salt)

    @property
    def cache_salt(self) -> str | None:
        return self.salt

    @property
    def num_tokens(self) -> int:
        return len(self.prompt)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt)


def doc(seed: int, blocks: float) -> list[int]:
    n = int(blocks * BS)
    return [(seed * 7919 + i * 31) % 50000 for i in range(n)]


def make_index(
    budget_blocks: int = 100,
    world_size: int = 1,
    pin: str = "any",
    quota_blocks: float | None = None,
    token: str | None = None,
    **kw: Any,
) -> StoreIndex:
    """An index of ``budget_blocks`` blocks; pins by ``pin`` mode with a per-tenant quota of
    ``quota_blocks`` (None: the server default, half the budget)."""
    geo = StoreGeometry(
        block_size=BS, block_bytes=BLOCK_BYTES, block_raw_bytes=RAW_BYTES, world_size=world_size
    )
    kw.setdefault("store_all", True)
    kw.setdefault("min_store_tokens", BS)
    budget = budget_blocks * BLOCK_BYTES
    quota = budget // 2 if quota_blocks is None else int(quota_blocks * BLOCK_BYTES)
    pins = PinPolicy(mode=pin, quota_bytes=quota, token=token)  # type: ignore[arg-type]
    return StoreIndex(geo, budget_bytes=budget, pins=pins, **kw)


class Engine:
    """Drives the index like vLLM's scheduler: admit, plan, run (the worker), report."""

    def __init__(self, index: StoreIndex, world_size: int = 1) -> None:
        self.index = index
        self.world_size = world_size
        self.next_block = 0
        self.worker_rows: set[int] = set()  # rows holding a block on the (fake) worker
        self.loaded_rows: list[int] = []
        self.freed_rows: list[int] = []

    def admit(self, req: FakeRequest, local_hit: int = 0) -> int:
        """Lookup + alloc; returns the external tokens granted."""
        n = self.index.lookup(req, local_hit)
        blocks = list(range(self.next_block, self.next_block + -(-req.num_tokens // BS)))
        self.next_block += len(blocks)
        self.index.on_alloc(req, blocks, n)
        self._blocks = getattr(self, "_blocks", {})
        self._blocks[req.request_id] = (blocks, local_hit + n)
        return n

    def step(self, reqs: list[FakeRequest], confirm: bool = True) -> StepPlan:
        sched = []
        for r in reqs:
            blocks, computed = self._blocks[r.request_id]
            sched.append(
                ScheduledReq(r.request_id, tuple(blocks), replace=True, computed_after=r.num_tokens)
            )
        plan = self.index.plan_step(sched)
        self.apply(plan, confirm)
        return plan

    def apply(self, plan: StepPlan, confirm: bool = True) -> None:
        """What a worker does with ``plan`` (loads, freed rows, stores), then its report."""
        report = WorkerReport()
        for job in plan.loads:
            assert set(job.rows) <= self.worker_rows, "load from a row that holds no block"
            self.loaded_rows.extend(job.rows)
            report.loads[job.load_id] = [1, len(job.rows)]
        assert len(set(plan.freed_rows)) == len(plan.freed_rows), "a row freed twice"
        self.freed_rows.extend(plan.freed_rows)
        self.worker_rows -= set(plan.freed_rows)
        for job in plan.stores:
            for row in job.rows:
                assert row not in self.worker_rows, "store into a row that holds a block"
                self.worker_rows.add(row)
                report.stored[row] = [BLOCK_BYTES // self.world_size, 1]
        if confirm:
            merged = report
            for _ in range(self.world_size - 1):
                merged = merged.merge(report)
            self.index.on_report(merged)

    def run(self, req: FakeRequest, local_hit: int = 0) -> dict[str, Any]:
        n = self.admit(req, local_hit)
        self.step([req])
        params = self.index.finish(req)
        assert params["polykv"]["tokens_from_store"] == n
        return params


# --- a fake vLLM scheduler with async loads -------------------------------------------------------


@dataclass
class _Loading:
    job: LoadJob
    start: int  # index of the job's first block in its request's blocks
    due: int  # the step its first rank finishes (one more rank each step after)
    good: int  # blocks it loads (the rest are found missing)
    ranks_left: int


class AsyncEngine:
    """Drives an index built with ``async_loads=True`` like vLLM's scheduler with an async
    connector, and checks the worker-side invariants as it goes.

    A request whose lookup returns n > 0 waits (WAITING_FOR_REMOTE_KVS) until the fake workers
    finished its load (``delay`` steps later, one rank per step); vLLM then caches the loaded
    blocks (``cached``: its local prefix cache, by block hash) and schedules the request without
    another lookup (or, when nothing at all was computed, frees its blocks and starts over).
    A None lookup is asked again next step. A scheduled request computes its whole
    prompt in one step and finishes. :meth:`abort` finishes a request at once; vLLM keeps the
    blocks of an aborted loading request until its load is reported (``blocks``)."""

    def __init__(self, index: StoreIndex, world_size: int = 1) -> None:
        assert index.async_loads
        self.index = index
        self.world_size = world_size
        self.step_no = 0
        self.next_block = 0
        self.cached: set[bytes] = set()
        self.waiting: list[FakeRequest] = []
        self.resumed: list[FakeRequest] = []  # loads done: scheduled next step, no lookup
        self.loading: dict[str, FakeRequest] = {}
        self.aborted_loading: set[str] = set()
        self.blocks: dict[str, list[int]] = {}  # blocks vLLM holds per request
        self.worker_rows: set[int] = set()
        self.in_flight: list[_Loading] = []
        self.loads_started = 0
        self.receipts: dict[str, dict[str, Any]] = {}

    def add(self, req: FakeRequest) -> None:
        self.waiting.append(req)

    def local_hit(self, req: FakeRequest) -> int:
        n, limit = 0, min((req.num_tokens - 1) // BS, len(req.block_hashes))
        while n < limit and req.block_hashes[n] in self.cached:
            n += 1
        return n * BS

    def abort(self, rid: str) -> None:
        """vLLM's finish_requests: ``request_finished`` now; blocks freed now unless loading."""
        for queue in (self.waiting, self.resumed):
            for req in list(queue):
                if req.request_id == rid:
                    queue.remove(req)
                    self._finish(req)
                    self.blocks.pop(rid, None)
        if rid in self.loading:
            self._finish(self.loading.pop(rid))
            self.aborted_loading.add(rid)

    def step(
        self,
        delay: Callable[[], int] = lambda: 0,
        loaded: Callable[[LoadJob], int] = lambda job: len(job.rows),
    ) -> StepPlan:
        """One engine step. ``delay()``: steps until a new load's first rank finishes;
        ``loaded(job)``: how many of its blocks load (the first of the rest is missing)."""
        self.step_no += 1
        computing: list[FakeRequest] = []
        for req in self.resumed:
            self.index.on_alloc(req, self.blocks[req.request_id], 0)
            computing.append(req)
        self.resumed = []
        for req in list(self.waiting):
            n = self.index.lookup(req, self.local_hit(req))
            if n is None:
                continue  # ask again later
            self.waiting.remove(req)
            rid = req.request_id
            if rid not in self.blocks:
                count = -(-req.num_tokens // BS)
                self.blocks[rid] = list(range(self.next_block, self.next_block + count))
                self.next_block += count
            self.index.on_alloc(req, self.blocks[rid], n)
            if n:
                self.loading[rid] = req
            else:
                computing.append(req)
        scheduled = [
            ScheduledReq(r.request_id, tuple(self.blocks[r.request_id]), True, r.num_tokens)
            for r in computing
        ]
        plan = self.index.plan_step(scheduled)
        report = self._work(plan, delay, loaded)
        finished_recving = self._finish_loads(report)
        self.index.on_report(report)
        for rid, computed in finished_recving.items():
            if rid in self.aborted_loading:
                self.aborted_loading.discard(rid)
                del self.blocks[rid]  # vLLM frees an aborted request's blocks only now
            elif computed:
                self.resumed.append(self.loading.pop(rid))
            else:  # nothing valid: vLLM frees the blocks, the request starts over
                del self.blocks[rid]
                self.waiting.insert(0, self.loading.pop(rid))
        for req in computing:  # prefilled: its prompt blocks are cached; done
            self.cached.update(req.block_hashes[: req.num_prompt_tokens // BS])
            del self.blocks[req.request_id]
            self._finish(req)
        return plan

    def drain(self, limit: int = 100) -> None:
        """Step until nothing is waiting or loading."""
        for _ in range(limit):
            if not (self.waiting or self.resumed or self.loading or self.in_flight):
                return
            self.step()
        raise AssertionError("requests still waiting after many steps")

    def _finish(self, req: FakeRequest) -> None:
        self.receipts[req.request_id] = self.index.finish(req)["polykv"]

    def _work(
        self, plan: StepPlan, delay: Callable[[], int], loaded: Callable[[LoadJob], int]
    ) -> WorkerReport:
        reading = {r for load in self.in_flight for r in load.job.rows}
        report = WorkerReport()
        for job in plan.loads:
            assert job.async_load, "an async index plans async loads"
            assert set(job.rows) <= self.worker_rows, "load from a row that holds no block"
            assert not reading & set(job.rows), "two unfinished loads of one block"
            reading |= set(job.rows)
            start = self.blocks[job.req_id].index(job.block_ids[0])
            due = self.step_no + delay()
            self.in_flight.append(_Loading(job, start, due, loaded(job), self.world_size))
            self.loads_started += 1
        assert not reading & set(plan.freed_rows), "a row freed under an unfinished load"
        assert len(set(plan.freed_rows)) == len(plan.freed_rows), "a row freed twice"
        self.worker_rows -= set(plan.freed_rows)
        for job in plan.stores:
            for row in job.rows:
                assert row not in self.worker_rows, "store into a row that holds a block"
                self.worker_rows.add(row)
                report.stored[row] = [BLOCK_BYTES, self.world_size]
        budget = self.index.budget_bytes
        assert self.index.used_bytes <= budget, "index over its budget"
        assert len(self.worker_rows) * BLOCK_BYTES <= budget, "workers hold more than the budget"
        return report

    def _finish_loads(self, report: WorkerReport) -> dict[str, int]:
        """Ranks finishing a load this step report it; returns vLLM's ``finished_recving``
        (the loads every rank finished), each with the blocks its request now has computed."""
        finished: dict[str, int] = {}
        pending = []
        for load in self.in_flight:
            if load.due > self.step_no:
                pending.append(load)
                continue
            job = load.job
            report.loads[job.load_id] = [1, load.good]
            if load.good < len(job.rows):
                report.failed_rows.add(job.rows[load.good])
            load.ranks_left -= 1
            if load.ranks_left:
                pending.append(load)
                continue
            finished[job.req_id] = load.start + load.good
            if job.req_id in self.loading:  # vLLM caches the blocks that loaded
                req = self.loading[job.req_id]
                self.cached.update(req.block_hashes[load.start : load.start + load.good])
        self.in_flight = pending
        return finished
