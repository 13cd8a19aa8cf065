"""Scheduler side of the connector: the index of the compressed store (pure Python, no vLLM).

What it holds and the rules it keeps:

- **Entries**, one per stored full block, keyed by vLLM's chained block hash
  (``request.block_hashes[i]``). A chained hash names the whole prefix up to that block, and the
  first block's hash includes the request's ``cache_salt``, so a lookup can only ever match the
  same tokens under the same salt. Each entry has a ``slot`` (an int never reused) that names
  its compressed tensors on the workers.
- An entry is **ready** (can serve lookups) only once every worker rank confirmed the store
  (:meth:`StoreIndex.on_report`); until then it is *pending* and counts against the budget.
- **Budget**: the predicted compressed bytes of all entries (ready and pending) never exceed
  ``budget_bytes``. Room is made by evicting least recently used entries.
- **Eviction rule**: an entry may be evicted only when it is ready, not pinned (``pins == 0``)
  and not being loaded (``refs == 0``). Loads are planned and emitted in the same scheduler step
  (synchronous loads), and the worker applies a step's loads before its evictions.
- **LRU order**: a used chain is touched from its last block to its first, so the first blocks
  of a document are always more recent than its later ones and eviction trims documents from
  the tail (a stored suffix without its prefix would be useless).
- **Documents**: a request's ``kv_transfer_params["polykv"]["doc_id"]`` names the full blocks
  of its prompt (for pinning and reporting; lookups go by hash only). Untagged prompts are
  named ``#<hash prefix>`` for logs. ``pin: true`` pins the document's stored blocks until a
  later request with the same doc id sends ``pin: false``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from polykv_vllm.connector.metadata import BlockJob, StepPlan, WorkerReport

__all__ = [
    "DocParams",
    "RequestLike",
    "ScheduledReq",
    "StoreGeometry",
    "StoreIndex",
    "parse_doc_params",
]

logger = logging.getLogger(__name__)

PARAMS_KEY = "polykv"


class RequestLike(Protocol):
    """The attributes of ``vllm.v1.request.Request`` the index reads (live objects)."""

    @property
    def request_id(self) -> str: ...
    @property
    def block_hashes(self) -> Sequence[Any]: ...  # hashable chained block hashes
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def kv_transfer_params(self) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class StoreGeometry:
    """Sizes the index needs, measured once by the connector at start-up.

    - ``block_size``: tokens per vLLM block (the block hashes' granularity).
    - ``block_bytes``: compressed bytes of one block, all layers, all kv heads of all ranks.
    - ``block_raw_bytes``: bytes of the same block in the engine's KV cache dtype.
    - ``world_size``: worker ranks that must confirm each store.
    """

    block_size: int
    block_bytes: int
    block_raw_bytes: int
    world_size: int = 1


@dataclass(frozen=True)
class DocParams:
    """The request's ``polykv`` parameters: ``doc_id`` (None when untagged) and ``pin``
    (None: leave the pin state as it is)."""

    doc_id: str | None = None
    pin: bool | None = None


def parse_doc_params(kv_transfer_params: Mapping[str, Any] | None) -> DocParams:
    """Read ``{"polykv": {"doc_id": str, "pin": bool}}``; malformed values are logged and
    ignored (a client's bad parameter must not stop the engine)."""
    raw = (kv_transfer_params or {}).get(PARAMS_KEY)
    if raw is None:
        return DocParams()
    if not isinstance(raw, Mapping):
        logger.warning(
            "ignoring kv_transfer_params.polykv=%r: expected an object like "
            '{"doc_id": "contract-42", "pin": true}',
            raw,
        )
        return DocParams()
    doc_id = raw.get("doc_id")
    pin = raw.get("pin")
    if doc_id is not None and (not isinstance(doc_id, str) or not doc_id):
        logger.warning("ignoring polykv.doc_id=%r: expected a non-empty string", doc_id)
        doc_id = None
    if pin is not None and not isinstance(pin, bool):
        logger.warning("ignoring polykv.pin=%r: expected true or false", pin)
        pin = None
    if pin is not None and doc_id is None:
        logger.warning("ignoring polykv.pin=%r: pinning needs a polykv.doc_id", pin)
        pin = None
    return DocParams(doc_id=doc_id, pin=pin)


@dataclass(frozen=True)
class ScheduledReq:
    """One request scheduled this step, as :meth:`StoreIndex.plan_step` needs it.

    ``block_ids``: the blocks added this step (or all of them when ``replace``);
    ``computed_after``: tokens whose KV exists once this step's forward ran.
    """

    req_id: str
    block_ids: tuple[int, ...]
    replace: bool
    computed_after: int


@dataclass(eq=False)
class _Entry:
    key: Hashable
    slot: int
    nbytes: int
    ready: bool = False
    refs: int = 0
    pins: int = 0
    ranks_confirmed: int = 0
    real_bytes: int = 0
    docs: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Doc:
    name: str
    keys: tuple[Hashable, ...]
    pinned_keys: set[Hashable] = field(default_factory=set)
    present: int = 0
    pin: bool = False


@dataclass(eq=False)
class _Req:
    request: RequestLike
    params: DocParams
    block_ids: list[int] = field(default_factory=list)
    next_store_block: int = 0
    tokens_from_store: int = 0
    tokens_stored: int = 0
    doc_name: str | None = None


@dataclass
class SchedulerCounters:
    """Counters since the last :meth:`StoreIndex.take_counters` (summed into metrics)."""

    hits: int = 0
    tokens_loaded: int = 0
    tokens_stored: int = 0
    blocks_evicted: int = 0
    store_rejected_blocks: int = 0


class StoreIndex:
    """The scheduler-side index of the compressed store. See the module docstring for rules.

    Hooks, in the order vLLM calls them within one scheduler step: :meth:`lookup` (per waiting
    request, side-effect free), :meth:`on_alloc` (per admitted request), :meth:`plan_step` (once),
    then later :meth:`on_report` (per step output) and :meth:`finish` (per finished request).
    """

    def __init__(
        self, geometry: StoreGeometry, budget_bytes: int, store_all: bool, min_store_tokens: int
    ) -> None:
        if geometry.block_bytes > budget_bytes:
            raise ValueError(
                f"polykv store_bytes={budget_bytes} cannot hold even one block "
                f"({geometry.block_bytes} bytes compressed): raise store_bytes."
            )
        self.geometry = geometry
        self.budget_bytes = budget_bytes
        self.store_all = store_all
        self.min_store_tokens = min_store_tokens
        self._lru: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._by_slot: dict[int, _Entry] = {}
        self._docs: dict[str, _Doc] = {}
        self._reqs: dict[str, _Req] = {}
        self._lookups: dict[str, tuple[int, int]] = {}
        self._pending_loads: list[BlockJob] = []
        self._pending_evictions: list[int] = []
        self._next_slot = 0
        self.used_bytes = 0
        self.counters = SchedulerCounters()

    # --- introspection ---------------------------------------------------------------------

    @property
    def num_entries(self) -> int:
        return len(self._lru)

    @property
    def num_documents(self) -> int:
        return sum(1 for d in self._docs.values() if d.present > 0)

    @property
    def real_bytes(self) -> int:
        """Compressed bytes the workers reported for ready entries (measured, all ranks)."""
        return sum(e.real_bytes for e in self._lru.values() if e.ready)

    @property
    def raw_bytes(self) -> int:
        """What the ready entries' tokens take in the engine's KV dtype."""
        return sum(self.geometry.block_raw_bytes for e in self._lru.values() if e.ready)

    def document(self, doc_id: str) -> dict[str, Any] | None:
        """``{"blocks", "ready_blocks", "pinned"}`` of a named document, or None if unknown."""
        doc = self._docs.get(doc_id)
        if doc is None:
            return None
        entries = [self._lru.get(k) for k in doc.keys]
        return {
            "blocks": len(doc.keys),
            "ready_blocks": sum(1 for e in entries if e is not None and e.ready),
            "pinned": doc.pin,
        }

    def take_counters(self) -> SchedulerCounters:
        out, self.counters = self.counters, SchedulerCounters()
        return out

    # --- lookups and loads -----------------------------------------------------------------

    def lookup(self, request: RequestLike, num_computed_tokens: int) -> int:
        """Tokens beyond ``num_computed_tokens`` the store can supply: whole ready blocks that
        continue the local hit, never the last token of the request."""
        bs = self.geometry.block_size
        if num_computed_tokens % bs:
            self._lookups.pop(request.request_id, None)
            return 0
        start = num_computed_tokens // bs
        limit = min((request.num_tokens - 1) // bs, len(request.block_hashes))
        n = 0
        for i in range(start, limit):
            entry = self._lru.get(request.block_hashes[i])
            if entry is None or not entry.ready:
                break
            n += 1
        self._lookups[request.request_id] = (start, n)
        return n * bs

    def on_alloc(
        self, request: RequestLike, block_ids: Sequence[int], num_external_tokens: int
    ) -> None:
        """Record the request's blocks; plan its load when ``num_external_tokens > 0``."""
        rid = request.request_id
        state = self._reqs.get(rid)
        if state is None:
            state = _Req(request=request, params=parse_doc_params(request.kv_transfer_params))
            self._reqs[rid] = state
        state.block_ids = list(block_ids)
        lookup = self._lookups.pop(rid, None)
        if num_external_tokens <= 0:
            return
        bs = self.geometry.block_size
        assert lookup is not None, "vLLM allocated external tokens without a lookup"
        start, n_found = lookup
        n = num_external_tokens // bs
        assert num_external_tokens % bs == 0 and n <= n_found, (num_external_tokens, lookup)
        entries = [self._lru[request.block_hashes[start + i]] for i in range(n)]
        for e in entries:
            assert e.ready, "a lookup only counts ready entries and nothing evicts before plan"
            e.refs += 1
        self._pending_loads.append(
            BlockJob(
                req_id=rid,
                slots=tuple(e.slot for e in entries),
                block_ids=tuple(state.block_ids[start : start + n]),
            )
        )
        state.tokens_from_store += num_external_tokens
        self.counters.hits += 1
        self.counters.tokens_loaded += num_external_tokens
        self._touch(request.block_hashes[: start + n])

    # --- per-step plan ---------------------------------------------------------------------

    def plan_step(self, scheduled: Iterable[ScheduledReq]) -> StepPlan:
        """Loads planned since the last step, stores of blocks this step completes, evictions."""
        plan = StepPlan(loads=self._pending_loads, evictions=self._pending_evictions)
        self._pending_loads, self._pending_evictions = [], []
        for s in scheduled:
            state = self._reqs.get(s.req_id)
            if state is None:
                continue
            if s.replace:
                state.block_ids = list(s.block_ids)
            else:
                state.block_ids.extend(s.block_ids)
            job = self._plan_store(state, s.computed_after, plan.evictions)
            if job is not None:
                plan.stores.append(job)
        for job in plan.loads:
            for slot in job.slots:
                self._by_slot[slot].refs -= 1
        return plan

    def _plan_store(
        self, state: _Req, computed_after: int, evictions: list[int]
    ) -> BlockJob | None:
        req = state.request
        bs = self.geometry.block_size
        if not (self.store_all or state.params.doc_id is not None):
            return None
        if req.num_prompt_tokens < self.min_store_tokens:
            return None
        full = min(computed_after, req.num_prompt_tokens, len(state.block_ids) * bs) // bs
        full = min(full, len(req.block_hashes))
        if full <= state.next_store_block:
            return None
        doc = self._doc_for(state, req.num_prompt_tokens // bs)
        slots: list[int] = []
        blocks: list[int] = []
        for i in range(state.next_store_block, full):
            key = req.block_hashes[i]
            entry = self._lru.get(key)
            if entry is None:
                if not self._make_room(self.geometry.block_bytes, evictions):
                    self.counters.store_rejected_blocks += full - i
                    logger.warning(
                        "polykv: store full (%d of %d bytes, pinned or in use): document %s "
                        "stored only up to block %d of %d",
                        self.used_bytes,
                        self.budget_bytes,
                        doc.name,
                        i,
                        full,
                    )
                    full = i
                    break
                entry = self._new_entry(key)
                slots.append(entry.slot)
                blocks.append(state.block_ids[i])
            self._join_doc(entry, doc)
        state.next_store_block = max(state.next_store_block, full)
        self._touch(req.block_hashes[:full])
        if not slots:
            return None
        state.tokens_stored += len(slots) * bs
        return BlockJob(req_id=req.request_id, slots=tuple(slots), block_ids=tuple(blocks))

    # --- documents and pins ----------------------------------------------------------------

    def _doc_for(self, state: _Req, prompt_blocks: int) -> _Doc:
        req = state.request
        keys = tuple(req.block_hashes[:prompt_blocks])
        if state.doc_name is not None:
            return self._docs[state.doc_name]
        name = state.params.doc_id or f"#{_short(keys[-1])}"
        doc = self._docs.get(name)
        if doc is None:
            doc = _Doc(name=name, keys=keys)
            self._docs[name] = doc
        elif doc.keys != keys:
            self._set_pin(doc, False)
            for k in doc.keys:
                e = self._lru.get(k)
                if e is not None and name in e.docs:
                    e.docs.discard(name)
                    doc.present -= 1
            doc.keys = keys
        state.doc_name = name
        if state.params.pin is not None:
            doc.pin = state.params.pin
        for k in keys:
            e = self._lru.get(k)
            if e is not None:
                self._join_doc(e, doc)
        self._set_pin(doc, doc.pin)
        return doc

    def _join_doc(self, entry: _Entry, doc: _Doc) -> None:
        if doc.name not in entry.docs:
            entry.docs.add(doc.name)
            doc.present += 1
        if doc.pin and entry.key not in doc.pinned_keys:
            doc.pinned_keys.add(entry.key)
            entry.pins += 1

    def _set_pin(self, doc: _Doc, pin: bool) -> None:
        if pin:
            for k in doc.keys:
                e = self._lru.get(k)
                if e is not None and k not in doc.pinned_keys:
                    doc.pinned_keys.add(k)
                    e.pins += 1
            return
        for k in doc.pinned_keys:
            e = self._lru.get(k)
            if e is not None:
                e.pins -= 1
        doc.pinned_keys.clear()

    def _apply_pin_request(self, state: _Req) -> None:
        """A request that only names a document (nothing to store) may still pin/unpin it."""
        p = state.params
        if p.doc_id is None or p.pin is None:
            return
        doc = self._docs.get(p.doc_id)
        if doc is not None and doc.pin != p.pin:
            doc.pin = p.pin
            self._set_pin(doc, p.pin)

    # --- entries, budget, eviction ---------------------------------------------------------

    def _new_entry(self, key: Hashable) -> _Entry:
        entry = _Entry(key=key, slot=self._next_slot, nbytes=self.geometry.block_bytes)
        self._next_slot += 1
        self._lru[key] = entry
        self._by_slot[entry.slot] = entry
        self.used_bytes += entry.nbytes
        assert self.used_bytes <= self.budget_bytes, "reserve before creating an entry"
        return entry

    def _make_room(self, nbytes: int, evictions: list[int]) -> bool:
        if self.used_bytes + nbytes <= self.budget_bytes:
            return True
        victims: list[_Entry] = []
        freed = 0
        for entry in self._lru.values():
            if entry.ready and entry.refs == 0 and entry.pins == 0:
                victims.append(entry)
                freed += entry.nbytes
                if self.used_bytes - freed + nbytes <= self.budget_bytes:
                    break
        if self.used_bytes - freed + nbytes > self.budget_bytes:
            return False
        self._evict(victims, evictions)
        return True

    def _evict(self, victims: Sequence[_Entry], evictions: list[int]) -> None:
        per_doc: dict[str, int] = {}
        for entry in victims:
            self._drop(entry)
            evictions.append(entry.slot)
            for name in entry.docs:
                per_doc[name] = per_doc.get(name, 0) + 1
        self.counters.blocks_evicted += len(victims)
        for name, n in per_doc.items():
            doc = self._docs.get(name)
            left = doc.present if doc is not None else 0
            logger.info(
                "polykv: evicted %d blocks of document %s (%d blocks left); store %d of %d bytes",
                n,
                name,
                left,
                self.used_bytes,
                self.budget_bytes,
            )

    def _drop(self, entry: _Entry) -> None:
        del self._lru[entry.key]
        del self._by_slot[entry.slot]
        self.used_bytes -= entry.nbytes
        for name in entry.docs:
            doc = self._docs.get(name)
            if doc is None:
                continue
            doc.present -= 1
            doc.pinned_keys.discard(entry.key)
            if doc.present <= 0 and not doc.pin:
                del self._docs[name]

    def _touch(self, keys: Sequence[Hashable]) -> None:
        for key in reversed(keys):
            if key in self._lru:
                self._lru.move_to_end(key)

    # --- worker reports and request end ----------------------------------------------------

    def on_report(self, report: WorkerReport) -> None:
        """Mark confirmed stores ready; drop entries whose load failed and stop counting the
        tokens they were to supply (vLLM recomputes them)."""
        stored_docs: dict[str, list[int]] = {}
        for slot, (nbytes, ranks) in report.stored.items():
            entry = self._by_slot.get(slot)
            if entry is None:
                continue  # evicted or failed meanwhile; the worker got the eviction
            entry.ranks_confirmed += ranks
            entry.real_bytes += nbytes
            if not entry.ready and entry.ranks_confirmed >= self.geometry.world_size:
                entry.ready = True
                self.counters.tokens_stored += self.geometry.block_size
                for name in entry.docs:
                    acc = stored_docs.setdefault(name, [0, 0])
                    acc[0] += 1
                    acc[1] += entry.real_bytes
        for name, (blocks, nbytes) in stored_docs.items():
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
        for rid, tokens in report.unloaded_tokens.items():
            state = self._reqs.get(rid)
            if state is not None:
                state.tokens_from_store -= tokens
        for slot in sorted(report.failed_slots):
            entry = self._by_slot.get(slot)
            if entry is None:
                continue
            logger.warning("polykv: dropping store entry %d: its load failed", slot)
            entry.refs = 0
            self._drop(entry)
            self._pending_evictions.append(slot)

    def finish(self, request: RequestLike) -> dict[str, Any]:
        """Forget the request; returns its ``kv_transfer_params`` for the final output."""
        rid = request.request_id
        self._lookups.pop(rid, None)
        state = self._reqs.pop(rid, None)
        if state is None:
            state = _Req(request=request, params=parse_doc_params(request.kv_transfer_params))
        self._apply_pin_request(state)
        doc = self._docs.get(state.params.doc_id) if state.params.doc_id else None
        return {
            PARAMS_KEY: {
                "doc_id": state.params.doc_id,
                "tokens_from_store": state.tokens_from_store,
                "tokens_stored": state.tokens_stored,
                "pinned": bool(doc is not None and doc.pin),
            }
        }


def _short(key: Hashable) -> str:
    if isinstance(key, bytes | bytearray):
        return key[:6].hex()
    return f"{hash(key) & 0xFFFFFFFFFFFF:012x}"
