"""Async loads without vLLM: the scheduler side (the load protocol, one load per document,
aborts during a load, failures, a randomized replay of interleavings) and the worker's CPU
path (one background thread, the kernels' torch backend). The CUDA side stream is tested in
``test_connector_cuda.py``."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import pytest
import torch
from scheduler_helpers import BLOCK_BYTES, BS, AsyncEngine, Engine, FakeRequest, doc, make_index

from polykv_vllm.connector.metadata import LoadJob, StepPlan, WorkerReport
from polykv_vllm.connector.scheduler import StoreIndex


def stored(eng: AsyncEngine, prompt: list[int], rid: str = "writer") -> None:
    """A first visit stores ``prompt``; then vLLM's own prefix cache forgets it."""
    eng.add(FakeRequest(rid, prompt))
    eng.drain()
    assert eng.receipts[rid]["tokens_stored"] == len(prompt) // BS * BS
    eng.cached.clear()
    eng.index.take_counters()


def refs(index: StoreIndex) -> int:
    return sum(e.refs for e in index.entries.values())


def test_async_load_is_planned_as_async_and_completes_on_the_report() -> None:
    index = make_index(async_loads=True)
    prompt = doc(1, 4.5)
    eng = AsyncEngine(index)
    stored(eng, prompt)
    eng.add(FakeRequest("a", prompt))
    plan = eng.step(delay=lambda: 2)
    (job,) = plan.loads
    assert job.async_load and len(job.rows) == 4
    assert "a" in eng.loading and refs(index) == 4 and index.loads_in_flight == 1
    eng.step()
    assert refs(index) == 4, "still loading: the entries stay referenced"
    eng.step()  # the load finishes here
    assert refs(index) == 0 and index.loads_in_flight == 0
    eng.drain()
    assert eng.receipts["a"]["tokens_from_store"] == 4 * BS


def test_sync_index_plans_sync_loads_and_never_defers() -> None:
    index = make_index()
    prompt = doc(2, 3.5)
    Engine(index).run(FakeRequest("writer", prompt))
    a, b = FakeRequest("a", prompt), FakeRequest("b", prompt)
    assert index.lookup(a, 0) == 3 * BS
    index.on_alloc(a, list(range(4)), 3 * BS)
    assert index.lookup(b, 0) == 3 * BS, "sync: vLLM caches a's blocks in the same step"
    (job,) = index.plan_step([]).loads
    assert not job.async_load


def test_second_agent_waits_for_the_first_load_then_hits_the_prefix_cache() -> None:
    index = make_index(async_loads=True)
    prompt = doc(3, 5)
    eng = AsyncEngine(index)
    stored(eng, prompt[: 4 * BS])
    agents = [FakeRequest(f"agent{i}", prompt[: 4 * BS] + [i + 1] * 7) for i in range(4)]
    for a in agents:
        eng.add(a)
    plan = eng.step(delay=lambda: 3)
    assert len(plan.loads) == 1 and len(eng.waiting) == 3
    for _ in range(2):
        eng.step()
        assert eng.loads_started == 1
    assert index.take_counters().loads_deduplicated == 3, "counted once per waiting request"
    eng.drain()
    assert eng.loads_started == 1, "one load for the document"
    from_store = sorted(r["tokens_from_store"] for r in eng.receipts.values() if r)
    assert from_store[-4:] == [0, 0, 0, 4 * BS]
    assert index.take_counters().loads_deduplicated == 0
    assert refs(index) == 0


def test_a_longer_prompt_waits_then_loads_only_what_the_first_load_did_not() -> None:
    index = make_index(async_loads=True)
    long_doc = doc(4, 6.5)
    eng = AsyncEngine(index)
    stored(eng, long_doc)
    eng.add(FakeRequest("short", long_doc[: 3 * BS + 5]))
    eng.step(delay=lambda: 1)
    eng.add(FakeRequest("long", long_doc))
    plan = eng.step()
    assert plan.loads == [] and eng.waiting[0].request_id == "long"
    eng.drain()
    assert eng.receipts["short"]["tokens_from_store"] == 3 * BS
    assert eng.receipts["long"]["tokens_from_store"] == 3 * BS, "blocks 3..5 only"
    assert eng.loads_started == 2


