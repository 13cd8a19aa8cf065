"""The worker's slab store: rows of compressed blocks, written and read by row, validation;
and the scheduler side's row placement (:class:`RowAllocator`)."""

from __future__ import annotations

import pytest
import torch
from slab_helpers import gather, put

from polykv_vllm.connector.scheduler import RowAllocator
from polykv_vllm.connector.slab import BlockSlab, Run, first_invalid_block, runs
from polykv_vllm.core import KVCodec, PackedKV


def make(preset: str, capacity: int = 6, bs: int = 16, heads: int = 2, dim: int = 64):
    codec = KVCodec(preset, num_layers=3, head_dim=dim)
    slab = BlockSlab(codec, [0, 1, 2], capacity, bs, heads, dim, torch.device("cpu"), pin=False)
    return codec, slab


def encode(codec: KVCodec, blocks: int, bs: int = 16, heads: int = 2, dim: int = 64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(3):
        k = torch.randn(blocks * bs, heads, dim, generator=g)
        v = torch.randn(blocks * bs, heads, dim, generator=g)
        out.append(codec.encode(k, v, layer))
    return out


def same(a: PackedKV, b: PackedKV) -> bool:
    meta = ("tokens", "kv_heads", "head_dim", "key_bits", "value_bits")
    return all(getattr(a, m) == getattr(b, m) for m in meta) and all(
        torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True)
    )


@pytest.mark.parametrize("preset", ["polykv", "polykv-lite"])
def test_put_get_round_trip_in_any_order(preset: str) -> None:
    codec, slab = make(preset)
    packed = encode(codec, 3)
    put(slab, [3, 4, 5], packed)
    got = gather(slab, [3, 4, 5])
    assert all(same(g, p) for g, p in zip(got, packed, strict=True))
    got = gather(slab, [5, 3])  # another order: blocks 2 then 0
    for g, p in zip(got, packed, strict=True):
        assert same(g, PackedKV.cat([p.slice(32, 48), p.slice(0, 16)]))
    assert len(slab) == 3
    assert slab.nbytes == 3 * slab.row_bytes
    assert slab.row_bytes == sum(p.slice(0, 16).nbytes for p in packed), "measured bytes"


def test_rows_are_marked_filled_and_empty_and_reused_up_to_capacity() -> None:
    codec, slab = make("polykv", capacity=4)
    allocator = RowAllocator(4)
    rows = allocator.alloc(4)
    put(slab, rows, encode(codec, 4))
    assert allocator.free_rows == 0
    with pytest.raises(AssertionError):
        allocator.alloc(1)
    with pytest.raises(AssertionError):
        slab.check_rows([4])  # a row the slab does not have
    allocator.free(rows[1])
    slab.mark_empty([rows[1]])
    slab.mark_empty([rows[1]])  # marking twice is harmless
    assert rows[1] not in slab and len(slab) == 3 and slab.nbytes == 3 * slab.row_bytes
    with pytest.raises(AssertionError):
        allocator.free(rows[1])  # freeing a free row is a bug
    (again,) = allocator.alloc(1)
    assert again == rows[1]
    fresh = encode(codec, 1, seed=7)
    put(slab, [again], fresh)
    assert all(same(g, p) for g, p in zip(gather(slab, [again]), fresh, strict=True))
    slab.clear()
    assert len(slab) == 0 and slab.nbytes == 0


def test_first_invalid_finds_the_first_non_finite_block() -> None:
    codec, slab = make("polykv")
    put(slab, [1, 2, 3], encode(codec, 3))
    assert first_invalid_block(3, gather(slab, [1, 2, 3])) is None
    slab.layers[2].v_norm[3][5, 1] = float("inf")
    slab.layers[0].k_scale[2][0, 0] = float("nan")
    assert first_invalid_block(3, gather(slab, [1, 2, 3])) == 1
    assert first_invalid_block(2, gather(slab, [3, 1])) == 0


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_worker_round_trip_through_the_flash_layout(layout: str) -> None:
    """The CUDA path (FlashAttention cache views, the kernels' torch backend) on CPU tensors:
    store two blocks, load them elsewhere, compare with the codec; an empty row is reported."""
    from polykv_vllm.connector.metadata import BlockJob, LoadJob, StepPlan
    from polykv_vllm.connector.paged_io import FlashPagedIO
    from polykv_vllm.connector.worker import PolyKVWorker

    layers, heads, dim, bs, blocks = 3, 2, 64, 16, 8
    codec = KVCodec("polykv", num_layers=layers, head_dim=dim)
    g = torch.Generator().manual_seed(3)
    caches = []
    for _ in range(layers):
        if layout == "NHD":  # physical [blocks, bs, H, 2D], logical [blocks, H, bs, 2D]
            caches.append(torch.randn(blocks, bs, heads, 2 * dim, generator=g).transpose(1, 2))
        else:
            caches.append(torch.randn(blocks, heads, bs, 2 * dim, generator=g))
    io = FlashPagedIO(codec, caches, list(range(layers)), dim, bs)
    slab = BlockSlab(codec, list(range(layers)), 4, bs, heads, dim, torch.device("cpu"), False)
    worker = PolyKVWorker(block_size=bs)
    worker.bind(io, slab)
    src = [caches[1][[5, 2]].clone()]
    worker.save(StepPlan(stores=[BlockJob("r", (1, 2), (5, 2))]))
    report = worker.take_report()
    assert report is not None and report.stored == {1: [slab.row_bytes, 1], 2: [slab.row_bytes, 1]}
    worker.start_load(StepPlan(loads=[LoadJob("q", (1, 2), (0, 6), load_id=0)]))
    assert worker.take_load_errors() == set()
    report = worker.take_report()
    assert report is not None and report.loads == {0: [1, 2]} and not report.failed_rows
    ref_k, ref_v = codec.decode(codec.encode(*_kv(src[0], dim), 1), dtype=torch.float32)
    got_k, got_v = _kv(caches[1][[0, 6]], dim)
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
    worker.start_load(StepPlan(loads=[LoadJob("q2", (1, 3), (1, 3), load_id=1)], freed_rows=[2]))
    assert worker.take_load_errors() == {3}
    report = worker.take_report()
    assert report is not None and report.failed_rows == {3}, "row 3 holds no block"
    assert report.loads == {1: [1, 1]}, "one of its two blocks loaded"
    assert 2 not in slab and 1 in slab, "freed row marked empty, the loaded one kept"
    assert 3 not in slab and len(slab) == 1, "a failed load changes nothing in the store"


