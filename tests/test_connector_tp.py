"""Tensor parallelism without an engine: one scheduler index, one real worker per rank (each
holding its slice of the kv heads of one cache), and vLLM's own ``KVOutputAggregator`` merging
the ranks' outputs as the executor does (docs/CONNECTOR.md, "Tensor parallelism").

vLLM refuses ``--tensor-parallel-size 2`` for the embedded SmolLM2 (9 attention heads); the
engine-level test at the TP the model allows (3) is in ``tests/test_connector_tp_vllm.py``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from scheduler_helpers import BS, FakeRequest, doc

pytest.importorskip("vllm")

from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402

from polykv_vllm.connector.connector import PolyKVWorkerMetadata  # noqa: E402
from polykv_vllm.connector.metadata import WorkerReport  # noqa: E402
from polykv_vllm.connector.paged_io import FlashPagedIO  # noqa: E402
from polykv_vllm.connector.scheduler import ScheduledReq, StoreIndex, store_rows  # noqa: E402
from polykv_vllm.connector.slab import BlockSlab  # noqa: E402
from polykv_vllm.connector.spec import ModelFacts, check_parallelism, store_geometry  # noqa: E402
from polykv_vllm.connector.worker import PolyKVWorker  # noqa: E402
from polykv_vllm.core import KVCodec  # noqa: E402

LAYERS, HEADS, DIM, BLOCKS = 3, 4, 64, 24  # HEADS kv heads in all, split over the ranks


class Gate:
    """A fence (``query``/``synchronize``) that passes once opened: a rank's late copy."""

    def __init__(self) -> None:
        self.open = False

    def query(self) -> bool:
        return self.open

    def synchronize(self) -> None:
        assert self.open, "the test would hang: open the gate first"


class Ranks:
    """``world`` workers over one seeded cache (rank r holds kv heads ``r*h .. r*h+h-1``) and
    the scheduler index; :meth:`step` runs one engine step the way vLLM does: plan, every rank's
    hooks, the executor's aggregation of the ranks' outputs, the scheduler's update."""

    def __init__(self, world: int, budget_blocks: int = 8, async_loads: bool = False) -> None:
        codec = KVCodec("polykv", num_layers=LAYERS, head_dim=DIM)
        h = HEADS // world
        facts = ModelFacts(LAYERS, LAYERS, h, DIM, BS, torch.float32, world_size=world)
        self.geometry = store_geometry(codec, facts)
        budget = budget_blocks * self.geometry.block_bytes
        self.index = StoreIndex(
            self.geometry,
            budget_bytes=budget,
            store_all=True,
            min_store_tokens=BS,
            async_loads=async_loads,
        )
        g = torch.Generator().manual_seed(5)
        full = [torch.randn(BLOCKS, HEADS, BS, 2 * DIM, generator=g) for _ in range(LAYERS)]
        self.caches = [[c[:, r * h : (r + 1) * h].clone() for c in full] for r in range(world)]
        self.workers = []
        for rank, caches in enumerate(self.caches):
            worker = PolyKVWorker(block_size=BS)
            rows = store_rows(budget, self.geometry.block_bytes)  # both sides' one rule
            slab = BlockSlab(codec, range(LAYERS), rows, BS, h, DIM, torch.device("cpu"), False)
            worker.bind(FlashPagedIO(codec, caches, list(range(LAYERS)), DIM, BS), slab)
            worker.rank = rank
            self.workers.append(worker)
        self.aggregator = KVOutputAggregator(world)
        self.rank_bytes: dict[int, int] = {}
        self.finished: set[str] = set()

    def admit(self, req: FakeRequest, block_ids: list[int]) -> int | None:
        n = self.index.lookup(req, 0)
        if n is not None:
            self.index.on_alloc(req, block_ids, n)
        return n

    def step(self, scheduled: list[tuple[FakeRequest, list[int]]] = ()) -> KVConnectorOutput:  # type: ignore[assignment]
        plan = self.index.plan_step(
            ScheduledReq(r.request_id, tuple(b), replace=True, computed_after=r.num_tokens)
            for r, b in scheduled
        )
        outputs: list[ModelRunnerOutput | None] = []
        for worker in self.workers:  # the hooks of one step, in vLLM's order
            worker.start_load(plan)
            worker.save(plan)
            finished = worker.get_finished()
            errors = worker.take_load_errors()
            report = worker.take_report()
            out = KVConnectorOutput(
                finished_recving=finished or None,
                kv_connector_worker_meta=None if report is None else PolyKVWorkerMetadata(report),
                invalid_block_ids=errors,
            )
            outputs.append(
                ModelRunnerOutput(req_ids=[], req_id_to_index={}, kv_connector_output=out)
            )
        merged = self.aggregator.aggregate(outputs)
        assert merged is not None and merged.kv_connector_output is not None
        kv = merged.kv_connector_output
        meta = kv.kv_connector_worker_meta
        if meta is not None:
            assert isinstance(meta, PolyKVWorkerMetadata)
            self.index.on_report(meta.report)
            self.rank_bytes.update(meta.report.rank_bytes)  # what the connector keeps
        self.finished |= kv.finished_recving or set()
        return kv