def test_abort_during_an_async_load_releases_everything_once_the_load_is_done() -> None:
    index = make_index(budget_blocks=6, async_loads=True)
    prompt = doc(5, 4.5)
    eng = AsyncEngine(index)
    stored(eng, prompt)
    eng.add(FakeRequest("a", prompt))
    eng.step(delay=lambda: 2)
    eng.abort("a")
    assert eng.receipts["a"]["tokens_from_store"] == 4 * BS
    assert "a" in eng.blocks, "vLLM keeps an aborted loading request's blocks"
    assert refs(index) == 4, "its rows are still being read: not evictable"
    eng.add(FakeRequest("other", doc(6, 4.5)))  # needs 4 rows: only 2 are free
    eng.step()
    assert eng.receipts["other"]["tokens_stored"] == 2 * BS, "the loading rows were not evicted"
    eng.step()  # the load finishes: refs and blocks released
    assert refs(index) == 0 and index.loads_in_flight == 0 and "a" not in eng.blocks
    eng.add(FakeRequest("again", doc(7, 4.5)))
    eng.drain()
    assert eng.receipts["again"]["tokens_stored"] == 4 * BS, "evictable again"


def test_abort_of_a_deferred_request_forgets_it() -> None:
    index = make_index(async_loads=True)
    prompt = doc(8, 3.5)
    eng = AsyncEngine(index)
    stored(eng, prompt)
    eng.add(FakeRequest("a", prompt))
    eng.add(FakeRequest("b", prompt))
    eng.step(delay=lambda: 2)
    eng.abort("b")
    eng.drain()
    assert eng.loads_started == 1 and refs(index) == 0
    assert index.take_counters().loads_deduplicated == 1


def test_failed_async_load_drops_the_entry_and_the_waiting_agent_recomputes_it() -> None:
    index = make_index(async_loads=True)
    prompt = doc(9, 4.5)
    eng = AsyncEngine(index)
    stored(eng, prompt)
    eng.add(FakeRequest("a", prompt))
    eng.step(delay=lambda: 1, loaded=lambda job: 2)  # block 2 found missing
    eng.add(FakeRequest("b", prompt))
    eng.step()  # the load finishes: b waited for it
    assert index.lookup(FakeRequest("x", prompt), 0) == 2 * BS, "block 2 dropped at once"
    assert refs(index) == 0
    eng.drain()
    assert eng.receipts["a"]["tokens_from_store"] == 2 * BS, "only the blocks that loaded"
    assert eng.receipts["b"]["tokens_from_store"] == 0, "b found blocks 0-1 in vLLM's cache"
    assert eng.loads_started == 1
    assert index.lookup(FakeRequest("x", prompt), 0) == 4 * BS, "stored again by the recompute"


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_async_load_completes_only_when_every_rank_reported(world_size: int) -> None:
    index = make_index(async_loads=True, world_size=world_size)
    prompt = doc(10, 3.5)
    eng = AsyncEngine(index, world_size=world_size)
    stored(eng, prompt)
    eng.add(FakeRequest("a", prompt))
    eng.step()  # rank 0 finishes in the step of the plan, one more rank each step after
    for _ in range(world_size - 1):
        assert refs(index) == 3 and index.loads_in_flight == 1
        assert index.lookup(FakeRequest("b", prompt), 0) is None
        eng.step()
    assert refs(index) == 0 and index.loads_in_flight == 0


def test_report_of_a_load_without_its_request_still_releases_it() -> None:
    """A request finished while loading: the worker's report arrives after ``finish``."""
    index = make_index(async_loads=True)
    prompt = doc(11, 2.5)
    stored(AsyncEngine(index), prompt)
    req = FakeRequest("a", prompt)
    n = index.lookup(req, 0)
    assert n == 2 * BS
    index.on_alloc(req, [0, 1, 2], n)
    (job,) = index.plan_step([]).loads
    index.finish(req)
    report = WorkerReport(loads={job.load_id: [1, 2]})
    index.on_report(report)
    assert refs(index) == 0 and index.lookup(FakeRequest("b", prompt), 0) == 2 * BS


