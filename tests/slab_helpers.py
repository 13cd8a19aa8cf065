"""Test-only access to a :class:`~polykv_vllm.connector.slab.BlockSlab`: write blocks into
given rows and read copies of rows back (the library itself only reads and writes runs)."""

from __future__ import annotations

from collections.abc import Sequence

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
    """A copy of the blocks in ``rows`` (any order), per layer, tokens in ``rows`` order (built
    from the library's own :meth:`BlockSlab.view`)."""
    slab.ready_for_host()
    if not rows:
        return slab.view(0, 0)
    per_row = [slab.view(row, 1) for row in rows]
    return [PackedKV.cat([blocks[i] for blocks in per_row]) for i in range(len(slab.layers))]
