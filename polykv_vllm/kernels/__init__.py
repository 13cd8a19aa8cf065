"""Paged-cache kernels: decode a stored document into vLLM's paged KV cache, and the inverse.

Two backends with one signature: ``"torch"`` (:mod:`.paged_ref`, the reference, built on the
layer spec's own encode / decode) and ``"triton"`` (:mod:`.paged_triton`: kernels in
:mod:`.triton_decode` / :mod:`.triton_encode`, tables in :mod:`.triton_tables`, launch plans and
tuned launch shapes in :mod:`.triton_plan`). ``backend="auto"`` picks Triton
for CUDA tensors when Triton imports, torch otherwise. ``"triton"`` on CPU tensors runs Triton's
interpreter (slow; used by the tests). Cache layouts: :mod:`.layout`.

Importing this package imports neither Triton nor the kernels; they load on first use.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Literal

import torch

from polykv_vllm.core import LayerSpec, PackedKV
from polykv_vllm.kernels.fp8 import fp8_view
from polykv_vllm.kernels.layout import split_kv_cache

__all__ = [
    "BACKENDS",
    "Backend",
    "compress_from_paged",
    "compress_layers_from_paged",
    "decompress_into_paged",
    "decompress_layers_into_paged",
    "fp8_view",
    "resolve_backend",
    "split_kv_cache",
    "triton_available",
]

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """True when ``triton`` imports (it is needed for the ``"triton"`` backend)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"torch"`` or ``"triton"`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed: use one of {BACKENDS}.")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise ValueError(
            "backend='triton' needs the triton package, which does not import here: install "
            "triton or use backend='torch' (or 'auto')."
        )
    return backend


def _impl(backend: str, device: torch.device) -> ModuleType:
    name = resolve_backend(backend, device)
    return importlib.import_module(
        f"polykv_vllm.kernels.paged_{'ref' if name == 'torch' else name}"
    )


def decompress_into_paged(
    packed: PackedKV,
    spec: LayerSpec,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    backend: Backend = "auto",
) -> None:
    """Decode one layer of a document into the paged cache (see :mod:`.paged_ref`;
    ``k_scale`` / ``v_scale``: the layer's scales for an fp8 cache)."""
    _impl(backend, key_cache.device).decompress_into_paged(
        packed, spec, key_cache, value_cache, block_ids, k_scale=k_scale, v_scale=v_scale
    )


def decompress_layers_into_paged(
    packed: Sequence[PackedKV],
    specs: Sequence[LayerSpec],
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    *,
    k_scales: Sequence[float] | None = None,
    v_scales: Sequence[float] | None = None,
    backend: Backend = "auto",
) -> None:
    """Decode every layer of a document into the paged cache (one call, few launches;
    ``k_scales`` / ``v_scales``: one fp8 scale per layer, None = 1.0)."""
    if not key_caches:
        return
    _impl(backend, key_caches[0].device).decompress_layers_into_paged(
        packed, specs, key_caches, value_caches, block_ids, k_scales=k_scales, v_scales=v_scales
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
    backend: Backend = "auto",
) -> PackedKV:
    """Encode the first ``num_tokens`` tokens of one layer held in ``block_ids`` (into ``out``
    when given)."""
    result: PackedKV = _impl(backend, key_cache.device).compress_from_paged(
        spec, key_cache, value_cache, block_ids, num_tokens, out, k_scale=k_scale, v_scale=v_scale
    )
    return result


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
    backend: Backend = "auto",
) -> list[PackedKV]:
    """Encode every layer's first ``num_tokens`` tokens held in ``block_ids`` (into ``out``)."""
    if not key_caches:
        return []
    result: list[PackedKV] = _impl(backend, key_caches[0].device).compress_layers_from_paged(
        specs,
        key_caches,
        value_caches,
        block_ids,
        num_tokens,
        out,
        k_scales=k_scales,
        v_scales=v_scales,
    )
    return result
