"""The KV codec: :class:`KVCodec` encodes ``[T, H, D]`` keys/values into a :class:`PackedKV`.

Byte layout and API contract: ``docs/FORMAT.md``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from polykv_vllm.core import lloyd_max
from polykv_vllm.core.hadamard import block_sizes, random_signs
from polykv_vllm.core.presets import (
    DEFAULT_PRESET,
    KEEP_KEY_BITS,
    KEEP_VALUE_BITS,
    CodecConfig,
    get_preset,
)
from polykv_vllm.core.quantizers import (
    int8_decode,
    int8_encode,
    rotated_decode,
    rotated_encode,
)

__all__ = ["KVCodec", "LayerSpec", "PackedKV", "MIN_HEAD_DIM"]

logger = logging.getLogger(__name__)

MIN_HEAD_DIM = 8


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """Everything a kernel needs to encode/decode one layer, as tables (never re-derived).

    ``value_centroids`` / ``key_centroids``: fp32 ``[2**bits]`` ascending (``key_centroids`` is
    None for int8 keys); ``value_signs`` / ``key_signs``: fp32 ±1 ``[head_dim]`` (``key_signs``
    None for int8 keys); ``blocks``: the power-of-two Hadamard block sizes summing to
    ``head_dim``. Tensors live on the CPU, are cached and shared: treat them as read-only
    (``.to(device)`` copies are fine, in-place ops are not).
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


@dataclass(frozen=True, eq=False)
class PackedKV:
    """One compressed span of tokens of one layer.

    Tensors (see ``docs/FORMAT.md``), all on one device:

    - ``k_codes``: int8 ``[T, H, D]`` (int8 keys) or uint8 ``[T, H, ceil(D/8)*key_bits]``
    - ``k_scale``: float16 ``[T, H]`` (the scale for int8 keys, the norm for rotated keys)
    - ``v_codes``: uint8 ``[T, H, ceil(D/8)*value_bits]``
    - ``v_norm``: float16 ``[T, H]``

    plus the ints ``tokens`` (T), ``kv_heads`` (H), ``head_dim`` (D), ``key_bits``,
    ``value_bits``. Picklable.
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    v_codes: torch.Tensor
    v_norm: torch.Tensor
    tokens: int
    kv_heads: int
    head_dim: int
    key_bits: int
    value_bits: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The four tensors, in field order."""
        return (self.k_codes, self.k_scale, self.v_codes, self.v_norm)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held (``numel * element_size`` summed), not a formula."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def device(self) -> torch.device:
        return self.k_codes.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedKV:
        """A copy with every tensor on ``device`` (self if already there)."""
        dev = torch.device(device)
        if all(t.device == dev for t in self.tensors()):
            return self
        moved = [t.to(dev, non_blocking=non_blocking) for t in self.tensors()]
        return self.with_tensors(moved, tokens=self.tokens)

    def slice(self, start: int | None, end: int | None) -> PackedKV:
        """Tokens ``[start, end)`` (views; Python slice rules: negative, None, clamped)."""
        idx = range(self.tokens)[start:end]
        if idx.step != 1:  # pragma: no cover - range slicing with no step keeps step 1
            raise AssertionError("unexpected slice step")
        s = slice(idx.start, idx.stop)
        return self.with_tensors([t[s] for t in self.tensors()], tokens=len(idx))

    @staticmethod
    def cat(parts: Sequence[PackedKV]) -> PackedKV:
        """Concatenate along the token axis; all parts must share heads, dim, bits and device."""
        if not parts:
            raise ValueError("PackedKV.cat needs at least one part; got an empty sequence.")
        first = parts[0]
        meta = ("kv_heads", "head_dim", "key_bits", "value_bits")
        for i, p in enumerate(parts):
            for name in meta:
                if getattr(p, name) != getattr(first, name):
                    raise ValueError(
                        f"PackedKV.cat: part {i} has {name}={getattr(p, name)} but part 0 has "
                        f"{getattr(first, name)}; only parts encoded with the same settings can be "
                        "concatenated."
                    )
            if p.device != first.device:
                raise ValueError(
                    f"PackedKV.cat: part {i} is on {p.device} but part 0 is on {first.device}; "
                    "move them with .to(device) first."
                )
        cols = [torch.cat(ts, dim=0) for ts in zip(*(p.tensors() for p in parts), strict=True)]
        return first.with_tensors(cols, tokens=sum(p.tokens for p in parts))

    def with_tensors(self, tensors: Sequence[torch.Tensor], tokens: int | None = None) -> PackedKV:
        """This object's metadata with other tensors, in ``tensors()`` order (e.g. pinned host
        copies); ``tokens`` defaults to this object's."""
        k_codes, k_scale, v_codes, v_norm = tensors
        return PackedKV(
            k_codes=k_codes,
            k_scale=k_scale,
            v_codes=v_codes,
            v_norm=v_norm,
            tokens=self.tokens if tokens is None else tokens,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            key_bits=self.key_bits,
            value_bits=self.value_bits,
        )


