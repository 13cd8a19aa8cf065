"""The scheduler side of the tiers (``scheduler/tiers.py``) with a fake engine and an in-memory
tier: write-through of confirmed stores, lookups that continue into a tier, fetch plans,
failed fetches, and keys that do not depend on vLLM's block hashes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import scheduler_helpers as sh

from polykv_vllm.connector.metadata import StepPlan, WorkerReport
from polykv_vllm.connector.scheduler.tiers import TierPlanner
from polykv_vllm.connector.tiers import Tier, fingerprint, rank_key

FP = fingerprint(model="fake")


class DictTier(Tier):
    name = "remote"

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, bytes] = {}

    def put(self, key: str, blob: bytes) -> bool:
        self.data[key] = blob
        return True

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return [k in self.data for k in keys]

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


class Req(sh.FakeRequest):
    """A request whose vLLM hashes depend on a per-process ``seed`` (like vLLM's NONE_HASH)."""

    def __init__(self, rid: str, prompt: list[int], seed: str = "a") -> None:
        super().__init__(rid, prompt)
        self.prompt_token_ids = prompt
        self.block_hashes = [hashlib.sha256(seed.encode() + h).digest() for h in self.block_hashes]


class TierEngine(sh.Engine):
    """The fake engine whose worker also writes through to, and fetches from, ``tier``."""

    def __init__(self, tier: DictTier, budget_blocks: int = 100, missing: int = -1) -> None:
        index = sh.make_index(budget_blocks)
        index.tiers = TierPlanner([tier], FP)
        index.documents.pin_changes = []  # as the connector does
        super().__init__(index)
        self.tier = tier
        self.fetched = 0

    def apply(self, plan: StepPlan, confirm: bool = True) -> None:
        for _, key in plan.tier_puts:
            self.tier.put(rank_key(key, 0), b"entry")
        report = WorkerReport()
        for job in plan.loads:
            fetch = plan.fetches.get(job.load_id)
            good = len(job.rows)
            if fetch is not None:
                rows = job.rows[fetch.first :]
                for i, (row, key) in enumerate(zip(rows, fetch.keys, strict=True)):
                    if self.tier.get(rank_key(key, 0)) is None:
                        report.failed_rows.update(rows[i:])
                        good = fetch.first + i
                        break
                    self.worker_rows.add(row)
                    report.stored[row] = [sh.BLOCK_BYTES, 1]
                    self.fetched += 1
            assert set(job.rows[:good]) <= self.worker_rows
            report.loads[job.load_id] = [1, good]
        self.freed_rows.extend(plan.freed_rows)
        self.worker_rows -= set(plan.freed_rows)
        for job in plan.stores:
            for row in job.rows:
                self.worker_rows.add(row)
                report.stored[row] = [sh.BLOCK_BYTES, 1]
        if confirm:
            self.index.on_report(report)


def test_a_second_engine_with_other_block_hashes_serves_the_first_ones_document() -> None:
    tier = DictTier()
    a = TierEngine(tier)
    doc = sh.doc(1, 4.5)  # 4 full blocks
    assert a.run(Req("a1", doc))["polykv"]["tokens_stored"] == 4 * sh.BS
    assert len(tier.data) == 4, "written through with the store"
    assert not a.step([]).tier_puts, "written once"

    b = TierEngine(tier)  # another process: other vLLM hashes, an empty store
    req = Req("b1", doc, seed="b")
    assert b.admit(req) == 4 * sh.BS
    plan = b.step([req])
    (job,) = plan.loads
    assert plan.fetches[job.load_id].first == 0 and len(plan.fetches[job.load_id].keys) == 4
    assert b.fetched == 4
    receipt = b.index.finish(req)["polykv"]
    assert receipt["tokens_from_store"] == 4 * sh.BS and receipt["tokens_stored"] == 0
    assert b.index.counters.tokens_stored == 0, "a fetch is not a store"
    assert not b.step([]).tier_puts and not plan.tier_puts, "fetched entries are not rewritten"
    # now in memory: the next request loads without a fetch
    again = Req("b2", doc, seed="b")
    assert b.admit(again) == 4 * sh.BS
    plan = b.step([again])
    assert not plan.fetches and b.fetched == 4
    b.index.finish(again)


def test_memory_hit_continues_into_the_tier_and_a_missing_block_is_recomputed() -> None:
    tier = DictTier()
    a = TierEngine(tier)
    doc = sh.doc(2, 6.5)  # 6 full blocks
    a.run(Req("a1", doc))
    a.step([])
    names = sorted(tier.data)
    b = TierEngine(tier)
    b.run(Req("b0", doc[: 2 * sh.BS + 3], seed="b"))  # b stores the first 2 blocks itself
    b.step([])
    # block 4 (chain position) is lost from the tier after the lookup found it
    req = Req("b1", doc, seed="b")
    assert b.admit(req) == 6 * sh.BS
    keys = b.index.tiers.keys(req, sh.BS)
    del tier.data[rank_key(keys[4], 0)]
    plan = b.step([req])
    (job,) = plan.loads
    fetch = plan.fetches[job.load_id]
    assert fetch.first == 2 and len(fetch.keys) == 4  # blocks 0-1 from memory, 2-5 from the tier
    receipt = b.index.finish(req)["polykv"]
    assert receipt["tokens_from_store"] == 4 * sh.BS  # blocks 4 and 5 recomputed
    assert len(b.index.entries) == 4, "the failed fetches' entries were dropped"
    assert len(names) == 6


def test_no_tier_hit_beyond_the_room_the_store_can_make() -> None:
    tier = DictTier()
    a = TierEngine(tier)
    doc = sh.doc(3, 8.5)
    a.run(Req("a1", doc))
    a.step([])
    b = TierEngine(tier, budget_blocks=5)
    req = Req("b1", doc, seed="b")
    assert b.admit(req) == 5 * sh.BS  # a 5-block store
    b.step([req])
    assert b.index.finish(req)["polykv"]["tokens_from_store"] == 5 * sh.BS


def test_a_tier_load_is_async_and_lookups_of_its_blocks_wait_for_it() -> None:
    tier = DictTier()
    a = TierEngine(tier)
    doc = sh.doc(4, 4.5)
    a.run(Req("a1", doc))
    b = TierEngine(tier)  # a sync index (async_loads=False): memory hits stay synchronous
    assert not b.index.async_loads
    first, second = Req("b1", doc, seed="b"), Req("b2", doc, seed="b")
    assert b.index.lookup(first, 0) == 4 * sh.BS
    assert b.index.lookup_is_async("b1"), "a load reaching into a tier is asynchronous"
    b.index.on_alloc(first, list(range(5)), 4 * sh.BS)
    plan = b.index.plan_step([])
    (job,) = plan.loads
    assert job.async_load and plan.fetches[job.load_id].first == 0
    # while the fetch is in flight, another agent on the same document waits for it
    assert b.index.lookup(second, 0) is None
    b.apply(plan)  # the fetch lands, the load finishes
    assert b.index.lookup(second, 0) == 4 * sh.BS and not b.index.lookup_is_async("b2")
    b.index.finish(first)
    b.index.finish(second)


def test_a_status_probe_says_which_tiers_hold_a_documents_blocks() -> None:
    tier = DictTier()
    a = TierEngine(tier)
    doc = sh.doc(5, 3.5)  # 3 full blocks
    a.run(Req("a1", doc))
    b = TierEngine(tier)  # never saw it
    probe = Req("p", doc[:1], seed="b")
    probe.kv_transfer_params = {"polykv": {"tier_status": doc}}
    assert b.run(probe)["polykv"]["tiers"] == {"memory": 0, "remote": 3}
    b.run(Req("b1", doc, seed="b"))  # fetched: now in memory too
    again = Req("p2", doc[:1], seed="b")
    again.kv_transfer_params = {"polykv": {"tier_status": doc, "doc_id": "d"}}
    assert b.run(again)["polykv"]["tiers"]["remote"] == 3
    salted = Req("p3", doc[:1], seed="b")
    salted.salt = "other-tenant"
    salted.kv_transfer_params = {"polykv": {"tier_status": doc}}
    assert b.run(salted)["polykv"]["tiers"] == {"memory": 0, "remote": 0}, "per tenant"


def test_a_pinned_document_is_pinned_in_the_tiers_and_unpinned_with_it() -> None:
    tier = DictTier()
    a = TierEngine(tier)
    doc = sh.doc(6, 3.5)  # 3 full blocks
    req = Req("a1", doc)
    req.kv_transfer_params = {"polykv": {"doc_id": "d", "pin": True}}
    assert a.admit(req) == 0
    plan = a.step([req])
    keys = [k for _, k in plan.tier_puts]
    assert len(keys) == 3 and plan.tier_pins == [(k, True) for k in keys]
    assert a.index.finish(req)["polykv"]["pinned"]
    unpin = Req("a2", doc[:5])
    unpin.kv_transfer_params = {"polykv": {"doc_id": "d", "pin": False}}
    a.run(unpin)
    assert sorted(a.step([]).tier_pins) == sorted((k, False) for k in keys)
    again = Req("a3", doc[:5])  # pinned again later: its entries are already in the tier
    again.kv_transfer_params = {"polykv": {"doc_id": "d", "pin": True}}
    a.run(again)
    assert sorted(a.step([]).tier_pins) == sorted((k, True) for k in keys)
