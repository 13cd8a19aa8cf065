"""Worker side of the tiers (``docs/TIERS.md``): row bytes in and out of the slab.

:meth:`TierIO.put_rows` copies confirmed rows out of the slab (the one part on the step's
path: one copy per row into host bytes), wraps them in the entry header and hands them to each
tier's :class:`~.base.AsyncWriter` (a full queue drops the write and counts it).
:meth:`TierIO.read_rows` reads a load's tier blocks into their rows before the load runs (on the
worker's fetch thread for an asynchronous load, :meth:`TierIO.fetch` in the step): tiers are
asked top first, an entry failing a check (size, fingerprint, key, checksum) is a miss,
deleted from its tier and counted, and a hit below the top tier is promoted to the tiers
above. The first block no tier gives ends the fetch: it and every later block of the fetch are
reported failed and marked empty, so the load recomputes them through the failed-load path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict

import torch

from polykv_vllm.connector.metadata import FetchJob, LoadJob, WorkerReport
from polykv_vllm.connector.slab import BlockSlab
from polykv_vllm.connector.tiers.base import (
    AsyncWriter,
    Tier,
    TierStats,
    pack_entry,
    rank_key,
    unpack_entry,
)
from polykv_vllm.connector.transfers import Fetched

__all__ = ["TierIO", "read_row", "write_row"]

logger = logging.getLogger(__name__)


def read_row(store: BlockSlab, row: int) -> bytes:
    """Row ``row``'s bytes: per layer ``k_codes, k_scale, v_codes, v_norm`` (docs/FORMAT.md),
    each in C order."""
    if store.device.type == "cpu":
        store.ready_for_host()
    parts = [t.reshape(-1).view(torch.uint8) for p in store.view(row, 1) for t in p.tensors()]
    return torch.cat(parts).cpu().numpy().tobytes()


def write_row(store: BlockSlab, row: int, payload: memoryview | bytes) -> None:
    """The inverse of :func:`read_row` (``payload`` has ``store.row_bytes`` bytes)."""
    src = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    if store.device.type != "cpu":
        src = src.to(store.device)
    offset = 0
    for p in store.view(row, 1):
        for t in p.tensors():
            n = t.numel() * t.element_size()
            t.reshape(-1).view(torch.uint8).copy_(src[offset : offset + n])
            offset += n
    assert offset == len(src), (offset, len(src))


class TierIO:
    """One rank's tiers, top first (module docstring)."""

    def __init__(
        self, tiers: Sequence[Tier], fp: bytes, rank: int, store: BlockSlab, queue_depth: int = 256
    ) -> None:
        self.tiers = list(tiers)
        self.store = store
        self._expected: dict[int, bytes] = {}  # row -> chain key, until the row is stored
        self._pending: list[tuple[int, bytes]] = []  # stored rows to write through
        self.fp = fp
        self.rank = rank
        self.writers = [AsyncWriter(t, queue_depth) for t in self.tiers]

    def expect(self, puts: Sequence[tuple[int, bytes]]) -> None:
        """Rows a plan stores, with their chain keys: written through once stored."""
        self._expected.update(puts)

    def stored(self, rows: Sequence[int], now: bool) -> None:
        """This rank's store of ``rows`` is in the slab: write the expected ones through
        ``now`` (a CPU build), else at the next :meth:`put_pending` (CUDA: reading the rows
        back here would wait for the GPU inside the step)."""
        for row in rows:
            key = self._expected.pop(row, None)
            if key is not None:
                self._pending.append((row, key))
        if now:
            self.put_pending()

    def put_pending(self) -> None:
        puts, self._pending = self._pending, []
        self.put_rows(self.store, puts)

    def put_rows(self, store: BlockSlab, puts: Sequence[tuple[int, bytes]]) -> None:
        for row, key in puts:
            blob = pack_entry(self.fp, key, read_row(store, row))
            name = rank_key(key, self.rank)
            for writer in self.writers:
                writer.submit(name, blob)

    def fetch(self, store: BlockSlab, job: LoadJob, fetch: FetchJob, report: WorkerReport) -> int:
        """Read ``job.rows[fetch.first:]`` from the tiers (synchronously); returns the blocks
        fetched."""
        got = self.read_rows(store, job, fetch, write=True)
        store.mark_filled(got.rows)
        for row in got.rows:
            report.stored[row] = [store.row_bytes, 1]
        store.mark_empty(got.missing)
        report.failed_rows.update(got.missing)
        return len(got.rows)

    def read_rows(self, store: BlockSlab, job: LoadJob, fetch: FetchJob, write: bool) -> Fetched:
        """Read the fetch's blocks in order until the first no tier gives; each into its row
        when ``write``, else into ``payloads``. Marks nothing: safe on a thread other than the
        step's when ``write`` goes to a host slab (nothing else touches rows being fetched:
        their entries are pending and referenced)."""
        rows = job.rows[fetch.first :]
        assert len(rows) == len(fetch.keys)
        got = Fetched(rows=(), missing=(), first=fetch.first)
        done = 0
        for row, key in zip(rows, fetch.keys, strict=True):
            payload = self._read(key, store.row_bytes)
            if payload is None:
                break
            if write:
                write_row(store, row, payload)
            else:
                got.payloads.append(payload)
            done += 1
        got.rows, got.missing = rows[:done], rows[done:]
        if got.missing:
            logger.warning(
                "polykv: request %s: block %d of its tier fetch is in no tier; recomputing %d "
                "blocks",
                job.req_id,
                fetch.first + done,
                len(got.missing),
            )
        return got

    def _read(self, key: bytes, payload_bytes: int) -> memoryview | None:
        name = rank_key(key, self.rank)
        for level, tier in enumerate(self.tiers):
            blob = tier.get(name)
            if blob is None:
                continue
            payload = unpack_entry(blob, self.fp, key, payload_bytes)
            if isinstance(payload, str):
                logger.warning("polykv: %s tier entry %s refused: %s", tier.name, name, payload)
                tier.count(corrupt=1)
                tier.delete(name)
                continue
            tier.count(hits=1)
            for writer in self.writers[:level]:  # promote to the tiers above
                writer.submit(name, blob)
            return payload
        return None

    def flush(self, timeout: float = 30.0) -> bool:
        return all(w.flush(timeout) for w in self.writers)

    def close(self) -> None:
        self.put_pending()
        for writer in self.writers:
            writer.close()
        for tier in self.tiers:
            tier.close()

    def pin(self, pins: Sequence[tuple[bytes, bool]]) -> None:
        """Pin (or unpin) blocks of pinned documents in the tiers (this rank's entries)."""
        for key, pinned in pins:
            name = rank_key(key, self.rank)
            for tier in self.tiers:
                tier.pin(name, pinned)

    def gauges(self, world_size: int) -> dict[str, int]:
        """``{"<tier>_stored_entries": n, "<tier>_stored_bytes": n}`` (docs/TIERS.md): entries
        are blocks (this rank's files), bytes of all ranks (each rank's entry of a block has
        the same size: this rank's bytes times ``world_size``); Redis says its DB's keys and
        its server's memory."""
        out: dict[str, int] = {}
        for tier in self.tiers:
            held = tier.held()
            if held is not None:
                local = tier.name != "remote"
                out[f"{tier.name}_stored_entries"] = held[0]
                out[f"{tier.name}_stored_bytes"] = held[1] * (world_size if local else 1)
        return out

    def take_stats(self) -> dict[str, int]:
        """``{"<tier>_<counter>": n}`` of the nonzero counters since the last call."""
        out: dict[str, int] = {}
        for tier in self.tiers:
            stats: TierStats = tier.take_stats()
            for k, v in asdict(stats).items():
                if v:
                    out[f"{tier.name}_{k}"] = v
        return out
