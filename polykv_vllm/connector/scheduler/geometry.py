"""Sizes the scheduler side plans with, and the one rule that turns a budget into slab rows."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StoreGeometry", "store_rows"]


@dataclass(frozen=True)
class StoreGeometry:
    """Sizes the index needs, measured once by the connector at start-up.

    - ``block_size``: tokens per vLLM block (the block hashes' granularity).
    - ``block_bytes``: compressed bytes of one block, all layers, all kv heads of all ranks.
    - ``block_raw_bytes``: bytes of the same block in the engine's KV cache dtype.
    - ``world_size``: worker ranks that must confirm each store and each load.
    """

    block_size: int
    block_bytes: int
    block_raw_bytes: int
    world_size: int = 1


def store_rows(budget_bytes: int, block_bytes: int) -> int:
    """Rows of the store: how many blocks of ``block_bytes`` fit in ``budget_bytes``.

    The scheduler hands out exactly these rows (:class:`~.rows.RowAllocator`) and every worker
    allocates exactly these rows (:class:`~polykv_vllm.connector.slab.BlockSlab`); both call
    this function, so the two sides agree without talking. Raises ``ValueError`` when the budget
    holds no block at all.
    """
    rows = budget_bytes // block_bytes
    if rows < 1:
        raise ValueError(
            f"polykv store_bytes={budget_bytes} cannot hold even one block "
            f"({block_bytes} bytes compressed): raise store_bytes."
        )
    return rows
