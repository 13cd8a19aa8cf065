"""Test-only access to a :class:`~polykv_vllm.connector.slab.BlockSlab`: write blocks into
given rows and read copies of rows back (the library itself only reads and writes runs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polykv_vllm.connector.slab import BlockSlab, runs
from polykv_vllm.core import PackedKV

__all__ = ["gather", "put"]


def put(slab: BlockSlab, rows: Sequence[int], per_layer: Sequence[PackedKV]) -> None:
    """Store ``per_layer[i]`` (``len(rows) * block_size`` tokens, blocks in ``rows`` order)
    into ``rows``, as the worker does."""
    for run in runs(rows):
        slab.write(run, per_layer, offset=run.offset * slab.block_size)
    slab.mark_filled(rows)


def gather(slab: BlockSlab, rows: Sequence[int]) -> list[PackedKV]:
    """A copy of the blocks in ``rows`` (any order), per layer, tokens in ``rows`` order."""
    slab.ready_for_host()
    index = torch.tensor(list(rows), dtype=torch.int64, device=slab.device)
    tokens = len(rows) * slab.block_size
    out = []
    for layer in slab.layers:
        k_codes, k_scale, v_codes, v_norm = (
            t.index_select(0, index).reshape(tokens, *t.shape[2:]) for t in layer.tensors()
        )
        out.append(
            PackedKV(
                k_codes=k_codes,
                k_scale=k_scale,
                v_codes=v_codes,
                v_norm=v_norm,
                tokens=tokens,
                kv_heads=slab.kv_heads,
                head_dim=slab.head_dim,
                key_bits=layer.key_bits,
                value_bits=layer.value_bits,
            )
        )
    return out
