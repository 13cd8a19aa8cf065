"""The worker's slab store: rows of compressed blocks, put/get/drop, validation."""

from __future__ import annotations

import pytest
import torch

from polykv_vllm.connector.slab import BlockSlab, Run
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
    slab.put([10, 11, 12], packed)
    got = slab.get([10, 11, 12])
    assert all(same(g, p) for g, p in zip(got, packed, strict=True))
    got = slab.get([12, 10])  # another order: blocks 2 then 0
    for g, p in zip(got, packed, strict=True):
        assert same(g, PackedKV.cat([p.slice(32, 48), p.slice(0, 16)]))
    assert len(slab) == 3
    assert slab.nbytes == 3 * slab.row_bytes
    assert slab.row_bytes == sum(p.slice(0, 16).nbytes for p in packed), "measured bytes"


def test_drop_recycles_rows_up_to_capacity() -> None:
    codec, slab = make("polykv", capacity=4)
    slab.put([1, 2, 3, 4], encode(codec, 4))
    with pytest.raises(AssertionError):
        slab.put([5], encode(codec, 1))
    slab.drop(2)
    slab.drop(2)  # dropping twice is harmless
    assert 2 not in slab and len(slab) == 3
    fresh = encode(codec, 1, seed=7)
    slab.put([5], fresh)
    assert all(same(g, p) for g, p in zip(slab.get([5]), fresh, strict=True))
    slab.clear()
    assert len(slab) == 0 and slab.nbytes == 0


def test_first_invalid_finds_the_first_non_finite_block() -> None:
    codec, slab = make("polykv")
    slab.put([1, 2, 3], encode(codec, 3))
    assert slab.first_invalid([1, 2, 3], slab.get([1, 2, 3])) is None
    slab.layers[2].v_norm[slab.row(3)][5, 1] = float("inf")
    slab.layers[0].k_scale[slab.row(2)][0, 0] = float("nan")
    assert slab.first_invalid([1, 2, 3], slab.get([1, 2, 3])) == 1
    assert slab.first_invalid([3, 1], slab.get([3, 1])) == 0


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_worker_round_trip_through_the_flash_layout(layout: str) -> None:
    """The CUDA path (FlashAttention cache views, the kernels' torch backend) on CPU tensors:
    store two blocks, load them elsewhere, compare with the codec; a missing slot is reported."""
    from polykv_vllm.connector.metadata import BlockJob, StepPlan
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
    worker.save(StepPlan(stores=[BlockJob("r", (7, 8), (5, 2))]))
    report = worker.take_report()
    assert report is not None and report.stored == {7: [slab.row_bytes, 1], 8: [slab.row_bytes, 1]}
    worker.start_load(StepPlan(loads=[BlockJob("q", (7, 8), (0, 6))]))
    assert worker.take_load_errors() == set()
    ref_k, ref_v = codec.decode(codec.encode(*_kv(src[0], dim), 1), dtype=torch.float32)
    got_k, got_v = _kv(caches[1][[0, 6]], dim)
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
    worker.start_load(StepPlan(loads=[BlockJob("q2", (7, 9), (1, 3))], evictions=[8]))
    assert worker.take_load_errors() == {3}
    report = worker.take_report()
    assert report is not None and report.failed_slots == {9}
    assert report.unloaded_tokens == {"q2": bs}
    assert 8 not in slab and 7 in slab


def _kv(blocks: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, H, bs, 2D] logical blocks -> token-major K, V [n*bs, H, D]."""
    t = blocks.transpose(1, 2).reshape(-1, blocks.shape[1], 2 * dim)
    return t[..., :dim], t[..., dim:]


def test_alloc_hands_out_runs_and_reuses_a_fitting_free_run() -> None:
    codec, slab = make("polykv", capacity=8)
    assert [(r.offset, r.row, r.length) for r in slab.alloc([1, 2, 3])] == [(0, 0, 3)]
    assert [(r.row, r.length) for r in slab.alloc([4, 5, 6])] == [(3, 3)]
    for slot in (1, 2, 4, 5):  # free rows 0, 1, 3, 4; never used: 6, 7
        slab.drop(slot)
    assert [(r.row, r.length) for r in slab.alloc([7, 8])] == [(6, 2)], "never-used rows first"
    assert [(r.row, r.length) for r in slab.alloc([9, 10])] == [(0, 2)], "the first free run"
    slab.drop(7)  # free: 3, 4, 6: no run of three -> any rows, split into runs
    runs = slab.alloc([11, 12, 13])
    assert [(r.offset, r.row, r.length) for r in runs] == [(0, 3, 2), (2, 6, 1)]
    assert slab.runs([13, 11, 12]) == [Run(0, 6, 1), Run(1, 3, 2)]
    with pytest.raises(AssertionError):
        slab.alloc([14])  # full


def test_view_is_zero_copy_and_write_fills_a_run() -> None:
    codec, slab = make("polykv")
    packed = encode(codec, 2)
    (run,) = slab.alloc([1, 2])
    slab.write(run, packed)
    views = slab.view(run.row, run.length)
    assert views[0].k_codes.data_ptr() == slab.layers[0].k_codes[run.row].data_ptr()
    assert all(same(v, p) for v, p in zip(views, packed, strict=True))


def test_worker_loads_a_request_spread_over_several_runs() -> None:
    """Blocks stored by different requests (separate runs, out of row order) load in the
    request's order, and the result equals the codec's decode."""
    from polykv_vllm.connector.metadata import BlockJob, StepPlan
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
    worker.save(StepPlan(stores=[BlockJob("b", (3,), (2,))]))
    src = [c[[2, 0, 1]].clone() for c in caches]
    worker.start_load(StepPlan(loads=[BlockJob("q", (3, 1, 2), (7, 8, 9))]))
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
