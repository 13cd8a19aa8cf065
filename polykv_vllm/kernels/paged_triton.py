"""Triton kernels: decode a stored document straight into vLLM's paged cache, and the inverse.

Same signatures and semantics as :mod:`.paged_ref` (the torch reference); the tables come from
the codec's :class:`~polykv_vllm.core.LayerSpec` (the ±1 Hadamard matrix is obtained by applying
the codec's own ``fwht`` to the identity), so kernel and codec cannot drift apart.

One launch handles one *stream* (keys or values) of every layer that shares a spec, a token
count and cache strides: the per-layer tensors are reached through int64 address tables, and a
persistent grid walks ``(layer, row tile)`` pairs. A row is one (token, kv head) pair; the stored
tensors are ``[T, H, ...]`` contiguous, so row ``r = t * H + h``.

Decode of a rotated stream, per row tile ``[ROWS, DP]`` (``DP`` = head dim rounded up to a power
of two): unpack ``b``-bit codes (8 codes = ``b`` bytes) -> centroid lookup (a chain of
selects on the ``2**b`` fp16 centroids) -> one
``[ROWS, DP] x [DP, DP]`` fp16 matmul with the ±1 block-diagonal Hadamard matrix on the tensor
cores (fp32 accumulate; the ±1 entries are exact, the only extra rounding is the centroid's fp16
rounding, ~2^-12 relative) -> x (sign / sqrt(m * D)) per column -> x norm per row -> store in the
cache dtype at ``block_ids[t // block_size]``, slot ``t % block_size``. Keys in int8 mode:
``code * scale``.

Encode mirrors it; the rotation uses a hi/lo fp16 split of the unit vector (two matmuls), which
keeps ~22 significant bits, so the codes match the reference except where a rotated coordinate
lies within ~1e-6 of a Lloyd-Max decision boundary. Division and square root use the IEEE
round-to-nearest forms (``div_rn``, ``sqrt_rn``) like torch, and int8 rounding is half-to-even
like ``torch.round``, so int8 key codes and scales are bit-exact.

Pointers read from the address tables carry no alignment facts; when all are 16-byte aligned the
kernels assert it (``tl.multiple_of``), which is what lets Triton emit 16-byte accesses (4.5x on
the key stream, H100).

Bytes moved per (token, head), D = 128, K8/V3, bf16 cache: decode reads 128 + 2 (keys) + 48 + 2
(values) = 180 B and writes 2 * 128 * 2 = 512 B; encode the reverse. Measured on an H100
(``benchmarks/KERNELS.md``): a 4096-token Llama-3-8B document (189 MB read, 537 MB written)
decodes in 0.54-0.56 ms (45% of the copy roofline; keys at 86%, values at 27%) and encodes in
0.92 ms.

fp8 caches (``float8_e4m3fn`` / ``float8_e5m2`` views, :mod:`.fp8`) are addressed as bytes and
bitcast: encode reads ``x8.to(fp32) * scale``, decode stores ``fp8(clamp(x / scale))`` rounded to
nearest even, with one fp32 scale per layer read from a table (``FP8`` is a compile-time switch,
so the float-cache kernels are unchanged).

On CPU tensors the kernels run in Triton's interpreter (slow; for tests only), which must be
enabled with ``TRITON_INTERPRET=1`` before triton is first imported.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from polykv_vllm.core import LayerSpec, PackedKV, lloyd_max
from polykv_vllm.core.hadamard import fwht
from polykv_vllm.kernels.fp8 import is_fp8
from polykv_vllm.kernels.layout import (
    check_block_ids,
    check_cache_pair,
    check_out,
    check_packed,
    check_scales,
)

__all__ = [
    "KernelConfig",
    "PagedPlan",
    "compress_from_paged",
    "compress_layers_from_paged",
    "decompress_into_paged",
    "decompress_layers_into_paged",
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
    - ``direct_unpack`` (decode): read each code's two bytes per column instead of assembling
      one word per 8-code group and reshaping.

    Defaults tuned on an NVIDIA H100 80GB HBM3 (``benchmarks/kernel_bench.py``, see
    ``benchmarks/KERNELS.md``): Llama-3-8B shape, 4096 tokens, block size 16.
    """

    rows: int = 64
    num_warps: int = 4
    programs_per_sm: int = 4
    num_stages: int = 3
    direct_unpack: bool = False

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
DEFAULT_DECODE_CONFIG = KernelConfig(rows=64, num_warps=4, programs_per_sm=4)
DEFAULT_ENCODE_CONFIG = KernelConfig(rows=32, num_warps=8, programs_per_sm=8)


