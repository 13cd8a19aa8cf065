"""Issue 10's H200 workload replayed through the real scheduler index, per eviction policy.

The request sequence is ``gpu_workload.py``'s own (its argument parser and ``build_workload``,
so the same seed and parameters as a run with ``--kv-gib 4 --cpu-gib 4 --store-gib 1
--equal-gpu-memory --waves 12``: 48 documents of 2K/4K/8K tokens, Zipf 1.0, 12 waves of 16
agents, 64-token queries, 32 output tokens; seed 0 is the H200 run, other seeds redraw it),
preceded by its warm-up (4 documents of 2K read twice, the GPU prefix cache emptied after each
round, so the store starts with them).

Memory, from the model shape and the codec, not hard-coded: the store holds
``store_rows(cpu_gib, block_bytes)`` blocks, ``block_bytes`` being what
:func:`polykv_vllm.connector.spec.store_geometry` counts for a Llama-3-8B geometry (32 layers,
8 KV heads, head dim 128, block 16) with the codec of the ``polykv`` preset (the entry the H200
run stored: 0.70x an fp8 block). In front of it, vLLM's GPU prefix cache is modelled as an LRU
of ``kv_gib / fp8 block bytes`` blocks (4 GiB: 4,096 blocks, 65,536 tokens): a request first
takes its longest prefix from it, the store's lookup continues from there
(``lookup(request, num_computed_tokens)``, as vLLM calls it), and all its blocks (prompt and
output) then enter the GPU LRU, the last block first, so the GPU cache also loses a document's
tail first, as vLLM's free queue does.

What it does not model: concurrency. Requests run one at a time, in the sequence order, so the
16 agents of a wave see each other's blocks at once (in vLLM a wave's prefills run over several
steps and its running requests hold GPU blocks that the prefix cache cannot keep); the GPU share
this gives is therefore checked against the H200's before trusting the tier shares.

Shares are of all prompt tokens (as the H200 table gives them): ``gpu`` from the GPU prefix
cache, ``tier`` from the store, ``computed`` the rest; ``unbounded`` is what a store with no
limit would serve (the ceiling of ``tier``).
"""

from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_serve import GIB, LLAMA3_8B  # noqa: E402
from gpu_workload import build_workload, parse_args  # noqa: E402
from workload_gen import kv_bytes_per_token  # noqa: E402

from polykv_vllm.connector.metadata import WorkerReport  # noqa: E402
from polykv_vllm.connector.scheduler import (  # noqa: E402
    PinPolicy,
    ScheduledReq,
    StoreGeometry,
    StoreIndex,
    make_eviction_policy,
    store_rows,
)

#: the H200 command this replays (issue 10, 4 GiB CPU tier)
H200_ARGS = ["--kv-gib", "4", "--cpu-gib", "4", "--store-gib", "1", "--equal-gpu-memory"]
H200_ARGS += ["--waves", "12"]


@dataclass
class Req:
    """What the index reads of a vLLM request (``RequestLike``)."""

    request_id: str
    num_tokens: int
    block_hashes: list[bytes]
    kv_transfer_params: dict[str, Any] | None = None
    cache_salt: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return self.num_tokens


def llama3_8b_geometry(preset: str = "polykv", block_size: int = 16) -> StoreGeometry:
    """The store's block bytes for Llama-3-8B, from the codec (``spec.store_geometry``)."""
    import torch

    from polykv_vllm.connector.spec import ModelFacts, store_geometry
    from polykv_vllm.core import KVCodec

    layers = LLAMA3_8B["num_hidden_layers"]
    head_dim = LLAMA3_8B["head_dim"]
    facts = ModelFacts(
        num_layers=layers,
        total_layers=layers,
        head_dim=head_dim,
        kv_heads=LLAMA3_8B["num_key_value_heads"],
        block_size=block_size,
        dtype=torch.bfloat16,
        world_size=1,
    )
    return store_geometry(KVCodec(preset, num_layers=layers, head_dim=head_dim), facts)


