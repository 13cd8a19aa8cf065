"""The connector inside vLLM on CUDA (written for vLLM 0.26 on an H100/H200): FlashAttention
HND caches, the Triton paged kernels, the store on the GPU or in pinned host memory.

No weights travel to GPU hosts, so the model is SmolLM2-135M's shape with ``load_format="dummy"``
(random weights, token-id prompts). What is checked: the revisit after eviction is served from
the store (counts), the decompressed blocks equal the codec's decode of the stored entries, the
measured bytes, and salt isolation. Output quality is tested on CPU with real weights
(``test_connector_vllm.py``).

Run on a GPU host: ``python -m pytest -q tests/test_connector_cuda.py``. The ``tp2`` tests
(tensor parallelism over 2 GPUs; skipped with fewer) need a 2-GPU host:
``NCCL_NVLS_ENABLE=0 python -m pytest -q tests/test_connector_cuda.py -k tp2``.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from slab_helpers import gather

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
DOC = 1000


@pytest.fixture(scope="module", params=["gpu", "cpu"])
def llm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    from polykv_vllm.connector.config import kv_transfer_config

    model = Path(tmp_path_factory.mktemp("smollm2-dummy"))
    (model / "config.json").write_text(json.dumps(SMOLLM2_135M))
    llm = LLM(
        str(model),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=4096,
        gpu_memory_utilization=0.25,
        seed=0,
        kv_transfer_config=kv_transfer_config(store_bytes="64MiB", placement=request.param),
    )
    yield llm
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    llm.llm_engine.engine_core.shutdown()
    ensure_kv_transfer_shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def run(
    llm: Any,
    ids: list[int],
    n: int = 8,
    salt: str | None = None,
    params: dict[str, Any] | None = None,
) -> Any:
    from vllm import SamplingParams

    prompt: dict[str, Any] = {"prompt_token_ids": ids}
    if salt:
        prompt["cache_salt"] = salt
    extra = {"kv_transfer_params": {"polykv": params}} if params is not None else None
    sp = SamplingParams(max_tokens=n, temperature=0.0, detokenize=False, extra_args=extra)
    (out,) = llm.generate([prompt], sp, use_tqdm=False)
    return out


def doc(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 49000, (DOC,), generator=g).tolist()


def test_revisit_is_served_from_the_store_on_cuda(llm: Any) -> None:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    conn: Any = get_kv_transfer_group()
    worker = conn.worker
    index = llm.llm_engine.engine_core.engine_core.scheduler.connector.index
    bs = index.geometry.block_size
    ids = doc(1)
    first = run(llm, ids)
    p1 = first.kv_transfer_params["polykv"]
    assert p1["tokens_from_store"] == 0 and p1["tokens_stored"] == (DOC // bs) * bs
    llm.reset_prefix_cache()
    before = worker.totals.tokens_decompressed
    again = run(llm, ids)
    expected = ((DOC - 1) // bs) * bs
    assert again.kv_transfer_params["polykv"]["tokens_from_store"] == expected
    assert again.num_cached_tokens == expected
    assert worker.totals.tokens_decompressed - before == expected
    # the store lives where the placement says; a host store loads asynchronously (auto)
    slab = worker.store.layers[0].k_codes
    placement = conn.config.placement
    assert conn.config.load_async is (placement == "cpu")
    assert worker.loads_in_flight == 0 and index.loads_in_flight == 0
    assert slab.device.type == ("cuda" if placement == "gpu" else "cpu")
    if placement == "cpu":
        assert slab.is_pinned()
    assert worker.nbytes == index.real_bytes
    ratio = index.raw_bytes / index.real_bytes
    assert 2.7 < ratio < 2.9, f"bf16 cache vs K8/V3 at head dim 64: {ratio:.2f}x"


def test_decompressed_blocks_equal_the_codec_decode(llm: Any) -> None:
    """White box: decode an entry straight into a scratch block of the live cache with the
    connector's own I/O and compare with the codec's torch decode."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    conn: Any = get_kv_transfer_group()
    worker = conn.worker
    io = worker.io
    index = llm.llm_engine.engine_core.engine_core.scheduler.connector.index
    row = next(e.row for e in index.entries.values() if e.ready)
    parts = gather(worker.store, [row])
    scratch = io.key_caches[0].shape[0] - 1  # the last block: free in a nearly idle engine
    io.load(parts, [scratch])
    for layer in (0, 15, 29):
        k, v = conn.codec.decode(parts[layer], dtype=torch.float32, device="cuda")
        got_k = io.key_caches[layer][scratch].float()
        got_v = io.value_caches[layer][scratch].float()
        ref_k = k.to(torch.bfloat16).float()
        ref_v = v.to(torch.bfloat16).float()
        # Triton and torch may round the last bf16 bit differently
        assert torch.allclose(got_k, ref_k, rtol=1e-2, atol=1e-2), (row, layer)
        assert torch.allclose(got_v, ref_v, rtol=1e-2, atol=1e-2), (row, layer)