@pytest.mark.parametrize("seed", range(12))
def test_random_interleavings_keep_the_budget_and_return_every_ref(seed: int) -> None:
    """Lookups, allocations, async completions after random delays and rank orders, partial
    failures, aborts at any time and evictions (a store of 10 blocks under ~30 blocks of
    documents): the fake workers never hold more than the budget, never read a freed row or
    store into a read one, no two unfinished loads bring in the same block, and once everything
    finished no reference is left."""
    rng = random.Random(seed)
    world_size = rng.choice([1, 2])
    index = make_index(budget_blocks=10, world_size=world_size, async_loads=True)
    eng = AsyncEngine(index, world_size=world_size)
    docs = [doc(100 + i, rng.choice([1.5, 2.5, 3.5, 4.5])) for i in range(8)]
    n = 0
    for _ in range(120):
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            d = rng.choice(docs)
            tail = [rng.randrange(50000) for _ in range(rng.randrange(1, BS))]
            eng.add(FakeRequest(f"r{n}", d[: len(d) // BS * BS] + tail))
            n += 1
        if rng.random() < 0.2:
            eng.cached.clear()  # vLLM's own prefix cache evicted everything
        live = [r.request_id for r in eng.waiting] + list(eng.loading)
        if live and rng.random() < 0.15:
            eng.abort(rng.choice(live))
        eng.step(
            delay=lambda: rng.choice([0, 0, 1, 2, 4]),
            loaded=lambda job: (
                len(job.rows) if rng.random() < 0.9 else rng.randrange(len(job.rows))
            ),
        )
        assert index.used_bytes <= index.budget_bytes
        assert refs(index) <= sum(len(load.job.rows) for load in eng.in_flight)
    eng.drain()
    assert refs(index) == 0 and index.loads_in_flight == 0
    assert not eng.blocks, "vLLM freed every request's blocks"
    assert len(eng.receipts) == n
    assert eng.loads_started > 5, "the replay exercised loads"
    assert index.used_bytes == len(eng.worker_rows) * BLOCK_BYTES


# --- the worker's CPU path: one background thread (the kernels' torch backend, no vLLM) -----------


def _thread_worker() -> tuple[Any, list[torch.Tensor], Any]:
    from polykv_vllm.connector.metadata import BlockJob
    from polykv_vllm.connector.paged_io import FlashPagedIO
    from polykv_vllm.connector.slab import BlockSlab
    from polykv_vllm.connector.worker import PolyKVWorker
    from polykv_vllm.core import KVCodec

    layers, heads, dim, bs, blocks = 3, 2, 64, 16, 12
    codec = KVCodec("polykv", num_layers=layers, head_dim=dim)
    g = torch.Generator().manual_seed(11)
    caches = [torch.randn(blocks, heads, bs, 2 * dim, generator=g) for _ in range(layers)]
    io = FlashPagedIO(codec, caches, list(range(layers)), dim, bs)
    slab = BlockSlab(codec, list(range(layers)), 6, bs, heads, dim, torch.device("cpu"), False)
    worker = PolyKVWorker(block_size=bs)
    worker.bind(io, slab)
    worker.save(StepPlan(stores=[BlockJob("w", (0, 1, 2), (1, 2, 3))]))
    assert worker.take_report() is not None
    return worker, caches, slab


def _wait_finished(worker: Any) -> set[str]:
    for _ in range(500):
        done: set[str] = worker.get_finished()
        if done:
            return done
        time.sleep(0.01)
    raise AssertionError("the async load never finished")


def test_thread_load_equals_the_sync_load_and_is_reported_once() -> None:
    worker, caches, _ = _thread_worker()
    worker.start_load(StepPlan(loads=[LoadJob("sync", (0, 1, 2), (4, 5, 6), load_id=0)]))
    assert worker.take_report().loads == {0: [1, 3]}
    gate = threading.Event()
    real = worker.io.load
    worker.io.load = lambda *a: (gate.wait(10), real(*a))
    job = LoadJob("async", (0, 1, 2), (7, 8, 9), load_id=1, async_load=True)
    worker.start_load(StepPlan(loads=[job]))
    assert worker.get_finished() == set() and worker.take_report() is None
    assert worker.loads_in_flight == 1
    gate.set()
    assert _wait_finished(worker) == {"async"}
    assert worker.get_finished() == set(), "reported once"
    assert worker.take_report().loads == {1: [1, 3]} and worker.take_load_errors() == set()
    for cache in caches:
        assert torch.equal(cache[[7, 8, 9]], cache[[4, 5, 6]]), "async == sync, bit for bit"
    assert worker.totals.tokens_decompressed == 6 * 16
    worker.shutdown()


def test_thread_load_writes_only_valid_blocks_and_reports_the_rest() -> None:
    worker, caches, slab = _thread_worker()
    slab.layers[1].v_norm[1, 0] = float("nan")  # row 1: the job's second block
    before = [c[[10, 11]].clone() for c in caches]
    worker.start_load(
        StepPlan(loads=[LoadJob("bad", (0, 1, 2), (9, 10, 11), load_id=3, async_load=True)])
    )
    assert _wait_finished(worker) == {"bad"}
    report = worker.take_report()
    assert report.loads == {3: [1, 1]} and report.failed_rows == {1}
    assert worker.take_load_errors() == {10, 11}
    assert all(torch.equal(c[[10, 11]], b) for c, b in zip(caches, before, strict=True))


def test_thread_load_that_raises_is_recomputed_without_dropping_the_entry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker, _, _ = _thread_worker()

    def broken(*args: Any) -> None:
        raise RuntimeError("simulated kernel failure")

    worker.io.load = broken
    worker.start_load(StepPlan(loads=[LoadJob("err", (0, 1), (7, 8), load_id=4, async_load=True)]))
    with caplog.at_level(logging.ERROR, logger="polykv_vllm"):
        assert _wait_finished(worker) == {"err"}
    assert any("async load of request err failed" in r.getMessage() for r in caplog.records)
    report = worker.take_report()
    assert report.loads == {4: [1, 0]} and not report.failed_rows, "the entry is not blamed"
    assert worker.take_load_errors() == {7, 8}


class _GatedTier:
    """A tier in memory whose reads wait for ``gate`` (a slow disk or network)."""

    def __new__(cls) -> Any:
        from polykv_vllm.connector.tiers import Tier

        class Gated(Tier):
            name = "disk"

            def __init__(self) -> None:
                super().__init__()
                self.data: dict[str, bytes] = {}
                self.gate = threading.Event()
                self.reader: str | None = None

            def put(self, key: str, blob: bytes) -> bool:
                self.data[key] = blob
                return True

            def get(self, key: str) -> bytes | None:
                self.reader = threading.current_thread().name
                assert self.gate.wait(10), "the test never opened the gate"
                return self.data.get(key)

            def contains_many(self, keys: Any) -> list[bool]:
                return [k in self.data for k in keys]

            def delete(self, key: str) -> None:
                self.data.pop(key, None)

        return Gated()


def test_tier_fetch_reads_off_the_step_then_loads_and_reports_the_missing_block() -> None:
    from polykv_vllm.connector.metadata import FetchJob
    from polykv_vllm.connector.tiers import chain_keys, fingerprint
    from polykv_vllm.connector.tiers.worker_io import TierIO

    worker, caches, slab = _thread_worker()
    worker.start_load(StepPlan(loads=[LoadJob("sync", (0, 1, 2), (4, 5, 10), load_id=0)]))
    assert worker.take_report().loads == {0: [1, 3]}
    fp = fingerprint(model="async-fetch")
    keys = chain_keys(fp, None, list(range(3 * BS)), BS)  # BS is the helpers' block size: 16
    tier = _GatedTier()
    worker.tiers = TierIO([tier], fp, rank=0, store=slab)
    worker.tiers.put_rows(slab, [(1, keys[0]), (2, keys[1])])  # rows 1-2 below; keys[2] nowhere
    assert worker.tiers.flush()
    slab.mark_filled([4])  # a stale block in a row being fetched: never loaded
    job = LoadJob("tier", (0, 3, 4, 5), (6, 7, 8, 9), load_id=5, async_load=True)
    fetch = FetchJob(load_id=5, first=1, keys=tuple(keys))
    t0 = time.perf_counter()
    worker.start_load(StepPlan(loads=[job], fetches={5: fetch}))
    assert time.perf_counter() - t0 < 1, "the step does not wait for the tier"
    for _ in range(3):  # steps go on while the read waits
        assert worker.get_finished() == set() and worker.take_report() is None
    assert worker.loads_in_flight == 1 and 4 not in slab
    tier.gate.set()
    assert _wait_finished(worker) == {"tier"}
    assert tier.reader is not None and tier.reader.startswith("polykv-fetch")
    report = worker.take_report()
    assert set(report.stored) == {3, 4} and report.failed_rows == {5}
    assert report.loads == {5: [1, 3]} and worker.take_load_errors() == {9}
    for cache in caches:  # row 0 from memory, rows 3-4 from the tier (rows 1-2's blocks)
        assert torch.equal(cache[[6, 7, 8]], cache[[4, 5, 10]]), "as loaded from rows 0-2"
    assert 3 in slab and 4 in slab and 5 not in slab
    worker.shutdown()
    worker.tiers.close()
