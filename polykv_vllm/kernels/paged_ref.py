"""Pure-torch references of the paged kernels (same signatures as :mod:`.paged_triton`).

They call the layer spec's own encode / decode (:class:`~polykv_vllm.core.LayerSpec`), so
``decompress_into_paged`` equals ``KVCodec.decode`` scattered into blocks bit for bit, and
``compress_from_paged`` equals ``KVCodec.encode`` of the gathered tokens bit for bit.
Cache views and the slot rule are described in :mod:`.layout`.

fp8 caches (``float8_e4m3fn`` / ``float8_e5m2`` views, :mod:`.fp8`): compress encodes
``x8.float() * scale``, decompress writes ``fp8(clamp(x / scale))``, with the layer's
``k_scale`` / ``v_scale``; float caches take no scales (1.0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polykv_vllm.core import LayerSpec, PackedKV
from polykv_vllm.kernels.fp8 import dequantize, is_fp8, quantize
from polykv_vllm.kernels.layout import (
    check_block_ids,
    check_cache_pair,
    check_out,
    check_packed,
    check_scales,
)

__all__ = [
    "compress_from_paged",
    "compress_layers_from_paged",
    "decompress_into_paged",
    "decompress_layers_into_paged",
    "slot_index",
]


def slot_index(
    block_ids: torch.Tensor, num_tokens: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block, slot)`` int64 ``[T]`` of each token: ``block_ids[t // bs]``, ``t % bs``."""
    t = torch.arange(num_tokens, device=block_ids.device)
    return block_ids.to(torch.int64)[t // block_size], t % block_size


def decompress_into_paged(
    packed: PackedKV,
    spec: LayerSpec,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Decode one layer of a stored document straight into vLLM's paged cache.

    - ``packed``: the layer's compressed tokens (``T = packed.tokens``), on the cache's device.
    - ``spec``: ``codec.layer_spec(layer, head_dim)`` of the layer it was encoded with.
    - ``key_cache`` / ``value_cache``: bf16/fp16/fp32 or fp8 (e4m3fn / e5m2) views
      ``[num_blocks, block_size, H, D]`` (any strides; see :func:`.layout.split_kv_cache`).
      Written in place; only the ``T`` slots of the document are touched.
    - ``block_ids``: int ``[>= ceil(T / block_size)]`` destination blocks, in token order.
    - ``k_scale`` / ``v_scale``: the layer's fp8 scales (fp8 caches only; 1.0 otherwise).
    """
    _, block_size, kv_heads = check_cache_pair(key_cache, value_cache, spec)
    check_packed(packed, spec, kv_heads)
    check_block_ids(block_ids, packed.tokens, block_size)
    check_scales(key_cache.dtype, k_scale, v_scale)
    k, v = spec.decode(packed)
    blk, slot = slot_index(block_ids, packed.tokens, block_size)
    if is_fp8(key_cache.dtype):
        key_cache[blk, slot] = quantize(k, k_scale, key_cache.dtype)
        value_cache[blk, slot] = quantize(v, v_scale, value_cache.dtype)
        return
    key_cache[blk, slot] = k.to(key_cache.dtype)
    value_cache[blk, slot] = v.to(value_cache.dtype)


def compress_from_paged(
    spec: LayerSpec,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    num_tokens: int,
    out: PackedKV | None = None,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> PackedKV:
    """Encode the first ``num_tokens`` tokens held in ``block_ids`` (inverse of decompress).

    Arguments as in :func:`decompress_into_paged`; returns a :class:`PackedKV` on the cache's
    device, equal to ``KVCodec.encode`` of the gathered K/V (of ``x8.float() * scale`` for an
    fp8 cache). With ``out`` (a PackedKV in ``spec.packed_shapes(num_tokens, kv_heads)``, e.g.
    rows of the store's slab) the result is written into its tensors and ``out`` is returned.
    """
    _, block_size, _ = check_cache_pair(key_cache, value_cache, spec)
    check_block_ids(block_ids, num_tokens, block_size)
    check_scales(key_cache.dtype, k_scale, v_scale)
    blk, slot = slot_index(block_ids, num_tokens, block_size)
    k = key_cache[blk, slot]
    v = value_cache[blk, slot]
    if is_fp8(key_cache.dtype):
        k, v = dequantize(k, k_scale), dequantize(v, v_scale)
    result = spec.encode(k, v)
    if out is None:
        return result
    check_out(out, result)
    for dst, src in zip(out.tensors(), result.tensors(), strict=True):
        dst.copy_(src)
    return out


def decompress_layers_into_paged(
    packed: Sequence[PackedKV],
    specs: Sequence[LayerSpec],
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    *,
    k_scales: Sequence[float] | None = None,
    v_scales: Sequence[float] | None = None,
) -> None:
    """:func:`decompress_into_paged` for every layer (one entry per layer in each sequence;
    ``k_scales`` / ``v_scales``: one fp8 scale per layer, None = 1.0 each)."""
    n = len(packed)
    ks, vs = _scales(n, k_scales), _scales(n, v_scales)
    _check_lengths(n, specs, key_caches, value_caches, ks, vs)
    for i, (p, s, kc, vc) in enumerate(zip(packed, specs, key_caches, value_caches, strict=True)):
        decompress_into_paged(p, s, kc, vc, block_ids, k_scale=ks[i], v_scale=vs[i])


def compress_layers_from_paged(
    specs: Sequence[LayerSpec],
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    num_tokens: int,
    out: Sequence[PackedKV] | None = None,
    *,
    k_scales: Sequence[float] | None = None,
    v_scales: Sequence[float] | None = None,
) -> list[PackedKV]:
    """:func:`compress_from_paged` for every layer (``out``: one PackedKV per layer, or None;
    scales as in :func:`decompress_layers_into_paged`)."""
    n = len(specs)
    ks, vs = _scales(n, k_scales), _scales(n, v_scales)
    _check_lengths(n, specs, key_caches, value_caches, ks, vs, *([out] if out is not None else []))
    outs: Sequence[PackedKV | None] = out if out is not None else [None] * n
    return [
        compress_from_paged(s, kc, vc, block_ids, num_tokens, o, k_scale=k, v_scale=v)
        for s, kc, vc, o, k, v in zip(specs, key_caches, value_caches, outs, ks, vs, strict=True)
    ]


def _scales(n: int, scales: Sequence[float] | None) -> Sequence[float]:
    return [1.0] * n if scales is None else scales


def _check_lengths(n: int, *seqs: Sequence[object]) -> None:
    lengths = [len(s) for s in seqs]
    if any(x != n for x in lengths):
        raise ValueError(
            f"per-layer sequences have lengths {[n, *lengths]}: pass one packed/spec/key_cache/"
            "value_cache per layer."
        )