def test_salt_isolates_on_cuda(llm: Any) -> None:
    ids = doc(2)
    run(llm, ids, salt="alice")
    llm.reset_prefix_cache()
    assert run(llm, ids, salt="bob").kv_transfer_params["polykv"]["tokens_from_store"] == 0
    llm.reset_prefix_cache()
    assert run(llm, ids, salt="alice").kv_transfer_params["polykv"]["tokens_from_store"] > 0


# --- tiers (docs/TIERS.md): rows of a GPU slab and of a pinned host slab to bytes and back ---


@pytest.mark.parametrize("placement", ["gpu", "cpu"])
def test_tier_rows_round_trip_on_cuda_slabs(placement: str, tmp_path: Path) -> None:
    from polykv_vllm.connector.metadata import FetchJob, LoadJob, WorkerReport
    from polykv_vllm.connector.slab import BlockSlab
    from polykv_vllm.connector.tiers import chain_keys, fingerprint
    from polykv_vllm.connector.tiers.disk import DiskTier
    from polykv_vllm.connector.tiers.worker_io import TierIO, read_row
    from polykv_vllm.core import KVCodec

    codec = KVCodec("polykv", num_layers=2, head_dim=128)
    device = torch.device("cuda") if placement == "gpu" else torch.device("cpu")
    slab = BlockSlab(codec, [0, 1], 4, 16, 8, 128, device, pin=placement == "cpu")
    g = torch.Generator().manual_seed(0)
    for p in slab.view(0, 1):
        for t in p.tensors():
            t.copy_(torch.randint(0, 100, t.shape, generator=g).to(t.dtype))
    slab.mark_filled([0])
    fp = fingerprint(model="cuda-test")
    (key,) = chain_keys(fp, None, list(range(16)), 16)
    io = TierIO([DiskTier(tmp_path, 10**8)], fp, rank=0, store=slab)
    io.expect([(0, key)])
    io.stored([0], now=True)
    assert io.flush()
    report = WorkerReport()
    job = LoadJob(req_id="r", rows=(2,), block_ids=(5,), load_id=0)
    assert io.fetch(slab, job, FetchJob(load_id=0, first=0, keys=(key,)), report) == 1
    torch.cuda.synchronize()
    assert read_row(slab, 2) == read_row(slab, 0) and 2 in slab
    io.close()