@triton.jit
def _round_to_fp8_grid(x, EMIN: tl.constexpr, MBITS: tl.constexpr):
    """fp32 ``x`` (finite, within the fp8 range) rounded half-to-even onto the fp8 grid (an
    fp8 format with ``MBITS`` mantissa bits and smallest normal exponent ``EMIN``), as fp32.

    Done by hand so that the cast to fp8 afterwards is exact: Triton's interpreter rounds
    fp32 -> fp8 without carrying a rounded-up mantissa into the exponent (31.6 -> 16 in e4m3,
    Triton 3.9), and an exact cast is the same on every backend. The step between grid points is
    ``2**(max(exponent(x), EMIN) - MBITS)``; scaling by it and by its inverse (both powers of
    two, built from their bits) is exact, unlike Triton's approximate fp32 division."""
    bits = x.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN) - MBITS
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)
    y = x * ((127 - e) << 23).to(tl.float32, bitcast=True)
    f = tl.floor(y + 0.5)
    f = tl.where((f - y == 0.5) & ((f.to(tl.int32) & 1) == 1), f - 1.0, f)
    r = tl.abs(f * step)
    return tl.where(x < 0, -r, r)


# Sizes are runtime values (no specialisation on them): one compile per model and setting,
# whatever the document length, so a warm-up at start-up covers every later call.
@triton.jit(do_not_specialize=["num_rows", "tiles_per_layer", "total_tiles"])
def _decode_kernel(
    codes_tab,  # int64 [L]: address of each layer's codes (int8 [T,H,D] or uint8 [T,H,row_bytes])
    scale_tab,  # int64 [L]: address of each layer's fp16 [T,H] scale (int8) or norm (rotated)
    cache_tab,  # int64 [L]: address of each layer's cache view [num_blocks, block_size, H, D]
    block_ids_ptr,  # int [ceil(T / block_size)]
    cent_ptr,  # fp32 [2**BITS] centroids (rotated)
    colscale_ptr,  # fp32 [DP]: sign / sqrt(m * D), 0 beyond D (rotated)
    had_ptr,  # fp16 [DP, DP]: ±1 block-diagonal Hadamard, 0 outside D x D (rotated)
    cscale_ptr,  # fp32 [L]: each layer's fp8 cache scale (FP8)
    num_rows,
    tiles_per_layer,
    total_tiles,
    kv_heads,
    head_dim,
    block_size,
    row_bytes,
    s_b,
    s_n,
    s_h,
    s_d,
    INT8: tl.constexpr,
    BITS: tl.constexpr,
    ALIGNED: tl.constexpr,
    NORM_CORR: tl.constexpr,
    DIRECT_UNPACK: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    FP8_EMIN: tl.constexpr,
    FP8_MBITS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    ROWS: tl.constexpr,
    DP: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, DP)
    cmask = cols < head_dim
    G: tl.constexpr = DP // 8
    g = tl.arange(0, G)
    k8 = tl.arange(0, 8)
    if not INT8:
        had = tl.load(had_ptr + cols[:, None] * DP + cols[None, :])
        colscale = tl.load(colscale_ptr + cols)
    for tile in range(pid, total_tiles, nprog):
        layer = tile // tiles_per_layer
        rows = (tile - layer * tiles_per_layer) * ROWS + tl.arange(0, ROWS)
        rmask = rows < num_rows
        omask = rmask[:, None] & cmask[None, :]
        # Destination slot of each row: block_ids[t // block_size], slot t % block_size.
        t = rows // kv_heads
        h = rows - t * kv_heads
        bidx = t // block_size
        blk = tl.load(block_ids_ptr + bidx, mask=rmask, other=0).to(tl.int64)
        dst_row = blk * s_b + (t - bidx * block_size) * s_n + h * s_h
        scale = tl.load(scale_tab + layer).to(tl.pointer_type(tl.float16))
        if ALIGNED:
            scale = tl.multiple_of(scale, 16)
        n = tl.load(scale + rows, mask=rmask, other=0.0).to(tl.float32)
        if INT8:
            codes = tl.load(codes_tab + layer).to(tl.pointer_type(tl.int8))
            if ALIGNED:
                codes = tl.multiple_of(codes, 16)
            q = tl.load(codes + rows[:, None] * head_dim + cols[None, :], mask=omask, other=0)
            out = q.to(tl.float32) * n[:, None]
        else:
            codes = tl.load(codes_tab + layer).to(tl.pointer_type(tl.uint8))
            if ALIGNED:
                codes = tl.multiple_of(codes, 16)
            if DIRECT_UNPACK:
                # Each column reads the (at most) two bytes holding its code straight into the
                # [ROWS, DP] layout: no 3-D reshape (a shared-memory round trip) per tile.
                bit = cols * BITS
                lo_b = bit // 8
                bp = codes + rows[:, None] * row_bytes + lo_b[None, :]
                b0 = tl.load(bp, mask=omask, other=0).to(tl.int32)
                m1 = omask & ((lo_b + 1) < row_bytes)[None, :]
                b1 = tl.load(bp + 1, mask=m1, other=0).to(tl.int32)
                c = ((b0 | (b1 << 8)) >> (bit % 8)[None, :]) & ((1 << BITS) - 1)
            else:
                # 8 codes of BITS bits = BITS bytes, little-endian: one word per group.
                gmask = rmask[:, None] & (g[None, :] * 8 < head_dim)
                gp = codes + rows[:, None] * row_bytes + g[None, :] * BITS
                w = tl.zeros((ROWS, G), dtype=tl.int32)
                for i in tl.static_range(BITS):
                    byte = tl.load(gp + i, mask=gmask, other=0).to(tl.int32)
                    w = w | (byte << (8 * i))
                c = (w[:, :, None] >> (k8[None, None, :] * BITS)) & ((1 << BITS) - 1)
                c = tl.reshape(c, (ROWS, DP))
            # Centroid lookup as a chain of selects on 2**BITS fp16 scalars (the matmul takes
            # fp16 anyway). A gather from global memory here became 4-byte cp.async copies
            # through shared memory and made this kernel ~9x slower than the key kernel (H100,
            # Triton 3.6; see benchmarks/KERNELS.md).
            a = tl.zeros((ROWS, DP), dtype=tl.float16) + tl.load(cent_ptr).to(tl.float16)
            for k in tl.static_range(1, 1 << BITS):
                a = tl.where(c == k, tl.load(cent_ptr + k).to(tl.float16), a)
            a = tl.where(cmask[None, :], a, 0.0)
            if NORM_CORR:
                # ||R^T y|| == ||y|| with y = centroid / sqrt(D): correct before rotating back.
                af = a.to(tl.float32)
                length = tl.sqrt_rn(tl.sum(af * af, axis=1) / head_dim)
                n = n / tl.where(length > 0, length, 1.0)
            y = tl.dot(a.to(tl.float16), had)
            out = y * colscale[None, :] * n[:, None]
        if FP8:
            # fp8(clamp(x / scale)), round to nearest even; written as its bytes
            cs = tl.load(cscale_ptr + layer)
            q8 = tl.minimum(tl.maximum(tl.div_rn(out, cs), -FP8_MAX), FP8_MAX)
            q8 = _round_to_fp8_grid(q8, FP8_EMIN, FP8_MBITS)
            byte = q8.to(OUT_DTYPE).to(tl.uint8, bitcast=True)
            cache8 = tl.load(cache_tab + layer).to(tl.pointer_type(tl.uint8))
            if ALIGNED:
                cache8 = tl.multiple_of(cache8, 16)
            tl.store(cache8 + dst_row[:, None] + cols[None, :] * s_d, byte, mask=omask)
        else:
            cache = tl.load(cache_tab + layer).to(tl.pointer_type(OUT_DTYPE))
            if ALIGNED:
                cache = tl.multiple_of(cache, 16)
            dst = cache + dst_row[:, None] + cols[None, :] * s_d
            tl.store(dst, out.to(OUT_DTYPE), mask=omask)


