"""Multi-agent load generator for any OpenAI-compatible server on this machine.

D documents x A agents: every agent asks its own question about every document, so the
documents are shared prefixes that a prefix cache (vLLM APC, the polykv store) can reuse.
Requests are interleaved across documents (agent 0 on docs 0..D-1, then agent 1 on docs
0..D-1, ...), so with a small KV cache a document is evicted between two of its visits.

Arrivals are Poisson (``--rate`` requests/s) or closed-loop (``--concurrency`` workers).
Every request streams, so the client measures time to first token (TTFT) and inter-token
latency (ITL). ``/metrics`` is scraped before and after the run for the prefix-cache, external
(connector) cache and ``vllm:polykv_*`` counters.

Documents are real text (Python's ``pydoc_data.topics``), cut to ``--doc-tokens`` tokens with the
server's own tokenizer (vLLM's ``/tokenize`` and ``/detokenize``) or, where the server has no such
endpoint, with an estimate of 4 characters per token.

Outputs ``<out>.csv`` (one row per request), ``<out>.json`` (summary, resolved config, command)
and ``<out>.png`` (TTFT over time and TTFT CDF, first visit vs revisit).

Example::

    python benchmarks/loadgen.py --base-url http://127.0.0.1:8000/v1 --documents 4 --agents 3 \\
        --doc-tokens 1500 --concurrency 2 --max-tokens 16 --doc-id --out benchmarks/results/run

Bounded: at most ``--max-requests`` requests and ``--time-limit`` seconds; refuses any host
other than localhost.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import json
import logging
import math
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from polykv_vllm.apps.serving import metric_totals, parse_metrics
from polykv_vllm.apps.workload import (
    agent_question,
    corpus_text,
    make_prompt,
    split_documents,
)

logger = logging.getLogger("loadgen")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
CHARS_PER_TOKEN = 4.0  # estimate used only when the server has no /tokenize endpoint
MAX_REQUESTS_CAP = 10_000
CACHE_METRICS = (
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:external_prefix_cache_queries",
    "vllm:external_prefix_cache_hits",
)


# --------------------------------------------------------------------------------------------
# Pure parts (unit-tested in tests/test_loadgen.py)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) with linear interpolation (numpy's default).

    Returns NaN for an empty sequence.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q!r} is outside [0, 100]; pass e.g. 50 or 99")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def cache_report(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Deltas of the cache counters between two scrapes and the hit rates they give.

    Returns ``{"deltas": {...}, "prefix_hit_rate": float|None, "external_hit_rate": float|None,
    "polykv": {name: value after}}``; a hit rate is None when there were no queries.
    """
    keys = set(CACHE_METRICS) | {k for k in after if k.startswith("vllm:prompt_tokens_by_source")}
    deltas = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in sorted(keys) if k in after}

    def rate(hits: str, queries: str) -> float | None:
        q = deltas.get(queries, 0.0)
        return deltas.get(hits, 0.0) / q if q > 0 else None

    polykv = {
        k: v
        for k, v in sorted(after.items())
        if k.startswith("vllm:polykv_") and not k.endswith("_bucket")
    }
    polykv_deltas = {k: v - before.get(k, 0.0) for k, v in polykv.items()}
    return {
        "deltas": deltas,
        "prefix_hit_rate": rate("vllm:prefix_cache_hits", "vllm:prefix_cache_queries"),
        "external_hit_rate": rate(
            "vllm:external_prefix_cache_hits", "vllm:external_prefix_cache_queries"
        ),
        "polykv_after": polykv,
        "polykv_deltas": polykv_deltas,
    }


@dataclass(frozen=True)
class WorkItem:
    """One request of the workload: agent ``agent`` asks its question about ``doc``."""

    index: int
    doc: int
    agent: int
    round: int
    revisit: bool  # the document was requested earlier in the schedule


