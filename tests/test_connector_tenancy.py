"""Documents between tenants, pin policy and quotas, true receipts (scheduler side, pure Python).

A tenant is a ``cache_salt`` (no salt is a tenant of its own). The same checks against a real
server with the ``openai`` client are in ``test_connector_tenancy_server.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator
from typing import Any

import pytest
from scheduler_helpers import BLOCK_BYTES, BS, Engine, FakeRequest, chain, doc, make_index

from polykv_vllm.connector.config import PIN_TOKEN_ENV, PolyKVConfig
from polykv_vllm.connector.scheduler import (
    MAX_DOC_ID_CHARS,
    LRUPolicy,
    PinPolicy,
    ScheduledReq,
    StoreGeometry,
    StoreIndex,
)


def params(doc_id: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"polykv": {"doc_id": doc_id, **kw}}


def receipt(eng: Engine, rid: str, prompt: list[int], salt: str | None, **kw: Any) -> Any:
    return eng.run(FakeRequest(rid, prompt, params(**kw), salt=salt))["polykv"]


# --- doc ids are scoped by tenant -------------------------------------------------------------


def test_a_tenant_can_neither_unpin_nor_see_another_tenants_document() -> None:
    """The attack of issue 9: B sends A's doc id with pin false."""
    eng = Engine(make_index(budget_blocks=20))
    a_doc = doc(1, 3.5)
    assert receipt(eng, "a1", a_doc, "A", doc_id="shared-name", pin=True)["pinned"] is True
    b_prompt = doc(2, 2.5)
    b = receipt(eng, "b1", b_prompt, "B", doc_id="shared-name", pin=False)
    # B's receipt is exactly what it would be on a server where A never existed
    alone = receipt(Engine(make_index(budget_blocks=20)), "b1", b_prompt, "B",
                    doc_id="shared-name", pin=False)  # fmt: skip
    assert b == alone
    assert b["total_blocks"] == 2 and b["stored_blocks"] == 2 and b["pinned"] is False
    # A's document is untouched
    a = receipt(eng, "a2", a_doc, "A", doc_id="shared-name")
    assert a["pinned"] is True and a["stored_blocks"] == a["total_blocks"] == 3
    assert eng.index.document("shared-name", tenant="A")["pinned"] is True  # type: ignore[index]
    assert eng.index.document("shared-name", tenant="B")["pinned"] is False  # type: ignore[index]
    assert eng.index.document("shared-name", tenant=None) is None, "no salt: another tenant"


def test_a_pin_request_naming_another_tenants_document_learns_nothing() -> None:
    """A request that stores nothing (shorter than min_store_tokens) and names A's doc id: same
    receipt as for a name nobody uses."""
    eng = Engine(make_index(budget_blocks=20, min_store_tokens=2 * BS))
    receipt(eng, "a", doc(3, 3.5), "A", doc_id="contract", pin=True)
    short = doc(4, 1.5)
    got = receipt(eng, "b", short, "B", doc_id="contract", pin=False)
    unknown = receipt(eng, "c", short, "B", doc_id="never-used", pin=False)
    assert {**got, "doc_id": None} == {**unknown, "doc_id": None}
    assert got["stored_blocks"] == 0 and got["pinned"] is False
    assert eng.index.document("contract", tenant="A")["pinned"] is True  # type: ignore[index]


def test_no_salt_is_a_tenant_of_its_own() -> None:
    eng = Engine(make_index(budget_blocks=20))
    receipt(eng, "n", doc(5, 2.5), None, doc_id="d", pin=True)
    receipt(eng, "a", doc(7, 2.5), "A", doc_id="d", pin=False)
    assert eng.index.document("d", tenant=None)["pinned"] is True  # type: ignore[index]


# --- receipts are true ------------------------------------------------------------------------


def test_pin_receipts_are_true_when_the_store_cannot_hold_them() -> None:
    """Issue 9: a store of about two documents, twelve requests pinning twelve documents."""
    index = make_index(budget_blocks=6, quota_blocks=100)  # the store, not the quota, limits
    eng = Engine(index)
    receipts = [receipt(eng, f"r{i}", doc(100 + i, 2.5), None, doc_id=f"d{i}", pin=True)
                for i in range(12)]  # fmt: skip
    pinned = [r["pinned"] for r in receipts]
    assert pinned == [True] * 3 + [False] * 9, "three documents of two blocks fit in six"
    for i, r in enumerate(receipts):
        state = index.document(f"d{i}")
        if r["pinned"]:
            assert r["stored_blocks"] == r["total_blocks"] == 2 and "pin_refused" not in r
            assert state is not None and state["pinned"] and state["stored_blocks"] == 2
        else:
            assert r["pin_refused"].startswith("store: "), r
            assert state is None or not state["pinned"]
    assert index.used_bytes <= index.budget_bytes
    assert sum(e.pins > 0 for e in index.entries.values()) == 6


