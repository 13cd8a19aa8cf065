"""``vllm:polykv_*`` Prometheus metrics and the stats dict they are fed from."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from prometheus_client import REGISTRY, Counter, Gauge, Histogram  # noqa: E402

from polykv_vllm.connector.metrics import (  # noqa: E402
    COUNTERS,
    DEPRECATED_GAUGES,
    GAUGES,
    RANK_GAUGES,
    SAMPLES,
    PolyKVPromMetrics,
    PolyKVStats,
)


def test_stats_aggregate_sums_counters_keeps_gauges_and_concatenates_samples() -> None:
    a = PolyKVStats()
    a.add("hits", 1)
    a.sample("load_seconds", 0.5)
    a.set_gauge("stored_bytes", 10)
    b = PolyKVStats()
    b.add("hits", 2)
    b.sample("load_seconds", 0.25)
    b.set_gauge("stored_bytes", 20)
    a.aggregate(b)
    assert a.data == {"hits": 3, "load_seconds": [0.5, 0.25], "stored_bytes": 20}
    assert a.reduce() == {
        "hits": 3,
        "load_seconds_count": 2,
        "load_seconds_sum": 0.75,
        "stored_bytes": 20,
    }
    assert not a.is_empty() and PolyKVStats().is_empty()


def test_stats_aggregate_keeps_each_ranks_latest_bytes() -> None:
    a, b = PolyKVStats(), PolyKVStats()
    a.set_rank_gauge("rank_stored_bytes", 0, 10)
    a.set_rank_gauge("rank_stored_bytes", 1, 10)
    b.set_rank_gauge("rank_stored_bytes", 1, 30)
    a.aggregate(b)
    assert a.reduce() == {"rank_stored_bytes:0": 10, "rank_stored_bytes:1": 30}


def test_prometheus_metrics_are_registered_and_observed() -> None:
    labels = {"model_name": "m", "engine": "0"}
    prom = PolyKVPromMetrics(
        SimpleNamespace(kv_transfer_config=None),  # type: ignore[arg-type]
        {Gauge: Gauge, Counter: Counter, Histogram: Histogram},
        list(labels),
        {0: list(labels.values())},
    )
    stats = PolyKVStats()
    stats.add("hits", 2)
    stats.add("tokens_loaded", 1408)
    stats.set_gauge("stored_documents", 3)
    stats.set_gauge("stored_bytes", 38154240)
    stats.set_gauge("stored_cache_dtype_bytes", 212336640)
    stats.add("store_rejected_blocks", 7)
    stats.sample("load_seconds", 0.17)
    stats.sample("load_seconds", 0.33)
    stats.set_rank_gauge("rank_stored_bytes", 0, 19077120)
    stats.set_rank_gauge("rank_stored_bytes", 1, 19077120)
    prom.observe(stats.data, engine_idx=0)
    prom.observe({"rank_stored_bytes:1": 0}, engine_idx=0)
    prom.observe({"hits": 1}, engine_idx=0)
    get = REGISTRY.get_sample_value
    assert get("vllm:polykv_hits_total", labels) == 3
    assert get("vllm:polykv_tokens_loaded_total", labels) == 1408
    assert get("vllm:polykv_stored_documents", labels) == 3
    assert get("vllm:polykv_stored_bytes", labels) == 38154240
    assert get("vllm:polykv_stored_cache_dtype_bytes", labels) == 212336640
    assert get("vllm:polykv_stored_bf16_bytes", labels) == 212336640, "deprecated alias"
    assert get("vllm:polykv_store_rejected_blocks_total", labels) == 7
    assert get("vllm:polykv_load_seconds_count", labels) == 2
    assert get("vllm:polykv_load_seconds_sum", labels) == pytest.approx(0.5)
    assert get("vllm:polykv_rank_stored_bytes", {**labels, "rank": "0"}) == 19077120
    assert get("vllm:polykv_rank_stored_bytes", {**labels, "rank": "1"}) == 0, "latest value"
    names = {m.name for m in REGISTRY.collect()}
    groups = (COUNTERS, GAUGES, DEPRECATED_GAUGES, RANK_GAUGES, SAMPLES)
    for name, _ in (v for group in groups for v in group.values()):
        assert name in names, name