@triton.jit(do_not_specialize=["num_rows", "tiles_per_layer", "total_tiles"])
def _encode_kernel(
    cache_tab,  # int64 [L]: address of each layer's cache view [num_blocks, block_size, H, D]
    codes_tab,  # int64 [L]: output codes (int8 [T,H,D] or uint8 [T,H,row_bytes])
    scale_tab,  # int64 [L]: output fp16 [T,H] scale (int8) or norm (rotated)
    block_ids_ptr,
    sign_ptr,  # fp32 [DP]: ±1, 0 beyond D (rotated)
    colscale_ptr,  # fp32 [DP]: sqrt(D / m) (rotated)
    bnd_ptr,  # fp32 [2**BITS - 1] ascending decision boundaries (rotated)
    had_ptr,  # fp16 [DP, DP] ±1 block-diagonal Hadamard (rotated)
    cscale_ptr,  # fp32 [L]: each layer's fp8 cache scale (FP8)
    num_rows,
    tiles_per_layer,
    total_tiles,
    kv_heads,
    head_dim,
    block_size,
    row_bytes,
    s_b,
    s_n,
    s_h,
    s_d,
    INT8: tl.constexpr,
    BITS: tl.constexpr,
    ALIGNED: tl.constexpr,
    FP8: tl.constexpr,
    IN_DTYPE: tl.constexpr,
    ROWS: tl.constexpr,
    DP: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, DP)
    cmask = cols < head_dim
    G: tl.constexpr = DP // 8
    g = tl.arange(0, G)
    k8 = tl.arange(0, 8)
    if not INT8:
        had = tl.load(had_ptr + cols[:, None] * DP + cols[None, :])
        colscale = tl.load(colscale_ptr + cols)
        sign = tl.load(sign_ptr + cols)
    for tile in range(pid, total_tiles, nprog):
        layer = tile // tiles_per_layer
        rows = (tile - layer * tiles_per_layer) * ROWS + tl.arange(0, ROWS)
        rmask = rows < num_rows
        omask = rmask[:, None] & cmask[None, :]
        t = rows // kv_heads
        h = rows - t * kv_heads
        bidx = t // block_size
        blk = tl.load(block_ids_ptr + bidx, mask=rmask, other=0).to(tl.int64)
        src_row = blk * s_b + (t - bidx * block_size) * s_n + h * s_h
        if FP8:
            # fp8 bytes -> x8.to(fp32) * scale (one IEEE product, like the reference)
            cache8 = tl.load(cache_tab + layer).to(tl.pointer_type(tl.uint8))
            if ALIGNED:
                cache8 = tl.multiple_of(cache8, 16)
            b = tl.load(cache8 + src_row[:, None] + cols[None, :] * s_d, mask=omask, other=0)
            x = b.to(IN_DTYPE, bitcast=True).to(tl.float32) * tl.load(cscale_ptr + layer)
        else:
            cache = tl.load(cache_tab + layer).to(tl.pointer_type(IN_DTYPE))
            if ALIGNED:
                cache = tl.multiple_of(cache, 16)
            x = tl.load(cache + src_row[:, None] + cols[None, :] * s_d, mask=omask, other=0.0)
            x = x.to(tl.float32)
        scale = tl.load(scale_tab + layer).to(tl.pointer_type(tl.float16))
        if ALIGNED:
            scale = tl.multiple_of(scale, 16)
        if INT8:
            s16 = tl.div_rn(tl.max(tl.abs(x), axis=1), 127.0).to(tl.float16)
            s = s16.to(tl.float32)
            q = tl.div_rn(x, tl.where(s > 0, s, 1.0)[:, None])
            # round half to even, like torch.round
            f = tl.floor(q + 0.5)
            q = tl.where((f - q == 0.5) & ((f.to(tl.int32) & 1) == 1), f - 1.0, f)
            q = tl.minimum(tl.maximum(q, -127.0), 127.0)
            q = tl.where(s[:, None] > 0, q, 0.0)
            codes = tl.load(codes_tab + layer).to(tl.pointer_type(tl.int8))
            if ALIGNED:
                codes = tl.multiple_of(codes, 16)
            tl.store(codes + rows[:, None] * head_dim + cols[None, :], q.to(tl.int8), mask=omask)
            tl.store(scale + rows, s16, mask=rmask)
        else:
            norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
            u = tl.div_rn(x, tl.where(norm > 0, norm, 1.0)[:, None]) * sign[None, :]
            hi = u.to(tl.float16)
            lo = (u - hi.to(tl.float32)).to(tl.float16)
            z = (tl.dot(hi, had) + tl.dot(lo, had)) * colscale[None, :]
            # code = number of boundaries strictly below z (torch.bucketize, right=False)
            c = tl.zeros((ROWS, DP), dtype=tl.int32)
            for k in tl.static_range((1 << BITS) - 1):
                c += (z > tl.load(bnd_ptr + k)).to(tl.int32)
            c = tl.where(cmask[None, :], c, 0)
            c3 = tl.reshape(c, (ROWS, G, 8))
            w = tl.sum(c3 << (k8[None, None, :] * BITS), axis=2)
            gmask = rmask[:, None] & (g[None, :] * 8 < head_dim)
            codes = tl.load(codes_tab + layer).to(tl.pointer_type(tl.uint8))
            if ALIGNED:
                codes = tl.multiple_of(codes, 16)
            gp = codes + rows[:, None] * row_bytes + g[None, :] * BITS
            for i in tl.static_range(BITS):
                tl.store(gp + i, ((w >> (8 * i)) & 255).to(tl.uint8), mask=gmask)
            tl.store(scale + rows, norm.to(tl.float16), mask=rmask)


