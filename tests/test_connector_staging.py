"""Staged stores with deferred confirmation, without CUDA: the worker's staged path runs on CPU
tensors with fences the test completes by hand (on CUDA they are side-stream events:
``tests/test_connector_cuda.py``)."""

from __future__ import annotations

import pytest
import torch
from scheduler_helpers import BS, FakeRequest, doc, make_index
from slab_helpers import gather

from polykv_vllm.connector.metadata import BlockJob, StepPlan
from polykv_vllm.connector.paged_io import FlashPagedIO
from polykv_vllm.connector.scheduler import ScheduledReq
from polykv_vllm.connector.slab import BlockSlab
from polykv_vllm.connector.staging import StagedStores
from polykv_vllm.connector.worker import PolyKVWorker
from polykv_vllm.core import KVCodec

LAYERS, HEADS, DIM, BLOCKS = 2, 2, 64, 12


class FakeFence:
    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True
        self.done = True


def test_ring_confirms_in_order_and_reuses_a_slot_only_when_done() -> None:
    ring = StagedStores(2)
    confirmed: list[tuple[int, ...]] = []
    a, b = ring.acquire(), None
    assert a is not None
    fa = FakeFence()
    ring.add((1, 2), a, fa)
    b = ring.acquire()
    assert b is not None and b is not a
    fb = FakeFence()
    ring.add((3,), b, fb)
    assert ring.acquire() is None, "both slots in flight"
    with pytest.raises(AssertionError):
        ring.add((4,), a, FakeFence())
    fb.done = True
    assert ring.poll(confirmed.append) == 0 and confirmed == [], "the older store is not done"
    fa.done = True
    assert ring.poll(confirmed.append) == 2 and confirmed == [(1, 2), (3,)]
    assert len(ring) == 0 and ring.acquire() is a
    fc = FakeFence()
    ring.add((5,), a, fc)
    ring.flush(confirmed.append)
    assert fc.waited and confirmed[-1] == (5,)


def make_worker(slots: int = 2, capacity: int = 8) -> tuple[PolyKVWorker, list, list[FakeFence]]:
    codec = KVCodec("polykv", num_layers=LAYERS, head_dim=DIM)
    g = torch.Generator().manual_seed(3)
    caches = [torch.randn(BLOCKS, HEADS, BS, 2 * DIM, generator=g) for _ in range(LAYERS)]
    io = FlashPagedIO(codec, caches, list(range(LAYERS)), DIM, BS)
    slab = BlockSlab(
        codec, list(range(LAYERS)), capacity, BS, HEADS, DIM, torch.device("cpu"), False
    )
    worker = PolyKVWorker(block_size=BS, staging_slots=slots)
    worker.bind(io, slab)
    worker.stage_stores = True
    fences: list[FakeFence] = []

    def fence() -> FakeFence:
        fences.append(FakeFence())
        return fences[-1]

    worker.host_fence = fence
    return worker, caches, fences


def expected(worker: PolyKVWorker, block_ids: list[int]) -> list:
    assert worker.io is not None
    return worker.io.store(block_ids)


def test_worker_confirms_a_staged_store_only_after_its_fence() -> None:
    worker, _, fences = make_worker()
    worker.save(StepPlan(stores=[BlockJob("a", (4, 5, 6), (0, 1, 2))]))
    assert worker.take_report() is None, "copies in flight: nothing confirmed"
    assert worker.stores_in_flight == 1 and 4 not in worker.store
    fences[0].done = True
    report = worker.take_report()
    assert report is not None and sorted(report.stored) == [4, 5, 6]
    assert worker.stores_in_flight == 0 and {4, 5, 6} <= set(worker.store._filled)
    got, want = gather(worker.store, [4, 5, 6]), expected(worker, [0, 1, 2])
    for g, w in zip(got, want, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(g.tensors(), w.tensors(), strict=True))


def test_busy_slots_fall_back_to_waiting_and_large_stores_go_in_pieces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(PolyKVWorker, "STAGING_TOKENS", 2 * BS)
    worker, _, fences = make_worker(slots=2)
    # 5 blocks in pieces of 2: 3 staged copies through 2 slots -> the third waits for the first
    worker.save(StepPlan(stores=[BlockJob("a", (0, 1, 2, 3, 4), (5, 6, 7, 8, 9))]))
    assert len(fences) == 3 and fences[0].waited and not fences[1].waited
    assert worker.totals.store_stalls == 1 and worker.stores_in_flight == 2
    report = worker.take_report()
    assert report is not None and sorted(report.stored) == [0, 1], "the piece waited for"
    worker.flush_timers()  # also waits for the stores in flight
    report = worker.take_report()
    assert report is not None and sorted(report.stored) == [2, 3, 4]
    got, want = gather(worker.store, [0, 1, 2, 3, 4]), expected(worker, [5, 6, 7, 8, 9])
    for g, w in zip(got, want, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(g.tensors(), w.tensors(), strict=True))
    assert len(worker.totals.store_seconds) == 3, "one timed store per staged piece"


def test_a_steps_stores_share_slots_in_store_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three requests' stores in one step (4 + 1 + 2 blocks) are packed into pieces of up to 4
    blocks across requests: 2 slots, no stall, and confirmed in store order."""
    monkeypatch.setattr(PolyKVWorker, "STAGING_TOKENS", 4 * BS)
    worker, _, fences = make_worker(slots=2)
    jobs = [
        BlockJob("a", (0, 1, 2, 3), (5, 6, 7, 8)),
        BlockJob("b", (4,), (9,)),
        BlockJob("c", (6, 7), (10, 11)),
    ]
    worker.save(StepPlan(stores=jobs))
    assert len(fences) == 2 and worker.totals.store_stalls == 0
    fences[1].done = True
    assert worker.take_report() is None, "the older piece is still in flight"
    fences[0].done = True
    report = worker.take_report()
    assert report is not None and list(report.stored) == [0, 1, 2, 3, 4, 6, 7]
    got, want = (
        gather(worker.store, [0, 1, 2, 3, 4, 6, 7]),
        expected(worker, [5, 6, 7, 8, 9, 10, 11]),
    )
    for g, w in zip(got, want, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(g.tensors(), w.tensors(), strict=True))


def test_entries_become_ready_only_when_the_worker_confirms() -> None:
    """Index and worker together: until the staged copy's fence passes, the stored document is
    pending (a second request finds nothing); one step after, it is served."""
    index = make_index(budget_blocks=8)
    worker, _, fences = make_worker(capacity=8)
    prompt = doc(7, 3) + [1, 2, 3]
    first, second = FakeRequest("a", prompt), FakeRequest("b", prompt)
    index.lookup(first, 0)
    index.on_alloc(first, [0, 1, 2, 3], 0)
    plan = index.plan_step([ScheduledReq("a", (0, 1, 2, 3), True, first.num_tokens)])
    worker.start_load(plan)
    worker.save(plan)
    assert worker.take_report() is None
    index.finish(first)
    assert index.lookup(second, 0) == 0, "pending until confirmed"
    fences[0].done = True
    report = worker.take_report()  # the next step's hook
    assert report is not None
    index.on_report(report)
    assert index.lookup(second, 0) == 3 * BS