def _prompt() -> list[int]:
    return doc(3, 3.25)  # three full blocks and a tail


def _store(ranks: Ranks) -> FakeRequest:
    writer = FakeRequest("writer", _prompt())
    assert ranks.admit(writer, [0, 1, 2, 3]) == 0
    ranks.step([(writer, [0, 1, 2, 3])])
    ranks.index.finish(writer)
    return writer


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_stores_its_heads_and_a_revisit_equals_tp1(world: int) -> None:
    one, tp = Ranks(1), Ranks(world)
    for ranks in (one, tp):
        _store(ranks)
        reader = FakeRequest("reader", _prompt())
        assert ranks.admit(reader, [10, 11, 12, 13]) == 3 * BS
        kv = ranks.step([(reader, [10, 11, 12, 13])])
        assert kv.invalid_block_ids == set()
        assert ranks.index.finish(reader)["polykv"]["tokens_from_store"] == 3 * BS
    for layer in range(LAYERS):  # each rank decoded its heads exactly as TP=1 did
        joined = torch.cat([caches[layer][10:13] for caches in tp.caches], dim=1)
        assert torch.equal(joined, one.caches[0][layer][10:13])
    whole = one.workers[0].nbytes
    assert whole > 0 and one.rank_bytes == {0: whole}
    assert tp.rank_bytes == {r: whole // world for r in range(world)}, "bytes per rank"
    assert [w.nbytes for w in tp.workers] == [whole // world] * world, "from the tensors"
    # the scheduler counts every rank's bytes against one budget, measured and planned
    assert tp.index.real_bytes == one.index.real_bytes == whole
    assert tp.geometry.block_bytes == one.geometry.block_bytes
    assert tp.index.used_bytes == one.index.used_bytes == 3 * one.geometry.block_bytes


def test_an_entry_is_visible_only_once_every_rank_confirmed_its_store() -> None:
    ranks = Ranks(2)
    late = ranks.workers[1]
    gate = Gate()
    late.stage_stores, late.host_fence = True, lambda: gate  # rank 1's copy lands later
    _store(ranks)
    assert ranks.rank_bytes == {0: ranks.workers[0].nbytes} and late.nbytes == 0
    assert ranks.index.lookup(FakeRequest("early", _prompt()), 0) == 0, "rank 1 has not confirmed"
    ranks.step()
    assert ranks.index.lookup(FakeRequest("early", _prompt()), 0) == 0
    gate.open = True
    ranks.step()  # rank 1's next report confirms its rows
    assert ranks.index.lookup(FakeRequest("now", _prompt()), 0) == 3 * BS
    assert ranks.rank_bytes == {0: late.nbytes, 1: late.nbytes} and late.nbytes > 0


def test_a_load_failing_on_one_rank_is_recomputed_on_every_rank() -> None:
    ranks = Ranks(2)
    _store(ranks)
    bad_row = ranks.index.entries.get(FakeRequest("x", _prompt()).block_hashes[1]).row  # type: ignore[union-attr]
    ranks.workers[1].store.layers[2].v_norm[bad_row, 0] = float("nan")  # rank 1 only
    reader = FakeRequest("reader", _prompt())
    assert ranks.admit(reader, [10, 11, 12, 13]) == 3 * BS
    kv = ranks.step([(reader, [10, 11, 12, 13])])
    # one set for the step, whichever rank found it: vLLM's scheduler recomputes these blocks
    # of the request, and so does every rank (there is one schedule)
    assert kv.invalid_block_ids == {11, 12}
    assert ranks.index.finish(reader)["polykv"]["tokens_from_store"] == BS, "only block 0 counted"
    assert ranks.index.lookup(FakeRequest("next", _prompt()), 0) == BS, "the entry was dropped"
    assert ranks.index.loads_in_flight == 0 and all(
        e.refs == 0 for e in ranks.index.entries.values()
    )


def _wait(ranks: Ranks, rid: str) -> int:
    for steps in range(1, 500):
        ranks.step()
        if rid in ranks.finished:
            return steps
        time.sleep(0.01)
    raise AssertionError("the async load never finished on every rank")


def test_an_async_load_finishes_only_when_every_rank_finished_it() -> None:
    ranks = Ranks(2, async_loads=True)
    _store(ranks)
    gate = threading.Event()
    slow = ranks.workers[1]
    real = slow.io.load  # type: ignore[union-attr]

    def held(*args: Any) -> None:
        gate.wait(10)
        real(*args)

    slow.io.load = held  # type: ignore[union-attr,method-assign]
    reader = FakeRequest("reader", _prompt())
    assert ranks.admit(reader, [10, 11, 12, 13]) == 3 * BS
    ranks.step()  # the plan with the async load: rank 0 finishes, rank 1 is held
    for _ in range(20):
        ranks.step()
        time.sleep(0.005)
    assert ranks.workers[0].loads_in_flight == 0 and slow.loads_in_flight == 1
    assert "reader" not in ranks.finished, "vLLM waits for every rank"
    assert ranks.index.loads_in_flight == 1, "the index too"
    gate.set()
    _wait(ranks, "reader")
    assert ranks.index.loads_in_flight == 0
    assert ranks.index.finish(reader)["polykv"]["tokens_from_store"] == 3 * BS
    for worker in ranks.workers:
        worker.shutdown()


def test_report_merge_keeps_each_ranks_bytes() -> None:
    a = WorkerReport(stored={4: [100, 1]}, rank_bytes={0: 100})
    b = WorkerReport(stored={4: [100, 1]}, rank_bytes={1: 100})
    merged = a.merge(b)
    assert merged.stored == {4: [200, 2]} and merged.rank_bytes == {0: 100, 1: 100}
    assert not WorkerReport(rank_bytes={0: 0}).is_empty(), "a freed store is news"


@pytest.mark.parametrize(
    "name",
    ["pipeline_parallel_size", "prefill_context_parallel_size", "decode_context_parallel_size"],
)
def test_parallelism_other_than_tensor_is_refused(name: str) -> None:
    from types import SimpleNamespace

    check_parallelism(SimpleNamespace(tensor_parallel_size=4, **{name: 1}))
    with pytest.raises(ValueError, match=f"{name}=2.*tensor-parallel-size"):
        check_parallelism(SimpleNamespace(**{name: 2}))


def test_gpu_serve_reads_every_ranks_timers_and_bytes_through_collective_rpc() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu_serve import RankWorkers

    def state(rank: int, flushed: bool) -> dict[str, Any]:
        return {
            "rank": rank,
            "load_seconds": [0.001 * (rank + 1)] * (2 if flushed else 1),
            "store_seconds": [0.002],
            "nbytes": 500,
            "row_bytes": 50,
            "block_size": 16,
            "device": "cuda:0",
        }

    class FakeLLM:
        def collective_rpc(self, fn: Any, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
            (flush,) = args
            return [state(1, flush), state(0, flush)]  # any order

    workers = RankWorkers.of(FakeLLM())
    assert workers is not None and workers.totals.load_seconds == [0.001]
    workers.flush_timers()
    assert workers.totals.load_seconds == [0.001, 0.001], "rank 0's timers"
    assert workers.store.row_bytes == 100, "one block over both ranks"
    assert workers.rank_bytes() == [500, 500]


def test_the_scheduler_side_exports_each_ranks_bytes_when_they_change() -> None:
    from scheduler_helpers import make_index

    from polykv_vllm.connector.connector import PolyKVConnector

    conn = PolyKVConnector.__new__(PolyKVConnector)  # the scheduler side's state, no engine
    conn.worker, conn.index = None, make_index(world_size=2)
    conn._gauges, conn._rank_bytes, conn._rank_gauges = {}, {}, {}

    def report(**rank_bytes: int) -> None:
        meta = PolyKVWorkerMetadata(
            WorkerReport(rank_bytes={int(k[1:]): v for k, v in rank_bytes.items()})
        )
        conn.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=meta))

    def rank_keys() -> dict[str, Any]:
        stats = conn.get_kv_connector_stats()
        data = {} if stats is None else stats.data
        return {k: v for k, v in data.items() if k.startswith("rank_")}

    report(r0=700, r1=700)
    assert conn.rank_bytes == {0: 700, 1: 700}
    assert rank_keys() == {"rank_stored_bytes:0": 700, "rank_stored_bytes:1": 700}
    assert rank_keys() == {}, "unchanged: not sent again"
    report(r1=0)
    assert rank_keys() == {"rank_stored_bytes:1": 0}
