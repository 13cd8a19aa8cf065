"""Demo of the HuggingFace fallback: ``python -m polykv_vllm.apps.hf_demo`` (make fallback-demo).

Loads the embedded SmolLM2-135M-Instruct (fp32, CPU), compresses a real document (Python's own
documentation of the ``with`` statement, from ``pydoc_data.topics``) once, lets several agents
answer different questions about it (by default decoding together in lockstep with
``pool.generate``: the shared prefix is attended once per layer for all of them; ``--mode
threads`` or ``sequential`` runs one ``Agent`` per question instead), compares each answer with the
uncompressed baseline (the plain model with the full-precision document), and prints the memory
summary. ``--json PATH`` also writes the answers, timings and bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

QUESTIONS = [
    "What does the with statement do?",
    "Which method of the context manager is invoked before the suite runs?",
    "What happens to an exception raised in the suite if __exit__() returns true?",
    "How are several context managers in one with statement processed?",
    "Which PEP introduced the with statement?",
    "What arguments are passed to __exit__() when there was no exception?",
    "Since which Python version can the items be surrounded by parentheses?",
    "What is the with statement semantically equivalent to?",
]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m polykv_vllm.apps.hf_demo", description=__doc__)
    p.add_argument("--topic", default="with", help="pydoc_data.topics key (default: with)")
    p.add_argument("--chars", type=int, default=3000, help="document characters (default 3000)")
    p.add_argument("--agents", type=int, default=4, help=f"1..{len(QUESTIONS)} (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--preset", default="polykv", help="codec preset (default polykv)")
    p.add_argument(
        "--threads-per-agent",
        type=int,
        default=0,
        help="torch intra-op threads; 0 = cores // agents, at least 1 (default 0)",
    )
    p.add_argument(
        "--mode",
        choices=["batched", "threads", "sequential"],
        default="batched",
        help="batched: pool.generate, all agents in lockstep (default); threads: one Agent per "
        "thread; sequential: one Agent after another",
    )
    p.add_argument("--sequential", action="store_true", help="same as --mode sequential")
    p.add_argument("--json", type=Path, default=None, help="also write results to this file")
    args = p.parse_args(argv)
    if args.sequential:
        args.mode = "sequential"
    if not 1 <= args.agents <= len(QUESTIONS):
        p.error(f"--agents={args.agents} is not allowed: use 1..{len(QUESTIONS)}")
    if args.chars < 1 or args.max_new_tokens < 1:
        p.error("--chars and --max-new-tokens must be >= 1")
    return args


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pydoc_data.topics import topics

    from polykv_vllm.embedded import load_embedded_model
    from polykv_vllm.hf import compress, create_agents, generate_uncompressed_ids

    if args.topic not in topics:
        print(f"unknown --topic {args.topic!r}; e.g. {sorted(topics)[:8]}", file=sys.stderr)
        return 2
    per_agent = args.mode == "threads"
    threads = args.threads_per_agent or (
        max(1, torch.get_num_threads() // args.agents) if per_agent else torch.get_num_threads()
    )
    torch.set_num_threads(threads)
    document = topics[args.topic][: args.chars].strip()
    questions = QUESTIONS[: args.agents]

    t0 = time.perf_counter()
    model, tokenizer = load_embedded_model()
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool = compress(model, tokenizer, document, preset=args.preset)
    t_compress = time.perf_counter() - t0
    agents = create_agents(pool, model, tokenizer, args.agents)

    t0 = time.perf_counter()
    pairs = list(zip(agents, questions, strict=True))
    if args.mode == "batched":
        got = pool.generate_ids(questions, model, tokenizer, max_new_tokens=args.max_new_tokens)
    elif args.mode == "sequential":
        got = [a.generate_ids(q, args.max_new_tokens) for a, q in pairs]
    else:
        with ThreadPoolExecutor(max_workers=args.agents) as ex:
            futures = [ex.submit(a.generate_ids, q, args.max_new_tokens) for a, q in pairs]
            got = [f.result() for f in futures]
    t_agents = time.perf_counter() - t0
    t0 = time.perf_counter()
    want = [
        generate_uncompressed_ids(pool, model, tokenizer, q, args.max_new_tokens) for q in questions
    ]
    t_baseline = time.perf_counter() - t0

    print(
        f"\nDocument: pydoc_data.topics[{args.topic!r}], {len(document)} characters, "
        f"{pool.num_tokens} tokens (chat template: {pool.prompt.chat}); preset {pool.preset}."
    )
    print(
        f"Timings: load {t_load:.1f} s, compress {t_compress:.1f} s, "
        f"{args.agents} agents ({args.mode}) {t_agents:.1f} s, uncompressed baseline "
        f"(sequential) {t_baseline:.1f} s; {threads} torch thread(s)"
        f"{' per agent' if per_agent else ''}.\n"
    )
    rows = []
    for agent, q, g, w in zip(agents, questions, got, want, strict=True):
        same = _common_prefix(g, w)
        verdict = "identical" if g == w else f"first {same} of {len(w)} tokens identical"
        answer = tokenizer.decode(g, skip_special_tokens=True).strip()
        baseline = tokenizer.decode(w, skip_special_tokens=True).strip()
        print(f"[{agent.name}] Q: {q}")
        print(f"  polykv  : {answer}")
        print(f"  baseline: {baseline}")
        peak = (
            ""
            if args.mode == "batched"
            else f"; peak working memory {agent.peak_bytes / 2**20:.3f} MiB"
        )
        print(f"  -> {verdict}{peak}\n")
        rows.append(
            {
                "agent": agent.name,
                "question": q,
                "answer": answer,
                "baseline": baseline,
                "identical_prefix_tokens": same,
                "tokens": len(g),
                "baseline_tokens": len(w),
                "peak_bytes": agent.peak_bytes,
            }
        )
    summary = pool.memory_summary(args.agents)
    print(summary)
    if args.json is not None:
        result = {
            "config": vars(args) | {"json": str(args.json), "threads_per_agent": threads},
            "document_tokens": pool.num_tokens,
            "timings_s": {
                "load": t_load,
                "compress": t_compress,
                "agents": t_agents,
                "baseline": t_baseline,
            },
            "answers": rows,
            "memory": asdict(summary),
        }
        args.json.write_text(json.dumps(result, indent=2))
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
