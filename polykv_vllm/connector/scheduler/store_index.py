"""The scheduler side's hooks: one :class:`StoreIndex` joins requests, entries and documents.

The life of a stored block, in the names of vLLM's ``OffloadingManager``:

- **lookup** (:meth:`StoreIndex.lookup`, side-effect free but for counting): whole ready blocks
  continuing the local prefix-cache hit, never the request's last token. With async loads, a
  lookup whose blocks another request's unfinished load is bringing in answers None ("ask again
  later", counted once per request in ``loads_deduplicated``): once that load finished, vLLM
  caches those blocks and the request finds them in its own prefix cache (one load per
  document).
- **prepare_load** (:meth:`StoreIndex.on_alloc`): the entries get a reference (``refs``) and a
  :class:`~.requests.LoadInFlight`; the load goes into the next plan with the entries' rows.
- **complete_load** (:meth:`StoreIndex.complete_load`, from the workers' report once every rank
  ran it; a rank reports an async load in the step it finished there, the step vLLM hears of
  it through ``get_finished``): the references are dropped; entries a rank found missing or
  corrupt are dropped on this one path (the worker only reports them) and their tokens are not
  counted as loaded.
- **prepare_store** (in :meth:`StoreIndex.plan_step`): blocks the step completes get a pending
  entry and a row, making room by eviction if the eviction policy admits them in place of its
  victims (a pinned document is always admitted); **complete_store** (:meth:`StoreIndex.on_report`):
  the entry is ready once every rank confirmed it.
- **touch**: a used chain is touched from its last block to its first; **record**: the first
  :meth:`StoreIndex.on_alloc` of a request tells the policy which prompt blocks were asked for.

Requests are tracked in :mod:`.requests`; entries, budget, rows and eviction in :mod:`.entries`;
names, pins and tenants in :mod:`.documents`; the tiers below the store (disk, Redis) in
:mod:`.tiers`, called from the hooks where ``self.tiers`` is set. The receipt
(:meth:`StoreIndex.finish`) is described in ``docs/CONNECTOR.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from polykv_vllm.connector.metadata import BlockJob, LoadJob, StepPlan, WorkerReport
from polykv_vllm.connector.scheduler.documents import Document, Documents
from polykv_vllm.connector.scheduler.entries import Entry, EntryTable
from polykv_vllm.connector.scheduler.eviction import EvictionPolicy
from polykv_vllm.connector.scheduler.geometry import StoreGeometry
from polykv_vllm.connector.scheduler.params import PARAMS_KEY
from polykv_vllm.connector.scheduler.pin_policy import PinPolicy
from polykv_vllm.connector.scheduler.requests import (
    LoadInFlight,
    LoadsInFlight,
    RequestLike,
    RequestState,
    ScheduledReq,
)
from polykv_vllm.connector.scheduler.tiers import TierPlanner

__all__ = ["SchedulerCounters", "StoreIndex"]

logger = logging.getLogger(__name__)


class _Room(Enum):
    MADE = "made"
    REFUSED = "refused"  # by the eviction policy's admission
    FULL = "full"  # of pinned or in-use blocks


@dataclass
class SchedulerCounters:
    """Counters since the last :meth:`StoreIndex.take_counters` (summed into metrics)."""

    hits: int = 0
    tokens_loaded: int = 0
    tokens_stored: int = 0
    blocks_evicted: int = 0
    store_rejected_blocks: int = 0
    admission_refused_blocks: int = 0
    loads_deduplicated: int = 0


class StoreIndex:
    """The scheduler-side index of the compressed store (module docstring).

    Hooks, in the order vLLM calls them within one scheduler step: :meth:`lookup` (per waiting
    request), :meth:`on_alloc` (per admitted request), :meth:`plan_step` (once), then later
    :meth:`on_report` (per step output) and :meth:`finish` (per finished request).
    ``pins``: the server's pin policy (default: anyone, half the budget per tenant);
    ``eviction``: the eviction order and admission (default LRU, admitting everything);
    ``async_loads``: loads are asynchronous (vLLM's ``load_async``; lookups deduplicate them).
    """

    def __init__(
        self,
        geometry: StoreGeometry,
        budget_bytes: int,
        store_all: bool,
        min_store_tokens: int,
        pins: PinPolicy | None = None,
        eviction: EvictionPolicy | None = None,
        async_loads: bool = False,
    ) -> None:
        self.geometry = geometry
        self.async_loads = async_loads
        self.store_all = store_all
        self.min_store_tokens = min_store_tokens
        self.entries = EntryTable(geometry, budget_bytes, eviction)
        if pins is None:
            pins = PinPolicy(mode="any", quota_bytes=budget_bytes // 2)
        self.documents = Documents(pins, geometry.block_bytes, budget_bytes)
        self._reqs: dict[str, RequestState] = {}
        self._lookups: dict[str, tuple[int, int, bool]] = {}  # id -> (start, blocks, async)
        self._loads = LoadsInFlight()
        self._planned_loads: list[LoadJob] = []
        self._next_load_id = 0
        self._deduplicated: set[str] = set()  # requests told to wait for another's load
        self.counters = SchedulerCounters()
        #: the tiers below the store (docs/TIERS.md), set by the connector; None: no tiers
        self.tiers: TierPlanner | None = None

    # --- introspection (running totals, no scans) ------------------------------------------

    @property
    def budget_bytes(self) -> int:
        return self.entries.budget_bytes

    @property
    def used_bytes(self) -> int:
        return self.entries.used_bytes

    @property
    def num_entries(self) -> int:
        return len(self.entries)

    @property
    def loads_in_flight(self) -> int:
        """Loads planned whose every rank has not reported yet."""
        return len(self._loads)

    @property
    def num_documents(self) -> int:
        return self.documents.num_present

    @property
    def real_bytes(self) -> int:
        """Compressed bytes the workers reported for ready entries (measured, all ranks)."""
        return self.entries.ready_real_bytes

    @property
    def raw_bytes(self) -> int:
        """What the ready entries' tokens take in the engine's KV cache dtype."""
        return self.entries.ready_entries * self.geometry.block_raw_bytes

    def document(self, doc_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """``{"total_blocks", "stored_blocks", "ready_blocks", "pinned"}`` of ``tenant``'s
        document ``doc_id``, or None if it has none of that name."""
        doc = self.documents.get(tenant, doc_id)
        if doc is None:
            return None
        return {
            "total_blocks": doc.total_blocks,
            "stored_blocks": doc.stored_blocks,
            "ready_blocks": sum(1 for e in doc.entries.values() if e.ready),
            "pinned": _pinned(doc),
        }

    def take_counters(self) -> SchedulerCounters:
        out, self.counters = self.counters, SchedulerCounters()
        return out

    # --- lookups and loads -----------------------------------------------------------------

    def lookup(self, request: RequestLike, num_computed_tokens: int) -> int | None:
        """Tokens beyond ``num_computed_tokens`` the store can supply: whole ready blocks that
        continue the local hit, never the last token of the request; None (async loads only)
        when an unfinished load of another request is bringing in one of those blocks."""
        bs = self.geometry.block_size
        if num_computed_tokens % bs:
            self._lookups.pop(request.request_id, None)
            return 0
        start = num_computed_tokens // bs
        limit = min((request.num_tokens - 1) // bs, len(request.block_hashes))
        n = 0
        for i in range(start, limit):
            entry = self.entries.get(request.block_hashes[i])
            if entry is None or not entry.ready:
                break
            n += 1
        # the block after the hit too: a pending entry an async tier fetch is bringing in
        if self._loads.any_loading(request.block_hashes[start : min(start + n + 1, limit)]):
            self._lookups.pop(request.request_id, None)
            if request.request_id not in self._deduplicated:
                self._deduplicated.add(request.request_id)
                self.counters.loads_deduplicated += 1
            return None
        from_tier = 0
        if self.tiers is not None and start + n < limit:  # tiers: docs/TIERS.md
            from_tier = self.tiers.probe(self, request, start + n, limit)
        # a load reaching into a tier is asynchronous whatever async_loads says: a disk or
        # network read never stalls the step (docs/TIERS.md)
        self._lookups[request.request_id] = (
            start,
            n + from_tier,
            self.async_loads or from_tier > 0,
        )
        return (n + from_tier) * bs

    def lookup_is_async(self, request_id: str) -> bool:
        """Whether the load the request's last :meth:`lookup` found is asynchronous."""
        found = self._lookups.get(request_id)
        return found is not None and found[2]

    def on_alloc(
        self, request: RequestLike, block_ids: Sequence[int], num_external_tokens: int
    ) -> None:
        """Record the request's blocks; prepare its load when ``num_external_tokens > 0``."""
        rid = request.request_id
        state = self._reqs.get(rid)
        if state is None:
            state = self._reqs[rid] = RequestState.of(request)
            full = request.num_prompt_tokens // self.geometry.block_size
            self.entries.policy.record(request.block_hashes[:full])
            if self.tiers is not None:
                self.tiers.note(request, self.geometry.block_size)
        state.block_ids = list(block_ids)
        lookup = self._lookups.pop(rid, None)
        self._deduplicated.discard(rid)
        if num_external_tokens <= 0:
            return
        bs = self.geometry.block_size
        assert lookup is not None, "vLLM allocated external tokens without a lookup"
        start, n_found, load_async = lookup
        n = num_external_tokens // bs
        assert num_external_tokens % bs == 0 and n <= n_found, (num_external_tokens, lookup)
        keys = request.block_hashes[start : start + n]
        n_tier = self.tiers.tier_blocks(request, start, n) if self.tiers is not None else 0
        entries: list[Entry] = []
        for key in keys[: n - n_tier]:
            entry = self.entries.get(key)
            assert entry is not None and entry.ready, "nothing evicts between lookup and alloc"
            entry.refs += 1
            entries.append(entry)
        if self.tiers is not None and n_tier:
            entries += self.tiers.prepare_fetch(self, request, start + n - n_tier, n_tier)
        load = LoadInFlight(
            load_id=self._next_load_id, req_id=rid, entries=entries, async_load=load_async
        )
        self._next_load_id += 1
        self._loads.add(load)
        if self.tiers is not None and n_tier:
            self.tiers.plan_fetch(
                self, load.load_id, n - n_tier, request, start + n - n_tier, n_tier, bs
            )
        self._planned_loads.append(
            LoadJob(
                req_id=rid,
                rows=tuple(e.row for e in entries),
                block_ids=tuple(state.block_ids[start : start + n]),
                load_id=load.load_id,
                async_load=load.async_load,
            )
        )
        state.tokens_from_store += num_external_tokens
        self.counters.hits += 1
        self.counters.tokens_loaded += num_external_tokens
        self.entries.touch_chain(request.block_hashes[: start + n])

    def complete_load(self, load: LoadInFlight) -> None:
        """Every rank ran ``load``: release its entries, drop those found missing or corrupt,
        and stop counting the blocks not loaded (vLLM recomputes them)."""
        self._loads.remove(load)
        for entry in load.entries:
            self.entries.unref(entry)
        for entry in load.entries:
            if entry.row in load.failed_rows and not entry.failed:
                logger.warning(
                    "polykv: dropping the store entry in row %d: its load failed", entry.row
                )
                self.documents.on_drop(entry)
                self.entries.fail(entry)
        missing = len(load.entries) - load.loaded_blocks
        state = self._reqs.get(load.req_id)
        if missing and state is not None:
            state.tokens_from_store -= missing * self.geometry.block_size

    # --- per-step plan ---------------------------------------------------------------------

    def plan_step(self, scheduled: Iterable[ScheduledReq]) -> StepPlan:
        """Loads prepared since the last step, stores of blocks this step completes, and the
        rows freed since the last plan."""
        plan = StepPlan(loads=self._planned_loads)
        self._planned_loads = []
        for s in scheduled:
            state = self._reqs.get(s.req_id)
            if state is None:
                continue
            if s.replace:
                state.block_ids = list(s.block_ids)
            else:
                state.block_ids.extend(s.block_ids)
            job = self._prepare_store(state, s.computed_after)
            if job is not None:
                plan.stores.append(job)
        plan.freed_rows = self.entries.take_freed_rows()
        if self.tiers is not None:
            self.tiers.fill(self, plan)
        return plan

    def _prepare_store(self, state: RequestState, computed_after: int) -> BlockJob | None:
        if state.store_done:  # every decode step of every running request comes here
            return None
        req = state.request
        bs = self.geometry.block_size
        prompt_tokens = req.num_prompt_tokens
        if not (self.store_all or state.params.doc_id is not None):
            state.store_done = True
            return None
        if prompt_tokens < self.min_store_tokens:
            state.store_done = True
            return None
        storable = prompt_tokens  # the document only, when the request says where it ends
        if state.params.doc_tokens is not None:
            storable = min(storable, state.params.doc_tokens)
        if state.next_store_block >= storable // bs:
            state.store_done = True
            return None
        full = min(computed_after, storable, len(state.block_ids) * bs) // bs
        full = min(full, len(req.block_hashes))
        if full <= state.next_store_block:
            return None
        doc = self._bind_doc(state)
        protect = set(req.block_hashes[:full])  # never evict this prompt's blocks for its own
        added: list[Entry] = []
        blocks: list[int] = []
        after: int | None = None  # the row of the block before the first one added
        for i in range(state.next_store_block, full):
            key = req.block_hashes[i]
            entry = self.entries.get(key)
            if entry is None:
                room = self._make_room(key, protect, admit_always=doc.pinned)
                if room is not _Room.MADE:
                    if room is _Room.FULL:
                        self._reject(state, doc, i, full)
                    else:
                        self.counters.admission_refused_blocks += full - i
                    full = i  # a suffix without its prefix is useless: stop here
                    break
                if not added:
                    before = self.entries.get(req.block_hashes[i - 1]) if i else None
                    after = before.row if before is not None and before.row >= 0 else None
                entry = self.entries.add(key)
                added.append(entry)
                blocks.append(state.block_ids[i])
            self.documents.join(entry, doc)
        state.next_store_block = max(state.next_store_block, full)
        state.store_done = state.next_store_block >= storable // bs
        self.entries.touch_chain(req.block_hashes[:full])
        if not added:
            return None
        # all rows at once, after the evictions: as few runs as the freed rows allow (placing
        # them block by block took each victim's row as it was freed, a document's tail in
        # reverse, so one run per block)
        self.entries.place(added, after)
        state.tokens_stored += len(added) * bs
        rows = tuple(e.row for e in added)
        return BlockJob(req_id=req.request_id, rows=rows, block_ids=tuple(blocks))

    def _reject(self, state: RequestState, doc: Document, block: int, full: int) -> None:
        self.counters.store_rejected_blocks += full - block
        logger.warning(
            "polykv: store full (%d of %d bytes, pinned or in use): document %s stored only up "
            "to block %d of %d",
            self.used_bytes,
            self.budget_bytes,
            doc.name,
            block,
            full,
        )
        if doc.pinned:  # a pin covers the whole document or nothing
            self.documents.unpin(doc)
            state.pin_refused = (
                f"store: only {block} of the document's {doc.total_blocks} blocks fit; the rest "
                f"of the store is pinned or being loaded ({self.used_bytes} of "
                f"{self.budget_bytes} bytes)"
            )

    def _make_room(self, key: Hashable, protect: set[Hashable], admit_always: bool) -> _Room:
        """Room for block ``key``: made (evicting the policy's victims), refused by the
        policy's admission, or impossible (the store is full of pinned or in-use blocks)."""
        victims = self.entries.choose_victims(self.geometry.block_bytes, protect)
        if victims is None:
            return _Room.FULL
        policy = self.entries.policy
        if victims and not admit_always and not policy.admit(key, [v.key for v in victims]):
            return _Room.REFUSED
        self.entries.evict(victims)
        per_doc: dict[str, int] = {}
        for entry in victims:
            for _, name in entry.docs:
                per_doc[name] = per_doc.get(name, 0) + 1
            self.documents.on_drop(entry)
        self.counters.blocks_evicted += len(victims)
        for name, n in per_doc.items():
            logger.info(
                "polykv: evicted %d blocks of document %s; store %d of %d bytes",
                n,
                name,
                self.used_bytes,
                self.budget_bytes,
            )
        return _Room.MADE

    # --- documents -------------------------------------------------------------------------

    def _bind_doc(self, state: RequestState) -> Document:
        """The request's document (named once per request), with its pin request applied."""
        if state.doc is not None:
            doc = self.documents.get(*state.doc)
            if doc is not None:
                return doc
        keys = state.prompt_keys(self.geometry.block_size)
        name = state.params.doc_id or f"#{_short(keys[-1])}"
        doc, released = self.documents.bind(state.tenant, name, keys, self.entries.get)
        state.doc = doc.key
        refused = self.documents.apply(doc, state.params, repin=released)
        if refused is not None:
            state.pin_refused = refused
        return doc

    def _named_doc(self, state: RequestState) -> Document | None:
        """A request that stored nothing may still name (and pin or unpin) its tenant's doc."""
        p = state.params
        if p.doc_id is None:
            return None
        doc = self.documents.get(state.tenant, p.doc_id)
        if doc is not None and p.forget:
            orphans = self.documents.forget(doc)
            self.entries.evict(orphans)
            logger.info("polykv: forgot document %s, evicted %d blocks", p.doc_id, len(orphans))
            return None
        if doc is None:
            if p.pin:
                state.pin_refused = self.documents.policy.refusal(p) or (
                    "not stored: this tenant has no stored document of that name, and this "
                    "request stored none"
                )
            return None
        refused = self.documents.apply(doc, p)
        if refused is not None:
            state.pin_refused = refused
        return doc

    # --- worker reports and request end ----------------------------------------------------

    def on_report(self, report: WorkerReport) -> None:
        """Complete the confirmed stores and the loads every rank ran."""
        stored: dict[str, list[int]] = {}
        for row, (nbytes, ranks) in report.stored.items():
            entry = self.entries.at_row(row)
            assert entry is not None and not entry.ready, f"row {row} reported, not pending"
            if self.entries.confirm(entry, nbytes, ranks):
                if self.tiers is not None and self.tiers.on_ready(entry):
                    continue  # fetched from a tier, not stored
                self.counters.tokens_stored += self.geometry.block_size
                for _, name in entry.docs:
                    acc = stored.setdefault(name, [0, 0])
                    acc[0] += 1
                    acc[1] += entry.real_bytes
        for name, (blocks, nbytes) in stored.items():
            raw = blocks * self.geometry.block_raw_bytes
            logger.info(
                "polykv: stored document %s: %d tokens in %d blocks, %d bytes compressed vs %d "
                "raw (%.2fx); store %d of %d bytes",
                name,
                blocks * self.geometry.block_size,
                blocks,
                nbytes,
                raw,
                raw / max(nbytes, 1),
                self.used_bytes,
                self.budget_bytes,
            )
        for load_id, (ranks, loaded) in report.loads.items():
            load = self._loads[load_id]
            load.ranks_done += ranks
            load.loaded_blocks = min(load.loaded_blocks, loaded)
            load.failed_rows |= {e.row for e in load.entries} & report.failed_rows
            if load.ranks_done >= self.geometry.world_size:
                self.complete_load(load)

    def finish(self, request: RequestLike) -> dict[str, Any]:
        """Forget the request; returns its receipt (``kv_transfer_params`` of the final
        output). Its load, if still in flight, completes when the workers report it (vLLM keeps
        the blocks of a request aborted in WAITING_FOR_REMOTE_KVS until then)."""
        rid = request.request_id
        self._lookups.pop(rid, None)
        self._deduplicated.discard(rid)
        if self.tiers is not None:
            self.tiers.forget(self, request)
        state = self._reqs.pop(rid, None) or RequestState.of(request)
        doc = self.documents.get(*state.doc) if state.doc is not None else None
        if doc is None:
            doc = self._named_doc(state)
        ready = 0
        if doc is not None:
            stored, total, pinned = doc.stored_blocks, doc.total_blocks, _pinned(doc)
            stored_bytes = sum(e.real_bytes or e.nbytes for e in doc.entries.values())
            ready = sum(1 for e in doc.entries.values() if e.ready)
            self.documents.forget_if_empty(doc)
        else:
            keys = state.prompt_keys(self.geometry.block_size)
            stored, total, pinned = self.entries.keys_present(keys), len(keys), False
            stored_bytes = stored * self.geometry.block_bytes
        receipt: dict[str, Any] = {
            "doc_id": state.params.doc_id,
            "tokens_from_store": state.tokens_from_store,
            "tokens_stored": state.tokens_stored,
            "pinned": pinned,
            "stored_blocks": stored,
            "total_blocks": total,
            "stored_bytes": stored_bytes,
        }
        tokens = state.params.tier_status
        if tokens is not None:  # which tiers hold the document's blocks (docs/TIERS.md)
            receipt["tiers"] = {"memory": ready}
            if self.tiers is not None:
                receipt["tiers"].update(self.tiers.held(request, tokens, self.geometry.block_size))
        if state.pin_refused is not None:
            receipt["pin_refused"] = state.pin_refused
        if state.params.doc_id_refused is not None:
            receipt["doc_id_refused"] = state.params.doc_id_refused
        return {PARAMS_KEY: receipt}


def _pinned(doc: Document) -> bool:
    """True only when the pin is held and every block of the document is stored (and so
    pinned)."""
    return doc.pinned and doc.stored_blocks == doc.total_blocks


def _short(key: Hashable) -> str:
    if isinstance(key, bytes | bytearray):
        return key[:6].hex()
    return f"{hash(key) & 0xFFFFFFFFFFFF:012x}"
