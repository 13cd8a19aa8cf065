"""Tiers below the in-memory store: one small interface, the entry format, keys, a writer.

A tier maps a key (``str``) to a blob (``bytes``): the compressed bytes of one store row (one
block, every layer, one rank) in the layout of ``docs/TIERS.md`` (a header with magic, version,
fingerprint, key and checksum, then the codec's tensors of ``docs/FORMAT.md``). Tiers never
see tensors and never raise for a fault of their medium: a failed read is a miss, a failed
write is counted (``TierStats.errors``) and logged.

- :class:`Tier`: ``put``, ``get``, ``contains_many``, ``delete``, ``nbytes``, ``close``;
- :func:`chain_keys`: polykv's own chained block keys (stable across processes, restarts and
  servers; vLLM's block hashes are not);
- :func:`pack_entry` / :func:`unpack_entry`: the entry header;
- :class:`AsyncWriter`: puts on a background thread behind a bounded queue (a full queue drops
  the write and counts it: the engine step never waits for a tier).
"""

from __future__ import annotations

import abc
import hashlib
import logging
import queue
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, fields

__all__ = [
    "ENTRY_VERSION",
    "AsyncWriter",
    "Tier",
    "TierStats",
    "chain_keys",
    "fingerprint",
    "pack_entry",
    "rank_key",
    "unpack_entry",
]

logger = logging.getLogger(__name__)

ENTRY_MAGIC = b"PKVT"
ENTRY_VERSION = 1
# magic, version, header bytes, payload bytes, fingerprint (16), key (32), crc32 of the payload
_HEADER = struct.Struct("<4sHHQ16s32sI")
HEADER_BYTES = _HEADER.size


def fingerprint(**facts: object) -> bytes:
    """16 bytes naming everything an entry's bytes depend on (model, codec preset and entry
    format, block size, kv heads, head dim, cache dtype, world size): two engines share
    entries only when every fact is equal."""
    text = ";".join(f"{k}={facts[k]!r}" for k in sorted(facts))
    return hashlib.sha256(f"polykv-entry-v{ENTRY_VERSION};{text}".encode()).digest()[:16]


def chain_keys(
    fp: bytes, salt: str | None, token_ids: Sequence[int], block_size: int, start: int = 0
) -> list[bytes]:
    """sha256 chain over the full blocks of ``token_ids``: key ``i`` hashes the fingerprint,
    the tenant salt, key ``i - 1`` and block ``i``'s token ids (so a key names the whole prefix
    up to its block). ``start`` > 0 is not supported (the chain needs its first block)."""
    assert start == 0
    salt_bytes = b"\x00" if salt is None else b"\x01" + salt.encode()
    prev = hashlib.sha256(fp + salt_bytes).digest()
    out = []
    for i in range(len(token_ids) // block_size):
        block = array("q", token_ids[i * block_size : (i + 1) * block_size]).tobytes()
        prev = hashlib.sha256(prev + block).digest()
        out.append(prev)
    return out


def rank_key(key: bytes, rank: int) -> str:
    """The name of rank ``rank``'s part of block ``key`` in a tier."""
    return f"{key.hex()}-r{rank}"


def pack_entry(fp: bytes, key: bytes, payload: bytes) -> bytes:
    header = _HEADER.pack(
        ENTRY_MAGIC, ENTRY_VERSION, HEADER_BYTES, len(payload), fp, key, zlib.crc32(payload)
    )
    return header + payload


def unpack_entry(blob: bytes, fp: bytes, key: bytes, payload_bytes: int) -> memoryview | str:
    """The payload of a valid entry, or why it is not one (a miss: never served)."""
    if len(blob) < HEADER_BYTES:
        return f"truncated ({len(blob)} bytes)"
    magic, version, hsize, size, efp, ekey, crc = _HEADER.unpack_from(blob)
    if magic != ENTRY_MAGIC or version != ENTRY_VERSION or hsize != HEADER_BYTES:
        return f"not a polykv entry of version {ENTRY_VERSION}"
    if efp != fp:
        return "written by another model, preset or geometry"
    if ekey != key:
        return "written for another key"
    if size != payload_bytes or len(blob) != HEADER_BYTES + size:
        return f"wrong size ({len(blob) - HEADER_BYTES} payload bytes, {payload_bytes} expected)"
    payload = memoryview(blob)[HEADER_BYTES:]
    if zlib.crc32(payload) != crc:
        return "checksum mismatch"
    return payload


@dataclass
class TierStats:
    """Counters of one tier since the last :meth:`Tier.take_stats`."""

    hits: int = 0  # entries read and valid
    misses: int = 0  # entries asked for and absent
    corrupt: int = 0  # entries read and refused (deleted)
    bytes_read: int = 0
    bytes_written: int = 0
    writes: int = 0
    drops: int = 0  # writes dropped: the writer's queue was full
    errors: int = 0  # faults of the medium (I/O errors, unreachable server)
    evictions: int = 0

    def add(self, other: TierStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class Tier(abc.ABC):
    """One tier: a byte store of entries by key (module docstring). Thread-safe."""

    #: the metrics' name of the tier (``disk``, ``remote``)
    name: str = "tier"

    def __init__(self) -> None:
        self.stats = TierStats()
        #: the same, never reset (for tests and benchmarks in the engine's process)
        self.totals = TierStats()
        self._stats_lock = threading.Lock()
        self._last_warning = 0.0

    @abc.abstractmethod
    def put(self, key: str, blob: bytes) -> bool:
        """Store ``blob`` under ``key`` (replacing any); False if the medium failed."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """The blob of ``key``, or None (absent, or the medium failed)."""

    @abc.abstractmethod
    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Which of ``keys`` are held (one round trip where the medium has them)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` if held."""

    @property
    def nbytes(self) -> int:
        """Bytes this process knows the tier holds (its own index; -1 if it keeps none)."""
        return -1

    def pin(self, key: str, pinned: bool) -> None:
        """Protect ``key`` from this tier's own eviction (or stop); a tier that never evicts
        (Redis: its server does, by its ``maxmemory-policy``) ignores it."""
        return None

    def held(self) -> tuple[int, int] | None:
        """``(entries, bytes)`` the tier holds as far as this process knows, without waiting
        for the medium (the metrics' gauges), or None if unknown."""
        return None

    def close(self) -> None:
        return None

    def count(self, **amounts: int) -> None:
        with self._stats_lock:
            for k, v in amounts.items():
                for s in (self.stats, self.totals):
                    setattr(s, k, getattr(s, k) + v)

    def take_stats(self) -> TierStats:
        with self._stats_lock:
            out, self.stats = self.stats, TierStats()
        return out

    def fault(self, what: str, error: BaseException) -> None:
        """Count a fault of the medium; log it (at most one line per 10 s per tier)."""
        self.count(errors=1)
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            logger.warning("polykv: %s tier: %s failed: %s", self.name, what, error)


class AsyncWriter:
    """Puts into ``tier`` on one background thread; at most ``depth`` writes wait (a write that
    finds the queue full is dropped and counted in ``tier.stats.drops``)."""

    def __init__(self, tier: Tier, depth: int = 256) -> None:
        self.tier = tier
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(
            target=self._run, name=f"polykv-{tier.name}-writer", daemon=True
        )
        self._thread.start()

    def submit(self, key: str, blob: bytes) -> bool:
        try:
            self._queue.put_nowait((key, blob))
        except queue.Full:
            self.tier.count(drops=1)
            return False
        return True

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted write was tried; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self.tier.put(*item)
            except Exception as e:  # a tier must not raise; never let the thread die
                self.tier.fault("write", e)
            finally:
                self._queue.task_done()