# --- tables -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StreamTables:
    """Device tables of one rotated stream (keys or values) of one spec."""

    centroids: torch.Tensor  # fp32 [2**bits]
    boundaries: torch.Tensor  # fp32 [2**bits - 1]
    signs: torch.Tensor  # fp32 [DP], 0 beyond D
    dec_colscale: torch.Tensor  # fp32 [DP]: sign / sqrt(m * D)
    enc_colscale: torch.Tensor  # fp32 [DP]: sqrt(D / m)
    hadamard: torch.Tensor  # fp16 [DP, DP]: ±1 block diagonal


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


_SPEC_KEYS: dict[int, tuple[LayerSpec, int]] = {}
_SPEC_IDS: dict[tuple[object, ...], int] = {}


def _spec_key(spec: LayerSpec) -> int:
    """A small integer naming everything in ``spec`` that the kernels read: equal tables give
    equal keys. Memoized per spec object (specs are frozen; the codec hands out one object per
    setting), so the per-call cost is one dict lookup."""
    hit = _SPEC_KEYS.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    key = _SPEC_IDS.setdefault(_compute_spec_key(spec), len(_SPEC_IDS))
    _SPEC_KEYS[id(spec)] = (spec, key)
    return key


def _compute_spec_key(spec: LayerSpec) -> tuple[object, ...]:

    def tab(t: torch.Tensor | None) -> tuple[float, ...] | None:
        return None if t is None else tuple(t.detach().cpu().double().tolist())

    return (
        spec.head_dim,
        spec.key_bits,
        spec.value_bits,
        spec.key_mode,
        tab(spec.key_centroids),
        tab(spec.key_signs),
        tab(spec.value_centroids),
        tab(spec.value_signs),
        spec.blocks,
        spec.norm_correction,
    )