def build_workload(
    documents: int, agents: int, rounds: int = 1, order: str = "interleaved"
) -> list[WorkItem]:
    """The request schedule for ``documents`` x ``agents`` x ``rounds``.

    ``interleaved``: for each round, for each agent, every document in turn (consecutive requests
    hit different documents). ``grouped``: all agents of a document back to back.
    """
    for field, value in (("documents", documents), ("agents", agents), ("rounds", rounds)):
        if value < 1:
            raise ValueError(f"{field}={value} must be >= 1")
    if order == "interleaved":
        triples = [
            (d, a, r) for r in range(rounds) for a in range(agents) for d in range(documents)
        ]
    elif order == "grouped":
        triples = [
            (d, a, r) for r in range(rounds) for d in range(documents) for a in range(agents)
        ]
    else:
        raise ValueError(f"order={order!r} is not one of 'interleaved', 'grouped'")
    seen: set[int] = set()
    items = []
    for i, (d, a, r) in enumerate(triples):
        items.append(WorkItem(index=i, doc=d, agent=a, round=r, revisit=d in seen))
        seen.add(d)
    return items


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets in seconds of ``n`` requests of a Poisson process of ``rate`` per second."""
    if rate <= 0:
        raise ValueError(f"rate={rate} must be > 0 requests/s")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def summarize(rows: Sequence[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Latency and throughput summary of per-request rows (see :class:`RequestResult`)."""
    ok = [r for r in rows if not r["error"]]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    itl = [x for r in ok for x in r["itl_s"]]
    out_tokens = sum(r["completion_tokens"] for r in ok)
    in_tokens = sum(r["prompt_tokens"] for r in ok)

    def pct(vals: Sequence[float]) -> dict[str, float]:
        return {"p50": percentile(vals, 50), "p99": percentile(vals, 99), "n": len(vals)}

    return {
        "requests": len(rows),
        "failed": len(rows) - len(ok),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else math.nan,
        "output_tokens": out_tokens,
        "prompt_tokens": in_tokens,
        "output_tok_per_s": out_tokens / wall_s if wall_s > 0 else math.nan,
        "ttft_s": pct(ttft),
        "ttft_first_visit_s": pct([r["ttft_s"] for r in ok if not r["revisit"] and r["ttft_s"]]),
        "ttft_revisit_s": pct([r["ttft_s"] for r in ok if r["revisit"] and r["ttft_s"]]),
        "itl_s": pct(itl),
        "e2e_s": pct([r["e2e_s"] for r in ok]),
    }


# --------------------------------------------------------------------------------------------
# Client side


@dataclass(frozen=True)
class LoadConfig:
    """Resolved settings of one run (written to the JSON next to the results)."""

    base_url: str
    model: str
    api: str
    documents: int
    agents: int
    rounds: int
    order: str
    doc_tokens: int
    doc_offset: int
    max_tokens: int
    rate: float | None
    concurrency: int | None
    doc_id: bool
    seed: int
    max_requests: int
    time_limit_s: float
    warmup: int
    out: str


def check_local(base_url: str) -> None:
    """Refuse any endpoint that is not on this machine."""
    host = urlparse(base_url).hostname or ""
    if host not in LOCAL_HOSTS and f"[{host}]" not in LOCAL_HOSTS:
        raise SystemExit(
            f"--base-url {base_url!r}: host {host!r} is not local; this tool only targets "
            f"{', '.join(LOCAL_HOSTS)}"
        )


def server_root(base_url: str) -> str:
    """``http://host:port`` of a base URL such as ``http://host:port/v1``."""
    p = urlparse(base_url)
    return f"{p.scheme}://{p.netloc}"


async def scrape_metrics(client: httpx.AsyncClient, base_url: str) -> dict[str, float]:
    """Totals of the server's ``/metrics`` (empty if the server has none)."""
    try:
        resp = await client.get(f"{server_root(base_url)}/metrics", timeout=30)
    except httpx.HTTPError as exc:
        logger.warning("could not scrape /metrics: %s", exc)
        return {}
    if resp.status_code != 200:
        logger.warning(
            "/metrics answered HTTP %s; cache hit rates will be missing", resp.status_code
        )
        return {}
    return metric_totals(parse_metrics(resp.text))


