"""``polykv.forget`` (the document routes' DELETE): unpin, unname and evict a tenant's document,
and only that tenant's (pure Python scheduler index, fake engine)."""

from __future__ import annotations

from scheduler_helpers import BS, Engine, FakeRequest, doc, make_index


def test_forget_unpins_unnames_and_evicts_only_the_tenants_document() -> None:
    index = make_index(budget_blocks=20)
    eng = Engine(index)
    text = doc(3, 4.5)
    pin = {"polykv": {"doc_id": "d", "pin": True}}
    for salt in ("A", "B"):
        receipt = eng.run(FakeRequest(f"pin-{salt}", text, pin, salt=salt))["polykv"]
        assert receipt["pinned"] is True and receipt["stored_blocks"] == 4
        assert receipt["stored_bytes"] == 4 * 1000
    used = index.used_bytes
    probe = {"polykv": {"doc_id": "d", "forget": True}}
    eng.run(FakeRequest("forget-A", text[:1], probe, salt="A"))
    assert index.document("d", tenant="A") is None
    assert index.used_bytes == used - 4 * 1000, "A's blocks left the store"
    assert index.document("d", tenant="B") == {
        "total_blocks": 4,
        "stored_blocks": 4,
        "ready_blocks": 4,
        "pinned": True,
    }
    # A's prompt is a miss now; B's is still a hit
    assert eng.admit(FakeRequest("a2", text, salt="A")) == 0
    assert eng.admit(FakeRequest("b2", text, salt="B")) == 4 * BS


def test_status_probe_reports_without_storing_or_repointing() -> None:
    index = make_index(budget_blocks=20)
    eng = Engine(index)
    text = doc(4, 3)
    eng.run(FakeRequest("w", text, {"polykv": {"doc_id": "d", "pin": True}}))
    used = index.used_bytes
    receipt = eng.run(FakeRequest("probe", text[:1], {"polykv": {"doc_id": "d"}}))["polykv"]
    assert receipt["pinned"] is True
    assert (receipt["stored_blocks"], receipt["total_blocks"]) == (3, 3)
    assert receipt["tokens_stored"] == 0 and index.used_bytes == used


def test_forget_needs_a_doc_id_and_a_bool() -> None:
    from polykv_vllm.connector.scheduler import parse_doc_params

    assert parse_doc_params({"polykv": {"forget": True}}).forget is False
    assert parse_doc_params({"polykv": {"doc_id": "d", "forget": "yes"}}).forget is False
    assert parse_doc_params({"polykv": {"doc_id": "d", "forget": True}}).forget is True