def _pinned_store_worker(
    seed: int, cache_blocks: int, rows: int, **worker_attrs: int
) -> tuple[Any, Any, list[torch.Tensor], Any]:
    """A worker alone with a CUDA paged cache (3 layers, 2 heads, head dim 64, bf16 random) and
    a pinned host slab of ``rows`` rows, its class attributes overridden by ``worker_attrs``
    (e.g. ``STAGING_TOKENS``); returns ``(worker, io, caches, slab)``."""
    from polykv_vllm.connector.paged_io import FlashPagedIO
    from polykv_vllm.connector.slab import BlockSlab
    from polykv_vllm.connector.worker import PolyKVWorker
    from polykv_vllm.core import KVCodec

    layers, heads, dim, bs = 3, 2, 64, 16
    codec = KVCodec("polykv", num_layers=layers, head_dim=dim)
    g = torch.Generator(device="cuda").manual_seed(seed)
    caches = [
        torch.randn(cache_blocks, heads, bs, 2 * dim, device="cuda", generator=g).to(torch.bfloat16)
        for _ in range(layers)
    ]
    io = FlashPagedIO(codec, caches, list(range(layers)), dim, bs)
    slab = BlockSlab(codec, list(range(layers)), rows, bs, heads, dim, torch.device("cpu"), True)
    worker = PolyKVWorker(block_size=bs, staging_slots=worker_attrs.pop("staging_slots", 4))
    for name, value in worker_attrs.items():
        assert hasattr(worker, name), name
        setattr(worker, name, value)
    worker.bind(io, slab)
    return worker, io, caches, slab


