"""Unit tests of the pure parts of benchmarks/loadgen.py and of what it shares with the demo
(``polykv_vllm.apps.serving``'s /metrics parser, ``polykv_vllm.apps.workload``); no server."""

from __future__ import annotations

import importlib.util
import math
import random
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest

from polykv_vllm.apps import workload


def _load_loadgen() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "loadgen.py"
    spec = importlib.util.spec_from_file_location("loadgen", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["loadgen"] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


lg = _load_loadgen()


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_statistics_quantiles(n: int, q: float) -> None:
    rng = random.Random(n * 1000 + int(q))
    values = [rng.uniform(-5, 5) for _ in range(n)]
    got = lg.percentile(values, q)
    if n == 1:
        assert got == values[0]
        return
    # statistics.quantiles(method="inclusive") is numpy's linear interpolation.
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    expected = min(values) if q == 0 else max(values) if q == 100 else cuts[int(q) - 1]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_percentile_edges() -> None:
    assert math.isnan(lg.percentile([], 50))
    assert lg.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert lg.percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError, match="outside"):
        lg.percentile([1.0], 101)


METRICS_TEXT = """\
# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 2604.0
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7953855168747418e+09
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 1024.0
vllm:external_prefix_cache_queries_total{engine="0",model_name="m"} 0.0
vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 0.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 1580.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 1024.0
vllm:polykv_stored_bytes{engine="0",model_name="m"} 12345.0
vllm:polykv_hits_total{engine="0",model_name="m,with \\"quote\\""} 3
vllm:polykv_hits_total{engine="1",model_name="m"} 2
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 4.0
vllm:odd_value{engine="0"} NaN
not a sample line at all
"""


def test_parse_metrics_samples() -> None:
    samples = lg.parse_metrics(METRICS_TEXT)
    names = [s[0] for s in samples]
    assert "vllm:prefix_cache_queries_total" in names
    assert not any(n.startswith("#") or n == "not" for n in names)
    by_name = {(n, tuple(sorted(lb.items()))): v for n, lb, v in samples}
    key = ("vllm:polykv_hits_total", (("engine", "0"), ("model_name", 'm,with \\"quote\\"')))
    assert by_name[key] == 3.0
    odd = [v for n, _, v in samples if n == "vllm:odd_value"]
    assert len(odd) == 1 and math.isnan(odd[0])


def test_metric_totals_sums_labels_and_drops_created() -> None:
    totals = lg.metric_totals(lg.parse_metrics(METRICS_TEXT))
    assert totals["vllm:prefix_cache_queries"] == 2604.0
    assert "vllm:prefix_cache_queries_created" not in totals
    assert totals["vllm:polykv_hits"] == 5.0  # two engines summed, _total stripped
    assert totals["vllm:polykv_stored_bytes"] == 12345.0
    assert totals["vllm:prompt_tokens_by_source[source=local_cache_hit]"] == 1024.0
    assert totals["vllm:prompt_tokens_by_source"] == 2604.0


@pytest.mark.parametrize(
    ("hits", "queries", "rate"), [(0.0, 0.0, None), (50.0, 200.0, 0.25), (10.0, 10.0, 1.0)]
)
def test_cache_report_rates(hits: float, queries: float, rate: float | None) -> None:
    before = {"vllm:prefix_cache_hits": 100.0, "vllm:prefix_cache_queries": 400.0}
    after = {
        "vllm:prefix_cache_hits": 100.0 + hits,
        "vllm:prefix_cache_queries": 400.0 + queries,
        "vllm:external_prefix_cache_hits": hits,
        "vllm:external_prefix_cache_queries": queries,
        "vllm:polykv_stored_bytes": 7.0,
    }
    report = lg.cache_report(before, after)
    assert report["prefix_hit_rate"] == rate
    assert report["external_hit_rate"] == rate
    assert report["polykv_after"] == {"vllm:polykv_stored_bytes": 7.0}
    assert report["polykv_deltas"] == {"vllm:polykv_stored_bytes": 7.0}


@pytest.mark.parametrize("documents", [1, 3, 4])
@pytest.mark.parametrize("agents", [1, 2, 5])
@pytest.mark.parametrize("rounds", [1, 2])
@pytest.mark.parametrize("order", ["interleaved", "grouped"])
def test_build_workload_covers_every_pair(
    documents: int, agents: int, rounds: int, order: str
) -> None:
    items = lg.build_workload(documents, agents, rounds, order)
    assert len(items) == documents * agents * rounds
    assert [it.index for it in items] == list(range(len(items)))
    pairs = sorted((it.doc, it.agent, it.round) for it in items)
    expected = sorted(
        (d, a, r) for d in range(documents) for a in range(agents) for r in range(rounds)
    )
    assert pairs == expected
    # A revisit is exactly a request whose document appeared earlier in the schedule.
    seen: set[int] = set()
    for it in items:
        assert it.revisit == (it.doc in seen)
        seen.add(it.doc)
    assert sum(not it.revisit for it in items) == documents


