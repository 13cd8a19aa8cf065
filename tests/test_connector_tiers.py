"""The tiers below the store (docs/TIERS.md): entry format, keys, disk tier, Redis tier, the
background writer, and the worker's fetch into a real slab (no vLLM)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis_helpers
import torch

from polykv_vllm.connector.metadata import FetchJob, LoadJob, WorkerReport
from polykv_vllm.connector.slab import BlockSlab
from polykv_vllm.connector.tiers import (
    AsyncWriter,
    Tier,
    chain_keys,
    fingerprint,
    open_tiers,
    pack_entry,
    rank_key,
    unpack_entry,
)
from polykv_vllm.connector.tiers.disk import DiskTier
from polykv_vllm.connector.tiers.worker_io import TierIO, read_row, write_row
from polykv_vllm.core import KVCodec

FP = fingerprint(model="m", preset="polykv", block_size=16)
KEY = bytes(range(32))


def blob(n: int = 1000, key: bytes = KEY) -> bytes:
    return pack_entry(FP, key, bytes(i % 251 for i in range(n)))


# --- keys and the entry format ------------------------------------------------------------


def test_chain_keys_are_stable_chained_and_salted() -> None:
    tokens = list(range(100))
    keys = chain_keys(FP, None, tokens, 16)
    assert len(keys) == 6 and len(set(keys)) == 6
    assert keys == chain_keys(FP, None, tokens, 16)  # no process-dependent seed
    assert chain_keys(FP, None, tokens[:40], 16) == keys[:2]  # a prefix has the same keys
    other = list(tokens)
    other[0] = 999
    assert not set(chain_keys(FP, None, other, 16)) & set(keys)  # chained: every key changes
    assert not set(chain_keys(FP, "tenant", tokens, 16)) & set(keys)
    fp2 = fingerprint(model="m", preset="polykv-lite", block_size=16)
    assert not set(chain_keys(fp2, None, tokens, 16)) & set(keys)


def test_entry_round_trip_and_every_check() -> None:
    payload = bytes(range(256)) * 4
    good = pack_entry(FP, KEY, payload)
    assert bytes(unpack_entry(good, FP, KEY, len(payload))) == payload  # type: ignore[arg-type]
    assert "truncated" in unpack_entry(b"", FP, KEY, len(payload))  # type: ignore[operator]
    assert "size" in unpack_entry(good[:-1], FP, KEY, len(payload))  # type: ignore[operator]
    flipped = bytearray(good)
    flipped[-5] ^= 1
    assert "checksum" in unpack_entry(bytes(flipped), FP, KEY, len(payload))  # type: ignore[operator]
    fp2 = fingerprint(model="other")
    assert "another model" in unpack_entry(good, fp2, KEY, len(payload))  # type: ignore[operator]
    assert "another key" in unpack_entry(good, FP, bytes(32), len(payload))  # type: ignore[operator]
    assert "size" in unpack_entry(good, FP, KEY, len(payload) + 1)  # type: ignore[operator]
    assert "not a polykv" in unpack_entry(b"x" * 200, FP, KEY, 100)  # type: ignore[operator]


# --- disk ---------------------------------------------------------------------------------


def test_disk_put_get_contains_delete_and_restart(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 10**6)
    b = blob()
    assert tier.put("k1", b) and tier.get("k1") == b
    assert tier.contains_many(["k1", "k2"]) == [True, False]
    assert tier.get("k2") is None
    assert tier.nbytes == len(b)
    s = tier.take_stats()
    assert (s.writes, s.bytes_written, s.bytes_read, s.misses) == (1, len(b), len(b), 1)
    assert not list(tier.tmp.iterdir()), "no temp file left behind"
    again = DiskTier(tmp_path, 10**6)  # a restart: the index is rebuilt from the directory
    assert again.nbytes == len(b) and again.get("k1") == b
    again.delete("k1")
    assert again.nbytes == 0 and again.contains_many(["k1"]) == [False]
    assert DiskTier(tmp_path, 10**6, scan=False).contains_many(["k1"]) == [False]


def test_disk_evicts_lru_under_its_budget_also_at_start(tmp_path: Path) -> None:
    b = blob()
    tier = DiskTier(tmp_path, 3 * len(b))
    for k in ("a", "b", "c"):
        tier.put(k, b)
    tier.get("a")  # a is now the most recent
    tier.put("d", b)
    assert tier.contains_many(["a", "b", "c", "d"]) == [True, False, True, True]
    assert tier.nbytes <= 3 * len(b) and tier.take_stats().evictions == 1
    disk_bytes = sum(f.stat().st_size for f in tier.root.rglob("*.pkv"))
    assert disk_bytes == 3 * len(b)
    smaller = DiskTier(tmp_path, len(b))  # restarted with a smaller budget: trimmed at start
    assert smaller.nbytes == len(b)
    assert sum(1 for _ in tier.root.rglob("*.pkv")) == 1


def test_disk_budget_covers_only_its_own_rank(tmp_path: Path) -> None:
    b = blob()
    r0 = DiskTier(tmp_path, 2 * len(b), owned="-r0")
    r1 = DiskTier(tmp_path, 2 * len(b), owned="-r1")
    for i in range(3):
        r0.put(f"k{i}-r0", b)
        r1.put(f"k{i}-r1", b)
    assert r0.nbytes == r1.nbytes == 2 * len(b)
    assert sum(1 for _ in tmp_path.rglob("*.pkv")) == 4


def test_disk_partial_writes_are_never_visible(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 10**6)
    # a writer killed mid-write leaves only a temp file: not an entry, and removed once stale
    stale = tier.tmp / "k1.123.0.tmp"
    stale.write_bytes(blob()[:100])
    os.utime(stale, (0, 0))
    assert tier.contains_many(["k1"]) == [False] and tier.get("k1") is None
    DiskTier(tmp_path, 10**6)
    assert not stale.exists()


def test_disk_full_or_unwritable_skips_the_store(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 10**6)
    tier.tmp.rmdir()  # the write cannot even start: an OSError like ENOSPC
    assert tier.put("k1", blob()) is False
    s = tier.take_stats()
    assert s.errors == 1 and s.writes == 0
    assert tier.contains_many(["k1"]) == [False]


def test_two_writers_of_the_same_key_leave_one_whole_entry(tmp_path: Path) -> None:
    a, b = DiskTier(tmp_path, 10**8), DiskTier(tmp_path, 10**8)
    payloads = [blob(200_000), blob(200_000)]
    threads = [
        threading.Thread(target=lambda t=t: [t.put("same", payloads[0]) for _ in range(20)])
        for t in (a, b)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = a.get("same")
    assert got is not None and not isinstance(unpack_entry(got, FP, KEY, 200_000), str)


# --- the writer ---------------------------------------------------------------------------


class _SlowTier(Tier):
    name = "disk"

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.data: dict[str, bytes] = {}

    def put(self, key: str, blob: bytes) -> bool:
        self.gate.wait(10)
        self.data[key] = blob
        return True

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def contains_many(self, keys: list[str]) -> list[bool]:  # type: ignore[override]
        return [k in self.data for k in keys]

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


def test_writer_never_blocks_and_counts_dropped_writes() -> None:
    tier = _SlowTier()
    writer = AsyncWriter(tier, depth=2)
    results = [writer.submit(f"k{i}", b"x") for i in range(6)]  # the tier is stuck
    assert results.count(False) >= 3 and tier.stats.drops == results.count(False)
    tier.gate.set()
    assert writer.flush(10)
    assert len(tier.data) == results.count(True)
    writer.close()


# --- redis --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_helpers.redis_server() as url:
        yield url


def test_redis_put_get_contains_delete(redis_url: str) -> None:
    (tier,) = open_tiers(None, 1, redis_url)
    b = blob()
    assert tier.put("r1", b) and tier.get("r1") == b
    assert tier.contains_many(["r1", "r2", "r1"]) == [True, False, True]
    tier.delete("r1")
    assert tier.get("r1") is None and tier.contains_many(["r1"]) == [False]
    s = tier.take_stats()
    assert (s.writes, s.bytes_written, s.bytes_read, s.misses, s.errors) == (
        1,
        len(b),
        len(b),
        1,
        0,
    )
    tier.close()


def test_redis_unreachable_then_started_then_killed() -> None:
    redis_helpers.require_redis()
    from polykv_vllm.apps.serving import free_port
    from polykv_vllm.connector.tiers.redis import RedisTier

    port = free_port()
    tier = RedisTier(f"redis://127.0.0.1:{port}/0", timeout=0.5, retry_seconds=0.2)
    # unreachable at start: misses and counted errors, never an exception
    assert tier.put("k", blob()) is False
    assert tier.get("k") is None and tier.contains_many(["k"]) == [False]
    assert tier.take_stats().errors >= 1
    proc, _ = redis_helpers.start_redis(port)
    try:
        import time

        time.sleep(0.3)  # past the retry interval: the tier reconnects
        assert tier.put("k", blob()) and tier.get("k") == blob()
    finally:
        redis_helpers.stop_redis(proc)
    # the server died mid-run: misses again, and no exception
    assert tier.get("k") is None and tier.contains_many(["k"]) == [False]
    assert tier.put("k", blob()) is False
    tier.close()


# --- the worker's side: rows in and out of a real slab --------------------------------------


def _slab(capacity: int = 4) -> BlockSlab:
    codec = KVCodec("polykv", num_layers=2, head_dim=64)
    return BlockSlab(codec, [0, 1], capacity, 16, 2, 64, torch.device("cpu"), pin=False)


def _fill(slab: BlockSlab, row: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in slab.view(row, 1):
        for t in p.tensors():
            t.copy_(torch.randint(0, 100, t.shape, generator=g).to(t.dtype))
    slab.mark_filled([row])


def test_rows_round_trip_through_bytes() -> None:
    slab = _slab()
    _fill(slab, 1, 7)
    data = read_row(slab, 1)
    assert len(data) == slab.row_bytes
    write_row(slab, 3, data)
    for a, b in zip(slab.view(1, 1), slab.view(3, 1), strict=True):
        for x, y in zip(a.tensors(), b.tensors(), strict=True):
            assert torch.equal(x, y)


def test_fetch_fills_rows_promotes_and_stops_at_the_first_bad_block(tmp_path: Path) -> None:
    slab = _slab(8)
    keys = chain_keys(FP, None, list(range(64)), 16)  # 4 blocks
    disk = DiskTier(tmp_path / "d", 10**7)
    lower = DiskTier(tmp_path / "lower", 10**7)
    lower.name = "remote"
    for i in range(3):
        _fill(slab, i, i)
    writer_io = TierIO([lower], FP, rank=0, store=slab)
    writer_io.put_rows(slab, [(0, keys[0]), (1, keys[1]), (2, keys[2])])
    assert writer_io.flush()
    writer_io.close()
    # block 2 corrupt in the lower tier, block 3 in no tier
    path = lower.path_of(rank_key(keys[2], 0))
    path.write_bytes(path.read_bytes()[:-10])
    io = TierIO([disk, lower], FP, rank=0, store=slab)
    report = WorkerReport()
    job = LoadJob(req_id="r", rows=(4, 5, 6, 7), block_ids=(10, 11, 12, 13), load_id=0)
    slab.mark_filled([6])  # an old block's row: a failed fetch must empty it
    assert io.fetch(slab, job, FetchJob(load_id=0, first=0, keys=tuple(keys)), report) == 2
    assert set(report.stored) == {4, 5} and report.failed_rows == {6, 7}
    assert 4 in slab and 5 in slab and 6 not in slab and 7 not in slab
    assert read_row(slab, 4) == read_row(slab, 0) and read_row(slab, 5) == read_row(slab, 1)
    assert io.flush()
    assert disk.contains_many([rank_key(k, 0) for k in keys]) == [True, True, False, False]
    assert not path.exists(), "the corrupt entry was deleted"
    stats = io.take_stats()
    assert stats["remote_hits"] == 2 and stats["remote_corrupt"] == 1
    assert stats["disk_writes"] == 2  # the promotions
    io.close()


def test_every_tier_counter_is_a_metric() -> None:
    pytest.importorskip("vllm")
    from dataclasses import fields

    from polykv_vllm.connector.metrics import COUNTERS
    from polykv_vllm.connector.tiers import TIER_NAMES, TierStats

    for tier in TIER_NAMES:
        for f in fields(TierStats):
            assert COUNTERS[f"{tier}_{f.name}"][0] == f"vllm:polykv_{tier}_{f.name}"


def test_tier_gauges_say_entries_and_bytes_held(tmp_path: Path, redis_url: str) -> None:
    import time

    disk, remote = open_tiers(str(tmp_path), 10**6, redis_url, rank=0, world_size=2)
    remote._client.flushdb()  # type: ignore[attr-defined]  # other tests' keys
    assert disk.held() == (0, 0)
    for i in range(3):
        assert disk.put(f"k{i}-r0", blob(1000))
        assert remote.put(f"k{i}-r0", blob(1000))
    assert disk.held() == (3, 3 * len(blob(1000)))
    # The first call starts the query on a thread and returns what was known before it (None);
    # on a fast local server the thread can finish before the call returns (CI saw that once),
    # so either answer is right here: the point is that the value arrives without a wait.
    first = remote.held()
    assert first is None or first[0] == 3
    deadline = time.monotonic() + 10
    while remote.held() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    held = remote.held()
    assert held is not None and held[0] == 3 and held[1] > 3 * len(blob(1000))
    slab = _slab()
    io = TierIO([disk, remote], FP, rank=0, store=slab)
    gauges = io.gauges(world_size=2)
    assert gauges["disk_stored_entries"] == 3
    assert gauges["disk_stored_bytes"] == 2 * 3 * len(blob(1000)), "both ranks' files"
    assert gauges["remote_stored_entries"] == 3
    io.close()
    pytest.importorskip("vllm")
    from polykv_vllm.connector.metrics import GAUGES

    assert {k for k in gauges} <= set(GAUGES), "every tier gauge is a metric"


def test_disk_eviction_skips_pinned_entries(tmp_path: Path) -> None:
    b = blob(1000)
    disk = DiskTier(tmp_path, budget_bytes=3 * len(b))
    for k in ("a", "b", "c"):
        assert disk.put(k, b)
    disk.pin("a", True)  # the oldest: LRU's first victim, but pinned
    assert disk.put("d", b)
    assert disk.contains_many(["a", "b", "c", "d"]) == [True, False, True, True]
    disk.pin("c", True)
    disk.pin("d", True)
    assert disk.put("e", b), "only pinned entries left: the new one goes"
    assert disk.contains_many(["a", "c", "d", "e"]) == [True, True, True, False]
    disk.pin("a", False)
    assert disk.put("f", b)
    assert disk.contains_many(["a", "c", "d", "f"]) == [False, True, True, True]
    assert disk.take_stats().evictions == 3
