"""Inclusive or exclusive disk tier? Hit rates and bytes written of three hierarchy policies on
replayed skewed traces, with a host store smaller than the working set (``docs/TIERS.md``).

Pure Python, no vLLM, block level: the host store and the disk tier are LRU over blocks with
the store's rules (a lookup walks a prompt's blocks in order and stops at the first block held
by no tier, never the last token; a used chain is touched from its last block to its first, so
a document's tail is evicted first). Documents, queries and traces are
``benchmarks/policy_replay.py``'s. Policies:

- ``write-through`` (inclusive, what polykv does): every block the host stores is written to
  the disk at once; a disk hit is copied up and stays on disk; a host eviction writes nothing.
- ``demote`` (inclusive, write-back): a block reaches the disk only when the host evicts it
  (and only if the disk does not hold it); a disk hit is copied up and stays on disk.
- ``exclusive``: a host eviction moves the block to the disk; a disk hit moves it up (deleted
  from disk), so host + disk hold distinct blocks (more capacity, more writes).

Each policy also runs with a **crash** at the middle of the trace: the host store is lost
(only what the disk holds survives: a killed server has no shutdown to demote in), and the
hit rate of the second half, and of the ``--window`` requests right after the crash, are
reported.

Outputs ``<out>.json`` (config, command, per configuration and policy: host/disk/total hit
rate of the tokens that could be served, GB written to disk per 1000 requests, and the
post-crash hit rate) and ``<out>.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy_replay import Prompts, could_serve, eligible, make_trace  # noqa: E402

POLICIES = ("write-through", "demote", "exclusive")
_METRICS = (
    "host_hit",
    "disk_hit",
    "hit",
    "gb_written_per_1k",
    "hit_after_crash",
    "hit_right_after_crash",
)


class LRU:
    """Blocks by hash, least recently used first, at most ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.d: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, h: bytes) -> bool:
        return h in self.d

    def touch(self, h: bytes) -> None:
        self.d.move_to_end(h)

    def add(self, h: bytes) -> list[bytes]:
        """Insert ``h`` (most recent); returns the blocks evicted to make room."""
        if h in self.d:
            self.d.move_to_end(h)
            return []
        self.d[h] = None
        out = []
        while len(self.d) > self.capacity:
            out.append(self.d.popitem(last=False)[0])
        return out

    def remove(self, h: bytes) -> None:
        self.d.pop(h, None)


