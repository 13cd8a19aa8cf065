"""One launch copying many byte ranges: a store's staged rows into pinned host memory.

A compressed block of Llama-3-8B is 32 layers x 4 tensors; moving a run of rows from the GPU into
a pinned host store is 128 separate ranges (each tensor's rows are contiguous, the tensors are
not). As 128 ``copy_`` calls that is ~1.7 ms of host time per store on the H200 host
(``benchmarks/profile_hit.py``); :func:`copy_ranges` enqueues one kernel that copies every
range, reading and writing through addresses (device memory, or pinned host memory, which CUDA's
unified addressing lets a kernel write directly over PCIe).

The torch reference is a ``copy_`` per range on tensor views (what the test compares with).
Every address and length must be a multiple of 16 bytes (the store's tensors are), so the kernel
moves 16-byte words.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["copy_ranges"]

_WORDS = 1024  # int32 words per program iteration (4 KiB)
_PROGRAMS_PER_RANGE = 4


@triton.jit
def _copy_kernel(src_tab, dst_tab, words_tab, P: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    p = tl.program_id(1)
    n = tl.load(words_tab + r)
    src = tl.multiple_of(tl.load(src_tab + r).to(tl.pointer_type(tl.int32)), 16)
    dst = tl.multiple_of(tl.load(dst_tab + r).to(tl.pointer_type(tl.int32)), 16)
    for start in range(p * BLOCK, n, P * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


def copy_ranges(
    src: Sequence[int], dst: Sequence[int], nbytes: Sequence[int], device: torch.device
) -> None:
    """Copy ``nbytes[i]`` bytes from address ``src[i]`` to ``dst[i]`` for every ``i``, in one
    launch on ``device``'s current stream (module docstring). The caller keeps both sides alive
    until the stream has run it."""
    assert len(src) == len(dst) == len(nbytes)
    if not src:
        return
    if any(x % 16 for x in (*src, *dst, *nbytes)):
        raise ValueError("copy_ranges needs 16-byte aligned addresses and lengths")
    words = [n // 4 for n in nbytes]
    table = torch.tensor([*src, *dst, *words], dtype=torch.int64).to(device, non_blocking=True)
    k = len(src)
    _copy_kernel[(k, _PROGRAMS_PER_RANGE)](
        table[:k], table[k : 2 * k], table[2 * k :], P=_PROGRAMS_PER_RANGE, BLOCK=_WORDS
    )
