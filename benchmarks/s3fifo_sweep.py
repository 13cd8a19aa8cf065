"""S3-FIFO's two knobs against the traces where it loses (``recent``, ``shift-50``), Zipf 1.0
and issue 10's workload: is there a setting that is good on both? (Pure Python, the replays of
``policy_replay.py`` and ``issue10_replay.py``, 3 seeds; about 45 s on 2 cores.)

Prints a Markdown table (hit rate of reusable tokens for the synthetic traces; share of all
prompt tokens from the store for issue 10, seed 0 / mean of the seeds)::

    python benchmarks/s3fifo_sweep.py > benchmarks/results/s3fifo_sweep.md
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import issue10_replay as ir  # noqa: E402
import policy_replay as pr  # noqa: E402

from polykv_vllm.connector.scheduler import EvictionPolicy, S3FIFOPolicy  # noqa: E402

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("small 10%, promote after 1 access (the default)", {}),
    ("small 20%", {"small_ratio": 0.2}),
    ("small 30%", {"small_ratio": 0.3}),
    ("promote after 2 accesses", {"promote_after": 2}),
]
TRACES = ["recent", "shift-50", "zipf-1.0"]
SEEDS = 3


def main() -> None:
    print("`python benchmarks/s3fifo_sweep.py`\n")
    print("| s3fifo setting | " + " | ".join(TRACES) + " | issue10 tier, seed 0 / mean |")
    print("|" + " --- |" * (len(TRACES) + 2))
    for label, kw in VARIANTS:

        def make(name: str, capacity: int, kw: dict[str, Any] = kw) -> EvictionPolicy:
            return S3FIFOPolicy(capacity, **kw)

        pr.make_eviction_policy = ir.make_eviction_policy = make  # type: ignore[assignment]
        cells = []
        for t in TRACES:
            hits = []
            for seed in range(SEEDS):
                trace = pr.make_trace(t, 16, 2000, random.Random(seed))
                prompts = pr.Prompts(16, 16, 1, seed)
                served = sum(pr.replay_index(trace, prompts, "s3fifo", 16 * 16))
                hits.append(served / sum(pr.could_serve(trace, prompts)))
            cells.append(f"{100 * sum(hits) / SEEDS:.1f}%")
        tier = [ir.replay("s3fifo", seed)["tier"] for seed in range(SEEDS)]
        cells.append(f"{100 * tier[0]:.1f}% / {100 * sum(tier) / SEEDS:.1f}%")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