def test_stored_and_total_blocks_report_a_partial_store() -> None:
    index = make_index(budget_blocks=4, quota_blocks=4)
    eng = Engine(index)
    receipt(eng, "p", doc(8, 3.5), None, doc_id="big", pin=True)  # 3 of 4 blocks pinned
    r = receipt(eng, "q", doc(9, 3.5), None, doc_id="next")
    assert (r["stored_blocks"], r["total_blocks"], r["pinned"]) == (1, 3, False)
    assert index.take_counters().store_rejected_blocks == 2


def test_untagged_receipts_count_the_prompts_blocks() -> None:
    eng = Engine(make_index())
    r = eng.run(FakeRequest("u", doc(10, 4.5)))["polykv"]
    assert r["doc_id"] is None and (r["stored_blocks"], r["total_blocks"]) == (4, 4)


# --- pin policy and quota ---------------------------------------------------------------------


def test_pin_off_refuses_every_pin_with_the_reason() -> None:
    index = make_index(pin="off")
    eng = Engine(index)
    r = receipt(eng, "a", doc(11, 2.5), None, doc_id="d", pin=True)
    assert r["pinned"] is False and r["pin_refused"].startswith("policy: pinning is off")
    assert r["stored_blocks"] == 2, "the document is still stored, only not pinned"
    assert all(e.pins == 0 for e in index.entries.values())


@pytest.mark.parametrize(
    ("token", "pinned", "reason"),
    [(None, False, "policy: pinning needs"), ("wrong", False, "policy: wrong pin token"),
     ("s3cret", True, None)],
)  # fmt: skip
def test_pin_token_mode_needs_the_servers_secret(
    token: str | None, pinned: bool, reason: str | None
) -> None:
    eng = Engine(make_index(pin="token", token="s3cret"))
    extra = {"pin_token": token} if token is not None else {}
    r = receipt(eng, "a", doc(12, 2.5), None, doc_id="d", pin=True, **extra)
    assert r["pinned"] is pinned
    if reason is None:
        assert "pin_refused" not in r
    else:
        assert r["pin_refused"].startswith(reason)
    assert "s3cret" not in repr(r)
    # unpinning needs no token
    assert receipt(eng, "b", doc(12, 2.5), None, doc_id="d", pin=False)["pinned"] is False


def test_pin_token_comes_from_the_environment_and_is_never_printed() -> None:
    config = PolyKVConfig(pin="token")
    with pytest.raises(ValueError, match=PIN_TOKEN_ENV):
        PinPolicy.from_config(config, environ={})
    policy = PinPolicy.from_config(config, environ={PIN_TOKEN_ENV: "hunter2"})
    assert policy.token == "hunter2" and "hunter2" not in repr(policy)
    assert "hunter2" not in repr(config)
    assert PinPolicy.from_config(PolyKVConfig(), environ={}).quota_bytes == 2**29


def test_quota_is_per_tenant_and_unpinning_gives_it_back() -> None:
    index = make_index(budget_blocks=20, quota_blocks=4)
    eng = Engine(index)
    assert receipt(eng, "a1", doc(20, 3.5), "A", doc_id="one", pin=True)["pinned"] is True
    r = receipt(eng, "a2", doc(21, 2.5), "A", doc_id="two", pin=True)
    assert r["pinned"] is False
    assert r["pin_refused"] == (
        f"quota: pinning this document needs {2 * BLOCK_BYTES} more bytes and this tenant has "
        f"{3 * BLOCK_BYTES} of {4 * BLOCK_BYTES} bytes pinned (--polykv-pin-quota)"
    )
    assert receipt(eng, "b1", doc(22, 3.5), "B", doc_id="one", pin=True)["pinned"] is True
    assert index.documents.pinned_bytes("A") == index.documents.pinned_bytes("B") == 3000
    receipt(eng, "a3", doc(20, 3.5), "A", doc_id="one", pin=False)
    assert index.documents.pinned_bytes("A") == 0
    assert receipt(eng, "a4", doc(21, 2.5), "A", doc_id="two", pin=True)["pinned"] is True