async def resolve_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model the server lists."""
    resp = await client.get(f"{base_url}/models", timeout=30)
    resp.raise_for_status()
    return str(resp.json()["data"][0]["id"])


async def tokenize_documents(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    documents: int,
    tokens: int,
    offset: int = 0,
) -> tuple[list[str], str]:
    """``documents`` texts of ``tokens`` tokens each (after skipping ``offset`` such windows of
    the corpus) and how they were sized."""
    text = corpus_text()
    root = server_root(base_url)
    # Take only as much text as needed (with margin), so /tokenize stays small.
    chunk = text[: int((documents + offset) * tokens * CHARS_PER_TOKEN * 2)]
    resp = await client.post(
        f"{root}/tokenize", json={"model": model, "prompt": chunk}, timeout=120
    )
    if resp.status_code == 200:
        ids = resp.json()["tokens"]
        docs = []
        for window in split_documents(ids, documents + offset, tokens)[offset:]:
            d = await client.post(
                f"{root}/detokenize", json={"model": model, "tokens": window}, timeout=120
            )
            d.raise_for_status()
            docs.append(str(d.json()["prompt"]))
        return docs, "server /tokenize"
    logger.warning(
        "/tokenize answered HTTP %s; sizing documents at %.1f chars/token",
        resp.status_code,
        CHARS_PER_TOKEN,
    )
    n = int(tokens * CHARS_PER_TOKEN)
    if len(text) < (documents + offset) * n:
        raise SystemExit(f"corpus too small for {documents + offset} x {tokens} tokens")
    windows = [text[i * n : (i + 1) * n] for i in range(offset, offset + documents)]
    return windows, "estimate 4 chars/token"


@dataclass
class RequestResult:
    """What one streamed request measured (times in seconds from the run start)."""

    item: WorkItem
    start_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None
    text: str = ""
    error: str = ""

    def row(self) -> dict[str, Any]:
        return {
            "index": self.item.index,
            "doc": self.item.doc,
            "agent": self.item.agent,
            "round": self.item.round,
            "revisit": self.item.revisit,
            "start_s": self.start_s,
            "ttft_s": self.ttft_s,
            "e2e_s": self.e2e_s,
            "itl_s": self.itl_s,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "text": self.text,
            "error": self.error,
        }


def request_body(cfg: LoadConfig, prompt: str, doc: int) -> dict[str, Any]:
    """JSON body of one streamed, greedy request (chat or completions API)."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": cfg.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.doc_id:
        body["kv_transfer_params"] = {"polykv": {"doc_id": f"loadgen-doc-{doc}"}}
    return body