@functools.cache
def _hadamard_pm1(blocks: tuple[int, ...]) -> torch.Tensor:
    """The codec's block-diagonal Hadamard as a ±1 matrix ``M`` (fp64 ``[D, D]``, exact), with
    ``fwht(x) == (x @ M.T) * (1/sqrt(m) per output column)``."""
    d = sum(blocks)
    basis = fwht(torch.eye(d, dtype=torch.float64))  # row i = fwht(e_i) = column i of H
    scale = torch.cat([torch.full((m,), math.sqrt(m), dtype=torch.float64) for m in blocks])
    pm1 = torch.round(basis * scale[:, None])
    if not torch.equal(pm1.abs(), (basis != 0).double()):
        raise AssertionError("fwht of the identity is not a scaled ±1 block-diagonal matrix")
    return pm1.T.contiguous()


_TABLES: dict[tuple[int, str, str], _StreamTables] = {}


def _stream_tables(spec: LayerSpec, stream: str, device: torch.device) -> _StreamTables:
    key = (_spec_key(spec), stream, str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    d = spec.head_dim
    dp = _pow2(d)
    st = spec.stream("k" if stream == "k" else "v")
    assert st.centroids is not None and st.signs is not None, "int8 streams have no tables"
    bits, cent, signs = st.bits, st.centroids, st.signs
    m = torch.cat([torch.full((b,), float(b), dtype=torch.float64) for b in spec.blocks])
    s = signs.to(torch.float64)
    pad = dp - d
    had = torch.zeros(dp, dp, dtype=torch.float64)
    had[:d, :d] = _hadamard_pm1(tuple(spec.blocks))
    tables = _StreamTables(
        centroids=cent.to(torch.float32).to(device),
        boundaries=lloyd_max.boundaries(bits).to(torch.float32).to(device),
        signs=torch.nn.functional.pad(s, (0, pad)).to(torch.float32).to(device),
        dec_colscale=torch.nn.functional.pad(s / torch.sqrt(m * d), (0, pad))
        .to(torch.float32)
        .to(device),
        enc_colscale=torch.nn.functional.pad(torch.sqrt(d / m), (0, pad))
        .to(torch.float32)
        .to(device),
        hadamard=had.to(torch.float16).to(device),
    )
    _TABLES[key] = tables
    return tables


# --- launchers --------------------------------------------------------------------------------


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
        key = (_spec_key(spec), n, kc.dtype, kc.shape, kc.stride(), vc.stride())
        groups.setdefault(key, []).append(i)
    return list(groups.values())


@dataclass(frozen=True)
class _Launch:
    kernel: Any
    grid: tuple[int]
    args: tuple[Any, ...]
    meta: dict[str, Any]


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


@dataclass(frozen=True)
class PagedPlan:
    """Validated, ready-to-enqueue launches over fixed tensors.

    Calling the plan enqueues its kernels and does nothing else, so it can be captured in a CUDA
    graph. ``side`` launches (if any) run on a side stream concurrently with ``launches``; the
    current stream waits for them before the call returns (the usual fork/join, which graph
    capture records as such). It keeps every tensor it reads or writes alive.
    """

    launches: tuple[_Launch, ...]
    keepalive: tuple[torch.Tensor, ...]
    side: tuple[_Launch, ...] = ()

    def __call__(self) -> None:
        if self.side:
            main = torch.cuda.current_stream()
            side = _SIDE_STREAMS.setdefault(main.device, torch.cuda.Stream(main.device))
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for launch in self.side:
                    launch.kernel[launch.grid](*launch.args, **launch.meta)
        for launch in self.launches:
            launch.kernel[launch.grid](*launch.args, **launch.meta)
        if self.side:
            main.wait_stream(side)


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
) -> tuple[_Launch, torch.Tensor, torch.Tensor]:
    device = caches[0].device
    _, block_size, kv_heads, d = caches[0].shape
    st = spec.stream("k" if stream == "k" else "v")
    int8, bits = not st.rotated, st.bits
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
    if int8:
        dummy = codes[0]  # unused by the int8 branch
        lut: tuple[torch.Tensor, ...] = (dummy,) * (4 if encode else 3)
    else:
        tb = _stream_tables(spec, stream, device)
        lut = (
            (tb.signs, tb.enc_colscale, tb.boundaries, tb.hadamard)
            if encode
            else (tb.centroids, tb.dec_colscale, tb.hadamard)
        )
    dtype = _TL_DTYPES[caches[0].dtype]
    fp8 = is_fp8(caches[0].dtype)
    cscale = torch.tensor(list(cache_scales), dtype=torch.float32)
    if device.type == "cuda":
        cscale = cscale.to(device, non_blocking=True)
    meta: dict[str, Any] = {
        "INT8": int8,
        "FP8": fp8,
        "BITS": bits,
        "ALIGNED": aligned,
        "ROWS": config.rows,
        "DP": _pow2(d),
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }
    if encode:
        meta["IN_DTYPE"] = dtype
    else:
        # e4m3: max 448, smallest normal 2**-6, 3 mantissa bits; e5m2: 57344, 2**-14, 2
        e5m2 = caches[0].dtype == torch.float8_e5m2
        meta["FP8_MAX"] = torch.finfo(caches[0].dtype).max if fp8 else 0.0
        meta["FP8_EMIN"] = -14 if e5m2 else -6
        meta["FP8_MBITS"] = 2 if e5m2 else 3
        meta["NORM_CORR"] = spec.norm_correction
        meta["DIRECT_UNPACK"] = config.direct_unpack
        meta["OUT_DTYPE"] = dtype
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
    return _Launch(_kernel(kernel, device), grid, args, meta), table, cscale


