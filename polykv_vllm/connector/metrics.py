"""Connector statistics (``KVConnectorStats``) and the ``vllm:polykv_*`` Prometheus metrics.

Stats are a flat dict (vLLM moves ``.data`` in 0.26 and ``.to_dict()`` in 0.32; both are the
same dict here) with three kinds of keys, merged across workers and the scheduler by
:meth:`PolyKVStats.aggregate`:

- counters (summed): :data:`COUNTERS`;
- gauges (the scheduler's latest value): :data:`GAUGES` (plus :data:`DEPRECATED_GAUGES`, old
  names kept for one release and set to the same value);
- per-rank gauges (the scheduler's latest value of each tensor-parallel rank):
  :data:`RANK_GAUGES`, keyed ``"<key>:<rank>"`` in the dict and labelled ``rank`` on
  ``/metrics``;
- samples (lists, concatenated; Prometheus histograms): :data:`SAMPLES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

__all__ = [
    "COUNTERS",
    "DEPRECATED_GAUGES",
    "GAUGES",
    "RANK_GAUGES",
    "SAMPLES",
    "PolyKVPromMetrics",
    "PolyKVStats",
]

#: counter key → (Prometheus name without ``_total``, help)
COUNTERS: dict[str, tuple[str, str]] = {
    "hits": ("vllm:polykv_hits", "Requests that loaded tokens from the polykv store."),
    "tokens_loaded": (
        "vllm:polykv_tokens_loaded",
        "Prompt tokens decompressed from the polykv store instead of computed.",
    ),
    "tokens_stored": (
        "vllm:polykv_tokens_stored",
        "Prompt tokens compressed into the polykv store (confirmed by the workers).",
    ),
    "blocks_evicted": ("vllm:polykv_blocks_evicted", "Blocks evicted from the polykv store."),
    "store_rejected_blocks": (
        "vllm:polykv_store_rejected_blocks",
        "Prompt blocks not stored because the polykv store was full of pinned or in-use blocks.",
    ),
    "admission_refused_blocks": (
        "vllm:polykv_admission_refused_blocks",
        "Prompt blocks not stored because the eviction policy did not admit them in place of "
        "more often used blocks (eviction=tinylfu).",
    ),
    "loads_deduplicated": (
        "vllm:polykv_loads_deduplicated",
        "Requests that waited for another request's unfinished async load of the same blocks "
        "instead of loading them again (async_load on).",
    ),
    "load_failures": (
        "vllm:polykv_load_failures",
        "Store entries found missing or invalid on load, counted by each rank that found one "
        "(those tokens were recomputed).",
    ),
}
# per tier (docs/TIERS.md): <tier>_<counter> → vllm:polykv_<tier>_<counter>_total
_TIER_COUNTERS = {
    "hits": "entries read from the tier and served",
    "misses": "entries asked of the tier and absent",
    "corrupt": "entries read from the tier that failed a check (deleted, recomputed)",
    "bytes_read": "bytes read from the tier",
    "bytes_written": "bytes written to the tier",
    "writes": "entries written to the tier",
    "drops": "writes dropped because the tier's write queue was full",
    "errors": "faults of the tier (I/O errors, full disk, unreachable server)",
    "evictions": "entries evicted from the tier to keep its byte budget",
}
for _tier in ("disk", "remote"):
    for _key, _text in _TIER_COUNTERS.items():
        COUNTERS[f"{_tier}_{_key}"] = (
            f"vllm:polykv_{_tier}_{_key}",
            f"polykv {_tier} tier: {_text}.",
        )
#: gauge key → (Prometheus name, help)
GAUGES: dict[str, tuple[str, str]] = {
    "stored_documents": ("vllm:polykv_stored_documents", "Documents with blocks in the store."),
    "stored_bytes": (
        "vllm:polykv_stored_bytes",
        "Compressed bytes held by the polykv store (measured from its tensors, all workers).",
    ),
    "stored_cache_dtype_bytes": (
        "vllm:polykv_stored_cache_dtype_bytes",
        "Bytes the stored tokens take in the engine's KV cache dtype.",
    ),
    "capacity_bytes": ("vllm:polykv_capacity_bytes", "Byte budget of the polykv store."),
    # the tiers below the store (docs/TIERS.md), from tensor-parallel rank 0's worker
    "disk_stored_entries": (
        "vllm:polykv_disk_stored_entries",
        "Blocks in the polykv disk tier (this server's files; refreshed each step).",
    ),
    "disk_stored_bytes": (
        "vllm:polykv_disk_stored_bytes",
        "Bytes of the polykv disk tier's files (this server's, all ranks).",
    ),
    "remote_stored_entries": (
        "vllm:polykv_remote_stored_entries",
        "Keys in the Redis DB of the polykv remote tier (DBSIZE, asked every 10 s).",
    ),
    "remote_stored_bytes": (
        "vllm:polykv_remote_stored_bytes",
        "Memory the Redis server of the polykv remote tier uses (INFO used_memory, every 10 s).",
    ),
}
#: per-rank gauge key → (Prometheus name, help); the metric carries a ``rank`` label
RANK_GAUGES: dict[str, tuple[str, str]] = {
    "rank_stored_bytes": (
        "vllm:polykv_rank_stored_bytes",
        "Compressed bytes held by one tensor-parallel rank's polykv store (its kv heads; "
        "measured from its tensors).",
    ),
}
#: gauge key → (old Prometheus name, help): deprecated aliases, set with the same value; to be
#: removed in the release after the one that renamed them
DEPRECATED_GAUGES: dict[str, tuple[str, str]] = {
    "stored_cache_dtype_bytes": (
        "vllm:polykv_stored_bf16_bytes",
        "Deprecated (it is not bf16 but the engine's KV cache dtype): use "
        "vllm:polykv_stored_cache_dtype_bytes; removed in the next release.",
    ),
}
#: sample key → (Prometheus histogram name, help)
SAMPLES: dict[str, tuple[str, str]] = {
    "load_seconds": (
        "vllm:polykv_load_seconds",
        "Seconds one worker spent decompressing one request's blocks into the paged cache.",
    ),
    "store_seconds": (
        "vllm:polykv_store_seconds",
        "Seconds one worker spent compressing one request's new blocks into the store.",
    ),
}
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class PolyKVStats(KVConnectorStats):
    """The polykv counters, gauges and samples of one interval (see the module docstring)."""

    def reset(self) -> None:
        self.data = {}

    def add(self, key: str, amount: float) -> None:
        assert key in COUNTERS, key
        self.data[key] = self.data.get(key, 0) + amount

    def sample(self, key: str, value: float) -> None:
        assert key in SAMPLES, key
        self.data.setdefault(key, []).append(value)

    def set_gauge(self, key: str, value: float) -> None:
        assert key in GAUGES, key
        self.data[key] = value

    def set_rank_gauge(self, key: str, rank: int, value: float) -> None:
        assert key in RANK_GAUGES, key
        self.data[f"{key}:{rank}"] = value

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            if key in COUNTERS:
                self.data[key] = self.data.get(key, 0) + value
            elif key in SAMPLES:
                self.data[key] = list(self.data.get(key, [])) + list(value)
            else:
                self.data[key] = value
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for key, value in self.data.items():
            if key in SAMPLES:
                out[f"{key}_count"] = len(value)
                out[f"{key}_sum"] = round(sum(value), 6)
            else:
                out[key] = value
        return out

    def is_empty(self) -> bool:
        return not self.data


class PolyKVPromMetrics(KVConnectorPromMetrics):
    """Registers ``vllm:polykv_*`` per engine and records :class:`PolyKVStats` dicts."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter_cls: Any = self._counter_cls
        gauge_cls: Any = self._gauge_cls
        histogram_cls: Any = self._histogram_cls
        self._counters = {
            key: self._per_engine(counter_cls(name=name, documentation=doc, labelnames=labelnames))
            for key, (name, doc) in COUNTERS.items()
        }

        def gauge(name: str, doc: str) -> dict[int, Any]:
            return self._per_engine(
                gauge_cls(
                    name=name,
                    documentation=doc,
                    labelnames=labelnames,
                    multiprocess_mode="mostrecent",
                )
            )

        self._gauges = {key: gauge(name, doc) for key, (name, doc) in GAUGES.items()}
        self._deprecated = {key: gauge(n, doc) for key, (n, doc) in DEPRECATED_GAUGES.items()}
        # labelled by rank too: one child per (engine, rank), made when a rank first reports
        self._rank_gauges = {
            key: gauge_cls(
                name=name,
                documentation=doc,
                labelnames=[*labelnames, "rank"],
                multiprocess_mode="mostrecent",
            )
            for key, (name, doc) in RANK_GAUGES.items()
        }
        self._histograms = {
            key: self._per_engine(
                histogram_cls(name=name, documentation=doc, labelnames=labelnames, buckets=_BUCKETS)
            )
            for key, (name, doc) in SAMPLES.items()
        }

    def _per_engine(self, metric: Any) -> dict[int, Any]:
        return {idx: metric.labels(*values) for idx, values in self.per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.items():
            if key in self._counters:
                self._counters[key][engine_idx].inc(value)
            elif key in self._gauges:
                self._gauges[key][engine_idx].set(value)
                if key in self._deprecated:
                    self._deprecated[key][engine_idx].set(value)
            elif key in self._histograms:
                hist = self._histograms[key][engine_idx]
                for v in value:
                    hist.observe(v)
            elif key.partition(":")[0] in self._rank_gauges:
                name, _, rank = key.partition(":")
                values = self.per_engine_labelvalues[engine_idx]
                self._rank_gauges[name].labels(*values, rank).set(value)
