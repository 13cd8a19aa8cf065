"""An fp8 working KV cache for the quality harness, simulated as vLLM's ``--kv-cache-dtype fp8``.

What vLLM does (CUDA ``reshape_and_cache_flash`` → ``scaled_convert``): every K/V it writes into
the paged cache is ``__nv_cvt_float_to_fp8(x / scale, __NV_SATFINITE, fmt)`` — divide by the
layer's per-tensor ``k_scale``/``v_scale`` in fp32, round to nearest even, saturate to the
largest finite value (±448 for e4m3, ±57344 for e5m2). Attention reads the cache back as
``fp8 * scale`` (FlashAttention's ``k_descale``/``v_descale``), for every token of the sequence,
including those of the current step: the current tokens are written first, then read from the
cache. Scales are 1.0 unless the checkpoint carries them or, on vLLM builds that still have it
(gone from 0.32), ``calculate_kv_scales`` is on: then, on a layer's first forward,
``k_scale = amax(|k|) / K_SCALE_CONSTANT`` (200) and ``v_scale = amax(|v|) / V_SCALE_CONSTANT``
(100), kept for the engine's life.

:class:`Fp8Cache` is a transformers ``DynamicCache`` that does exactly that to every update: the
stored and returned K/V are the dequantized values (fp32 holds ``fp8 * scale`` exactly, so
storing them is the same as storing the fp8 codes and descaling on read). Not simulated: on
Hopper FlashAttention 3 also quantizes the query with ``q_scale`` and the softmax probabilities
to fp8 inside the kernel; that acts on fp8 alone and fp8 + polykv alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

#: ``--kv-cache-dtype`` names vLLM accepts for fp8 caches → (torch dtype, largest finite value).
FP8_CACHE_DTYPES: dict[str, tuple[torch.dtype, float]] = {
    "fp8": (torch.float8_e4m3fn, 448.0),
    "fp8_e4m3": (torch.float8_e4m3fn, 448.0),
    "fp8_e5m2": (torch.float8_e5m2, 57344.0),
}
SCALE_MODES = ("unit", "calculated")
#: vLLM's defaults of the ``K_SCALE_CONSTANT`` / ``V_SCALE_CONSTANT`` environment variables.
K_SCALE_CONSTANT = 200.0
V_SCALE_CONSTANT = 100.0


def quantize_fp8(x: torch.Tensor, scale: float, cache_dtype: str) -> torch.Tensor:
    """``x`` (any float dtype, any shape) → fp8 codes of the same shape: ``sat(x / scale)``.

    The division is done in fp32, as vLLM's kernel does; saturation to the largest finite
    value is explicit because torch's cast turns out-of-range values into NaN (e4m3fn) or inf.
    """
    dtype, fmax = _fp8(cache_dtype)
    return (x.float() / scale).clamp(-fmax, fmax).to(dtype)


def dequantize_fp8(q: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """fp8 codes ``q`` → ``q * scale`` (computed in fp32) in ``dtype``."""
    return (q.float() * scale).to(dtype)


def fp8_roundtrip(x: torch.Tensor, scale: float, cache_dtype: str) -> torch.Tensor:
    """What attention reads back after ``x`` was written into the fp8 cache; ``x``'s dtype."""
    return dequantize_fp8(quantize_fp8(x, scale, cache_dtype), scale, x.dtype)


def _fp8(cache_dtype: str) -> tuple[torch.dtype, float]:
    if cache_dtype not in FP8_CACHE_DTYPES:
        raise ValueError(
            f"cache_dtype={cache_dtype!r} is not an fp8 KV-cache dtype; allowed: "
            f"{sorted(FP8_CACHE_DTYPES)} (vLLM's --kv-cache-dtype names)"
        )
    return FP8_CACHE_DTYPES[cache_dtype]


@dataclass(frozen=True)
class Fp8Spec:
    """One fp8 working-cache configuration.

    ``scales``: ``"unit"`` (vLLM's default, k_scale = v_scale = 1.0) or ``"calculated"``
    (vLLM's ``calculate_kv_scales``: per layer, on its first update, amax / constant).
    """

    cache_dtype: str = "fp8"
    scales: str = "unit"
    k_scale_constant: float = K_SCALE_CONSTANT
    v_scale_constant: float = V_SCALE_CONSTANT

    def __post_init__(self) -> None:
        _fp8(self.cache_dtype)
        if self.scales not in SCALE_MODES:
            raise ValueError(
                f"scales={self.scales!r} is not a scale mode; allowed: {list(SCALE_MODES)} "
                "(unit: vLLM's default 1.0; calculated: calculate_kv_scales)"
            )
        for name in ("k_scale_constant", "v_scale_constant"):
            value = getattr(self, name)
            if not (value > 0 and value < float("inf")):
                raise ValueError(f"{name}={value!r} must be a finite positive number")


@dataclass
class LayerScales:
    """The per-layer ``(k_scale, v_scale)`` of one engine (one window here), shared by every
    cache built for it: calibrated once (on the document's prefill) and then fixed, so K/V
    written back later (a decoded polykv entry, the continuation) use the same scales."""

    spec: Fp8Spec
    scales: dict[int, tuple[float, float]] = field(default_factory=dict)

    def get(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[float, float]:
        """The scales of ``layer``; with ``"calculated"``, set from ``key``/``value`` on the
        layer's first call (``key``, ``value``: the K/V being written, any shape)."""
        if layer not in self.scales:
            if self.spec.scales == "unit":
                self.scales[layer] = (1.0, 1.0)
            else:
                self.scales[layer] = (
                    float(key.abs().max()) / self.spec.k_scale_constant,
                    float(value.abs().max()) / self.spec.v_scale_constant,
                )
            k_scale, v_scale = self.scales[layer]
            if not (0 < k_scale < float("inf") and 0 < v_scale < float("inf")):
                raise ValueError(
                    f"layer {layer}: fp8 scales k={k_scale!r}, v={v_scale!r} are not finite "
                    "positive (all-zero K/V with --kv-scales calculated?); use --kv-scales unit"
                )
        return self.scales[layer]


class Fp8Cache(DynamicCache):
    """A ``DynamicCache`` whose every write goes through fp8 with ``scales`` (see module doc).

    ``update`` takes ``[1, H, T, D]`` K/V in the model's dtype, stores and returns the
    dequantized values in that dtype.
    """

    def __init__(self, scales: LayerScales) -> None:
        super().__init__()
        self.fp8_scales = scales

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_scale, v_scale = self.fp8_scales.get(layer_idx, key_states, value_states)
        fmt = self.fp8_scales.spec.cache_dtype
        return super().update(
            fp8_roundtrip(key_states, k_scale, fmt),
            fp8_roundtrip(value_states, v_scale, fmt),
            layer_idx,
            *args,
            **kwargs,
        )


def cache_factory(scales: LayerScales | None) -> Callable[[], DynamicCache]:
    """New empty caches: plain ``DynamicCache`` (``None``: the model's dtype) or fp8."""
    if scales is None:
        return DynamicCache
    return lambda: Fp8Cache(scales)


def fp8_nbytes(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], cache_dtype: str) -> int:
    """Bytes the fp8 working cache holds for ``kv``, from the quantized tensors (scale 1)."""
    return sum(
        quantize_fp8(k, 1.0, cache_dtype).nbytes + quantize_fp8(v, 1.0, cache_dtype).nbytes
        for k, v in kv
    )