async def stream_request(
    client: httpx.AsyncClient,
    cfg: LoadConfig,
    body: dict[str, Any],
    result: RequestResult,
    t0: float,
) -> None:
    """Send one streaming request and fill ``result`` with its timings and usage."""
    path = "/chat/completions" if cfg.api == "chat" else "/completions"
    start = time.perf_counter()
    result.start_s = start - t0
    last = start
    pieces: list[str] = []
    try:
        async with client.stream("POST", f"{cfg.base_url}{path}", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    result.completion_tokens = int(usage.get("completion_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        result.cached_tokens = int(details["cached_tokens"])
                for choice in chunk.get("choices") or []:
                    piece = (
                        (choice.get("delta") or {}).get("content")
                        if cfg.api == "chat"
                        else choice.get("text")
                    )
                    if not piece:
                        continue
                    now = time.perf_counter()
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    pieces.append(piece)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    except asyncio.CancelledError:
        result.error = "cancelled: --time-limit reached"
        raise
    finally:
        result.e2e_s = time.perf_counter() - start
        result.text = "".join(pieces)


async def run_load(
    cfg: LoadConfig, items: Sequence[WorkItem], prompts: dict[tuple[int, int], str]
) -> tuple[list[RequestResult], float]:
    """Issue ``items`` (Poisson or closed-loop) and return the results and wall time."""
    results = [RequestResult(item=it) for it in items]
    limits = httpx.Limits(max_connections=max(cfg.concurrency or 0, 64))
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.time_limit_s), limits=limits) as client:
        t0 = time.perf_counter()
        deadline = t0 + cfg.time_limit_s

        async def one(res: RequestResult) -> None:
            if time.perf_counter() >= deadline:
                res.error = "not sent: --time-limit reached"
                return
            body = request_body(cfg, prompts[(res.item.doc, res.item.agent)], res.item.doc)
            await stream_request(client, cfg, body, res, t0)
            logger.info(
                "req %d doc %d agent %d %s ttft %.3fs e2e %.3fs%s",
                res.item.index,
                res.item.doc,
                res.item.agent,
                "revisit" if res.item.revisit else "first  ",
                res.ttft_s or math.nan,
                res.e2e_s,
                f" ERROR {res.error}" if res.error else "",
            )

        if cfg.rate is not None:
            offsets = poisson_arrivals(len(results), cfg.rate, cfg.seed)

            async def delayed(res: RequestResult, at: float) -> None:
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                await one(res)

            tasks = [
                asyncio.create_task(delayed(r, at)) for r, at in zip(results, offsets, strict=True)
            ]
        else:
            queue: asyncio.Queue[RequestResult] = asyncio.Queue()
            for r in results:
                queue.put_nowait(r)

            async def worker() -> None:
                while not queue.empty():
                    await one(queue.get_nowait())

            tasks = [asyncio.create_task(worker()) for _ in range(cfg.concurrency or 1)]
        remaining = deadline - time.perf_counter() + 30.0  # grace for requests in flight
        _done, pending = await asyncio.wait(tasks, timeout=max(remaining, 1.0))
        for task in pending:
            task.cancel()
        for r in results:
            if not r.error and r.e2e_s == 0.0:
                r.error = "cancelled: --time-limit reached"
        wall = time.perf_counter() - t0
    return results, wall


def write_outputs(
    cfg: LoadConfig, rows: list[dict[str, Any]], report: dict[str, Any]
) -> list[Path]:
    """Write ``<out>.csv``, ``<out>.json`` and ``<out>.png``; return the paths written."""
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".csv"), out.with_suffix(".json")]
    with paths[0].open("w", newline="") as f:
        fields = [k for k in rows[0] if k != "itl_s"] + ["itl_mean_s", "itl_count"] if rows else []
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            flat = {k: v for k, v in r.items() if k != "itl_s"}
            flat["itl_mean_s"] = sum(r["itl_s"]) / len(r["itl_s"]) if r["itl_s"] else ""
            flat["itl_count"] = len(r["itl_s"])
            writer.writerow(flat)
    paths[1].write_text(json.dumps(report, indent=2, default=str) + "\n")
    png = plot(rows, out.with_suffix(".png"), title=out.name)
    if png is not None:
        paths.append(png)
    return paths


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """TTFT over time (first visit vs revisit) and the TTFT CDF; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no PNG (pip install matplotlib)")
        return None
    ok = [r for r in rows if not r["error"] and r["ttft_s"] is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for revisit, label, marker in ((False, "first visit", "o"), (True, "revisit", "x")):
        sel = [r for r in ok if r["revisit"] == revisit]
        ax1.scatter(
            [r["start_s"] for r in sel],
            [r["ttft_s"] * 1e3 for r in sel],
            label=label,
            marker=marker,
        )
        ttfts = sorted(r["ttft_s"] * 1e3 for r in sel)
        if ttfts:
            fractions = [0.0] + [(i + 1) / len(ttfts) for i in range(len(ttfts))]
            ax2.step([ttfts[0], *ttfts], fractions, where="post", label=label)
    ax1.set(xlabel="request start (s)", ylabel="TTFT (ms)", title=f"{title}: TTFT per request")
    ax2.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF")
    ax1.set_yscale("log")
    ax2.set_xscale("log")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


async def warmup(client: httpx.AsyncClient, cfg: LoadConfig) -> None:
    """A few short requests with no document, so the first measured request is not a cold one."""
    for i in range(cfg.warmup):
        body = request_body(dataclasses.replace(cfg, doc_id=False), f"Say hello ({i}).", -1)
        await stream_request(
            client, cfg, body, RequestResult(item=build_workload(1, 1)[0]), time.perf_counter()
        )


async def main_async(cfg: LoadConfig, argv: Sequence[str]) -> dict[str, Any]:
    """Prepare documents, run the load, scrape metrics, write the outputs; returns the report."""
    async with httpx.AsyncClient(timeout=120) as client:
        if not cfg.model:
            cfg = dataclasses.replace(cfg, model=await resolve_model(client, cfg.base_url))
        docs, sizing = await tokenize_documents(
            client, cfg.base_url, cfg.model, cfg.documents, cfg.doc_tokens, cfg.doc_offset
        )
        await warmup(client, cfg)
        before = await scrape_metrics(client, cfg.base_url)
    items = build_workload(cfg.documents, cfg.agents, cfg.rounds, cfg.order)[: cfg.max_requests]
    prompts = {
        (d, a): make_prompt(docs[d], agent_question(a))
        for d in range(cfg.documents)
        for a in range(cfg.agents)
    }
    logger.info(
        "%d requests (%d documents x %d agents x %d rounds, %s), documents sized by %s",
        len(items),
        cfg.documents,
        cfg.agents,
        cfg.rounds,
        cfg.order,
        sizing,
    )
    results, wall = await run_load(cfg, items, prompts)
    async with httpx.AsyncClient(timeout=120) as client:
        after = await scrape_metrics(client, cfg.base_url)
    rows = [r.row() for r in results]
    report = {
        "summary": summarize(rows, wall),
        "cache": cache_report(before, after),
        "config": dataclasses.asdict(cfg),
        "document_sizing": sizing,
        "command": " ".join(shlex.quote(a) for a in argv),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    paths = write_outputs(cfg, rows, report)
    report["files"] = [str(p) for p in paths]
    return report


def parse_args(argv: Sequence[str]) -> LoadConfig:
    """Command line -> :class:`LoadConfig` (validated)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL (localhost only)"
    )
    p.add_argument("--model", default="", help="model name (default: the server's first model)")
    p.add_argument("--api", choices=("chat", "completions"), default="chat")
    p.add_argument("--documents", type=int, default=4, help="number of documents D")
    p.add_argument(
        "--agents", type=int, default=3, help="agents per document A (distinct questions)"
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="times every agent asks about every document"
    )
    p.add_argument("--order", choices=("interleaved", "grouped"), default="interleaved")
    p.add_argument("--doc-tokens", type=int, default=1500, help="tokens per document")
    p.add_argument(
        "--doc-offset",
        type=int,
        default=0,
        help="skip this many document-sized windows of the corpus (disjoint document sets)",
    )
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    arrivals = p.add_mutually_exclusive_group()
    arrivals.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests/s")
    arrivals.add_argument(
        "--concurrency", type=int, default=None, help="closed loop, N workers (default 1)"
    )
    p.add_argument(
        "--doc-id", action="store_true", help='send kv_transfer_params {"polykv": {"doc_id": ...}}'
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-requests", type=int, default=256, help=f"bound on requests (<= {MAX_REQUESTS_CAP})"
    )
    p.add_argument("--time-limit", type=float, default=600.0, help="bound on run time, seconds")
    p.add_argument("--warmup", type=int, default=1, help="short requests before the measured run")
    p.add_argument(
        "--out", default="benchmarks/results/loadgen", help="output prefix (.csv/.json/.png)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no per-request lines")
    a = p.parse_args(argv)
    if not 1 <= a.max_requests <= MAX_REQUESTS_CAP:
        p.error(f"--max-requests {a.max_requests} must be in [1, {MAX_REQUESTS_CAP}]")
    if a.time_limit <= 0:
        p.error(f"--time-limit {a.time_limit} must be > 0 seconds")
    if a.concurrency is not None and a.concurrency < 1:
        p.error(f"--concurrency {a.concurrency} must be >= 1")
    if a.rate is not None and a.rate <= 0:
        p.error(f"--rate {a.rate} must be > 0")
    if a.doc_tokens < 1 or a.max_tokens < 1 or a.doc_offset < 0:
        p.error("--doc-tokens and --max-tokens must be >= 1, --doc-offset >= 0")
    check_local(a.base_url)
    logging.basicConfig(
        level=logging.WARNING if a.quiet else logging.INFO, format="%(asctime)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return LoadConfig(
        base_url=a.base_url.rstrip("/"),
        model=a.model,
        api=a.api,
        documents=a.documents,
        agents=a.agents,
        rounds=a.rounds,
        order=a.order,
        doc_tokens=a.doc_tokens,
        doc_offset=a.doc_offset,
        max_tokens=a.max_tokens,
        rate=a.rate,
        concurrency=a.concurrency if a.rate is not None or a.concurrency is not None else 1,
        doc_id=a.doc_id,
        seed=a.seed,
        max_requests=a.max_requests,
        time_limit_s=a.time_limit,
        warmup=a.warmup,
        out=a.out,
    )


