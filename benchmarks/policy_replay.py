"""Hit rates of the store's eviction policies on replayed traces, against Belady's optimum.

Pure Python, no vLLM: every request goes through the real scheduler-side index
(:class:`~polykv_vllm.connector.scheduler.StoreIndex`: its byte budget, block chains, documents,
the never-the-last-token rule) with a fake worker that confirms every store and load, one
request at a time, like ``tests/scheduler_helpers.py``. A prompt is a document (its chain of
blocks, shared by every request for it) followed by a query of its own (one-shot blocks, plus a
few tokens so the last token never falls in the document).

Traces (``--traces``; ``C`` is the store's capacity in documents, ``--capacity-docs``):

- ``cyclic-R``: ``R x C`` documents in round robin;
- ``zipf-S``: documents drawn with Zipf exponent ``S`` from ``10 x C`` of them;
- ``scan``: half the requests go to a hot set of ``C / 2`` documents, half to documents seen
  once (a scan);
- ``shift-P``: Zipf 1.0 over ``10 x C`` documents, their popularity drawn anew every ``P``
  requests (where frequency from the past misleads);
- ``recent``: 30% of requests bring a new document, the others revisit one whose age (in
  documents) is exponential with mean ``C`` (where recency is what counts: LRU's case);
- ``mixed``: 50% Zipf 1.0 over ``4 x C`` documents, 30% a round robin over ``1.5 x C`` others,
  20% one-shot documents;
- ``issue10``: issue 10's H200 workload with its real sizes, behind a GPU prefix cache
  (``issue10_replay.py``: its own store capacity and metric, shares of all prompt tokens, no
  Belady), in a second table.

**Hit rate** = tokens served from the store / tokens that could be: the lookup-eligible tokens
(whole blocks, never the last token) continuing a prefix of blocks some earlier request had,
i.e. what an unbounded store would serve. Compulsory misses count for no policy.

**Belady** (``belady``): the optimum's classical rule, replayed at block level on the same
requests and capacity (rows): when a block must be stored and the store is full, evict the
stored block whose next request is furthest away, or store nothing (bypass) when the new block's
own next request is further still. Blocks of one document share their next request, so ties go
to the later block of a document and the tail goes first: it keeps prefixes, as a lookup needs.
Block level rather than document level because the index stores and evicts blocks and a partly
stored document serves its prefix. It is MIN for unit-size pages; with the prefix rule it is a
reference point (the best known offline), not a proven bound.

Outputs ``<out>.json`` (config, command, per trace and policy: hit rate, tokens, share of
Belady), ``<out>.md`` (the table) and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import issue10_replay  # noqa: E402

from polykv_vllm.connector.scheduler import (  # noqa: E402
    EVICTION_POLICIES,
    PinPolicy,
    StoreGeometry,
    StoreIndex,
    make_eviction_policy,
    store_rows,
)

BLOCK_BYTES = 1000  # any size: the budget is counted in blocks of this size


@dataclass
class Trace:
    name: str
    docs: list[int]  # the document of each request, in order


@dataclass
class Prompts:
    """Block chains of documents (cached) and of each request's one-shot query."""

    block_size: int
    doc_blocks: int
    query_blocks: int
    seed: int
    _chains: dict[int, list[bytes]] = field(default_factory=dict)

    def doc_chain(self, d: int) -> list[bytes]:
        chain = self._chains.get(d)
        if chain is None:
            n = random.Random(self.seed * 1_000_003 + d).randint(
                max(1, self.doc_blocks // 2), self.doc_blocks * 3 // 2
            )
            chain = issue10_replay.chain(b"", [f"doc{d}/{i}" for i in range(n)])
            self._chains[d] = chain
        return chain

    def request(self, t: int, d: int) -> issue10_replay.Req:
        doc = self.doc_chain(d)
        hashes = doc + issue10_replay.chain(
            doc[-1], [f"q{t}/{j}" for j in range(self.query_blocks)]
        )
        tokens = len(hashes) * self.block_size + 5  # a partial last block of query tokens
        return issue10_replay.Req(request_id=f"r{t}", num_tokens=tokens, block_hashes=hashes)


def make_trace(name: str, capacity_docs: int, requests: int, rng: random.Random) -> Trace:
    c = capacity_docs
    kind, _, arg = name.partition("-")
    if kind == "cyclic":
        n = round(float(arg) * c)
        return Trace(name, [t % n for t in range(requests)])
    if kind == "zipf":
        return Trace(name, _zipf(float(arg), 10 * c, requests, rng, base=0))
    if kind == "scan":
        hot = max(1, c // 2)
        fresh = iter(range(10**6, 2 * 10**6))
        return Trace(
            name,
            [rng.randrange(hot) if rng.random() < 0.5 else next(fresh) for _ in range(requests)],
        )
    if kind == "shift":
        n, period = 10 * c, int(arg)
        docs = []
        for start in range(0, requests, period):  # a new popularity ranking every period
            docs += _zipf(1.0, n, min(period, requests - start), rng, base=0)
        return Trace(name, docs)
    if kind == "recent":
        born: list[int] = []
        docs = []
        for _ in range(requests):
            if not born or rng.random() < 0.3:
                born.append(len(born))
                docs.append(born[-1])
            else:  # newer documents are asked for more: age in documents ~ geometric, mean C
                age = min(int(rng.expovariate(1.0 / c)), len(born) - 1)
                docs.append(born[-1 - age])
        return Trace(name, docs)
    if kind == "mixed":
        zipf = iter(_zipf(1.0, 4 * c, requests, rng, base=0))
        loop_n, loop_t = round(1.5 * c), 0
        fresh = iter(range(10**6, 2 * 10**6))
        docs = []
        for _ in range(requests):
            u = rng.random()
            if u < 0.5:
                docs.append(next(zipf))
            elif u < 0.8:
                docs.append(10**5 + loop_t % loop_n)
                loop_t += 1
            else:
                docs.append(next(fresh))
        return Trace(name, docs)
    raise SystemExit(
        f"--traces: unknown trace {name!r}: use cyclic-R, zipf-S, shift-P, recent, scan, mixed "
        "or issue10"
    )


def _zipf(s: float, n: int, k: int, rng: random.Random, base: int) -> list[int]:
    weights = [1.0 / (i + 1) ** s for i in range(n)]
    order = list(range(n))
    rng.shuffle(order)  # popularity unrelated to the document's number (and so its length)
    return [base + order[i] for i in rng.choices(range(n), weights=weights, k=k)]


def eligible(req: issue10_replay.Req, block_size: int) -> int:
    """Blocks a lookup may serve (never the request's last token)."""
    return min((req.num_tokens - 1) // block_size, len(req.block_hashes))


def could_serve(trace: Trace, prompts: Prompts) -> list[int]:
    """Per request, the tokens an unbounded store would serve."""
    seen: set[bytes] = set()
    out = []
    for t, d in enumerate(trace.docs):
        req = prompts.request(t, d)
        n = 0
        for h in req.block_hashes[: eligible(req, prompts.block_size)]:
            if h not in seen:
                break
            n += 1
        out.append(n * prompts.block_size)
        seen.update(req.block_hashes)
    return out


def replay_index(trace: Trace, prompts: Prompts, policy: str, budget_blocks: int) -> list[int]:
    """Tokens served per request by the real index with eviction ``policy``."""
    bs = prompts.block_size
    geo = StoreGeometry(block_size=bs, block_bytes=BLOCK_BYTES, block_raw_bytes=4 * BLOCK_BYTES)
    budget = budget_blocks * BLOCK_BYTES
    index = StoreIndex(
        geo,
        budget_bytes=budget,
        store_all=True,
        min_store_tokens=bs,
        pins=PinPolicy(mode="any", quota_bytes=budget // 2),
        eviction=make_eviction_policy(policy, store_rows(budget, BLOCK_BYTES)),
    )
    served = []
    next_block = 0
    for t, d in enumerate(trace.docs):
        req = prompts.request(t, d)
        served.append(issue10_replay.serve(index, req, next_block, 0, BLOCK_BYTES))
        next_block += -(-req.num_tokens // bs)
    return served


def replay_belady(trace: Trace, prompts: Prompts, budget_blocks: int) -> list[int]:
    """Tokens served per request by block-level Belady with bypass (module docstring)."""
    bs = prompts.block_size
    reqs = [prompts.request(t, d) for t, d in enumerate(trace.docs)]
    uses: dict[bytes, list[int]] = {}
    for t, req in enumerate(reqs):
        for h in req.block_hashes:
            uses.setdefault(h, []).append(t)
    never = len(reqs)
    cursor: dict[bytes, int] = {}

    def next_use(h: bytes, after: int) -> int:
        ts, i = uses[h], cursor.get(h, 0)
        while i < len(ts) and ts[i] <= after:
            i += 1
        cursor[h] = i
        return ts[i] if i < len(ts) else never

    stored: dict[bytes, int] = {}  # block -> its next request
    heap: list[tuple[int, int, bytes]] = []  # (-next request, -position, block), lazy
    served = []
    for t, req in enumerate(reqs):
        n = 0
        for h in req.block_hashes[: eligible(req, bs)]:
            if h not in stored:
                break
            n += 1
        served.append(n * bs)
        nexts = [next_use(h, t) for h in req.block_hashes]
        for pos, (h, nu) in enumerate(zip(req.block_hashes, nexts, strict=True)):
            if h in stored:
                stored[h] = nu
                heapq.heappush(heap, (-nu, -pos, h))
        for pos, (h, nu) in enumerate(zip(req.block_hashes, nexts, strict=True)):
            if h in stored:
                continue
            if len(stored) >= budget_blocks:
                while True:
                    neg, _, victim = heap[0]
                    if stored.get(victim) == -neg:
                        break
                    heapq.heappop(heap)  # stale
                if -neg <= nu:
                    break  # bypass: nothing stored is needed later than this block
                heapq.heappop(heap)
                del stored[victim]
            stored[h] = nu
            heapq.heappush(heap, (-nu, -pos, h))
    return served


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--traces",
        default="cyclic-1.25,cyclic-1.5,cyclic-2,zipf-0.8,zipf-1.0,zipf-1.2,shift-200,shift-50,recent,"
        "scan,mixed,issue10",
    )
    p.add_argument("--policies", default=",".join(EVICTION_POLICIES))
    p.add_argument("--capacity-docs", type=int, default=16, help="store size in mean documents")
    p.add_argument("--doc-blocks", type=int, default=16, help="mean document length in blocks")
    p.add_argument("--query-blocks", type=int, default=1, help="one-shot blocks per request")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=3, help="random traces and lengths per seed")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/policy_replay"))
    args = p.parse_args(argv)
    policies = [s for s in args.policies.split(",") if s]
    budget_blocks = args.capacity_docs * args.doc_blocks
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    names = [s for s in args.traces.split(",") if s]
    issue10 = [
        issue10_replay.replay(policy, seed)
        for policy in (policies if "issue10" in names else [])
        for seed in range(args.seeds)
    ]
    for name in [n for n in names if n != "issue10"]:
        for seed in range(args.seeds):
            rng = random.Random(seed)
            trace = make_trace(name, args.capacity_docs, args.requests, rng)
            prompts = Prompts(args.block_size, args.doc_blocks, args.query_blocks, seed)
            possible = sum(could_serve(trace, prompts))
            results: dict[str, int] = {"belady": sum(replay_belady(trace, prompts, budget_blocks))}
            for policy in policies:
                results[policy] = sum(replay_index(trace, prompts, policy, budget_blocks))
            for policy, tokens in results.items():
                rows.append(
                    {
                        "trace": name,
                        "seed": seed,
                        "policy": policy,
                        "tokens_served": tokens,
                        "tokens_possible": possible,
                        "hit_rate": tokens / max(possible, 1),
                        "of_belady": tokens / max(results["belady"], 1),
                    }
                )
    summary = _summarize(rows, ["belady", *policies])
    command = " ".join(["python", "benchmarks/policy_replay.py", *(argv or sys.argv[1:])])
    out = {
        "format": "policy_replay",
        "command": command,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "budget_blocks": budget_blocks,
        "seconds": time.perf_counter() - started,
        "summary": summary,
        "runs": rows,
        "issue10": issue10,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    table = _table(summary, ["belady", *policies], command)
    if issue10:
        table += "\nissue10 (shares of all prompt tokens, `issue10_replay.py`):\n\n"
        table += issue10_replay.table(issue10, policies, args.seeds)
    args.out.with_suffix(".md").write_text(table)
    _plot(summary, ["belady", *policies], args.out.with_suffix(".png"), args)
    print(table)


def _summarize(rows: list[dict[str, Any]], policies: list[str]) -> dict[str, dict[str, Any]]:
    """Per trace and policy: mean hit rate and share of Belady over seeds, and their range."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        cell = out.setdefault(r["trace"], {}).setdefault(r["policy"], {"hit": [], "of_belady": []})
        cell["hit"].append(r["hit_rate"])
        cell["of_belady"].append(r["of_belady"])
    for per_policy in out.values():
        for cell in per_policy.values():
            for key in ("hit", "of_belady"):
                v = cell.pop(key)
                cell[key] = sum(v) / len(v)
                cell[key + "_min"], cell[key + "_max"] = min(v), max(v)
    return out


def _table(summary: dict[str, dict[str, Any]], policies: list[str], command: str) -> str:
    head = (
        "| trace | "
        + " | ".join(policies)
        + " | "
        + " | ".join(f"{p} / belady" for p in policies[1:])
        + " |"
    )
    lines = [f"`{command}`", "", head, "|" + " --- |" * (2 * len(policies))]
    for trace, cells in summary.items():
        hits = [_pct(cells[p]["hit"], cells[p]["hit_min"], cells[p]["hit_max"]) for p in policies]
        shares = [f"{cells[p]['of_belady']:.2f}" for p in policies[1:]]
        lines.append(f"| {trace} | " + " | ".join(hits + shares) + " |")
    return "\n".join(lines) + "\n"


def _pct(mean: float, lo: float, hi: float) -> str:
    return (
        f"{100 * mean:.1f}%"
        if hi - lo < 0.001
        else f"{100 * mean:.1f}% ({100 * lo:.0f}–{100 * hi:.0f})"
    )


def _plot(summary: dict[str, dict[str, Any]], policies: list[str], path: Path, args: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(summary)
    width = 0.8 / len(policies)
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, policy in enumerate(policies):
        xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(traces))]
        ys = [100 * summary[t][policy]["hit"] for t in traces]
        ax.bar(xs, ys, width, label=policy)
    ax.set_xticks(range(len(traces)), traces)
    ax.set_ylabel("hit rate (% of reusable tokens)")
    ax.set_title(
        f"store of {args.capacity_docs} documents ({args.capacity_docs * args.doc_blocks} blocks), "
        f"{args.requests} requests x {args.seeds} seeds"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