def test_quota_counts_the_blocks_a_pinned_document_has_yet_to_store() -> None:
    """Chunked prefill: the quota is checked for the whole document when it is pinned."""
    index = make_index(budget_blocks=20, quota_blocks=5)
    req = FakeRequest("a", doc(23, 4.5), params("long", pin=True), salt="A")
    index.lookup(req, 0)
    index.on_alloc(req, list(range(5)), 0)
    index.plan_step([ScheduledReq("a", tuple(range(5)), True, computed_after=BS)])
    assert index.documents.pinned_bytes("A") == BLOCK_BYTES, "one block stored so far"
    eng = Engine(index)
    r = receipt(eng, "b", doc(24, 2.5), "A", doc_id="other", pin=True)
    assert r["pin_refused"].startswith("quota: "), "4 blocks held or coming + 2 > 5"


def test_doc_too_long_for_the_store_is_refused() -> None:
    eng = Engine(make_index(budget_blocks=3, quota_blocks=10))
    r = receipt(eng, "a", doc(25, 4.5), None, doc_id="huge", pin=True)
    assert r["pinned"] is False and r["pin_refused"].startswith("store: the document's 4 blocks")


def test_repointing_a_pinned_doc_id_releases_the_old_blocks() -> None:
    index = make_index(budget_blocks=20, quota_blocks=4)
    eng = Engine(index)
    receipt(eng, "a", doc(26, 3.5), "A", doc_id="d", pin=True)
    r = receipt(eng, "b", doc(27, 2.5), "A", doc_id="d")  # same name, another prompt
    assert r["pinned"] is True and r["total_blocks"] == 2, "the pin follows the name"
    assert index.documents.pinned_bytes("A") == 2 * BLOCK_BYTES
    old = chain(doc(26, 3.5), "A")
    assert all(index.entries.get(h).pins == 0 for h in old)  # type: ignore[union-attr]


# --- doc id length ----------------------------------------------------------------------------


def test_overlong_doc_id_is_served_unnamed_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    eng = Engine(make_index(store_all=False))
    with caplog.at_level(logging.WARNING):
        r = receipt(eng, "a", doc(28, 2.5), None, doc_id="x" * 200_000, pin=True)
    assert r["doc_id"] is None and r["pinned"] is False and r["tokens_stored"] == 0
    assert r["doc_id_refused"] == f"too long: 200000 characters, at most {MAX_DOC_ID_CHARS}"
    assert any("200000 characters" in m for m in caplog.messages)
    assert all(len(m) < 1000 for m in caplog.messages), "the id itself is not logged"
    ok = receipt(eng, "b", doc(28, 2.5), None, doc_id="x" * MAX_DOC_ID_CHARS)
    assert ok["doc_id"] == "x" * MAX_DOC_ID_CHARS and ok["tokens_stored"] == 2 * BS


# --- the eviction policy is replaceable -------------------------------------------------------


class MRUPolicy(LRUPolicy):
    """Most recently used first: a different order through the same interface."""

    def candidates(self) -> Iterator[Hashable]:
        return reversed(list(super().candidates()))


def test_eviction_policy_is_replaceable() -> None:
    geo = StoreGeometry(block_size=BS, block_bytes=BLOCK_BYTES, block_raw_bytes=5000)
    lru = Engine(StoreIndex(geo, 4 * BLOCK_BYTES, store_all=True, min_store_tokens=BS))
    mru = Engine(StoreIndex(geo, 4 * BLOCK_BYTES, True, BS, eviction=MRUPolicy()))
    old, new, newest = doc(40, 2.5), doc(41, 2.5), doc(42, 2.5)
    for eng in (lru, mru):
        for i, p in enumerate((old, new, newest)):
            eng.run(FakeRequest(f"r{i}", p))
    assert [h in lru.index.entries for h in chain(old)] == [False, False]
    assert [h in lru.index.entries for h in chain(new)] == [True, True]
    assert [h in mru.index.entries for h in chain(old)] == [True, True]
    assert [h in mru.index.entries for h in chain(new)] == [False, False]
