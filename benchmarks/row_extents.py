"""Runs of slab rows per store and per load on the skewed workload, row extents vs per-block rows.

Pure Python, no vLLM, no tensors: ``gpu_workload.py``'s request sequence (``workload_gen.py``:
48 documents of 2K/4K/8K tokens, Zipf 1.0, waves of 16 agents, 64-token queries) goes through
the real scheduler-side :class:`~polykv_vllm.connector.scheduler.StoreIndex` with the H200 run's
geometry (Llama-3-8B: 32 layers, 8 kv heads, head dim 128, 16-token blocks; the block's bytes
measured by the codec; an 8 GiB store). A wave's requests are admitted together and prefilled
in steps of ``--step-tokens`` tokens (chunked prefill, first come first served), so the stores
of concurrent requests interleave as in the engine; a fake worker confirms each step's stores
and loads. A GPU prefix cache of ``--gpu-tokens`` tokens (LRU over block hashes) decides the
local hits, which the store is not asked for.

The worker copies one run of consecutive rows per tensor and layer (4 tensors x 32 layers
here), so runs per store is the number of those copy batches a store pays:

- ``per-block``: the allocator before row extents (one row per block as each block was
  admitted, right after its victim was evicted: never-used rows first, then the lowest free row);
- ``extents``: all of a step's new blocks of a request placed at once after its evictions, in
  as few runs as the free extents allow (:mod:`polykv_vllm.connector.scheduler.rows`).

Prints a Markdown table; ``--out`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import statistics
import sys
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload_gen import make_workload  # noqa: E402

from polykv_vllm.connector.metadata import StepPlan, WorkerReport  # noqa: E402
from polykv_vllm.connector.scheduler import (  # noqa: E402
    EntryTable,
    ScheduledReq,
    StoreGeometry,
    StoreIndex,
)
from polykv_vllm.connector.scheduler.entries import Entry  # noqa: E402
from polykv_vllm.connector.slab import runs  # noqa: E402

GIB = 1 << 30


class PerBlockRows:
    """The allocator before row extents, verbatim in behaviour: ``alloc(n)`` takes never-used
    rows first, then the first free run of ``n`` (the lowest free row for ``n == 1``)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._fresh = 0
        self._free: list[int] = []
        self._used = 0

    @property
    def free_rows(self) -> int:
        return self.capacity - self._used

    def alloc(self, n: int, after: int | None = None) -> list[int]:
        if self._fresh + n <= self.capacity:
            rows = list(range(self._fresh, self._fresh + n))
            self._fresh += n
        else:
            free = self._free + list(range(self._fresh, self.capacity))
            last = len(free) - n
            start = next((i for i in range(last + 1) if free[i + n - 1] - free[i] == n - 1), 0)
            rows = free[start : start + n]
            taken = set(rows)
            self._fresh = self.capacity
            self._free = [r for r in free if r not in taken]
        self._used += n
        return rows

    def free(self, row: int) -> None:
        bisect.insort(self._free, row)
        self._used -= 1


class PerBlockTable(EntryTable):
    """Places each entry as it is added (what ``EntryTable.add`` did before row extents)."""

    def __init__(self, geometry: StoreGeometry, budget_bytes: int) -> None:
        super().__init__(geometry, budget_bytes)
        self.rows = PerBlockRows(self.rows.capacity)  # type: ignore[assignment]

    def add(self, key: Hashable) -> Entry:
        entry = super().add(key)
        super().place([entry])
        return entry

    def place(self, entries: Sequence[Entry], after: int | None = None) -> None:
        return  # placed in add


def block_bytes_llama3_8b(preset: str) -> int:
    from polykv_vllm.core import KVCodec

    codec = KVCodec(preset, num_layers=32, head_dim=128)
    per_token_head = sum(codec.bytes_per_token_head(128, layer) for layer in range(32))
    return per_token_head * 16 * 8