def test_staged_store_lands_in_pinned_memory_and_is_confirmed_after_its_copy() -> None:
    """The CPU tier's store path without vLLM: compressed into a GPU staging slot on the
    current stream, copied to the pinned slab on a side stream, confirmed once copied. The
    paged blocks are overwritten right after the save (as a later step may): the stored bytes
    are still the blocks' compression. One staging slot of two blocks: the step's three blocks
    (two requests) go in two pieces, so the second piece waits for the first (a counted stall)
    and reuses its slot."""
    from polykv_vllm.connector.metadata import BlockJob, StepPlan

    bs = 16
    # one slot of two blocks; the staging slots, not the direct path below
    worker, io, caches, slab = _pinned_store_worker(
        0, 10, 8, staging_slots=1, STAGING_TOKENS=2 * bs, DIRECT_STORE_TOKENS=0
    )
    want = [p.to("cpu") for p in io.store([1, 2, 7])]
    torch.cuda.synchronize()
    worker.save(StepPlan(stores=[BlockJob("a", (5, 6), (1, 2)), BlockJob("b", (0,), (7,))]))
    for c in caches:
        c.fill_(7.0)  # a later step reuses the blocks
    assert worker.totals.store_stalls == 1 and worker._side is not None
    assert slab.layers[0].k_codes.is_pinned()
    torch.cuda.synchronize()
    report = worker.take_report()
    assert report is not None and sorted(report.stored) == [0, 5, 6]
    assert worker.stores_in_flight == 0 and len(worker.store) == 3
    got = gather(slab, [5, 6, 0])
    for a, b in zip(got, want, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
    worker.flush_timers()
    assert len(worker.totals.store_seconds) == 2


def test_small_staged_store_is_encoded_straight_into_pinned_rows() -> None:
    """A step's small stores (two requests' query blocks, 3 blocks <= DIRECT_STORE_TOKENS) skip
    the staging slots: the kernels write the pinned rows over PCIe on the current stream, the
    rows are confirmed once that stream passed, and hold the blocks' compression. A larger piece
    in the same step still goes through a slot."""
    from polykv_vllm.connector.metadata import BlockJob, StepPlan

    bs = 16
    worker, io, caches, slab = _pinned_store_worker(
        1, 12, 10, DIRECT_STORE_TOKENS=3 * bs, STAGING_TOKENS=3 * bs
    )
    assert slab.is_pinned
    want = [p.to("cpu") for p in io.store([1, 2, 7, 3, 4, 5, 8])]
    torch.cuda.synchronize()
    # the rows in store order, in pieces of at most 3 blocks: 5,6,0 / 1,2,3 / 4, all direct
    plan = StepPlan(
        stores=[BlockJob("a", (5, 6), (1, 2)), BlockJob("b", (0,), (7,))]
        + [BlockJob("c", (1, 2, 3, 4), (3, 4, 5, 8))]
    )
    worker.save(plan)
    assert all(s.buffers is None for s in worker._staged.slots), "no staging buffer used"
    for c in caches:
        c.fill_(7.0)  # a later step reuses the blocks
    torch.cuda.synchronize()
    report = worker.take_report()
    assert report is not None and sorted(report.stored) == [0, 1, 2, 3, 4, 5, 6]
    got = gather(slab, [5, 6, 0, 1, 2, 3, 4])
    for a, b in zip(got, want, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
    worker.DIRECT_STORE_TOKENS = bs  # now a 2-block piece is staged through a slot
    worker.save(StepPlan(stores=[BlockJob("d", (7, 8), (9, 10))]))
    assert any(s.buffers is not None for s in worker._staged.slots)
    worker.flush_timers()
    assert worker.totals.store_stalls == 0


# --- async loads on a side stream (the worker alone: CUDA tensors, no engine) -------------------


def _side_stream_worker() -> tuple[Any, list[torch.Tensor], Any]:
    from polykv_vllm.connector.metadata import BlockJob, StepPlan
    from polykv_vllm.connector.paged_io import FlashPagedIO
    from polykv_vllm.connector.slab import BlockSlab
    from polykv_vllm.connector.worker import PolyKVWorker
    from polykv_vllm.core import KVCodec

    layers, heads, dim, bs, blocks = 4, 2, 64, 16, 12
    codec = KVCodec("polykv", num_layers=layers, head_dim=dim)
    g = torch.Generator(device="cuda").manual_seed(7)
    caches = [
        torch.randn(blocks, heads, bs, 2 * dim, device="cuda", generator=g).to(torch.bfloat16)
        for _ in range(layers)
    ]
    io = FlashPagedIO(codec, caches, list(range(layers)), dim, bs)
    slab = BlockSlab(codec, list(range(layers)), 8, bs, heads, dim, torch.device("cpu"), pin=True)
    worker = PolyKVWorker(block_size=bs)
    worker.bind(io, slab)
    worker.save(StepPlan(stores=[BlockJob("w", (0, 1, 2), (1, 2, 3))]))
    torch.cuda.synchronize()
    assert worker.take_report() is not None
    return worker, caches, slab


def test_side_stream_load_waits_for_the_current_stream_and_equals_the_sync_load() -> None:
    from polykv_vllm.connector.metadata import LoadJob, StepPlan

    worker, caches, _ = _side_stream_worker()
    worker.start_load(StepPlan(loads=[LoadJob("sync", (0, 1, 2), (4, 5, 6), load_id=0)]))
    torch.cuda.synchronize()
    assert worker.take_report().loads == {0: [1, 3]}
    # warm the async path once (first-call compiles must not outlast the busy stream below)
    warm = LoadJob("warm", (0, 1, 2), (10, 11, 9), load_id=9, async_load=True)
    worker.start_load(StepPlan(loads=[warm]))
    torch.cuda.synchronize()
    assert worker.get_finished() == {"warm"}
    assert worker.take_report() is not None
    torch.cuda._sleep(2_000_000_000)  # keep the current stream busy for a while (~1 s)
    job = LoadJob("async", (0, 1, 2), (7, 8, 9), load_id=1, async_load=True)
    worker.start_load(StepPlan(loads=[job]))
    assert worker.get_finished() == set(), "the side stream waits for the current stream"
    assert worker.take_report() is None and worker.loads_in_flight == 1
    torch.cuda.synchronize()
    assert worker.get_finished() == {"async"}
    assert worker.get_finished() == set(), "reported once"
    report = worker.take_report()
    assert report is not None and report.loads == {1: [1, 3]} and not report.failed_rows
    assert worker.take_load_errors() == set()
    for cache in caches:
        assert torch.equal(cache[[7, 8, 9]], cache[[4, 5, 6]]), "async == sync, bit for bit"
    worker.flush_timers()
    assert len(worker.totals.load_seconds) == 3 and worker.totals.tokens_decompressed == 9 * 16


def test_async_load_reports_a_corrupt_block_and_every_later_one_as_load_errors() -> None:
    from polykv_vllm.connector.metadata import LoadJob, StepPlan

    worker, caches, slab = _side_stream_worker()
    with torch.inference_mode():
        slab.layers[2].k_scale[1, 3] = float("nan")  # row 1 (the job's second block)
    job = LoadJob("bad", (0, 1, 2), (10, 11, 9), load_id=5, async_load=True)
    worker.start_load(StepPlan(loads=[job]))
    torch.cuda.synchronize()
    assert worker.get_finished() == {"bad"}
    report = worker.take_report()
    assert report is not None and report.loads == {5: [1, 1]} and report.failed_rows == {1}
    assert worker.take_load_errors() == {11, 9}, "never marked valid: vLLM recomputes them"
    # a job whose first row holds nothing finishes at once, with nothing written
    before = [c[8].clone() for c in caches]
    slab.mark_empty([0])
    worker.start_load(StepPlan(loads=[LoadJob("gone", (0,), (8,), load_id=6, async_load=True)]))
    assert worker.get_finished() == {"gone"}
    assert worker.take_load_errors() == {8}
    assert all(torch.equal(c[8], b) for c, b in zip(caches, before, strict=True))


# --- tensor parallelism: two GPUs (docs/CONNECTOR.md, "Tensor parallelism") ------------------
# A dummy Llama whose 8 attention / 2 kv heads split over 2 ranks (SmolLM2's 9 heads do not).
# The workers run in vLLM's worker processes; the checks that need their tensors run there,
# through ``LLM.collective_rpc`` (functions defined inside the tests, so cloudpickle sends them
# by value). Every process keeps NVLink multicast off (NCCL_NVLS_ENABLE=0, the GPU host's rule).

TP2_MODEL = {
    **SMOLLM2_135M,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)


def _engine(model: Path, tp: int, placement: str) -> Any:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # inherited by vLLM's worker processes
    from vllm import LLM

    from polykv_vllm.connector.config import kv_transfer_config

    return LLM(
        str(model),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=4096,
        gpu_memory_utilization=0.25,
        seed=0,
        tensor_parallel_size=tp,
        kv_transfer_config=kv_transfer_config(store_bytes="64MiB", placement=placement),
    )


def _shutdown(llm: Any) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    llm.llm_engine.engine_core.shutdown()
    ensure_kv_transfer_shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def _scheduler_conn(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler.connector


@pytest.fixture(scope="module", params=["gpu", "cpu"])
def tp2(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A TP=2 engine of the dummy Llama (its scheduler side in this process)."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    model = Path(tmp_path_factory.mktemp("llama-tp2-dummy"))
    (model / "config.json").write_text(json.dumps(TP2_MODEL))
    llm = _engine(model, 2, request.param)
    yield llm
    _shutdown(llm)


def _tp1_row_bytes(conn: Any) -> int:
    """Bytes of one stored block at TP=1 (all kv heads), from a slab built as a TP=1 worker
    builds its own (the connector's codec; a second in-process engine would share vLLM's
    process-global connector state with the module's other engine)."""
    from polykv_vllm.connector.slab import BlockSlab

    f = conn.facts
    heads = f.kv_heads * f.world_size
    layers = range(f.num_layers)
    cpu = torch.device("cpu")
    return BlockSlab(conn.codec, layers, 1, f.block_size, heads, f.head_dim, cpu, False).row_bytes


@needs_two_gpus
def test_tp2_revisit_is_served_from_both_ranks_stores(tp2: Any) -> None:
    conn = _scheduler_conn(tp2)
    index = conn.index
    bs = index.geometry.block_size
    assert conn.facts.world_size == 2 and conn.facts.kv_heads == 1
    ids = doc(21)
    first = run(tp2, ids)
    assert first.kv_transfer_params["polykv"]["tokens_stored"] == (DOC // bs) * bs
    tp2.reset_prefix_cache()
    again = run(tp2, ids)
    expected = ((DOC - 1) // bs) * bs
    assert again.kv_transfer_params["polykv"]["tokens_from_store"] == expected
    assert again.num_cached_tokens == expected
    assert index.loads_in_flight == 0
    # bytes per rank: half of TP=1's, from each rank's tensors (reported and measured there)
    tp1_bytes = index.entries.ready_entries * _tp1_row_bytes(conn)
    assert index.real_bytes == tp1_bytes
    assert conn.rank_bytes == {0: tp1_bytes // 2, 1: tp1_bytes // 2}

    def measured(worker: Any) -> tuple[int, int, int]:
        from vllm.distributed import get_tensor_model_parallel_rank
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        w = get_kv_transfer_group().worker
        return get_tensor_model_parallel_rank(), w.nbytes, w.store.kv_heads

    got = sorted(tp2.collective_rpc(measured))
    assert got == [(0, tp1_bytes // 2, 1), (1, tp1_bytes // 2, 1)]


@needs_two_gpus
def test_tp2_decompressed_blocks_equal_the_codec_decode_on_each_rank(tp2: Any) -> None:
    index = _scheduler_conn(tp2).index
    if not any(e.ready for e in index.entries.values()):
        run(tp2, doc(22))
    row = next(e.row for e in index.entries.values() if e.ready)

    def check(worker: Any, row: int) -> tuple[int, bool]:
        import torch
        from vllm.distributed import get_tensor_model_parallel_rank
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        conn = get_kv_transfer_group()
        w, io = conn.worker, conn.worker.io
        w.store.ready_for_host()
        parts = [p.to(io.device) for p in w.store.view(row, 1)]
        scratch = io.key_caches[0].shape[0] - 1  # the last block: free in an idle engine
        io.load(parts, [scratch])
        ok = True
        for layer in range(len(parts)):
            k, v = conn.codec.decode(parts[layer], dtype=torch.float32, device=io.device)
            got_k = io.key_caches[layer][scratch].float()
            got_v = io.value_caches[layer][scratch].float()
            ok &= torch.allclose(got_k, k.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
            ok &= torch.allclose(got_v, v.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
        return get_tensor_model_parallel_rank(), bool(ok)

    assert sorted(tp2.collective_rpc(check, args=(row,))) == [(0, True), (1, True)]


@needs_two_gpus
def test_tp2_salt_isolates(tp2: Any) -> None:
    ids = doc(23)
    run(tp2, ids, salt="alice")
    tp2.reset_prefix_cache()
    assert run(tp2, ids, salt="bob").kv_transfer_params["polykv"]["tokens_from_store"] == 0
    tp2.reset_prefix_cache()
    assert run(tp2, ids, salt="alice").kv_transfer_params["polykv"]["tokens_from_store"] > 0


@needs_two_gpus
def test_tp2_load_failing_on_one_rank_is_recomputed_on_both(tp2: Any) -> None:
    index = _scheduler_conn(tp2).index
    bs = index.geometry.block_size
    ids, params = doc(24), {"doc_id": "tp2-bad"}
    run(tp2, ids, params=params)
    tp2.reset_prefix_cache()
    stored = index.documents.get(None, "tp2-bad")
    bad = stored.entries[stored.keys[2]]  # the document's third block

    def corrupt(worker: Any, row: int) -> int:
        import torch
        from vllm.distributed import get_tensor_model_parallel_rank
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        rank = get_tensor_model_parallel_rank()
        if rank == 1:  # rank 0's copy of its heads stays valid
            store = get_kv_transfer_group().worker.store
            with torch.inference_mode():
                store.layers[3].v_norm[row, 0] = float("nan")
        return rank

    assert sorted(tp2.collective_rpc(corrupt, args=(bad.row,))) == [0, 1]
    again = run(tp2, ids, params=params)
    assert again.kv_transfer_params["polykv"]["tokens_from_store"] == 2 * bs, "blocks 0-1 only"
    # vLLM got rank 1's invalid blocks in the one merged set and recomputed them from block 2
    # on, on both ranks; the answer is complete
    assert len(again.outputs[0].token_ids) == 8
    assert bad.failed and stored.entries.get(stored.keys[2]) is not bad, "the entry was dropped"


@pytest.mark.parametrize("placement", ["gpu", "cpu"])
def test_async_tier_fetch_then_side_stream_load_equals_the_sync_load(placement: str) -> None:
    """A load whose last rows come from a tier (docs/TIERS.md): the fetch thread reads them
    (into the pinned slab, or as bytes the step's thread copies into a GPU slab), then
    get_finished starts the side-stream load; a block in no tier is a load error."""
    import threading
    import time

    from polykv_vllm.connector.metadata import BlockJob, FetchJob, LoadJob, StepPlan
    from polykv_vllm.connector.paged_io import FlashPagedIO
    from polykv_vllm.connector.slab import BlockSlab
    from polykv_vllm.connector.tiers import Tier, chain_keys, fingerprint
    from polykv_vllm.connector.tiers.worker_io import TierIO
    from polykv_vllm.connector.worker import PolyKVWorker
    from polykv_vllm.core import KVCodec

    class Gated(Tier):
        name = "disk"

        def __init__(self) -> None:
            super().__init__()
            self.data: dict[str, bytes] = {}
            self.gate = threading.Event()

        def put(self, key: str, blob: bytes) -> bool:
            self.data[key] = blob
            return True

        def get(self, key: str) -> bytes | None:
            assert self.gate.wait(10)
            return self.data.get(key)

        def contains_many(self, keys: Any) -> list[bool]:
            return [k in self.data for k in keys]

        def delete(self, key: str) -> None:
            self.data.pop(key, None)

    layers, heads, dim, bs, blocks = 4, 2, 64, 16, 12
    codec = KVCodec("polykv", num_layers=layers, head_dim=dim)
    g = torch.Generator(device="cuda").manual_seed(8)
    caches = [
        torch.randn(blocks, heads, bs, 2 * dim, device="cuda", generator=g).to(torch.bfloat16)
        for _ in range(layers)
    ]
    io = FlashPagedIO(codec, caches, list(range(layers)), dim, bs)
    device = torch.device("cuda") if placement == "gpu" else torch.device("cpu")
    slab = BlockSlab(codec, list(range(layers)), 8, bs, heads, dim, device, pin=placement == "cpu")
    worker = PolyKVWorker(block_size=bs)
    worker.bind(io, slab)
    worker.save(StepPlan(stores=[BlockJob("w", (0, 1, 2), (1, 2, 3))]))
    worker.flush_stores()
    torch.cuda.synchronize()
    assert worker.take_report() is not None
    worker.start_load(StepPlan(loads=[LoadJob("sync", (0, 1, 2), (4, 5, 6), load_id=0)]))
    torch.cuda.synchronize()
    assert worker.take_report().loads == {0: [1, 3]}
    fp = fingerprint(model="cuda-fetch")
    keys = chain_keys(fp, None, list(range(3 * bs)), bs)
    tier = Gated()
    worker.tiers = TierIO([tier], fp, rank=0, store=slab)
    worker.tiers.put_rows(slab, [(1, keys[0]), (2, keys[1])])
    assert worker.tiers.flush()
    job = LoadJob("tier", (0, 3, 4, 5), (7, 8, 9, 10), load_id=1, async_load=True)
    worker.start_load(StepPlan(loads=[job], fetches={1: FetchJob(1, 1, tuple(keys))}))
    assert worker.get_finished() == set() and worker.loads_in_flight == 1
    tier.gate.set()
    finished: set[str] = set()
    for _ in range(500):
        finished = worker.get_finished()
        if finished:
            break
        time.sleep(0.01)
    assert finished == {"tier"}
    report = worker.take_report()
    assert report is not None and set(report.stored) == {3, 4} and report.failed_rows >= {5}
    assert report.loads == {1: [1, 3]} and worker.take_load_errors() == {10}
    for cache in caches:
        assert torch.equal(cache[[7, 8, 9]], cache[[4, 5, 6]]), "fetched rows load like stored"
    worker.shutdown()
    worker.tiers.close()