def plan_decompress_layers(
    packed: Sequence[PackedKV],
    specs: Sequence[LayerSpec],
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    *,
    config: KernelConfig = DEFAULT_DECODE_CONFIG,
    value_config: KernelConfig | None = None,
    concurrent: bool = False,
    k_scales: Sequence[float] | None = None,
    v_scales: Sequence[float] | None = None,
) -> PagedPlan:
    """Validate and prepare :func:`decompress_layers_into_paged`; call the result to run it.

    ``value_config`` (default: ``config``) is the launch shape of the value kernels. With
    ``concurrent`` (CUDA only), the key kernels run on a side stream alongside the value
    kernels: keys are a memory-bound copy, values are bound by arithmetic and latency, so the
    two overlap. ``k_scales`` / ``v_scales``: one fp8 scale per layer (None: 1.0 each).
    """
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
    launches: list[_Launch] = []
    side: list[_Launch] = []
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
                _decode_kernel,
                stream,
                specs[layers[0]],
                [codes, scales, group_caches],
                group_caches,
                codes,
                block_ids,
                tokens,
                config if stream == "k" else (value_config or config),
                encode=False,
                cache_scales=[(ks if stream == "k" else vs)[i] for i in layers],
            )
            if concurrent and stream == "k" and device.type == "cuda":
                side.append(launch)
            else:
                launches.append(launch)
            keep += [table, cscale, *codes, *scales, *group_caches]
    logger.debug(
        "decode plan: %d layers, %d launches (%d on a side stream)",
        n,
        len(launches) + len(side),
        len(side),
    )
    return PagedPlan(tuple(launches), tuple(keep), tuple(side))


