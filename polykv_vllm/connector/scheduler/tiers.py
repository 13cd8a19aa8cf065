"""Scheduler side of the tiers below the store (``docs/TIERS.md``): keys, lookups, fetches and
write-through.

- **Keys.** vLLM's block hashes are not equal across processes (a random seed), so tier
  entries are addressed by polykv's own chain keys (:func:`~..tiers.base.chain_keys`), computed
  here from each request's prompt token ids and salt, once per request.
- **Lookup** (:meth:`TierPlanner.probe`, from :meth:`~.store_index.StoreIndex.lookup`): after
  the in-memory hit, the blocks no entry lists are asked of the tiers (rank 0's part: a stat
  per file on disk, one pipelined ``EXISTS`` in Redis); the leading run held by some tier,
  bounded by the room the store can make for it, extends the hit.
- **Fetch** (:meth:`TierPlanner.prepare_fetch`, from ``on_alloc``): those blocks get pending
  entries in fresh rows (evicting like a store, always admitted) holding a reference, and the
  load gets a :class:`~..metadata.FetchJob`: the workers read the entries into the rows, report
  them stored (the entries become ready as a store's do) and load them; a block no tier
  could give is reported failed with every later one and recomputed on the existing path.
- **Write-through** (:meth:`TierPlanner.fill`): every row a plan stores goes into the same
  plan's ``tier_puts`` with its chain key; each worker writes its part once its store of the
  row is done (entries fetched from a tier are not written back).
- **Pins** (:meth:`TierPlanner.fill`): an entry a pinned document pins is pinned in the tiers
  too (``tier_pins``: the disk tier never evicts it), and unpinned with its document.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from polykv_vllm.connector.metadata import FetchJob, StepPlan
from polykv_vllm.connector.scheduler.entries import Entry
from polykv_vllm.connector.scheduler.requests import RequestLike
from polykv_vllm.connector.tiers.base import Tier, chain_keys, rank_key

if TYPE_CHECKING:
    from polykv_vllm.connector.scheduler.store_index import StoreIndex

__all__ = ["TierPlanner"]


class TierPlanner:
    """The scheduler's view of the tiers (module docstring). ``tiers``: top first, opened for
    ``contains_many`` only; ``fp``: the entry fingerprint."""

    def __init__(self, tiers: Sequence[Tier], fp: bytes) -> None:
        self.tiers = list(tiers)
        self.fp = fp
        self._keys: dict[str, list[bytes]] = {}  # request id -> chain keys of its full blocks
        self._chain: dict[Hashable, bytes] = {}  # block hash -> chain key, until written
        self._probed: dict[str, tuple[int, int]] = {}  # request id -> (first block, blocks)
        self._fetched: set[Hashable] = set()  # block hashes whose pending entry is a fetch
        self._fetches: dict[int, FetchJob] = {}
        self.probe_hits = 0  # blocks found in a tier by lookups that were then loaded

    def keys(self, request: RequestLike, block_size: int) -> list[bytes]:
        rid = request.request_id
        keys = self._keys.get(rid)
        if keys is None:
            tokens = getattr(request, "prompt_token_ids", None)
            salt = _salt(request)
            keys = [] if tokens is None else chain_keys(self.fp, salt, tokens, block_size)
            self._keys[rid] = keys
        return keys

    def held(self, request: RequestLike, tokens: Sequence[int], block_size: int) -> dict[str, int]:
        """How many of the full blocks of ``tokens`` (in ``request``'s tenant) each tier holds
        (rank 0's part; one ``stat`` per block on disk, one pipelined ``EXISTS`` in Redis)."""
        names = [rank_key(k, 0) for k in chain_keys(self.fp, _salt(request), tokens, block_size)]
        return {t.name: sum(t.contains_many(names)) for t in self.tiers}

    def note(self, request: RequestLike, block_size: int) -> None:
        """A request was admitted: remember its blocks' chain keys for the write-through."""
        for h, k in zip(request.block_hashes, self.keys(request, block_size), strict=False):
            self._chain.setdefault(h, k)

    def probe(self, index: StoreIndex, request: RequestLike, first: int, limit: int) -> int:
        """Blocks ``first ..`` (before ``limit``) a tier holds and the store has room for."""
        self._probed.pop(request.request_id, None)
        bs = index.geometry.block_size
        keys = self.keys(request, bs)[first:limit]
        hashes = request.block_hashes[first : first + len(keys)]
        n = next((i for i, h in enumerate(hashes) if h in index.entries), len(hashes))
        names = [rank_key(k, 0) for k in keys[:n]]
        held = [False] * n
        for tier in self.tiers:
            ask = [i for i in range(n) if not held[i]]
            if not ask:
                break
            for i, found in zip(ask, tier.contains_many([names[i] for i in ask]), strict=True):
                held[i] = found
        n = next((i for i in range(n) if not held[i]), n)
        protect = set(request.block_hashes[: first + n])
        while n and index.entries.choose_victims(n * index.geometry.block_bytes, protect) is None:
            n -= 1
        if n:
            self._probed[request.request_id] = (first, n)
        return n

    def tier_blocks(self, request: RequestLike, start: int, n: int) -> int:
        """Of the ``n`` blocks from ``start`` vLLM will load, how many come from a tier (the
        last ones, found by the request's last :meth:`probe`)."""
        probed = self._probed.pop(request.request_id, None)
        if probed is None:
            return 0
        first, found = probed
        return max(0, min(start + n, first + found) - first)

    def prepare_fetch(
        self, index: StoreIndex, request: RequestLike, first: int, n: int
    ) -> list[Entry]:
        """Pending entries (one reference each) in fresh rows for blocks ``first .. first+n-1``."""
        from polykv_vllm.connector.scheduler.store_index import _Room

        protect = set(request.block_hashes[: first + n])
        out = []
        for h in request.block_hashes[first : first + n]:
            room = index._make_room(h, protect, admit_always=True)
            assert room is _Room.MADE, "lookup checked the room and nothing changed since"
            entry = index.entries.add(h)
            entry.refs += 1
            self._fetched.add(h)
            out.append(entry)
        before = index.entries.get(request.block_hashes[first - 1]) if first else None
        index.entries.place(out, before.row if before is not None and before.row >= 0 else None)
        self.probe_hits += n
        return out

    def plan_fetch(
        self,
        index: StoreIndex,
        load_id: int,
        offset: int,
        request: RequestLike,
        first: int,
        n: int,
        block_size: int,
    ) -> None:
        keys = tuple(self.keys(request, block_size)[first : first + n])
        self._fetches[load_id] = FetchJob(load_id=load_id, first=offset, keys=keys)
        for h, key in zip(request.block_hashes[first : first + n], keys, strict=True):
            entry = index.entries.get(h)
            if entry is not None:
                entry.tier_key = key

    def on_ready(self, entry: Entry) -> bool:
        """``entry`` was confirmed by every rank: True if it was fetched from a tier (not a
        store)."""
        if entry.key in self._fetched:
            self._fetched.discard(entry.key)
            self._chain.pop(entry.key, None)
            return True
        return False

    def fill(self, index: StoreIndex, plan: StepPlan) -> None:
        """This step's fetches, write-throughs (the rows it stores) and pin changes of entries
        the tiers hold into ``plan``; a fetched row is not marked empty by the plan (the fetch
        fills it, or empties it if it fails)."""
        plan.fetches, self._fetches = self._fetches, {}
        for job in plan.stores:
            for row in job.rows:
                entry = index.entries.at_row(row)
                key = self._chain.pop(entry.key, None) if entry is not None else None
                if entry is not None and key is not None:
                    plan.tier_puts.append((row, key))
                    entry.tier_key = key
        # pins of entries the tiers hold (a store's entry was joined, and pinned, just before)
        changes = index.documents.pin_changes
        if changes:
            plan.tier_pins += [(e.tier_key, p) for e, p in changes if e.tier_key is not None]
            changes.clear()
        loads_rows = {job.load_id: job.rows for job in plan.loads}
        if plan.fetches:
            fetched = {r for lid, f in plan.fetches.items() for r in loads_rows[lid][f.first :]}
            plan.freed_rows = [r for r in plan.freed_rows if r not in fetched]

    def forget(self, index: StoreIndex, request: RequestLike) -> None:
        """The request finished: drop what only it needed (keys of blocks still pending stay
        until their store is confirmed)."""
        self._probed.pop(request.request_id, None)
        self._keys.pop(request.request_id, None)
        for h in request.block_hashes:
            entry = index.entries.get(h)
            if entry is None or entry.ready:
                self._chain.pop(h, None)
                if entry is None:
                    self._fetched.discard(h)


def _salt(request: RequestLike) -> str | None:
    """The tenant part of a request's chain keys: its ``cache_salt``, and its LoRA adapter
    (vLLM's block hashes include the adapter: so do these)."""
    salt = getattr(request, "cache_salt", None)
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        salt = f"{salt}|lora:{getattr(lora, 'lora_name', lora)}"
    return salt
