"""Triton encode kernel: vLLM's paged cache -> compressed rows of a stored document.

The inverse of :mod:`.triton_decode`, launched the same way (:mod:`.triton_plan`); the torch
reference is :func:`.paged_ref.compress_from_paged`. The rotation uses a hi/lo fp16 split of the
unit vector (two matmuls), which keeps ~22 significant bits, so the codes match the reference
except where a rotated coordinate lies within ~1e-6 of a Lloyd-Max decision boundary. Division
and square root use the IEEE round-to-nearest forms (``div_rn``, ``sqrt_rn``) like torch, and
int8 rounding is half-to-even like ``torch.round``, so int8 key codes and scales are bit-exact.
fp8 caches are read as bytes and bitcast: ``x8.to(fp32) * scale``.

Bytes moved per (token, head), D = 128, K8/V3, bf16 cache: 512 B read, 180 B written. Measured
on an H100 (``benchmarks/KERNELS.md``): a 4096-token Llama-3-8B document encodes in 0.92 ms.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["encode_kernel"]


@triton.jit(do_not_specialize=["num_rows", "tiles_per_layer", "total_tiles"])
def encode_kernel(
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