class KVCodec:
    """Encode/decode per-layer K/V ``[tokens, kv_heads, head_dim]`` (the torch reference).

    ``KVCodec(preset="polykv")`` or ``KVCodec(config=CodecConfig(...))``. ``num_layers`` is needed
    only when ``config.keep_layers`` holds negative indices; ``head_dim`` is only the default for
    :meth:`layer_spec`.
    """

    def __init__(
        self,
        preset: str | None = None,
        *,
        config: CodecConfig | None = None,
        num_layers: int | None = None,
        head_dim: int | None = None,
    ) -> None:
        if preset is not None and config is not None:
            raise ValueError(
                f"KVCodec got both preset={preset!r} and config=...; pass only one of them."
            )
        self.config = config if config is not None else get_preset(preset or DEFAULT_PRESET)
        if num_layers is not None and (not isinstance(num_layers, int) or num_layers < 1):
            raise ValueError(f"KVCodec num_layers={num_layers!r} is invalid: use an integer >= 1.")
        if any(i < 0 for i in self.config.keep_layers) and num_layers is None:
            raise ValueError(
                f"CodecConfig.keep_layers={self.config.keep_layers} has negative (from the end) "
                "indices: pass num_layers= to KVCodec so they can be resolved."
            )
        self.num_layers = num_layers
        self.head_dim = head_dim
        kept = {i % num_layers if num_layers else i for i in self.config.keep_layers}
        self._kept_layers = frozenset(kept)

    def __repr__(self) -> str:
        return f"KVCodec(config={self.config!r}, num_layers={self.num_layers})"

    # --- per-layer settings -------------------------------------------------------------

    def layer_bits(self, layer: int) -> tuple[int, int]:
        """``(key_bits, value_bits)`` used for ``layer``."""
        if not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer={layer!r} is invalid: use a layer index >= 0.")
        if self.num_layers is not None and layer >= self.num_layers:
            raise ValueError(
                f"layer={layer} is out of range: this codec was built for num_layers="
                f"{self.num_layers} (allowed 0..{self.num_layers - 1})."
            )
        if layer in self._kept_layers:
            return KEEP_KEY_BITS, KEEP_VALUE_BITS
        return self.config.key_bits, self.config.value_bits

    def layer_spec(self, layer: int = 0, head_dim: int | None = None) -> LayerSpec:
        """The tables for ``layer`` at ``head_dim`` (default: the codec's ``head_dim``)."""
        dim = head_dim if head_dim is not None else self.head_dim
        if dim is None:
            raise ValueError(
                "layer_spec needs the head dim: pass head_dim= here or to KVCodec(...)."
            )
        _check_head_dim(dim)
        key_bits, value_bits = self.layer_bits(layer)
        return _spec(dim, key_bits, value_bits, self.config.seed, self.config.norm_correction)

    # --- encode / decode ----------------------------------------------------------------

    def encode(self, k: torch.Tensor, v: torch.Tensor, layer: int = 0) -> PackedKV:
        """Compress ``k``, ``v`` (float ``[tokens, kv_heads, head_dim]``, same shape and device).

        Returns a :class:`PackedKV` on the inputs' device. The inputs are not modified.
        """
        _check_kv(k, v)
        tokens, heads, dim = k.shape
        spec = self.layer_spec(layer, dim)
        if spec.key_mode == "int8":
            k_codes, k_scale = int8_encode(k)
        else:
            assert spec.key_signs is not None and spec.key_centroids is not None
            k_codes, k_scale = rotated_encode(
                k, spec.key_bits, spec.key_signs, lloyd_max.boundaries(spec.key_bits)
            )
        v_codes, v_norm = rotated_encode(
            v, spec.value_bits, spec.value_signs, lloyd_max.boundaries(spec.value_bits)
        )
        return PackedKV(
            k_codes=k_codes,
            k_scale=k_scale,
            v_codes=v_codes,
            v_norm=v_norm,
            tokens=tokens,
            kv_heads=heads,
            head_dim=dim,
            key_bits=spec.key_bits,
            value_bits=spec.value_bits,
        )

    def decode(
        self,
        packed: PackedKV,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decompress to ``(k, v)``, each ``dtype`` ``[tokens, kv_heads, head_dim]`` on ``device``
        (default: the packed tensors' device). Computed in float32, cast at the end.

        The bits come from ``packed`` itself; seed and norm correction from this codec's config.
        """
        if not isinstance(packed, PackedKV):
            raise TypeError(f"decode expects a PackedKV, got {type(packed).__name__}.")
        if not dtype.is_floating_point:
            raise ValueError(
                f"decode dtype={dtype} is not allowed: use a floating dtype such as "
                "torch.bfloat16, torch.float16 or torch.float32."
            )
        target = torch.device(device) if device is not None else packed.device
        p = packed.to(target)
        spec = _spec(
            p.head_dim, p.key_bits, p.value_bits, self.config.seed, self.config.norm_correction
        )
        if spec.key_mode == "int8":
            k = int8_decode(p.k_codes, p.k_scale)
        else:
            assert spec.key_signs is not None and spec.key_centroids is not None
            k = rotated_decode(
                p.k_codes,
                p.k_scale,
                spec.key_bits,
                spec.key_signs,
                spec.key_centroids,
                spec.norm_correction,
            )
        v = rotated_decode(
            p.v_codes,
            p.v_norm,
            spec.value_bits,
            spec.value_signs,
            spec.value_centroids,
            spec.norm_correction,
        )
        return k.to(dtype), v.to(dtype)

    def bytes_per_token_head(self, head_dim: int, layer: int = 0) -> int:
        """Bytes one (token, head) takes at ``layer``, measured by encoding one zero row."""
        z = torch.zeros(1, 1, head_dim)
        return self.encode(z, z, layer).nbytes


@functools.lru_cache(maxsize=256)
def _spec(
    head_dim: int, key_bits: int, value_bits: int, seed: int, norm_correction: bool
) -> LayerSpec:
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


def _check_head_dim(dim: int) -> None:
    if not isinstance(dim, int) or dim < MIN_HEAD_DIM or dim % 2:
        raise ValueError(
            f"head_dim={dim!r} is not supported: allowed are even integers >= {MIN_HEAD_DIM} "
            "(e.g. 64, 80, 96, 112, 128)."
        )


def _check_kv(k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 3:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}: expected 3 dims [tokens, kv_heads, "
                "head_dim]; reshape or index one layer first."
            )
        if not t.dtype.is_floating_point:
            raise ValueError(
                f"{name} has dtype {t.dtype}: expected a floating dtype (float32, float16, "
                "bfloat16); cast it first."
            )
    if k.shape != v.shape:
        raise ValueError(
            f"k shape {tuple(k.shape)} != v shape {tuple(v.shape)}: keys and values must have the "
            "same [tokens, kv_heads, head_dim]."
        )
    if k.device != v.device:
        raise ValueError(f"k is on {k.device} but v is on {v.device}: put both on one device.")
    _check_head_dim(k.shape[-1])
