"""What the connector costs per engine step when a step has nothing to load or store (CPU).

A micro benchmark of the real :class:`~polykv_vllm.connector.connector.PolyKVConnector` hooks,
without an engine: one instance plays both roles (a :class:`StoreIndex` and a
:class:`PolyKVWorker` bound to a tiny CPU cache and slab), ``--requests`` requests are decoding
(their prompts already stored), and each step calls the hooks vLLM 0.32 calls per step, in its
order: scheduler ``build_connector_meta`` (a fake ``SchedulerOutput`` of decode steps), worker
``bind_connector_metadata``, ``start_load_kv``, ``wait_for_save``,
``get_block_ids_with_load_errors``, ``get_kv_connector_stats``, ``build_connector_worker_meta``,
``clear_connector_metadata``, scheduler ``update_connector_output`` and
``get_kv_connector_stats``. Reports microseconds per step (median of ``--repeats`` timings of
``--steps`` steps); ``--profile`` prints the cProfile top entries instead.

    python benchmarks/idle_step.py --requests 16
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch  # noqa: E402
from scheduler_helpers import BS, FakeRequest, doc, make_index  # noqa: E402

from polykv_vllm.connector.connector import PolyKVConnector  # noqa: E402
from polykv_vllm.connector.paged_io import FlashPagedIO  # noqa: E402
from polykv_vllm.connector.scheduler import ScheduledReq  # noqa: E402
from polykv_vllm.connector.slab import BlockSlab  # noqa: E402
from polykv_vllm.connector.worker import PolyKVWorker  # noqa: E402
from polykv_vllm.core import KVCodec  # noqa: E402


def build(n_requests: int) -> tuple[PolyKVConnector, Any]:
    """A both-roles connector with ``n_requests`` stored prompts now decoding, and the fake
    scheduler output of their decode steps."""
    conn: Any = object.__new__(PolyKVConnector)
    conn._connector_metadata = None
    conn._last_saved = None
    conn._gauges = {}
    conn.index = make_index(budget_blocks=64 * n_requests)
    codec = KVCodec("polykv", num_layers=2, head_dim=64)
    caches = [torch.zeros(8 * n_requests, 2, BS, 128) for _ in range(2)]
    worker = PolyKVWorker(block_size=BS)
    worker.bind(
        FlashPagedIO(codec, caches, [0, 1], 64, BS),
        BlockSlab(codec, [0, 1], 64 * n_requests, BS, 2, 64, torch.device("cpu"), False),
    )
    conn.worker = worker
    index = conn.index
    ids, computed = [], []
    for i in range(n_requests):
        req = FakeRequest(f"r{i}", doc(i, 4) + [7] * 5)
        blocks = list(range(i * 8, i * 8 + 6))
        index.lookup(req, 0)
        index.on_alloc(req, blocks, 0)
        plan = index.plan_step([ScheduledReq(req.request_id, tuple(blocks), True, req.num_tokens)])
        worker.save(plan)
        report = worker.take_report()
        assert report is not None
        index.on_report(report)
        ids.append(req.request_id)
        computed.append(req.num_tokens)
    worker.take_counters()
    index.take_counters()
    out = SimpleNamespace(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=ids,
            new_block_ids=[None] * n_requests,
            resumed_req_ids=set(),
            num_computed_tokens=computed,
        ),
        num_scheduled_tokens={r: 1 for r in ids},
    )
    return conn, out


def step(conn: Any, sched_out: Any) -> None:
    meta = conn.build_connector_meta(sched_out)
    conn.bind_connector_metadata(meta)
    conn.start_load_kv(None)
    conn.wait_for_save()
    conn.get_block_ids_with_load_errors()
    conn.get_kv_connector_stats()
    worker_meta = conn.build_connector_worker_meta()
    conn.clear_connector_metadata()
    conn.update_connector_output(SimpleNamespace(kv_connector_worker_meta=worker_meta))
    conn.get_kv_connector_stats()
    for i in range(len(sched_out.scheduled_cached_reqs.num_computed_tokens)):
        sched_out.scheduled_cached_reqs.num_computed_tokens[i] += 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    conn, out = build(a.requests)
    for _ in range(200):
        step(conn, out)
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.steps):
            step(conn, out)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        return
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step(conn, out)
        times.append((time.perf_counter() - t0) / a.steps)
    assert conn.index.num_entries > 0
    print(
        f"{a.requests} decoding requests: {statistics.median(times) * 1e6:.1f} us per step "
        f"(min {min(times) * 1e6:.1f}, max {max(times) * 1e6:.1f}; {a.repeats} x {a.steps} steps)"
    )


if __name__ == "__main__":
    main()
