"""Where a transfer's compressed tensors are, as plain addresses (no triton import here).

:class:`~.triton_bound.BoundPagedKernels` reads and writes a document's compressed tensors
through per-layer address tables; a store computes these addresses by arithmetic
(:meth:`polykv_vllm.connector.slab.BlockSlab.addresses`) instead of building per-layer tensor
views on every transfer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from polykv_vllm.core import PackedKV

__all__ = ["PackedAddresses"]


@dataclass(frozen=True)
class PackedAddresses:
    """Where one transfer's compressed tensors are: per layer (in the bound layer order) the
    address of its ``k_codes``, ``k_scale``, ``v_codes`` and ``v_norm``, each contiguous in the
    layer spec's :meth:`~polykv_vllm.core.LayerSpec.packed_shapes` for ``tokens`` tokens."""

    tokens: int
    k_codes: Sequence[int]
    k_scale: Sequence[int]
    v_codes: Sequence[int]
    v_norm: Sequence[int]

    @classmethod
    def of(cls, packed: Sequence[PackedKV]) -> PackedAddresses:
        """The addresses of ``packed`` (one per layer, contiguous tensors of one token count)."""
        assert packed and all(p.tokens == packed[0].tokens for p in packed)
        assert all(t.is_contiguous() for p in packed for t in p.tensors())
        return cls(
            packed[0].tokens,
            [p.k_codes.data_ptr() for p in packed],
            [p.k_scale.data_ptr() for p in packed],
            [p.v_codes.data_ptr() for p in packed],
            [p.v_norm.data_ptr() for p in packed],
        )