def format_summary(report: dict[str, Any]) -> str:
    """Human-readable lines for the terminal."""
    s, c = report["summary"], report["cache"]

    def ms(d: dict[str, float]) -> str:
        return f"p50 {d['p50'] * 1e3:8.1f} ms  p99 {d['p99'] * 1e3:8.1f} ms  (n={d['n']})"

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        f"requests {s['requests']} (failed {s['failed']}) in {s['wall_s']:.1f} s: "
        f"{s['requests_per_s']:.2f} req/s, {s['output_tok_per_s']:.1f} output tok/s",
        f"TTFT          {ms(s['ttft_s'])}",
        f"TTFT first    {ms(s['ttft_first_visit_s'])}",
        f"TTFT revisit  {ms(s['ttft_revisit_s'])}",
        f"ITL           {ms(s['itl_s'])}",
        f"prefix cache hit rate {pct(c['prefix_hit_rate'])}, "
        f"external (connector) hit rate {pct(c['external_hit_rate'])}",
    ]
    lines += [
        f"{k} = {v:g} (delta {c['polykv_deltas'][k]:+g})" for k, v in c["polykv_after"].items()
    ]
    lines.append("files: " + ", ".join(report.get("files", [])))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, printer: Callable[[str], None] = print) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv)
    report = asyncio.run(main_async(cfg, ["python", "benchmarks/loadgen.py", *argv]))
    printer(format_summary(report))
    return 1 if report["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
