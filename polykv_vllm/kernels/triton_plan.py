"""Launch plans of the Triton kernels: validation, address tables, launch shapes and the grid.

:func:`plan_decompress_layers` / :func:`plan_compress_layers` check their arguments once and
return a :class:`PagedPlan`: one :class:`Launch` per stream (keys, values) of every group of
layers that share a spec, a token count and cache strides (:func:`_group_layers`). Each launch
reads its layers' tensors through int64 address tables; when every address is 16-byte aligned
the kernels assert it (``tl.multiple_of``), which is what lets Triton emit 16-byte accesses
(4.5x on the key stream, H100). A plan only enqueues kernels, so it can be captured in a CUDA
graph (``benchmarks/kernel_bench.py`` times plans that way and sweeps :class:`KernelConfig`).

The launcher owns the grid: persistent programs, ``programs_per_sm`` per multiprocessor, at most
4 programs under Triton's CPU interpreter. Sizes are runtime kernel arguments (one compile per
model and setting, whatever the document length), so a warm-up at start-up covers every call.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from polykv_vllm.core import LayerSpec, PackedKV
from polykv_vllm.kernels.fp8 import is_fp8
from polykv_vllm.kernels.layout import (
    check_block_ids,
    check_cache_pair,
    check_out,
    check_packed,
    check_scales,
)
from polykv_vllm.kernels.triton_decode import decode_kernel
from polykv_vllm.kernels.triton_encode import encode_kernel
from polykv_vllm.kernels.triton_tables import pow2, spec_key, stream_tables

__all__ = [
    "DEFAULT_DECODE_CONFIG",
    "DEFAULT_ENCODE_CONFIG",
    "KernelConfig",
    "Launch",
    "PagedPlan",
    "plan_compress_layers",
    "plan_decompress_layers",
]

logger = logging.getLogger(__name__)

_TL_DTYPES = {
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float32: tl.float32,
    torch.float8_e4m3fn: tl.float8e4nv,
    torch.float8_e5m2: tl.float8e5,
}


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape of the paged kernels.

    - ``rows``: (token, head) rows per tile; a power of two >= 16 (``tl.dot`` needs M >= 16).
    - ``num_warps``: warps per program.
    - ``programs_per_sm``: persistent programs per multiprocessor (the grid is
      ``min(tiles, programs_per_sm * SMs)``); 0 launches one program per tile.
    - ``num_stages``: Triton's software-pipelining depth of the tile loop.

    Defaults tuned on an NVIDIA H100 80GB HBM3 (``benchmarks/kernel_bench.py``, see
    ``benchmarks/KERNELS.md``): Llama-3-8B shape, 4096 tokens, block size 16.
    """

    rows: int = 64
    num_warps: int = 4
    programs_per_sm: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        if self.rows < 16 or self.rows & (self.rows - 1):
            raise ValueError(
                f"KernelConfig.rows={self.rows} is not allowed: use a power of two >= 16."
            )
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(
                f"KernelConfig.num_warps={self.num_warps} is not allowed: use 1, 2, 4, 8 or 16."
            )
        if self.num_stages < 1:
            raise ValueError(f"KernelConfig.num_stages={self.num_stages} is not allowed: use >= 1.")
        if self.programs_per_sm < 0:
            raise ValueError(
                f"KernelConfig.programs_per_sm={self.programs_per_sm} is not allowed: use >= 0 "
                "(0 = one program per tile)."
            )


# Tuned on an NVIDIA H100 80GB HBM3 (Triton 3.6, torch 2.11), Llama-3-8B shape, 4096 tokens,
# block size 16 (benchmarks/KERNELS.md). Decode: 64 rows x 4 warps is the smallest tile that
# keeps the value matmul on wgmma (M = 64 per warpgroup); every other shape tried (32..128 rows,
# 4/8 warps, 2-8 programs per SM, 1-3 stages, one program per tile) was slower or within 2%.
# Encode: 32 rows x 8 warps, 8 programs per SM measured 0.91 ms vs 1.17 ms for 64 x 4 x 4.
# Two variants measured there are left to the benchmark, not the library: keys on a side stream
# alongside the values (v5: 0.544 vs 0.555 ms, ~2%) and a per-column unpack of the codes (v6:
# slower).
DEFAULT_DECODE_CONFIG = KernelConfig(rows=64, num_warps=4, programs_per_sm=4)
DEFAULT_ENCODE_CONFIG = KernelConfig(rows=32, num_warps=8, programs_per_sm=8)


