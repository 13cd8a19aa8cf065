"""The multi-agent / RAG workload of ``gpu_workload.py`` and its statistics (pure Python).

A workload is ``docs`` documents of mixed lengths (``lengths`` cycled over the documents, so the
mix is exact) with Zipf popularity (weight ``1 / rank**zipf``; ranks a seeded permutation, so
popularity does not follow length), and a request sequence drawn from it: each request is one
document plus its own query, arriving

- ``"waves"``: ``wave_size`` requests at once; the next wave when this one has finished
  (``wave_interval=0``, closed loop) or every ``wave_interval`` seconds (open loop);
- ``"poisson"``: one stream at ``rate`` requests/s (exponential gaps).

Token ids are derived from ``seed`` and the document / request index only, so every
configuration gets exactly the same prompts in the same order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Record",
    "Request",
    "Workload",
    "kv_bytes_per_token",
    "make_workload",
    "percentile",
    "summarize",
]


@dataclass(frozen=True)
class Request:
    """One agent's request: ``doc`` + its own query. ``arrival_s``: seconds after the start of
    the run, or None for a closed-loop wave (released when the previous wave has finished).
    ``revisit``: an earlier request of the sequence read the same document."""

    index: int
    doc: int
    wave: int
    arrival_s: float | None
    revisit: bool


@dataclass(frozen=True)
class Workload:
    """Documents (``doc_tokens[d]`` tokens, popularity ``weights[d]``) and the requests."""

    seed: int
    doc_tokens: tuple[int, ...]
    weights: tuple[float, ...]
    requests: tuple[Request, ...]
    query_tokens: int
    out_tokens: int
    vocab: tuple[int, int]  # token ids are drawn from [low, high)

    def doc(self, d: int) -> list[int]:
        """Token ids of document ``d`` (distinct per document from the first token on)."""
        rng = random.Random(f"{self.seed}:doc:{d}")
        return [rng.randrange(*self.vocab) for _ in range(self.doc_tokens[d])]

    def query(self, key: str | int) -> list[int]:
        """Token ids of the query of request ``key`` (``query_tokens`` of them)."""
        rng = random.Random(f"{self.seed}:query:{key}")
        return [rng.randrange(*self.vocab) for _ in range(self.query_tokens)]

    def prompts(self) -> dict[int, list[int]]:
        """Prompt token ids per request index (each document built once)."""
        docs: dict[int, list[int]] = {}
        out = {}
        for r in self.requests:
            if r.doc not in docs:
                docs[r.doc] = self.doc(r.doc)
            out[r.index] = docs[r.doc] + self.query(r.index)
        return out

    def describe(self, bytes_per_token: dict[str, int]) -> dict[str, Any]:
        """Counts and the KV bytes of the documents per cache dtype (a size computed from the
        model shape, ``bytes_per_token[dtype]``, not measured)."""
        used = sorted({r.doc for r in self.requests})
        all_tokens = sum(self.doc_tokens)
        used_tokens = sum(self.doc_tokens[d] for d in used)
        return {
            "documents": len(self.doc_tokens),
            "document_tokens": all_tokens,
            "documents_requested": len(used),
            "requested_document_tokens": used_tokens,
            "requests": len(self.requests),
            "revisits": sum(r.revisit for r in self.requests),
            "prompt_tokens": sum(self.doc_tokens[r.doc] + self.query_tokens for r in self.requests),
            "kv_bytes_all_documents": {k: v * all_tokens for k, v in bytes_per_token.items()},
            "kv_bytes_requested_documents": {
                k: v * used_tokens for k, v in bytes_per_token.items()
            },
        }


def make_workload(
    *,
    docs: int = 48,
    lengths: Sequence[int] = (2048, 4096, 8192),
    zipf: float = 1.0,
    waves: int = 20,
    wave_size: int = 16,
    arrival: str = "waves",
    wave_interval: float = 0.0,
    rate: float = 16.0,
    query_tokens: int = 64,
    out_tokens: int = 32,
    seed: int = 0,
    vocab: tuple[int, int] = (1000, 120000),
) -> Workload:
    """The workload described in the module docstring (``waves * wave_size`` requests)."""
    for name, value in (("docs", docs), ("waves", waves), ("wave_size", wave_size)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths={list(lengths)} must be a non-empty list of positive ints")
    if zipf < 0 or not math.isfinite(zipf):
        raise ValueError(f"zipf={zipf} must be a finite exponent >= 0 (0: uniform popularity)")
    if arrival not in ("waves", "poisson"):
        raise ValueError(f"arrival={arrival!r}: use 'waves' or 'poisson'")
    if arrival == "poisson" and not rate > 0:
        raise ValueError(f"rate={rate} must be > 0 requests/s for arrival='poisson'")
    if wave_interval < 0:
        raise ValueError(f"wave_interval={wave_interval} must be >= 0 seconds (0: closed loop)")
    doc_tokens = tuple(lengths[d % len(lengths)] for d in range(docs))
    ranks = list(range(docs))
    random.Random(f"{seed}:ranks").shuffle(ranks)
    weights = tuple(1.0 / (ranks[d] + 1) ** zipf for d in range(docs))
    rng = random.Random(f"{seed}:requests")
    n = waves * wave_size
    chosen = rng.choices(range(docs), weights=weights, k=n)
    t = 0.0
    seen: set[int] = set()
    requests = []
    for i, d in enumerate(chosen):
        wave = i // wave_size
        if arrival == "poisson":
            t += rng.expovariate(rate)
            at: float | None = t
        else:
            at = wave * wave_interval if wave_interval > 0 else None
        requests.append(Request(i, d, wave, at, d in seen))
        seen.add(d)
    return Workload(seed, doc_tokens, weights, tuple(requests), query_tokens, out_tokens, vocab)


def kv_bytes_per_token(config: dict[str, Any], element_bytes: float) -> int:
    """K + V bytes per token of a HF ``config.json`` dict: 2 x layers x kv heads x head dim x
    ``element_bytes`` (a size from the shape)."""
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return int(2 * config["num_hidden_layers"] * heads * head_dim * element_bytes)


# --------------------------------------------------------------------------------------------
# Statistics


@dataclass
class Record:
    """Client-side timestamps of one request (``time.perf_counter`` seconds): ``arrival`` (its
    scheduled arrival, or its wave's release), ``tokens`` = (time, new tokens) per engine step
    that returned tokens for it, ``finished``; what the engine reported at the end."""

    index: int
    revisit: bool
    arrival: float
    tokens: list[tuple[float, int]] = field(default_factory=list)
    finished: float | None = None
    num_cached_tokens: int = 0
    engine_ttft_s: float | None = None  # vLLM's RequestStateStats.first_token_latency
    tokens_from_store: int = 0  # polykv's kv_transfer_params

    @property
    def ttft_s(self) -> float | None:
        return self.tokens[0][0] - self.arrival if self.tokens else None

    def gaps_s(self) -> list[float]:
        """Inter-token gaps: a step that returned ``n`` tokens gives ``n`` gaps of dt / n."""
        out = []
        for (t0, _), (t1, n) in zip(self.tokens, self.tokens[1:], strict=False):
            out += [(t1 - t0) / n] * n
        return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default); None when
    ``values`` is empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q={q} must be in [0, 100]")
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def summarize(records: Sequence[Record], start: float) -> dict[str, Any]:
    """req/s over the run's wall time (``start`` to the last finish), TTFT p50/p99/mean (all,
    first reads, revisits), ITL p50/p99 over all gaps, vLLM's own TTFT p50 where it gave one."""
    done = [r for r in records if r.finished is not None]
    if not done:
        return {"requests": len(records), "finished": 0}
    wall = max(r.finished for r in done if r.finished is not None) - start
    ttft = [t for r in done if (t := r.ttft_s) is not None]
    first = [t for r in done if not r.revisit and (t := r.ttft_s) is not None]
    again = [t for r in done if r.revisit and (t := r.ttft_s) is not None]
    gaps = [g for r in done for g in r.gaps_s()]
    engine = [r.engine_ttft_s for r in done if r.engine_ttft_s]
    out_tokens = sum(n for r in done for _, n in r.tokens)
    return {
        "requests": len(records),
        "finished": len(done),
        "wall_s": wall,
        "req_s": len(done) / wall if wall > 0 else None,
        "out_tok_s": out_tokens / wall if wall > 0 else None,
        "output_tokens": out_tokens,
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "ttft_mean_ms": _ms(sum(ttft) / len(ttft)) if ttft else None,
        "ttft_first_read_p50_ms": _ms(percentile(first, 50)),
        "ttft_revisit_p50_ms": _ms(percentile(again, 50)),
        "itl_p50_ms": _ms(percentile(gaps, 50)),
        "itl_p99_ms": _ms(percentile(gaps, 99)),
        "engine_ttft_p50_ms": _ms(percentile(engine, 50)),
        "num_cached_tokens": sum(r.num_cached_tokens for r in done),
        "tokens_from_store": sum(r.tokens_from_store for r in done),
    }


def workload_dict(w: Workload) -> dict[str, Any]:
    """The workload's parameters and request sequence as JSON-able data."""
    return {
        "seed": w.seed,
        "doc_tokens": list(w.doc_tokens),
        "weights": [round(x, 6) for x in w.weights],
        "query_tokens": w.query_tokens,
        "out_tokens": w.out_tokens,
        "vocab": list(w.vocab),
        "requests": [asdict(r) for r in w.requests],
    }