def serve(index: StoreIndex, req: Req, first_block: int, computed: int, block_bytes: int) -> int:
    """One request through the index, one at a time: lookup after ``computed`` tokens, blocks
    ``first_block...`` allocated, its loads and stores confirmed by a fake worker, finished;
    the tokens it was served from the store. Shared with ``policy_replay.py``."""
    bs = index.geometry.block_size
    n = index.lookup(req, computed) or 0
    blocks = list(range(first_block, first_block + -(-req.num_tokens // bs)))
    index.on_alloc(req, blocks, n)
    plan = index.plan_step([ScheduledReq(req.request_id, tuple(blocks), True, req.num_tokens)])
    report = WorkerReport()
    for job in plan.loads:
        report.loads[job.load_id] = [1, len(job.rows)]
    for job in plan.stores:
        for row in job.rows:
            report.stored[row] = [block_bytes, 1]
    index.on_report(report)
    served = int(index.finish(req)["polykv"]["tokens_from_store"])
    assert index.used_bytes <= index.budget_bytes, "over budget"
    return served


def chain(prev: bytes, labels: list[str]) -> list[bytes]:
    """Block hashes chained from ``prev``, one per label (a prompt's ``block_hashes``)."""
    out = []
    for label in labels:
        prev = hashlib.blake2b(prev + label.encode(), digest_size=16).digest()
        out.append(prev)
    return out


def requests(seed: int, block_size: int = 16) -> tuple[list[Req], list[Req], int]:
    """(warm-up requests, workload requests, output tokens per request) of ``gpu_workload.py``
    with ``--seed seed`` and :data:`H200_ARGS`; block hashes chained per document."""
    a = parse_args(["--out", "unused", *H200_ARGS, "--seed", str(seed)])
    w = build_workload(a, int(LLAMA3_8B["vocab_size"]))
    docs: dict[str, list[bytes]] = {}

    def make(rid: str, doc: str, doc_tokens: int) -> Req:
        if doc not in docs:
            docs[doc] = chain(b"", [f"{doc}/{i}" for i in range(doc_tokens // block_size)])
        tokens = doc_tokens + w.query_tokens
        full = tokens // block_size
        prefix = docs[doc]
        query = chain(prefix[-1], [f"{rid}/q{j}" for j in range(full - len(prefix))])
        return Req(rid, tokens, prefix + query)

    warm = [make(f"warm{i}", f"w{seed}:{i}", min(a.doc_lengths)) for i in range(a.warmup)]
    reqs = [make(f"r{r.index}", f"d{seed}:{r.doc}", w.doc_tokens[r.doc]) for r in w.requests]
    return warm, reqs, w.out_tokens


class GPUPrefixCache:
    """vLLM's GPU prefix cache as an LRU of block hashes (module docstring)."""

    def __init__(self, blocks: int) -> None:
        self.capacity = blocks
        self._lru: OrderedDict[bytes, None] = OrderedDict()

    def hit(self, req: Req, block_size: int) -> int:
        """Blocks of ``req``'s prefix cached (never its last token)."""
        n = 0
        for h in req.block_hashes[: (req.num_tokens - 1) // block_size]:
            if h not in self._lru:
                break
            n += 1
        return n

    def add(self, keys: list[bytes]) -> None:
        for h in reversed(keys):  # the first block most recent: the tail goes first
            self._lru[h] = None
            self._lru.move_to_end(h)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def clear(self) -> None:
        self._lru.clear()


def replay(policy: str, seed: int, cpu_gib: float = 4.0, kv_gib: float = 4.0) -> dict[str, Any]:
    """Prompt tokens per source for ``policy`` on seed ``seed``'s workload (module docstring)."""
    geo = llama3_8b_geometry()
    bs = geo.block_size
    budget = int(cpu_gib * GIB)
    rows = store_rows(budget, geo.block_bytes)
    gpu_block_bytes = kv_bytes_per_token(LLAMA3_8B, 1) * bs  # fp8 working cache
    gpu = GPUPrefixCache(int(kv_gib * GIB) // gpu_block_bytes)
    index = StoreIndex(
        geo,
        budget_bytes=budget,
        store_all=True,
        min_store_tokens=bs,
        pins=PinPolicy(mode="any", quota_bytes=budget // 2),
        eviction=make_eviction_policy(policy, rows),
    )
    warm, reqs, out_tokens = requests(seed, bs)
    seen: set[bytes] = set()  # for the unbounded store
    totals = {"prompt": 0, "gpu": 0, "tier": 0, "unbounded": 0}
    next_block = 0

    def run(req: Req, count: bool) -> None:
        nonlocal next_block
        g = gpu.hit(req, bs)
        served = serve(index, req, next_block, g * bs, geo.block_bytes)
        next_block += -(-req.num_tokens // bs)
        out_blocks = chain(req.block_hashes[-1], [f"{req.request_id}/o{j}" for j in range(2)])
        gpu.add(req.block_hashes + out_blocks[: (req.num_tokens % bs + out_tokens) // bs])
        if count:
            eligible = req.block_hashes[: (req.num_tokens - 1) // bs]
            u = g
            while u < len(eligible) and eligible[u] in seen:
                u += 1
            totals["prompt"] += req.num_tokens
            totals["gpu"] += g * bs
            totals["tier"] += served
            totals["unbounded"] += (u - g) * bs
        seen.update(req.block_hashes)

    for _ in range(2 if warm else 0):  # the warm-up, then vLLM's reset_prefix_cache()
        for req in warm:
            run(req, count=False)
        gpu.clear()
    for req in reqs:
        run(req, count=True)
    p = totals["prompt"]
    return {
        "policy": policy,
        "seed": seed,
        "store_blocks": rows,
        "block_bytes": geo.block_bytes,
        "gpu_blocks": gpu.capacity,
        "prompt_tokens": p,
        "gpu": totals["gpu"] / p,
        "tier": totals["tier"] / p,
        "computed": 1 - (totals["gpu"] + totals["tier"]) / p,
        "unbounded": totals["unbounded"] / p,
        "blocks_evicted": index.counters.blocks_evicted,
        "admission_refused_blocks": index.counters.admission_refused_blocks,
    }


#: measured on the H200 (README, issue 10; benchmarks/results/workload_h200_s6, _s8):
#: prompt-token shares GPU / tier / computed and req/s vs fp8 + native offloading
H200 = {
    "lru": {"gpu": 0.556, "tier": 0.099, "computed": 0.345, "vs_offload": "1.02x-1.08x"},
    "tinylfu": {"gpu": 0.551, "tier": 0.201, "computed": 0.248, "vs_offload": "1.33x-1.35x"},
}


def table(rows: list[dict[str, Any]], policies: list[str], seeds: int) -> str:
    """Markdown: per policy, seed 0 (the H200's workload) and the mean over seeds."""
    lines = [
        "| policy | GPU / tier / computed, seed 0 | tier, mean of "
        f"{seeds} seeds (range) | unbounded store | H200, seed 0: GPU / tier / computed "
        "| H200 req/s vs fp8+offload |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for policy in policies:
        mine = [r for r in rows if r["policy"] == policy]
        s0 = next(r for r in mine if r["seed"] == 0)
        tiers = [r["tier"] for r in mine]
        h = H200.get(policy)
        measured = (
            f"{100 * h['gpu']:.1f}% / {100 * h['tier']:.1f}% / {100 * h['computed']:.1f}%"
            if h
            else "not run"
        )
        lines.append(
            f"| {policy} | {100 * s0['gpu']:.1f}% / **{100 * s0['tier']:.1f}%** / "
            f"{100 * s0['computed']:.1f}% | {100 * sum(tiers) / len(tiers):.1f}% "
            f"({100 * min(tiers):.1f}–{100 * max(tiers):.1f}) | {100 * s0['unbounded']:.1f}% "
            f"| {measured} | {h['vs_offload'] if h else 'not run'} |"
        )
    return "\n".join(lines) + "\n"
