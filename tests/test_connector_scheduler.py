"""Pure-Python tests of the connector's scheduler-side index (no vLLM, no tensors)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from scheduler_helpers import (
    BLOCK_BYTES,
    BS,
    RAW_BYTES,
    Engine,
    FakeRequest,
    chain,
    doc,
    make_index,
)

from polykv_vllm.connector.metadata import WorkerReport
from polykv_vllm.connector.scheduler import (
    ScheduledReq,
    StoreGeometry,
    StoreIndex,
    parse_doc_params,
)


@pytest.mark.parametrize(
    ("blocks", "expected_blocks"), [(4, 3), (4.5, 4), (1, 0), (1.0625, 1), (0.5, 0)]
)
def test_revisit_hits_whole_blocks_but_never_the_last_token(
    blocks: float, expected_blocks: int
) -> None:
    eng = Engine(make_index())
    prompt = doc(1, blocks)
    eng.run(FakeRequest("a", prompt))
    revisit = FakeRequest("b", prompt)
    n = eng.admit(revisit)
    assert n == expected_blocks * BS
    assert n < revisit.num_tokens
    plan = eng.step([revisit])
    if expected_blocks:
        (job,) = plan.loads
        assert len(job.rows) == expected_blocks
        assert job.block_ids == tuple(eng._blocks["b"][0][:expected_blocks])
    else:
        assert plan.loads == []


def test_lookup_continues_the_local_hit_and_ignores_unaligned_hits() -> None:
    eng = Engine(make_index())
    prompt = doc(2, 6.5)
    eng.run(FakeRequest("a", prompt))
    req = FakeRequest("b", prompt)
    assert eng.index.lookup(req, 2 * BS) == 4 * BS
    assert eng.index.lookup(req, 2 * BS + 3) == 0
    assert eng.index.lookup(req, 6 * BS) == 0


def test_lookup_is_side_effect_free() -> None:
    eng = Engine(make_index())
    prompt = doc(3, 3.5)
    eng.run(FakeRequest("a", prompt))
    req = FakeRequest("b", prompt)
    first = eng.index.lookup(req, 0)
    assert [eng.index.lookup(req, 0) for _ in range(3)] == [first] * 3
    assert eng.index.take_counters().hits == 0


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_entry_serves_only_after_every_rank_confirmed(world_size: int) -> None:
    index = make_index(world_size=world_size)
    eng = Engine(index, world_size=1)  # each report carries one rank's confirmation
    prompt = doc(4, 3.5)
    a = FakeRequest("a", prompt)
    eng.admit(a)
    plan = eng.step([a], confirm=False)
    rows = plan.stores[0].rows
    assert index.lookup(FakeRequest("x", prompt), 0) == 0, "pending entries must not serve"
    for rank in range(world_size):
        assert index.lookup(FakeRequest("x", prompt), 0) == 0
        index.on_report(WorkerReport(stored={r: [BLOCK_BYTES // world_size, 1] for r in rows}))
        del rank
    assert index.lookup(FakeRequest("x", prompt), 0) == 3 * BS
    assert index.real_bytes == 3 * BLOCK_BYTES


def test_blocks_already_stored_are_not_stored_twice() -> None:
    eng = Engine(make_index())
    prompt = doc(5, 4)
    eng.run(FakeRequest("a", prompt))
    eng.admit(FakeRequest("b", prompt + [1, 2, 3] * BS))
    plan = eng.step([FakeRequest("b", prompt + [1, 2, 3] * BS)])
    (store,) = plan.stores
    assert len(store.rows) == 3, "only the three new blocks of the longer prompt"
    assert eng.index.num_entries == 7


@pytest.mark.parametrize("budget_blocks", [3, 5, 8, 13])
def test_churn_never_exceeds_the_budget_and_trims_documents_from_the_tail(
    budget_blocks: int,
) -> None:
    index = make_index(budget_blocks=budget_blocks)
    eng = Engine(index)
    prompts = [doc(100 + i, 2 + i % 4) for i in range(20)]
    for i, p in enumerate(prompts * 2):
        eng.run(FakeRequest(f"r{i}", p))
        assert index.used_bytes <= index.budget_bytes
        assert eng.worker_rows == {e.row for e in index.entries.values()}
        assert index.entries.rows.free_rows == index.budget_bytes // BLOCK_BYTES - len(
            index.entries
        ), "one row per entry, every other row free"
        for q in prompts:
            present = [h in index.entries for h in chain(q)]
            # what survives of a document is a prefix of it
            assert present == sorted(present, reverse=True)
    assert index.take_counters().blocks_evicted > 0


def test_entries_being_loaded_are_not_evicted_in_the_same_step() -> None:
    index = make_index(budget_blocks=4)
    eng = Engine(index)
    old = doc(6, 4.5)
    eng.run(FakeRequest("a", old))  # fills the budget: 4 blocks
    reader = FakeRequest("b", old)
    newcomer = FakeRequest("c", doc(7, 2.5))
    assert eng.admit(reader) == 4 * BS
    eng.admit(newcomer)
    plan = eng.step([reader, newcomer])
    loaded = set(plan.loads[0].rows)
    assert not loaded & set(plan.freed_rows)
    assert plan.stores == [] or not plan.stores[0].rows
    assert index.take_counters().store_rejected_blocks == 2


def test_pinned_documents_survive_churn_until_unpinned() -> None:
    index = make_index(budget_blocks=6, quota_blocks=3)
    eng = Engine(index)
    pinned = doc(8, 3.5)
    pin = {"polykv": {"doc_id": "contract", "pin": True}}
    params = eng.run(FakeRequest("p", pinned, pin))
    assert params["polykv"]["pinned"] is True
    for i in range(10):
        eng.run(FakeRequest(f"x{i}", doc(200 + i, 2.5)))
        assert index.document("contract") == {
            "total_blocks": 3,
            "stored_blocks": 3,
            "ready_blocks": 3,
            "pinned": True,
        }
        assert index.used_bytes <= index.budget_bytes
    unpin = {"polykv": {"doc_id": "contract", "pin": False}}
    params = eng.run(FakeRequest("u", pinned, unpin))
    assert params["polykv"].pop("stored_bytes") > 0
    assert params["polykv"] == {
        "doc_id": "contract",
        "tokens_from_store": 3 * BS,
        "tokens_stored": 0,
        "pinned": False,
        "stored_blocks": 3,
        "total_blocks": 3,
    }
    for i in range(10):
        eng.run(FakeRequest(f"y{i}", doc(300 + i, 3.5)))
    assert index.document("contract") is None


def test_store_full_of_pins_rejects_new_documents_without_exceeding_the_budget() -> None:
    index = make_index(budget_blocks=3, quota_blocks=3)
    eng = Engine(index)
    p = eng.run(FakeRequest("p", doc(9, 3.5), {"polykv": {"doc_id": "d", "pin": True}}))
    assert p["polykv"]["pinned"] is True
    params = eng.run(FakeRequest("q", doc(10, 2.5)))
    assert params["polykv"]["tokens_stored"] == 0
    assert index.used_bytes == 3 * BLOCK_BYTES


def test_many_agents_on_one_document_share_one_entry_per_block() -> None:
    index = make_index()
    eng = Engine(index)
    shared = doc(11, 4)
    eng.run(FakeRequest("w", shared + [1] * 5, {"polykv": {"doc_id": "d"}}))
    for i in range(8):
        eng.run(FakeRequest(f"a{i}", shared + [i + 10] * 5, {"polykv": {"doc_id": "d"}}))
    assert index.num_entries == 4
    assert index.num_documents == 1
    assert len(set(eng.loaded_rows)) == 4


def test_salt_isolates_identical_prompts() -> None:
    eng = Engine(make_index())
    prompt = doc(12, 3.5)
    eng.run(FakeRequest("a", prompt, salt="alice"))
    assert eng.index.lookup(FakeRequest("b", prompt, salt="bob"), 0) == 0
    assert eng.index.lookup(FakeRequest("c", prompt), 0) == 0
    assert eng.index.lookup(FakeRequest("d", prompt, salt="alice"), 0) == 3 * BS


def test_failed_load_drops_the_entry_on_one_path() -> None:
    """The worker only reports the bad row; the index drops the entry once (on the load's
    completion), counts only the blocks loaded, and frees the row to the worker exactly once."""
    index = make_index()
    eng = Engine(index)
    prompt = doc(13, 4.5)
    eng.run(FakeRequest("a", prompt))
    rows = [index.entries.get(h).row for h in chain(prompt)]  # type: ignore[union-attr]
    reader = FakeRequest("b", prompt)
    assert eng.admit(reader) == 4 * BS
    (load,) = index.plan_step([]).loads
    assert load.rows == tuple(rows)
    assert all(index.entries.get(h).refs == 1 for h in chain(prompt))  # type: ignore[union-attr]
    index.on_report(WorkerReport(loads={load.load_id: [1, 2]}, failed_rows={rows[2]}))
    assert all(e.refs == 0 for e in index.entries.values()), "refs released by complete_load"
    assert index.lookup(FakeRequest("c", prompt), 0) == 2 * BS
    assert index.finish(reader)["polykv"]["tokens_from_store"] == 2 * BS
    plan = index.plan_step([])
    assert plan.freed_rows == [rows[2]]
    assert index.plan_step([]).freed_rows == [], "freed once"
    assert index.num_entries == 3


def test_refs_hold_until_every_rank_reported_the_load() -> None:
    """An entry being loaded is not evicted before its load completed, even steps later."""
    index = make_index(budget_blocks=4, world_size=2)
    eng = Engine(index, world_size=2)
    old = doc(30, 4.5)
    eng.run(FakeRequest("a", old))
    reader = FakeRequest("b", old)
    assert eng.admit(reader) == 4 * BS
    (load,) = index.plan_step([ScheduledReq("b", (90, 91, 92, 93, 94), True, 4 * BS)]).loads
    newcomer = FakeRequest("c", doc(31, 2.5))
    eng.admit(newcomer)
    eng.step([newcomer], confirm=False)
    assert index.take_counters().store_rejected_blocks == 2, "the loading entries stay"
    index.on_report(WorkerReport(loads={load.load_id: [1, 4]}))  # one rank of two
    assert all(e.refs == 1 for e in index.entries.values())
    index.on_report(WorkerReport(loads={load.load_id: [1, 4]}))
    assert all(e.refs == 0 for e in index.entries.values())
    later = FakeRequest("d", doc(32, 2.5))
    eng.admit(later)
    plan = eng.step([later])
    assert len(plan.stores[0].rows) == 2 and len(plan.freed_rows) == 2
    assert set(plan.stores[0].rows) == set(plan.freed_rows), "the evicted rows are reused"


def test_store_policy_tagged_and_min_store_tokens() -> None:
    index = make_index(store_all=False, min_store_tokens=3 * BS)
    eng = Engine(index)
    assert eng.run(FakeRequest("a", doc(14, 4)))["polykv"]["tokens_stored"] == 0
    tagged = {"polykv": {"doc_id": "t"}}
    assert eng.run(FakeRequest("b", doc(15, 2.5), tagged))["polykv"]["tokens_stored"] == 0
    assert eng.run(FakeRequest("c", doc(16, 3.5), tagged))["polykv"]["tokens_stored"] == 3 * BS


def test_doc_tokens_stores_only_the_document_and_the_next_agent_hits_it() -> None:
    """``doc_tokens`` = 2 blocks of a 4.5-block prompt: only the document's 2 blocks are stored
    (not the agent's question after it), and another agent with its own question gets them."""
    index = make_index()
    eng = Engine(index)
    document = doc(18, 2)
    first = FakeRequest("a", document + doc(19, 2.5), {"polykv": {"doc_tokens": 2 * BS + 3}})
    assert eng.run(first)["polykv"]["tokens_stored"] == 2 * BS
    second = FakeRequest("b", document + doc(20, 1.5), {"polykv": {"doc_tokens": 2 * BS}})
    assert index.lookup(second, 0) == 2 * BS
    assert eng.run(second)["polykv"]["tokens_stored"] == 0, "its question is not stored"
    bad = parse_doc_params({"polykv": {"doc_tokens": 0}})
    assert (
        bad.doc_tokens is None
        and parse_doc_params({"polykv": {"doc_tokens": True}}).doc_tokens is None
    )


def test_chunked_prefill_stores_blocks_as_they_complete() -> None:
    index = make_index()
    prompt = doc(17, 5.5)
    req = FakeRequest("a", prompt)
    index.lookup(req, 0)
    index.on_alloc(req, [0, 1, 2], 0)
    plan = index.plan_step([ScheduledReq("a", (0, 1, 2), True, computed_after=40)])
    assert [len(j.rows) for j in plan.stores] == [2]
    plan = index.plan_step([ScheduledReq("a", (3, 4, 5), False, computed_after=len(prompt))])
    assert plan.stores[0].block_ids == (2, 3, 4)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (None, (None, None)),
        ({}, (None, None)),
        ({"polykv": {"doc_id": "x"}}, ("x", None)),
        ({"polykv": {"doc_id": "x", "pin": True}}, ("x", True)),
        ({"polykv": {"doc_id": 5}}, (None, None)),
        ({"polykv": {"pin": True}}, (None, None)),
        ({"polykv": "x"}, (None, None)),
        ({"polykv": {"doc_id": "x", "pin": "yes"}}, ("x", None)),
    ],
)
def test_doc_params_are_parsed_leniently(
    params: dict[str, Any] | None,
    expected: tuple[str | None, bool | None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        p = parse_doc_params(params)
    assert (p.doc_id, p.pin) == expected


def test_unknown_doc_id_is_served_normally() -> None:
    eng = Engine(make_index())
    params = eng.run(FakeRequest("a", doc(18, 2.5), {"polykv": {"doc_id": "never-seen"}}))
    assert params["polykv"]["tokens_from_store"] == 0
    assert params["polykv"]["tokens_stored"] == 2 * BS


def test_budget_smaller_than_one_block_is_refused() -> None:
    geo = StoreGeometry(block_size=BS, block_bytes=BLOCK_BYTES, block_raw_bytes=RAW_BYTES)
    with pytest.raises(ValueError, match="store_bytes"):
        StoreIndex(geo, budget_bytes=BLOCK_BYTES - 1, store_all=True, min_store_tokens=BS)


def test_worker_report_merge_sums_bytes_and_ranks() -> None:
    a = WorkerReport(stored={1: [10, 1], 2: [5, 1]}, loads={3: [1, 4]}, failed_rows={7})
    b = WorkerReport(stored={1: [10, 1]}, loads={3: [1, 2], 4: [1, 1]}, failed_rows={8})
    m = a.merge(b)
    assert m.stored == {1: [20, 2], 2: [5, 1]}
    assert m.loads == {3: [2, 2], 4: [1, 1]}, "ranks summed, loaded blocks the minimum"
    assert m.failed_rows == {7, 8}
    assert a.stored == {1: [10, 1], 2: [5, 1]}, "merge must not mutate its inputs"
    assert a.loads == {3: [1, 4]}
