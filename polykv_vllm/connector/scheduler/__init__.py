"""Scheduler side of the connector: the index of the compressed store (pure Python, no vLLM).

Who owns what (``docs/CONNECTOR.md`` has the picture):

- :mod:`.store_index`: :class:`StoreIndex`, vLLM's scheduler hooks, the life of a load and a
  store, and the receipts;
- :mod:`.requests`: what is remembered per request between hooks;
- :mod:`.entries`: entries, the byte budget, running totals; :mod:`.rows`: placement (which
  slab row holds each block); :mod:`.eviction`: the eviction order and admission behind one
  interface;
- :mod:`.documents`: doc names, pins and tenants; :mod:`.pin_policy`: who may pin and how
  much; :mod:`.params`: the per-request ``polykv`` parameters;
- :mod:`.geometry`: the sizes it plans with, and the budget → rows rule the workers share.
- :mod:`.tiers`: the tiers below the store (keys, lookups, fetches, write-through;
  ``docs/TIERS.md``).
"""

from polykv_vllm.connector.scheduler.entries import Entry, EntryTable
from polykv_vllm.connector.scheduler.eviction import (
    EVICTION_POLICIES,
    EvictionPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    TinyLFUPolicy,
    make_eviction_policy,
)
from polykv_vllm.connector.scheduler.geometry import StoreGeometry, store_rows
from polykv_vllm.connector.scheduler.params import (
    MAX_DOC_ID_CHARS,
    PARAMS_KEY,
    DocParams,
    parse_doc_params,
)
from polykv_vllm.connector.scheduler.pin_policy import PinPolicy
from polykv_vllm.connector.scheduler.requests import RequestLike, ScheduledReq
from polykv_vllm.connector.scheduler.rows import RowAllocator
from polykv_vllm.connector.scheduler.store_index import SchedulerCounters, StoreIndex

__all__ = [
    "EVICTION_POLICIES",
    "MAX_DOC_ID_CHARS",
    "PARAMS_KEY",
    "DocParams",
    "Entry",
    "EntryTable",
    "EvictionPolicy",
    "LRUPolicy",
    "PinPolicy",
    "RequestLike",
    "RowAllocator",
    "ScheduledReq",
    "SchedulerCounters",
    "StoreGeometry",
    "StoreIndex",
    "S3FIFOPolicy",
    "TinyLFUPolicy",
    "make_eviction_policy",
    "parse_doc_params",
    "store_rows",
]
