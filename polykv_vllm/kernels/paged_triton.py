"""Triton kernels: decode a stored document straight into vLLM's paged cache, and the inverse.

The same four functions, with the same signatures and semantics, as :mod:`.paged_ref` (the torch
reference); :mod:`polykv_vllm.kernels` picks one of the two by ``backend``. Who holds what:

- :mod:`.triton_decode` / :mod:`.triton_encode`: the two kernels (one launch decodes or
  encodes one stream, keys or values, of a group of layers), next to their references
  :func:`.paged_ref.decompress_into_paged` / :func:`.paged_ref.compress_from_paged`;
- :mod:`.triton_tables`: the device tables, built from the codec's
  :class:`~polykv_vllm.core.LayerSpec` (so kernel and codec cannot drift apart);
- :mod:`.triton_plan`: validation, address tables, launch shapes (:class:`~.triton_plan.
  KernelConfig`, tuned on an H100) and graph-capturable plans, the interface the benchmark
  (``benchmarks/kernel_bench.py``) times and sweeps.

fp8 caches (``float8_e4m3fn`` / ``float8_e5m2`` views, :mod:`.fp8`) are addressed as bytes and
bitcast, with one fp32 scale per layer read from a table (``FP8`` is a compile-time switch, so
the float-cache kernels are unchanged). On CPU tensors the kernels run in Triton's interpreter
(slow; for tests only), which must be enabled with ``TRITON_INTERPRET=1`` before triton is first
imported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polykv_vllm.core import LayerSpec, PackedKV
from polykv_vllm.kernels.triton_plan import plan_compress_layers, plan_decompress_layers

__all__ = [
    "compress_from_paged",
    "compress_layers_from_paged",
    "decompress_into_paged",
    "decompress_layers_into_paged",
]


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
    """Triton version of :func:`.paged_ref.decompress_layers_into_paged` (same arguments).

    Two launches (keys, values) per group of layers sharing a spec and cache strides.
    """
    plan_decompress_layers(
        packed,
        specs,
        key_caches,
        value_caches,
        block_ids,
        k_scales=k_scales,
        v_scales=v_scales,
    )()


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
    """Triton version of :func:`.paged_ref.compress_layers_from_paged` (same arguments)."""
    plan, results = plan_compress_layers(
        specs,
        key_caches,
        value_caches,
        block_ids,
        num_tokens,
        out,
        k_scales=k_scales,
        v_scales=v_scales,
    )
    plan()
    return results


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
    """Triton version of :func:`.paged_ref.decompress_into_paged` (same arguments)."""
    decompress_layers_into_paged(
        [packed],
        [spec],
        [key_cache],
        [value_cache],
        block_ids,
        k_scales=[k_scale],
        v_scales=[v_scale],
    )


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
    """Triton version of :func:`.paged_ref.compress_from_paged` (same arguments)."""
    return compress_layers_from_paged(
        [spec],
        [key_cache],
        [value_cache],
        block_ids,
        num_tokens,
        None if out is None else [out],
        k_scales=[k_scale],
        v_scales=[v_scale],
    )[0]
