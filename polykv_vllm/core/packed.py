"""``PackedKV``: one compressed span of tokens of one layer (codec output, store unit).

Its tensors' shapes and dtypes are defined by the :class:`~.layer_spec.LayerSpec` that encoded
it (:meth:`~.layer_spec.LayerSpec.packed_shapes`); byte layout: ``docs/FORMAT.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PackedKV"]


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
