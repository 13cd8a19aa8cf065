"""A fake engine driving the scheduler-side index like vLLM's scheduler, with a fake worker
(pure Python: no vLLM, no tensors). Shared by the scheduler and tenancy tests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from polykv_vllm.connector.metadata import StepPlan, WorkerReport
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