def replay(
    policy: str, docs: list[int], prompts: Prompts, host_blocks: int, disk_blocks: int, crash: int
) -> dict[str, Any]:
    """Per-request tokens from host and disk, blocks written to disk; the host is emptied
    before request ``crash`` (-1: never)."""
    host, disk = LRU(host_blocks), LRU(disk_blocks)
    bs = prompts.block_size
    from_host, from_disk, writes = [], [], 0

    def write(h: bytes) -> None:
        nonlocal writes
        if h not in disk:
            writes += 1
        disk.add(h)

    def store(h: bytes) -> None:
        for victim in host.add(h):
            if policy == "exclusive" or (policy == "demote" and victim not in disk):
                write(victim)

    for t, d in enumerate(docs):
        if t == crash:
            host = LRU(host_blocks)
        req = prompts.request(t, d)
        n = eligible(req, bs)
        hashes = req.block_hashes
        h_hits = d_hits = 0
        served: list[tuple[bytes, str]] = []
        for h in hashes[:n]:
            if h in host:
                served.append((h, "host"))
                h_hits += 1
            elif h in disk:
                served.append((h, "disk"))
                d_hits += 1
            else:
                break
        from_host.append(h_hits * bs)
        from_disk.append(d_hits * bs)
        for h, where in served:
            if where == "disk":
                disk.touch(h)
                if policy == "exclusive":
                    disk.remove(h)
        for h, where in served:  # promoted: copied (or moved) up
            if where == "disk":
                store(h)
        for h in hashes[len(served) :]:  # computed: stored (the whole prompt's full blocks)
            store(h)
            if policy == "write-through":
                write(h)
        for h in reversed(hashes):  # the chain, last block first: tails are evicted first
            if h in host:
                host.touch(h)
    return {"from_host": from_host, "from_disk": from_disk, "writes": writes}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", default="zipf-0.8,zipf-1.0,zipf-1.2,mixed")
    p.add_argument("--host-docs", type=int, default=20, help="host store capacity, in documents")
    p.add_argument("--disk-ratios", default="2,10", help="disk capacity / host capacity")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--doc-blocks", type=int, default=12, help="mean blocks per document")
    p.add_argument("--query-blocks", type=int, default=1)
    p.add_argument("--block-bytes", type=int, default=1_059_908, help="one entry (SmolLM2, 128)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--window", type=int, default=200, help="requests right after the crash")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/tier_hierarchy"))
    args = p.parse_args(argv)
    host_blocks = args.host_docs * args.doc_blocks
    rows = []
    for trace_name in args.traces.split(","):
        for ratio in (int(r) for r in args.disk_ratios.split(",")):
            for seed in range(args.seeds):
                trace = make_trace(trace_name, args.host_docs, args.requests, random.Random(seed))
                prompts = Prompts(128, args.doc_blocks, args.query_blocks, seed)
                possible = could_serve(trace, prompts)
                half = args.requests // 2
                for policy in POLICIES:
                    run = replay(policy, trace.docs, prompts, host_blocks, ratio * host_blocks, -1)
                    crashed = replay(
                        policy, trace.docs, prompts, host_blocks, ratio * host_blocks, half
                    )
                    total = sum(possible)
                    after = sum(possible[half:])
                    w = slice(half, half + args.window)
                    window = sum(possible[w])
                    rows.append(
                        {
                            "trace": trace_name,
                            "disk_ratio": ratio,
                            "seed": seed,
                            "policy": policy,
                            "host_hit": sum(run["from_host"]) / total,
                            "disk_hit": sum(run["from_disk"]) / total,
                            "hit": (sum(run["from_host"]) + sum(run["from_disk"])) / total,
                            "gb_written_per_1k": run["writes"]
                            * args.block_bytes
                            / 1e9
                            / (args.requests / 1000),
                            "hit_after_crash": (
                                sum(crashed["from_host"][half:]) + sum(crashed["from_disk"][half:])
                            )
                            / after,
                            "hit_right_after_crash": (
                                sum(crashed["from_host"][w]) + sum(crashed["from_disk"][w])
                            )
                            / window,
                        }
                    )
    summary: dict[str, dict[str, float]] = {}
    for r in rows:
        key = f"{r['trace']} disk={r['disk_ratio']}x {r['policy']}"
        acc = summary.setdefault(key, {"n": 0})
        acc["n"] += 1
        for k in _METRICS:
            acc[k] = acc.get(k, 0.0) + r[k]
    for acc in summary.values():
        n = acc.pop("n")
        for k in acc:
            acc[k] /= n
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out = {"command": command, "config": config, "summary": summary, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    lines = [
        f"`{command}` (means over {args.seeds} seeds; hit rates of the tokens an unbounded store "
        "would serve)",
        "",
        "| trace | disk / host | policy | host hit | disk hit | total hit | GB written / 1k req "
        f"| hit after a crash | hit in the {args.window} requests after it |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, acc in summary.items():
        trace_name, ratio, policy = key.split(" ")
        lines.append(
            f"| {trace_name} | {ratio.split('=')[1]} | {policy} | {acc['host_hit']:.1%} | "
            f"{acc['disk_hit']:.1%} | {acc['hit']:.1%} | {acc['gb_written_per_1k']:.2f} | "
            f"{acc['hit_after_crash']:.1%} | {acc['hit_right_after_crash']:.1%} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