def _kv(blocks: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, H, bs, 2D] logical blocks -> token-major K, V [n*bs, H, D]."""
    t = blocks.transpose(1, 2).reshape(-1, blocks.shape[1], 2 * dim)
    return t[..., :dim], t[..., dim:]


def test_alloc_hands_out_runs_and_reuses_a_fitting_free_run() -> None:
    rows = RowAllocator(8)
    a = rows.alloc(3)
    assert [(r.offset, r.row, r.length) for r in runs(a)] == [(0, 0, 3)]
    b = rows.alloc(3)
    assert [(r.row, r.length) for r in runs(b)] == [(3, 3)]
    for row in (0, 1, 3, 4):  # free rows 0, 1, 3, 4; never used: 6, 7
        rows.free(row)
    c = rows.alloc(2)
    assert [(r.row, r.length) for r in runs(c)] == [(0, 2)], "best fit, the lowest row"
    assert [(r.row, r.length) for r in runs(rows.alloc(2))] == [(3, 2)], "the next that fits"
    rows.free(3)  # free: 3, 6, 7: no run of three -> the largest, then the rest
    got = rows.alloc(3)
    assert [(r.offset, r.row, r.length) for r in runs(got)] == [(0, 3, 1), (1, 6, 2)]
    assert runs([6, 3, 4]) == [Run(0, 6, 1), Run(1, 3, 2)]
    with pytest.raises(AssertionError):
        rows.alloc(1)  # full


def test_view_is_zero_copy_and_write_fills_a_run() -> None:
    codec, slab = make("polykv")
    packed = encode(codec, 2)
    (run,) = runs([1, 2])
    slab.write(run, packed)
    views = slab.view(run.row, run.length)
    assert views[0].k_codes.data_ptr() == slab.layers[0].k_codes[run.row].data_ptr()
    assert all(same(v, p) for v, p in zip(views, packed, strict=True))


def test_worker_loads_a_request_spread_over_several_runs() -> None:
    """Blocks stored by different requests (separate runs, out of row order) load in the
    request's order, and the result equals the codec's decode."""
    from polykv_vllm.connector.metadata import BlockJob, LoadJob, StepPlan
    from polykv_vllm.connector.paged_io import FlashPagedIO
    from polykv_vllm.connector.worker import PolyKVWorker

    layers, heads, dim, bs, blocks = 3, 2, 64, 16, 10
    codec = KVCodec("polykv", num_layers=layers, head_dim=dim)
    g = torch.Generator().manual_seed(5)
    caches = [torch.randn(blocks, heads, bs, 2 * dim, generator=g) for _ in range(layers)]
    io = FlashPagedIO(codec, caches, list(range(layers)), dim, bs)
    slab = BlockSlab(codec, list(range(layers)), 6, bs, heads, dim, torch.device("cpu"), False)
    worker = PolyKVWorker(block_size=bs)
    worker.bind(io, slab)
    worker.save(StepPlan(stores=[BlockJob("a", (1, 2), (0, 1))]))
    worker.save(StepPlan(stores=[BlockJob("b", (4,), (2,))]))
    src = [c[[2, 0, 1]].clone() for c in caches]
    worker.start_load(StepPlan(loads=[LoadJob("q", (4, 1, 2), (7, 8, 9), load_id=0)]))
    assert worker.take_load_errors() == set()
    for layer in range(layers):
        ref_k, ref_v = codec.decode(codec.encode(*_kv(src[layer], dim), layer), torch.float32)
        got_k, got_v = _kv(caches[layer][[7, 8, 9]], dim)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
    worker.flush_timers()
    assert len(worker.totals.load_seconds) == 1 and len(worker.totals.store_seconds) == 2
    assert worker.totals.tokens_decompressed == 3 * bs


def test_warm_up_touches_only_the_given_block() -> None:
    """The start-up warm-up runs both kernels on one block (vLLM's null block 0) and leaves
    every other block as it was."""
    from polykv_vllm.connector.paged_io import FlashPagedIO

    layers, heads, dim, bs, blocks = 2, 2, 64, 16, 4
    codec = KVCodec("polykv", num_layers=layers, head_dim=dim)
    g = torch.Generator().manual_seed(9)
    caches = [torch.randn(blocks, heads, bs, 2 * dim, generator=g) for _ in range(layers)]
    before = [c.clone() for c in caches]
    io = FlashPagedIO(codec, caches, list(range(layers)), dim, bs)
    assert io.warm_up(block_id=0) >= 0
    for layer, (c, b) in enumerate(zip(caches, before, strict=True)):
        assert torch.equal(c[1:], b[1:]), "other blocks untouched"
        ref_k, ref_v = codec.decode(codec.encode(*_kv(b[[0]], dim), layer), torch.float32)
        got_k, got_v = _kv(c[[0]], dim)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bound kernels run on CUDA")
@pytest.mark.parametrize("placement", ["gpu", "cpu"])
def test_cuda_worker_reads_and_writes_the_store_by_address(placement: str) -> None:
    """CUDA: the worker encodes into / decodes from the store's rows through the bound kernels
    (a GPU slab by address, a pinned host slab read directly over PCIe); the result equals the
    same transfers done by the per-call Triton plans, and a corrupt row is caught before any
    block is decoded from it."""
    from polykv_vllm.connector.metadata import BlockJob, LoadJob, StepPlan
    from polykv_vllm.connector.paged_io import FlashPagedIO
    from polykv_vllm.connector.worker import PolyKVWorker

    layers, heads, dim, bs, blocks = 3, 2, 64, 16, 12
    dev = torch.device("cuda")
    codec = KVCodec("polykv-lite", num_layers=layers, head_dim=dim)  # two spec groups
    g = torch.Generator().manual_seed(7)
    caches = [
        torch.randn(blocks, heads, bs, 2 * dim, generator=g).to(dev, torch.bfloat16)
        for _ in range(layers)
    ]
    io = FlashPagedIO(codec, caches, list(range(layers)), dim, bs)
    assert io.bound is not None
    slab_dev = dev if placement == "gpu" else torch.device("cpu")
    slab = BlockSlab(codec, list(range(layers)), 8, bs, heads, dim, slab_dev, placement == "cpu")
    worker = PolyKVWorker(block_size=bs)
    worker.bind(io, slab)
    # two runs: rows 1-2 and row 5
    worker.save(StepPlan(stores=[BlockJob("a", (1, 2, 5), (3, 4, 0))]))
    want = io.store([3, 4, 0])  # the per-call path's encode of the same blocks
    worker.flush_timers()  # a host slab's staged copies have landed and are confirmed
    for layer in range(layers):
        rows = [slab.view(1, 2)[layer], slab.view(5, 1)[layer]]
        for i, t in enumerate(want[layer].tensors()):
            stored = torch.cat([r.tensors()[i].to(dev) for r in rows])
            assert torch.equal(stored, t), (layer, i)
    worker.start_load(StepPlan(loads=[LoadJob("q", (5, 1, 2), (9, 10, 11), load_id=0)]))
    assert worker.take_load_errors() == set()
    ref = [c.clone() for c in caches]
    ref[0][9:12] = 0  # differs unless the plan below writes the same blocks
    ref_io = FlashPagedIO(codec, ref, list(range(layers)), dim, bs)
    order = [slab.view(5, 1), slab.view(1, 2)]
    per_layer = [PackedKV.cat([order[0][i], order[1][i]]).to(dev) for i in range(layers)]
    ref_io.kernels.decompress_layers_into_paged(
        per_layer,
        ref_io.specs,
        ref_io.key_caches,
        ref_io.value_caches,
        torch.tensor([9, 10, 11], device=dev),
        backend="triton",
    )
    torch.cuda.synchronize()
    for a, b in zip(caches, ref, strict=True):
        assert torch.equal(a, b)
    # a corrupt norm in row 2 (the third block of this load): two blocks load, one recomputed
    slab.layers[1].v_norm[2][3, 1] = float("nan")
    worker.start_load(StepPlan(loads=[LoadJob("r", (5, 1, 2), (6, 7, 8), load_id=1)]))
    assert worker.take_load_errors() == {8}
    report = worker.take_report()
    assert report is not None and report.loads[1] == [1, 2] and report.failed_rows == {2}
