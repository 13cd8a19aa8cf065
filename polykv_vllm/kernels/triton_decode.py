"""Triton decode kernel: compressed rows of a stored document -> vLLM's paged cache.

The launcher (:mod:`.triton_plan`) gives one launch per *stream* (keys or values) of every layer
that shares a spec, a token count and cache strides; the torch reference of the same work is
:func:`.paged_ref.decompress_into_paged`. The per-layer tensors are reached through int64 address
tables, and a persistent grid walks ``(layer, row tile)`` pairs. A row is one (token, kv head)
pair; the stored tensors are ``[T, H, ...]`` contiguous, so row ``r = t * H + h``.

Decode of a rotated stream, per row tile ``[ROWS, DP]`` (``DP`` = head dim rounded up to a power
of two): unpack ``b``-bit codes (8 codes = ``b`` bytes, one word per group) -> centroid lookup (a
chain of selects on the ``2**b`` fp16 centroids) -> one ``[ROWS, DP] x [DP, DP]`` fp16 matmul
with the ±1 block-diagonal Hadamard matrix on the tensor cores (fp32 accumulate; the ±1 entries
are exact, the only extra rounding is the centroid's fp16 rounding, ~2^-12 relative) -> x (sign /
sqrt(m * D)) per column -> x norm per row -> store in the cache dtype at
``block_ids[t // block_size]``, slot ``t % block_size``. Keys in int8 mode: ``code * scale``.
fp8 caches: ``fp8(clamp(x / scale))`` rounded to nearest even, written as bytes.

Bytes moved per (token, head), D = 128, K8/V3, bf16 cache: 128 + 2 (keys) + 48 + 2 (values) =
180 B read, 2 * 128 * 2 = 512 B written. Measured on an H100 (``benchmarks/KERNELS.md``): a
4096-token Llama-3-8B document (189 MB read, 537 MB written) decodes in 0.54-0.56 ms (45% of the
copy roofline; keys at 86%, values at 27%).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["decode_kernel"]


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
def decode_kernel(
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
