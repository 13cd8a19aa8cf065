"""One run of the demo: a server, the documents, the interleaved requests, what each measured."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polykv_vllm.apps.demo.options import DemoConfig, server_command
from polykv_vllm.apps.serving import (
    EMBEDDED_MODEL_NAME,
    http_post_json,
    metric_labels,
    metric_totals,
    read_metrics,
    running_server,
)
from polykv_vllm.apps.workload import agent_question, corpus_text, make_prompt, split_documents

__all__ = ["COMPUTED", "EXTERNAL", "LOCAL_HIT", "RequestRecord", "RunResult", "run_once", "say"]

EXTERNAL = "vllm:prompt_tokens_by_source[source=external_kv_transfer]"
LOCAL_HIT = "vllm:prompt_tokens_by_source[source=local_cache_hit]"
COMPUTED = "vllm:prompt_tokens_by_source[source=local_compute]"


def say(msg: str) -> None:
    """A progress line for the user (this is a program: stdout is its interface)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class RequestRecord:
    """One request of a run: which document/agent, what it measured, where its prompt came from.

    ``ttft_s`` is client-side (request sent → first streamed token); the ``tokens_*`` fields are
    deltas of ``vllm:prompt_tokens_by_source`` around this request alone (runs are sequential).
    """

    index: int
    doc: int
    agent: int
    revisit: bool
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_from_store: float = 0.0
    tokens_from_vllm_cache: float = 0.0
    tokens_computed: float = 0.0
    text: str = ""


@dataclass
class RunResult:
    """Everything one server run measured."""

    plugin: bool
    records: list[RequestRecord] = field(default_factory=list)
    startup_s: float = 0.0
    wall_s: float = 0.0
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    kv_cache_tokens: int | None = None
    kv_cache_bytes: int | None = None
    command: list[str] = field(default_factory=list)


def kv_cache_size(url: str) -> tuple[int | None, int | None]:
    """vLLM's KV cache (tokens, bytes) as the server reports it in ``vllm:cache_config_info``."""
    labels = metric_labels(read_metrics(url), "vllm:cache_config_info")
    tokens, nbytes = labels.get("kv_cache_size_tokens"), labels.get("kv_cache_memory_bytes")
    return (
        int(tokens) if tokens and tokens.isdigit() else None,
        int(nbytes) if nbytes and nbytes.isdigit() else None,
    )


def load_documents(url: str, documents: int, tokens: int) -> list[str]:
    """``documents`` disjoint windows of ``tokens`` tokens of the corpus, cut with the server's
    own tokenizer."""
    text = corpus_text()[: documents * tokens * 8]
    ids = http_post_json(f"{url}/tokenize", {"model": EMBEDDED_MODEL_NAME, "prompt": text})
    try:
        windows = split_documents(ids["tokens"], documents, tokens)
    except ValueError as exc:
        raise ValueError(f"--documents {documents} x --doc-tokens {tokens}: {exc}") from exc
    return [
        str(
            http_post_json(f"{url}/detokenize", {"model": EMBEDDED_MODEL_NAME, "tokens": window})[
                "prompt"
            ]
        )
        for window in windows
    ]


def schedule(documents: int, agents: int) -> list[tuple[int, int, bool]]:
    """Interleaved ``(doc, agent, revisit)``: agent 0 on every document, then agent 1, ..."""
    return [(d, a, a > 0) for a in range(agents) for d in range(documents)]


def run_workload(
    cfg: DemoConfig, url: str, docs: Sequence[str], plugin: bool, result: RunResult
) -> None:
    """Send the requests one at a time through the ``openai`` client, streaming; fill ``result``."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=cfg.request_timeout_s)
    plan = schedule(cfg.documents, cfg.agents)
    result.metrics_before = before = metric_totals(read_metrics(url))
    t0 = time.perf_counter()
    for i, (d, a, revisit) in enumerate(plan):
        rec = RequestRecord(index=i, doc=d, agent=a, revisit=revisit)
        extra: dict[str, Any] = {}
        if plugin:
            extra["kv_transfer_params"] = {"polykv": {"doc_id": f"demo-doc-{d}"}}
        start = time.perf_counter()
        stream = client.chat.completions.create(
            model=EMBEDDED_MODEL_NAME,
            messages=[{"role": "user", "content": make_prompt(docs[d], agent_question(a))}],
            max_tokens=cfg.max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra or None,
        )
        pieces: list[str] = []
        for chunk in stream:
            if chunk.usage is not None:
                rec.prompt_tokens = chunk.usage.prompt_tokens
                rec.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    if not pieces:
                        rec.ttft_s = time.perf_counter() - start
                    pieces.append(choice.delta.content)
        rec.e2e_s = time.perf_counter() - start
        rec.text = "".join(pieces)
        after = metric_totals(read_metrics(url))
        rec.tokens_from_store = after.get(EXTERNAL, 0.0) - before.get(EXTERNAL, 0.0)
        rec.tokens_from_vllm_cache = after.get(LOCAL_HIT, 0.0) - before.get(LOCAL_HIT, 0.0)
        rec.tokens_computed = after.get(COMPUTED, 0.0) - before.get(COMPUTED, 0.0)
        before = after
        result.records.append(rec)
        say(
            f"  {i + 1:>2}/{len(plan)} doc {d} agent {a} {'revisit' if revisit else 'first  '}"
            f" TTFT {rec.ttft_s * 1e3:7.0f} ms  prompt {rec.prompt_tokens} tok = "
            f"{rec.tokens_from_store:.0f} store + {rec.tokens_from_vllm_cache:.0f} vLLM cache + "
            f"{rec.tokens_computed:.0f} computed"
        )
    result.wall_s = time.perf_counter() - t0
    time.sleep(1.0)  # connector gauges are published with the engine's next stats
    result.metrics_after = metric_totals(read_metrics(url))


def run_once(cfg: DemoConfig, model_dir: Path, plugin: bool, docs: list[str]) -> RunResult:
    """One server start, the workload, one server stop. Loads ``docs`` if it is empty.

    Raises :class:`~polykv_vllm.apps.serving.ServerError` when the server does not start.
    """
    label = "polykv on" if plugin else "plugin off"
    cmd = server_command(cfg, model_dir, plugin)
    result = RunResult(plugin=plugin, command=cmd)
    log = Path(tempfile.mkdtemp(prefix="polykv-demo-")) / f"{label.replace(' ', '-')}.log"
    with running_server(
        cmd, cfg.port, log, timeout_s=cfg.startup_timeout_s, label=f"vLLM ({label})"
    ) as server:
        result.startup_s = server.startup_s
        result.kv_cache_tokens, result.kv_cache_bytes = kv_cache_size(server.url)
        if not docs:
            docs.extend(load_documents(server.url, cfg.documents, cfg.doc_tokens))
            say(f"{len(docs)} documents of {cfg.doc_tokens} tokens from pydoc_data.topics")
        n = cfg.documents * cfg.agents
        say(f"running {n} requests ({cfg.documents} documents x {cfg.agents} agents) [{label}]")
        run_workload(cfg, server.url, docs, plugin, result)
    return result