def chain(tokens: Sequence[int], bs: int) -> list[bytes]:
    out, prev = [], b""
    for i in range(len(tokens) // bs):
        prev = hashlib.blake2b(prev + repr(tokens[i * bs : (i + 1) * bs]).encode()).digest()
        out.append(prev)
    return out


class Req:
    def __init__(self, rid: str, tokens: list[int], bs: int) -> None:
        self.request_id = rid
        self.num_tokens = self.num_prompt_tokens = len(tokens)
        self.block_hashes = chain(tokens, bs)
        self.kv_transfer_params: dict[str, Any] | None = None
        self.cache_salt: str | None = None


def replay(a: argparse.Namespace, allocator: str, block_bytes: int) -> dict[str, Any]:
    bs = 16
    geo = StoreGeometry(block_size=bs, block_bytes=block_bytes, block_raw_bytes=4 * block_bytes)
    budget = int(a.store_gib * GIB)
    index = StoreIndex(geo, budget_bytes=budget, store_all=True, min_store_tokens=bs)
    if allocator == "per-block":
        index.entries = PerBlockTable(geo, budget)
    w = make_workload(waves=a.waves, wave_size=a.wave_size, seed=a.seed)
    prompts = w.prompts()
    gpu: OrderedDict[bytes, None] = OrderedDict()  # GPU prefix cache: LRU of block hashes
    gpu_blocks = a.gpu_tokens // bs
    store_runs: list[int] = []
    store_blocks: list[int] = []
    load_runs: list[int] = []
    next_block = 0
    for wave in range(a.waves):
        reqs = [Req(f"r{r.index}", prompts[r.index], bs) for r in w.requests if r.wave == wave]
        done: dict[str, int] = {}
        blocks: dict[str, list[int]] = {}
        for req in reqs:
            local = 0
            for h in req.block_hashes[: (req.num_tokens - 1) // bs]:
                if h not in gpu:
                    break
                gpu.move_to_end(h)
                local += 1
            n = index.lookup(req, local * bs)
            blocks[req.request_id] = list(range(next_block, next_block + -(-req.num_tokens // bs)))
            next_block += len(blocks[req.request_id])
            index.on_alloc(req, blocks[req.request_id], n)
            done[req.request_id] = local * bs + n
        first = True
        while any(done[r.request_id] < r.num_tokens for r in reqs):
            budget_tokens = a.step_tokens
            sched = []
            for req in reqs:
                rid = req.request_id
                left = req.num_tokens - done[rid]
                if left <= 0 or budget_tokens <= 0:
                    continue
                take = min(left, budget_tokens)
                budget_tokens -= take
                done[rid] += take
                sched.append(ScheduledReq(rid, tuple(blocks[rid]), first, done[rid]))
            first = False
            plan = index.plan_step(sched)
            _confirm(index, plan, block_bytes)
            store_runs += [len(runs(list(j.rows))) for j in plan.stores]
            store_blocks += [len(j.rows) for j in plan.stores]
            load_runs += [len(runs(list(j.rows))) for j in plan.loads]
        for req in reqs:
            for h in req.block_hashes:
                gpu[h] = None
                gpu.move_to_end(h)
            while len(gpu) > gpu_blocks:
                gpu.popitem(last=False)
            index.finish(req)
    counters = index.take_counters()
    return {
        "allocator": allocator,
        "stores": len(store_runs),
        "store_blocks_mean": statistics.mean(store_blocks),
        "runs_per_store_mean": statistics.mean(store_runs),
        "runs_per_store_p50": statistics.median(store_runs),
        "runs_per_store_max": max(store_runs),
        "single_run_stores": sum(r == 1 for r in store_runs) / len(store_runs),
        "store_copies": sum(store_runs) * 32 * 4,
        "loads": len(load_runs),
        "runs_per_load_mean": statistics.mean(load_runs) if load_runs else None,
        "runs_per_load_max": max(load_runs, default=None),
        "blocks_evicted": counters.blocks_evicted,
        "tokens_loaded": counters.tokens_loaded,
    }


def _confirm(index: StoreIndex, plan: StepPlan, block_bytes: int) -> None:
    report = WorkerReport()
    for job in plan.loads:
        report.loads[job.load_id] = [1, len(job.rows)]
    for job in plan.stores:
        for row in job.rows:
            report.stored[row] = [block_bytes, 1]
    index.on_report(report)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store-gib", type=float, default=8.0)
    p.add_argument("--gpu-tokens", type=int, default=65536, help="4 GiB of fp8 Llama-3-8B KV")
    p.add_argument("--step-tokens", type=int, default=16384, help="max_num_batched_tokens")
    p.add_argument("--waves", type=int, default=20)
    p.add_argument("--wave-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="polykv")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    block_bytes = block_bytes_llama3_8b(a.preset)
    results = [replay(a, alloc, block_bytes) for alloc in ("per-block", "extents")]
    command = " ".join(["python", "benchmarks/row_extents.py", *(argv or sys.argv[1:])])
    keys = [k for k in results[0] if k != "allocator"]
    lines = [f"`{command}` (block {block_bytes} B)", "", "| | per-block | extents |"]
    lines.append("| --- | ---: | ---: |")
    for k in keys:
        cells = [_fmt(r[k]) for r in results]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        a.out.write_text(json.dumps({"command": command, "results": results}, indent=1))


def _fmt(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x)


if __name__ == "__main__":
    main()