def _grid(total_tiles: int, device: torch.device, config: KernelConfig) -> int:
    if device.type != "cuda":
        return max(1, min(total_tiles, 4))
    if config.programs_per_sm == 0:
        return max(1, total_tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(total_tiles, sms * config.programs_per_sm))


def _kernel(fn: object, device: torch.device) -> Any:
    """The kernel to launch on ``device``: compiled on a GPU, Triton's interpreter on the CPU."""
    if device.type == "cuda":
        return fn
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(fn, InterpretedFunction):
        raise ValueError(
            f"the triton backend got {device.type} tensors: Triton runs on CUDA, or on the CPU "
            "only under its interpreter, which must be enabled before triton is imported "
            "(TRITON_INTERPRET=1). Use backend='torch' or 'auto' for CPU tensors."
        )
    return fn


def _group_layers(
    specs: Sequence[LayerSpec],
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    tokens: Sequence[int],
) -> list[list[int]]:
    """Layer indices grouped so that one launch covers layers with one spec, one token count
    and identical cache shapes, strides and dtypes."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, (spec, kc, vc, n) in enumerate(
        zip(specs, key_caches, value_caches, tokens, strict=True)
    ):
        key = (spec_key(spec), n, kc.dtype, kc.shape, kc.stride(), vc.stride())
        groups.setdefault(key, []).append(i)
    return list(groups.values())


@dataclass(frozen=True)
class Launch:
    """One kernel launch over fixed tensors: ``stream`` (``"k"`` / ``"v"``) of a group of layers."""

    kernel: Any
    grid: tuple[int]
    args: tuple[Any, ...]
    meta: dict[str, Any]
    stream: str

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)


@dataclass(frozen=True)
class PagedPlan:
    """Validated, ready-to-enqueue launches over fixed tensors.

    Calling the plan enqueues its kernels on the current stream and does nothing else, so it
    can be captured in a CUDA graph. It keeps every tensor it reads or writes alive.
    """

    launches: tuple[Launch, ...]
    keepalive: tuple[torch.Tensor, ...]

    def __call__(self) -> None:
        for launch in self.launches:
            launch()


def _check_layers(
    n: int,
    specs: Sequence[LayerSpec],
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    tokens: Sequence[int],
    k_scales: Sequence[float],
    v_scales: Sequence[float],
) -> None:
    lengths = [len(specs), len(key_caches), len(value_caches), len(k_scales), len(v_scales)]
    if len(tokens) != n or any(x != n for x in lengths):
        raise ValueError(
            f"per-layer sequences have lengths {[n, *lengths]}: pass one entry per layer in "
            "each (packed/specs, key_caches, value_caches, k_scales, v_scales)."
        )
    device = key_caches[0].device
    for s, kc, vc, t, ks, vs in zip(
        specs, key_caches, value_caches, tokens, k_scales, v_scales, strict=True
    ):
        _, block_size, _ = check_cache_pair(kc, vc, s)
        check_block_ids(block_ids, t, block_size)
        check_scales(kc.dtype, ks, vs)
        if kc.device != device:
            raise ValueError(
                f"all caches must be on one device ({device}); got a cache on {kc.device}."
            )


def stream_constants(
    spec: LayerSpec,
    stream: str,
    cache_dtype: torch.dtype,
    device: torch.device,
    encode: bool,
    dummy: torch.Tensor,
) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """What a launch of ``stream`` (``"k"`` / ``"v"``) of ``spec`` over caches of
    ``cache_dtype`` reads that does not change between calls: the codec's tables (``dummy``
    where the int8 branch reads none) and the compile-time constants."""
    st = spec.stream("k" if stream == "k" else "v")
    if st.rotated:
        tb = stream_tables(spec, stream, device)
        lut: tuple[torch.Tensor, ...] = (
            (tb.signs, tb.enc_colscale, tb.boundaries, tb.hadamard)
            if encode
            else (tb.centroids, tb.dec_colscale, tb.hadamard)
        )
    else:
        lut = (dummy,) * (4 if encode else 3)
    dtype = _TL_DTYPES[cache_dtype]
    fp8 = is_fp8(cache_dtype)
    consts: dict[str, Any] = {
        "INT8": not st.rotated,
        "FP8": fp8,
        "BITS": st.bits,
        "DP": pow2(spec.head_dim),
    }
    if encode:
        consts["IN_DTYPE"] = dtype
    else:
        # e4m3: max 448, smallest normal 2**-6, 3 mantissa bits; e5m2: 57344, 2**-14, 2
        e5m2 = cache_dtype == torch.float8_e5m2
        consts["FP8_MAX"] = torch.finfo(cache_dtype).max if fp8 else 0.0
        consts["FP8_EMIN"] = -14 if e5m2 else -6
        consts["FP8_MBITS"] = 2 if e5m2 else 3
        consts["NORM_CORR"] = spec.norm_correction
        consts["OUT_DTYPE"] = dtype
    return lut, consts


def _stream_launch(
    kernel: Any,
    stream: str,
    spec: LayerSpec,
    tables_in: Sequence[Sequence[torch.Tensor]],
    caches: Sequence[torch.Tensor],
    codes: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    tokens: int,
    config: KernelConfig,
    encode: bool,
    cache_scales: Sequence[float],
) -> tuple[Launch, torch.Tensor, torch.Tensor]:
    device = caches[0].device
    _, block_size, kv_heads, d = caches[0].shape
    addr = [[t.data_ptr() for t in group] for group in tables_in]
    # Pointers read from a table carry no alignment facts; when every one is 16-byte aligned the
    # kernel says so (tl.multiple_of), which lets Triton emit 16-byte loads and stores.
    aligned = all(a % 16 == 0 for group in addr for a in group)
    table = torch.tensor(addr, dtype=torch.int64)
    if device.type == "cuda":
        table = table.to(device, non_blocking=True)
    num_rows = tokens * kv_heads
    tiles = triton.cdiv(num_rows, config.rows)
    total = tiles * len(caches)
    s_b, s_n, s_h, s_d = caches[0].stride()
    lut, consts = stream_constants(spec, stream, caches[0].dtype, device, encode, codes[0])
    cscale = torch.tensor(list(cache_scales), dtype=torch.float32)
    if device.type == "cuda":
        cscale = cscale.to(device, non_blocking=True)
    meta: dict[str, Any] = {
        **consts,
        "ALIGNED": aligned,
        "ROWS": config.rows,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }
    args = (
        table[0],
        table[1],
        table[2],
        block_ids,
        *lut,
        cscale,
        num_rows,
        tiles,
        total,
        kv_heads,
        d,
        block_size,
        codes[0].shape[-1],
        s_b,
        s_n,
        s_h,
        s_d,
    )
    grid = (_grid(total, device, config),)
    return Launch(_kernel(kernel, device), grid, args, meta, stream), table, cscale


def plan_decompress_layers(
    packed: Sequence[PackedKV],
    specs: Sequence[LayerSpec],
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    *,
    config: KernelConfig = DEFAULT_DECODE_CONFIG,
    k_scales: Sequence[float] | None = None,
    v_scales: Sequence[float] | None = None,
) -> PagedPlan:
    """Validate and prepare :func:`.paged_triton.decompress_layers_into_paged`; call the result
    to run it. Two launches (keys, values) per group of layers sharing a spec and cache strides,
    each of launch shape ``config``; ``k_scales`` / ``v_scales``: one fp8 scale per layer (None:
    1.0 each)."""
    n = len(packed)
    if n == 0:
        return PagedPlan((), ())
    ks, vs = _scales(n, k_scales), _scales(n, v_scales)
    _check_layers(n, specs, key_caches, value_caches, block_ids, [p.tokens for p in packed], ks, vs)
    device = key_caches[0].device
    for p, s, kc in zip(packed, specs, key_caches, strict=True):
        check_packed(p, s, kc.shape[2])
        if p.device != device:
            raise ValueError(
                f"packed tensors are on {p.device} but the caches on {device}: move the "
                "document with PackedKV.to(device) first."
            )
    block_ids = block_ids.to(device)
    launches: list[Launch] = []
    keep: list[torch.Tensor] = [block_ids]
    for layers in _group_layers(specs, key_caches, value_caches, [p.tokens for p in packed]):
        tokens = packed[layers[0]].tokens
        if tokens == 0:
            continue
        for stream, caches in (("k", key_caches), ("v", value_caches)):
            if stream == "k":
                codes = [packed[i].k_codes.contiguous() for i in layers]
                scales = [packed[i].k_scale.contiguous() for i in layers]
            else:
                codes = [packed[i].v_codes.contiguous() for i in layers]
                scales = [packed[i].v_norm.contiguous() for i in layers]
            group_caches = [caches[i] for i in layers]
            launch, table, cscale = _stream_launch(
                decode_kernel,
                stream,
                specs[layers[0]],
                [codes, scales, group_caches],
                group_caches,
                codes,
                block_ids,
                tokens,
                config,
                encode=False,
                cache_scales=[(ks if stream == "k" else vs)[i] for i in layers],
            )
            launches.append(launch)
            keep += [table, cscale, *codes, *scales, *group_caches]
    logger.debug("decode plan: %d layers, %d launches", n, len(launches))
    return PagedPlan(tuple(launches), tuple(keep))


def _scales(n: int, scales: Sequence[float] | None) -> Sequence[float]:
    return [1.0] * n if scales is None else scales


def plan_compress_layers(
    specs: Sequence[LayerSpec],
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    num_tokens: int,
    out: Sequence[PackedKV] | None = None,
    *,
    config: KernelConfig = DEFAULT_ENCODE_CONFIG,
    k_scales: Sequence[float] | None = None,
    v_scales: Sequence[float] | None = None,
) -> tuple[PagedPlan, list[PackedKV]]:
    """Validate and prepare :func:`.paged_triton.compress_layers_from_paged`: ``(plan,
    outputs)``; the outputs (``out``, or new ones from each layer's
    :meth:`~polykv_vllm.core.LayerSpec.empty`) hold the result once the plan has run."""
    n = len(specs)
    if n == 0:
        return PagedPlan((), ()), []
    ks, vs = _scales(n, k_scales), _scales(n, v_scales)
    _check_layers(n, specs, key_caches, value_caches, block_ids, [num_tokens] * n, ks, vs)
    device = key_caches[0].device
    results = [
        s.empty(num_tokens, kc.shape[2], device) for s, kc in zip(specs, key_caches, strict=True)
    ]
    if out is not None:
        if len(out) != n:
            raise ValueError(f"out holds {len(out)} PackedKV but there are {n} layers.")
        for o, r in zip(out, results, strict=True):
            check_out(o, r)
        results = list(out)
    if num_tokens == 0:
        return PagedPlan((), ()), results
    block_ids = block_ids.to(device)
    launches: list[Launch] = []
    keep: list[torch.Tensor] = [block_ids]
    for layers in _group_layers(specs, key_caches, value_caches, [num_tokens] * n):
        for stream, caches in (("k", key_caches), ("v", value_caches)):
            group_caches = [caches[i] for i in layers]
            codes = [results[i].k_codes if stream == "k" else results[i].v_codes for i in layers]
            scales = [results[i].k_scale if stream == "k" else results[i].v_norm for i in layers]
            launch, table, cscale = _stream_launch(
                encode_kernel,
                stream,
                specs[layers[0]],
                [group_caches, codes, scales],
                group_caches,
                codes,
                block_ids,
                num_tokens,
                config,
                encode=True,
                cache_scales=[(ks if stream == "k" else vs)[i] for i in layers],
            )
            launches.append(launch)
            keep += [table, cscale, *codes, *scales, *group_caches]
    return PagedPlan(tuple(launches), tuple(keep)), results