@pytest.mark.parametrize("documents", [2, 3, 5])
def test_interleaved_never_repeats_a_document_back_to_back(documents: int) -> None:
    items = lg.build_workload(documents, 3, 2, "interleaved")
    assert all(a.doc != b.doc for a, b in zip(items, items[1:], strict=False))
    assert [it.doc for it in items[:documents]] == list(range(documents))
    grouped = lg.build_workload(documents, 3, 1, "grouped")
    assert [it.doc for it in grouped[:3]] == [0, 0, 0]


@pytest.mark.parametrize(("field", "args"), [("documents", (0, 1)), ("agents", (1, 0))])
def test_build_workload_rejects_bad_sizes(field: str, args: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=field):
        lg.build_workload(*args)
    with pytest.raises(ValueError, match="order"):
        lg.build_workload(1, 1, 1, "random")


def test_agent_questions_are_distinct() -> None:
    questions = [lg.agent_question(a) for a in range(3 * len(workload.QUESTIONS))]
    assert len(set(questions)) == len(questions)


@pytest.mark.parametrize("rate", [0.5, 4.0])
def test_poisson_arrivals(rate: float) -> None:
    n = 4000
    t = lg.poisson_arrivals(n, rate, seed=1)
    assert t[0] == 0.0 and all(b >= a for a, b in zip(t, t[1:], strict=False))
    mean_gap = t[-1] / (n - 1)
    assert mean_gap == pytest.approx(1 / rate, rel=0.06)
    assert lg.poisson_arrivals(10, rate, seed=1) == t[:10]
    with pytest.raises(ValueError, match="rate"):
        lg.poisson_arrivals(3, 0.0, seed=1)


@pytest.mark.parametrize(("documents", "tokens"), [(1, 5), (3, 4), (4, 25)])
def test_split_documents_disjoint_windows(documents: int, tokens: int) -> None:
    ids = list(range(100))
    docs = lg.split_documents(ids, documents, tokens)
    assert [len(d) for d in docs] == [tokens] * documents
    flat = [t for d in docs for t in d]
    assert flat == ids[: documents * tokens]
    with pytest.raises(ValueError, match="--doc-tokens"):
        lg.split_documents(ids, documents + 100, tokens)


def test_prompts_share_the_document_prefix() -> None:
    doc = lg.corpus_text()[:2000]
    p0, p1 = (lg.make_prompt(doc, lg.agent_question(a)) for a in (0, 1))
    assert p0 != p1
    shared = len(workload.DOC_HEADER) + len(doc)
    assert p0[:shared] == p1[:shared]
    assert len(lg.corpus_text()) > 200_000


def _row(ttft: float | None, revisit: bool, itl: list[float], error: str = "") -> dict:
    return {
        "ttft_s": ttft,
        "revisit": revisit,
        "itl_s": itl,
        "e2e_s": (ttft or 0.0) + sum(itl),
        "prompt_tokens": 100,
        "completion_tokens": len(itl) + 1,
        "error": error,
    }


def test_summarize_splits_first_visit_and_revisit() -> None:
    rows = [
        _row(1.0, False, [0.1, 0.1]),
        _row(2.0, False, [0.2]),
        _row(0.1, True, [0.1, 0.3]),
        _row(None, True, [], error="HTTP 500"),
    ]
    s = lg.summarize(rows, wall_s=2.0)
    assert s["requests"] == 4 and s["failed"] == 1
    assert s["output_tokens"] == 3 + 2 + 3
    assert s["output_tok_per_s"] == pytest.approx(4.0)
    assert s["requests_per_s"] == pytest.approx(1.5)
    assert s["ttft_first_visit_s"]["p50"] == pytest.approx(1.5)
    assert s["ttft_revisit_s"]["n"] == 1 and s["ttft_revisit_s"]["p50"] == pytest.approx(0.1)
    assert s["itl_s"]["n"] == 5 and s["itl_s"]["p50"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://127.0.0.1:8000/v1", True),
        ("http://localhost:9/v1", True),
        ("http://[::1]:8000/v1", True),
        ("http://10.0.0.2:8000/v1", False),
        ("https://api.openai.com/v1", False),
    ],
)
def test_check_local(url: str, ok: bool) -> None:
    if ok:
        lg.check_local(url)
    else:
        with pytest.raises(SystemExit, match="not local"):
            lg.check_local(url)


def test_request_body_doc_id() -> None:
    cfg = lg.parse_args(["--doc-id", "--model", "m", "--api", "completions"])
    body = lg.request_body(cfg, "prompt", 3)
    assert body["kv_transfer_params"] == {"polykv": {"doc_id": "loadgen-doc-3"}}
    assert body["prompt"] == "prompt" and body["stream"] is True and body["temperature"] == 0.0
    plain = lg.request_body(lg.parse_args(["--model", "m"]), "hi", 0)
    assert "kv_transfer_params" not in plain and plain["messages"][0]["content"] == "hi"
