"""``LayerSpec``: one layer's encoding, the one owner of its byte layout and of its math.

Every module that needs the bytes of a layer asks its spec instead of re-deriving them:
:meth:`LayerSpec.packed_shapes` is the layout (shapes and dtypes of a :class:`~.packed.PackedKV`),
:meth:`LayerSpec.empty` / :meth:`LayerSpec.zeros` allocate it (the store's slabs, the kernels'
outputs), :attr:`LayerSpec.bytes_per_token_head` is measured from tensors so allocated, and
:meth:`LayerSpec.encode` / :meth:`LayerSpec.decode` are the torch reference of the math (the
codec, the paged-cache references and the HF fallback all call them). Each of the two streams
(keys, values) is a :class:`StreamSpec`, so the int8 / rotated choice is made in one place.
Byte layout: ``docs/FORMAT.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from polykv_vllm.core import bitpack, lloyd_max
from polykv_vllm.core.hadamard import block_sizes, random_signs
from polykv_vllm.core.packed import PackedKV
from polykv_vllm.core.quantizers import (
    int8_decode,
    int8_encode,
    rotated_decode,
    rotated_encode,
)

__all__ = ["LayerSpec", "StreamSpec", "make_layer_spec"]

# (shape, dtype) of one tensor of a PackedKV
TensorLayout = tuple[tuple[int, ...], torch.dtype]


@dataclass(frozen=True, eq=False)
class StreamSpec:
    """One stream (the keys or the values) of a layer.

    ``rotated``: norm + seeded random-sign Hadamard + Lloyd-Max codes, bit-packed
    (``centroids`` fp32 ``[2**bits]`` ascending, ``signs`` fp32 ±1 ``[head_dim]``); otherwise
    symmetric int8 per (token, head) (``bits`` 8, ``centroids`` / ``signs`` None). Either way a
    (token, head) row is ``row_bytes`` code bytes plus one fp16 scale (int8) or norm (rotated).
    """

    head_dim: int
    bits: int
    centroids: torch.Tensor | None
    signs: torch.Tensor | None
    norm_correction: bool

    @property
    def rotated(self) -> bool:
        return self.centroids is not None

    @property
    def row_bytes(self) -> int:
        """Code bytes of one (token, head): ``ceil(D/8) * bits`` rotated, ``D`` int8."""
        return bitpack.packed_len(self.head_dim, self.bits) if self.rotated else self.head_dim

    def layout(self, tokens: int, heads: int) -> tuple[TensorLayout, TensorLayout]:
        """``(codes, scale)`` layouts: codes ``[T, H, row_bytes]`` (uint8 rotated, int8 int8),
        scale fp16 ``[T, H]``."""
        codes = torch.uint8 if self.rotated else torch.int8
        return ((tokens, heads, self.row_bytes), codes), ((tokens, heads), torch.float16)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float ``[T, H, D]`` -> ``(codes, scale)`` in :meth:`layout` (computed in fp32)."""
        if not self.rotated:
            return int8_encode(x)
        assert self.signs is not None
        return rotated_encode(x, self.bits, self.signs, lloyd_max.boundaries(self.bits))

    def decode(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`: -> float32 ``[T, H, D]``."""
        if not self.rotated:
            return int8_decode(codes, scale)
        assert self.signs is not None and self.centroids is not None
        return rotated_decode(
            codes, scale, self.bits, self.signs, self.centroids, self.norm_correction
        )


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """Everything a kernel needs to encode/decode one layer, as tables (never re-derived).

    ``value_centroids`` / ``key_centroids``: fp32 ``[2**bits]`` ascending (``key_centroids`` is
    None for int8 keys); ``value_signs`` / ``key_signs``: fp32 ±1 ``[head_dim]`` (``key_signs``
    None for int8 keys); ``blocks``: the power-of-two Hadamard block sizes summing to
    ``head_dim``. Tensors live on the CPU, are cached and shared: treat them as read-only
    (``.to(device)`` copies are fine, in-place ops are not). :attr:`keys` / :attr:`values` are
    the same tables per stream.
    """

    head_dim: int
    key_bits: int
    value_bits: int
    key_mode: Literal["int8", "rotated"]
    key_centroids: torch.Tensor | None
    key_signs: torch.Tensor | None
    value_centroids: torch.Tensor
    value_signs: torch.Tensor
    blocks: tuple[int, ...]
    norm_correction: bool

    @functools.cached_property
    def keys(self) -> StreamSpec:
        return StreamSpec(
            self.head_dim, self.key_bits, self.key_centroids, self.key_signs, self.norm_correction
        )

    @functools.cached_property
    def values(self) -> StreamSpec:
        return StreamSpec(
            self.head_dim,
            self.value_bits,
            self.value_centroids,
            self.value_signs,
            self.norm_correction,
        )

    def stream(self, name: Literal["k", "v"]) -> StreamSpec:
        """:attr:`keys` for ``"k"``, :attr:`values` for ``"v"``."""
        return self.keys if name == "k" else self.values

    # --- byte layout --------------------------------------------------------------------

    def packed_shapes(self, tokens: int, heads: int) -> tuple[TensorLayout, ...]:
        """``(shape, dtype)`` of each tensor of a :class:`PackedKV` of ``tokens`` tokens and
        ``heads`` kv heads, in ``PackedKV.tensors()`` order (``k_codes``, ``k_scale``,
        ``v_codes``, ``v_norm``). What :meth:`encode` returns has exactly these."""
        return (*self.keys.layout(tokens, heads), *self.values.layout(tokens, heads))

    def empty(
        self, tokens: int, heads: int, device: torch.device | str, *, pin_memory: bool = False
    ) -> PackedKV:
        """An uninitialised :class:`PackedKV` in this layout, on ``device`` (pinned host memory
        with ``pin_memory``), contiguous: e.g. a kernel's output."""
        return self._alloc(torch.empty, tokens, heads, device, pin_memory)

    def zeros(
        self, tokens: int, heads: int, device: torch.device | str, *, pin_memory: bool = False
    ) -> PackedKV:
        """:meth:`empty`, zero-filled (e.g. a store's slab)."""
        return self._alloc(torch.zeros, tokens, heads, device, pin_memory)

    @functools.cached_property
    def bytes_per_token_head(self) -> int:
        """Bytes one (token, kv head) takes, measured from a one-row :meth:`empty`."""
        return self.empty(1, 1, "cpu").nbytes

    def _alloc(
        self,
        make: Callable[..., torch.Tensor],
        tokens: int,
        heads: int,
        device: torch.device | str,
        pin: bool,
    ) -> PackedKV:
        dev = torch.device(device)
        pin = pin and dev.type == "cpu"
        k_codes, k_scale, v_codes, v_norm = (
            make(shape, dtype=dtype, device=dev, pin_memory=pin)
            for shape, dtype in self.packed_shapes(tokens, heads)
        )
        return self._packed(k_codes, k_scale, v_codes, v_norm, tokens, heads)

    # --- math (the torch reference) ----------------------------------------------------

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> PackedKV:
        """Compress ``k``, ``v`` (float ``[T, H, head_dim]``, same shape and device; the
        inputs are not modified) into a :class:`PackedKV` on their device."""
        if k.shape != v.shape or k.dim() != 3 or k.shape[-1] != self.head_dim:
            raise ValueError(
                f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [tokens, kv_heads, "
                f"{self.head_dim}] for this spec (head_dim={self.head_dim})."
            )
        k_codes, k_scale = self.keys.encode(k)
        v_codes, v_norm = self.values.encode(v)
        return self._packed(k_codes, k_scale, v_codes, v_norm, k.shape[0], k.shape[1])

    def decode(self, packed: PackedKV) -> tuple[torch.Tensor, torch.Tensor]:
        """Decompress ``packed`` to ``(k, v)``, float32 ``[T, H, head_dim]`` on its device."""
        got = (packed.head_dim, packed.key_bits, packed.value_bits)
        if got != (self.head_dim, self.key_bits, self.value_bits):
            raise ValueError(
                f"packed (head_dim, key_bits, value_bits) = {got} does not match this spec's "
                f"{(self.head_dim, self.key_bits, self.value_bits)}: decode with the spec of "
                "the layer it was encoded for."
            )
        k = self.keys.decode(packed.k_codes, packed.k_scale)
        v = self.values.decode(packed.v_codes, packed.v_norm)
        return k, v

    def _packed(
        self,
        k_codes: torch.Tensor,
        k_scale: torch.Tensor,
        v_codes: torch.Tensor,
        v_norm: torch.Tensor,
        tokens: int,
        heads: int,
    ) -> PackedKV:
        return PackedKV(
            k_codes=k_codes,
            k_scale=k_scale,
            v_codes=v_codes,
            v_norm=v_norm,
            tokens=tokens,
            kv_heads=heads,
            head_dim=self.head_dim,
            key_bits=self.key_bits,
            value_bits=self.value_bits,
        )


@functools.lru_cache(maxsize=256)
def make_layer_spec(
    head_dim: int, key_bits: int, value_bits: int, seed: int, norm_correction: bool
) -> LayerSpec:
    """The (cached, shared) spec of one setting: keys rotated unless ``key_bits`` is 8; values
    use ``seed``, rotated keys ``seed + 1``. Head-dim checks are the caller's
    (:meth:`~.codec.KVCodec.layer_spec`)."""
    rotated_keys = key_bits != 8
    return LayerSpec(
        head_dim=head_dim,
        key_bits=key_bits,
        value_bits=value_bits,
        key_mode="rotated" if rotated_keys else "int8",
        key_centroids=lloyd_max.centroids(key_bits) if rotated_keys else None,
        key_signs=random_signs(head_dim, seed + 1) if rotated_keys else None,
        value_centroids=lloyd_max.centroids(value_bits),
        value_signs=random_signs(head_dim, seed),
        blocks=block_sizes(head_dim),
        norm_correction=norm_correction,
    )
