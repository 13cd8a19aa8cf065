"""Pure-torch references of the paged kernels (same signatures as :mod:`.paged_triton`).

They reuse the codec's own quantizers (``polykv_vllm.core.quantizers``), so
``decompress_into_paged`` equals ``KVCodec.decode`` scattered into blocks bit for bit, and
``compress_from_paged`` equals ``KVCodec.encode`` of the gathered tokens bit for bit.
Cache views and the slot rule are described in :mod:`.layout`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polykv_vllm.core import LayerSpec, PackedKV, lloyd_max
from polykv_vllm.core.quantizers import (
    int8_decode,
    int8_encode,
    rotated_decode,
    rotated_encode,
)
from polykv_vllm.kernels.layout import (
    check_block_ids,
    check_cache_pair,
    check_out,
    check_packed,
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


def decode_fp32(packed: PackedKV, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The codec's float32 decode of ``packed``: ``(k, v)`` fp32 ``[T, H, D]``."""
    if spec.key_mode == "int8":
        k = int8_decode(packed.k_codes, packed.k_scale)
    else:
        assert spec.key_signs is not None and spec.key_centroids is not None
        k = rotated_decode(
            packed.k_codes,
            packed.k_scale,
            spec.key_bits,
            spec.key_signs,
            spec.key_centroids,
            spec.norm_correction,
        )
    v = rotated_decode(
        packed.v_codes,
        packed.v_norm,
        spec.value_bits,
        spec.value_signs,
        spec.value_centroids,
        spec.norm_correction,
    )
    return k, v


def decompress_into_paged(
    packed: PackedKV,
    spec: LayerSpec,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
) -> None:
    """Decode one layer of a stored document straight into vLLM's paged cache.

    - ``packed``: the layer's compressed tokens (``T = packed.tokens``), on the cache's device.
    - ``spec``: ``codec.layer_spec(layer, head_dim)`` of the layer it was encoded with.
    - ``key_cache`` / ``value_cache``: bf16/fp16/fp32 views ``[num_blocks, block_size, H, D]``
      (any strides; see :func:`.layout.split_kv_cache`). Written in place; only the ``T`` slots
      of the document are touched.
    - ``block_ids``: int ``[>= ceil(T / block_size)]`` destination blocks, in token order.
    """
    _, block_size, kv_heads = check_cache_pair(key_cache, value_cache, spec)
    check_packed(packed, spec, kv_heads)
    check_block_ids(block_ids, packed.tokens, block_size)
    k, v = decode_fp32(packed, spec)
    blk, slot = slot_index(block_ids, packed.tokens, block_size)
    key_cache[blk, slot] = k.to(key_cache.dtype)
    value_cache[blk, slot] = v.to(value_cache.dtype)


def compress_from_paged(
    spec: LayerSpec,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    num_tokens: int,
    out: PackedKV | None = None,
) -> PackedKV:
    """Encode the first ``num_tokens`` tokens held in ``block_ids`` (inverse of decompress).

    Arguments as in :func:`decompress_into_paged`; returns a :class:`PackedKV` on the cache's
    device, equal to ``KVCodec.encode`` of the gathered K/V. With ``out`` (a PackedKV of the
    right shapes, e.g. a slot of a preallocated store) the result is written into its tensors and
    ``out`` is returned.
    """
    _, block_size, kv_heads = check_cache_pair(key_cache, value_cache, spec)
    check_block_ids(block_ids, num_tokens, block_size)
    blk, slot = slot_index(block_ids, num_tokens, block_size)
    k = key_cache[blk, slot]
    v = value_cache[blk, slot]
    if spec.key_mode == "int8":
        k_codes, k_scale = int8_encode(k)
    else:
        assert spec.key_signs is not None
        k_codes, k_scale = rotated_encode(
            k, spec.key_bits, spec.key_signs, lloyd_max.boundaries(spec.key_bits)
        )
    v_codes, v_norm = rotated_encode(
        v, spec.value_bits, spec.value_signs, lloyd_max.boundaries(spec.value_bits)
    )
    result = PackedKV(
        k_codes=k_codes,
        k_scale=k_scale,
        v_codes=v_codes,
        v_norm=v_norm,
        tokens=num_tokens,
        kv_heads=kv_heads,
        head_dim=spec.head_dim,
        key_bits=spec.key_bits,
        value_bits=spec.value_bits,
    )
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
) -> None:
    """:func:`decompress_into_paged` for every layer (one entry per layer in each sequence)."""
    _check_lengths(len(packed), specs, key_caches, value_caches)
    for p, s, kc, vc in zip(packed, specs, key_caches, value_caches, strict=True):
        decompress_into_paged(p, s, kc, vc, block_ids)


def compress_layers_from_paged(
    specs: Sequence[LayerSpec],
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    num_tokens: int,
    out: Sequence[PackedKV] | None = None,
) -> list[PackedKV]:
    """:func:`compress_from_paged` for every layer (``out``: one PackedKV per layer, or None)."""
    _check_lengths(len(specs), specs, key_caches, value_caches, *([out] if out is not None else []))
    outs: Sequence[PackedKV | None] = out if out is not None else [None] * len(specs)
    return [
        compress_from_paged(s, kc, vc, block_ids, num_tokens, o)
        for s, kc, vc, o in zip(specs, key_caches, value_caches, outs, strict=True)
    ]


def _check_lengths(n: int, *seqs: Sequence[object]) -> None:
    lengths = [len(s) for s in seqs]
    if any(x != n for x in lengths):
        raise ValueError(
            f"per-layer sequences have lengths {[n, *lengths]}: pass one packed/spec/key_cache/"
            "value_cache per layer."
        )