def decompress_layers_into_paged(
    packed: Sequence[PackedKV],
    specs: Sequence[LayerSpec],
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    *,
    k_scales: Sequence[float] | None = None,
    v_scales: Sequence[float] | None = None,
    config: KernelConfig = DEFAULT_DECODE_CONFIG,
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
        config=config,
        k_scales=k_scales,
        v_scales=v_scales,
    )()


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
    """Validate and prepare :func:`compress_layers_from_paged`: ``(plan, outputs)``; the
    outputs hold the result once the plan has run."""
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
    launches: list[_Launch] = []
    keep: list[torch.Tensor] = [block_ids]
    for layers in _group_layers(specs, key_caches, value_caches, [num_tokens] * n):
        for stream, caches in (("k", key_caches), ("v", value_caches)):
            group_caches = [caches[i] for i in layers]
            codes = [results[i].k_codes if stream == "k" else results[i].v_codes for i in layers]
            scales = [results[i].k_scale if stream == "k" else results[i].v_norm for i in layers]
            launch, table, cscale = _stream_launch(
                _encode_kernel,
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
    config: KernelConfig = DEFAULT_ENCODE_CONFIG,
) -> list[PackedKV]:
    """Triton version of :func:`.paged_ref.compress_layers_from_paged` (same arguments)."""
    plan, results = plan_compress_layers(
        specs,
        key_caches,
        value_caches,
        block_ids,
        num_tokens,
        out,
        config=config,
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
    config: KernelConfig = DEFAULT_DECODE_CONFIG,
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
        config=config,
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
    config: KernelConfig = DEFAULT_ENCODE_CONFIG,
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
        config=config,
    )[0]
