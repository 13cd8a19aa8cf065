"""Tiers below the in-memory store: local disk and a shared remote (Redis); ``docs/TIERS.md``.

:func:`open_tiers` builds the configured tiers, top first; :mod:`.base` holds the interface,
the entry format and the keys, :mod:`.disk` / :mod:`.redis` the tiers, :mod:`.worker_io` the
worker's side (the scheduler's is :mod:`polykv_vllm.connector.scheduler.tiers`).
"""

from __future__ import annotations

from polykv_vllm.connector.tiers.base import (
    AsyncWriter,
    Tier,
    TierStats,
    chain_keys,
    fingerprint,
    pack_entry,
    rank_key,
    unpack_entry,
)

__all__ = [
    "TIER_NAMES",
    "AsyncWriter",
    "Tier",
    "TierStats",
    "chain_keys",
    "fingerprint",
    "open_tiers",
    "pack_entry",
    "rank_key",
    "unpack_entry",
]

#: the tiers' names in the metrics, top first
TIER_NAMES = ("disk", "remote")


def open_tiers(
    disk_path: str | None,
    disk_bytes: int,
    remote: str | None,
    rank: int = 0,
    world_size: int = 1,
    scan: bool = True,
) -> list[Tier]:
    """The configured tiers, top first. On disk each rank keeps ``disk_bytes / world_size`` of
    its own files; ``scan=False`` (the scheduler side) only asks which entries exist."""
    tiers: list[Tier] = []
    if disk_path is not None:
        from polykv_vllm.connector.tiers.disk import DiskTier

        tiers.append(DiskTier(disk_path, disk_bytes // world_size, owned=f"-r{rank}", scan=scan))
    if remote is not None:
        from polykv_vllm.connector.tiers.redis import RedisTier

        tiers.append(RedisTier(remote))
    return tiers
