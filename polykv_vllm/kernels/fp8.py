"""fp8 working caches: vLLM's ``kv_cache_dtype`` names, their torch dtypes, and the scale rule.

vLLM allocates an fp8 KV cache as ``uint8`` (``STR_DTYPE_TO_TORCH_DTYPE``, 0.26 and 0.32) and
stores ``fp8(x / scale)`` with one float scale per layer and stream (``Attention._k_scale_float``
/ ``_v_scale_float``; 1.0 unless the checkpoint or ``calculate_kv_scales`` sets them). The bytes
are e4m3 (``torch.float8_e4m3fn``) for ``"fp8"`` / ``"fp8_e4m3"`` and e5m2 for ``"fp8_e5m2"``;
an attention backend views them as that dtype.

polykv stores values independent of the scales: compress reads ``x8.float() * scale``,
decompress writes ``fp8(clamp(x / scale, -max, max))`` (round to nearest even, like vLLM's CUDA
``scaled_convert`` with saturation). A scale that is not finite or not positive cannot be
honoured; :func:`valid_scale` says so, and the connector treats such a layer as a miss.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "FP8_CACHE_DTYPES",
    "FP8_DTYPES",
    "dequantize",
    "fp8_view",
    "is_fp8",
    "quantize",
    "valid_scale",
]

# vLLM kv_cache_dtype name -> the torch dtype its bytes are
FP8_CACHE_DTYPES: dict[str, torch.dtype] = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    """True for the two fp8 dtypes polykv reads and writes."""
    return dtype in FP8_DTYPES


def fp8_view(cache: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """``cache`` (vLLM's ``uint8`` fp8 allocation, any shape and strides) viewed as the fp8
    dtype of ``kv_cache_dtype`` (no copy). A float cache is returned as is."""
    if kv_cache_dtype not in FP8_CACHE_DTYPES:
        return cache
    dtype = FP8_CACHE_DTYPES[kv_cache_dtype]
    if cache.dtype == dtype:
        return cache
    if cache.dtype != torch.uint8:
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r} but the cache tensor is {cache.dtype}: vLLM "
            "allocates fp8 caches as uint8; pass that tensor."
        )
    return cache.view(dtype)


def valid_scale(scale: float) -> bool:
    """A usable fp8 scale: finite and > 0."""
    return math.isfinite(scale) and scale > 0


def dequantize(x8: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 values of fp8 cache elements: ``x8.float() * scale`` (same shape)."""
    return x8.to(torch.float32) * scale


def quantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``dtype`` (an fp8 dtype) of ``x / scale``, saturated to the finite range (torch's cast
    of an out-of-range value is NaN / inf, vLLM's CUDA cast saturates)."""
    top = torch.finfo(dtype).max
    return (x.to(torch.float32) / scale).clamp(-top, top).to(dtype)
