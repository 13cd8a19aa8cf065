"""``benchmarks/tier_load.py`` (issue 12's uncompressed baseline): the bf16 and polykv payloads
round-trip through the real tiers into the paged cache (bf16 exactly, polykv equal to the
codec's decode), the page cache is evicted before every disk load, and the eviction helper
really calls ``posix_fadvise``. Tiny random geometry; the CUDA case (Triton decode, H2D) is
skipped without a GPU (run on a GPU host: ``python -m pytest -q tests/test_tier_load.py``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import redis_helpers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import tier_load as tl  # noqa: E402

from polykv_vllm.connector.tiers import Tier, chain_keys, fingerprint  # noqa: E402
from polykv_vllm.connector.tiers.disk import DiskTier  # noqa: E402
from polykv_vllm.core import KVCodec  # noqa: E402

GEOM = tl.Geometry(layers=2, kv_heads=2, head_dim=32, block_size=4)
TOKENS = 32
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


def _setup(device: str) -> tuple[KVCodec, tl.KV, dict[str, Any], dict[str, Any], dict[str, Any]]:
    codec = KVCodec("polykv", num_layers=GEOM.layers, head_dim=GEOM.head_dim)
    kv = tl.random_kv(GEOM, TOKENS, seed=3)
    doc = list(range(100, 100 + TOKENS))
    fps = {f: fingerprint(preset=f, block_size=GEOM.block_size) for f in tl.FORMATS}
    keys = {f: chain_keys(fps[f], None, doc, GEOM.block_size) for f in tl.FORMATS}
    payloads = {
        "polykv": tl.polykv_payloads(codec, kv, GEOM)[0],
        "bf16": tl.bf16_payloads(kv, GEOM),
    }
    blocks = TOKENS // GEOM.block_size
    loaders = {f: tl.Loader(f, codec, GEOM, blocks, torch.device(device)) for f in tl.FORMATS}
    return codec, kv, fps, keys, {"payloads": payloads, "loaders": loaders}


def _check_loaded(codec: KVCodec, kv: tl.KV, loaders: dict[str, tl.Loader]) -> None:
    bf16 = loaders["bf16"].gathered()
    poly = loaders["polykv"].gathered()
    for i, (k, v) in enumerate(kv):
        assert torch.equal(bf16[i][0].cpu(), k) and torch.equal(bf16[i][1].cpu(), v)
        dk, dv = codec.decode(codec.encode(k.float(), v.float(), i), torch.bfloat16, layer=i)
        if loaders["polykv"].device.type == "cpu":  # the torch reference: bit for bit
            assert torch.equal(poly[i][0], dk) and torch.equal(poly[i][1], dv)
        else:  # the Triton kernel: within bf16 rounding of the reference
            torch.testing.assert_close(poly[i][0].cpu(), dk, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(poly[i][1].cpu(), dv, atol=2e-2, rtol=2e-2)
        assert not torch.equal(poly[i][0].cpu(), k)  # really compressed, not a copy


@pytest.mark.parametrize("device", DEVICES)
def test_disk_round_trip_and_eviction(tmp_path: Path, device: str) -> None:
    codec, kv, fps, keys, s = _setup(device)
    tier = DiskTier(tmp_path, 2**30)
    for f in tl.FORMATS:
        tl.store(tier, fps[f], keys[f], s["payloads"][f])
    # the payload sizes are the formats' own: polykv the slab row, bf16 the raw block
    assert (
        len(s["payloads"]["bf16"][0]) == GEOM.layers * GEOM.block_size * GEOM.kv_heads * 2 * 32 * 2
    )
    assert len(s["payloads"]["polykv"][0]) == s["loaders"]["polykv"].payload_bytes
    assert len(s["payloads"]["polykv"][0]) < len(s["payloads"]["bf16"][0]) / 2
    calls: list[list[Path]] = []

    def evict(paths: Sequence[Path]) -> dict[str, Any]:
        calls.append(list(paths))
        return tl.evict_page_cache(paths)

    for loader in s["loaders"].values():  # loads fill the caches: start from zeros
        for c in loader.caches:
            c.zero_()
    out = tl.measure({"disk": tier}, s["loaders"], fps, keys, repeats=2, evict=evict)
    assert len(calls) == 2 * len(tl.FORMATS)  # before every timed disk load
    assert all(len(c) == 2 * (TOKENS // GEOM.block_size) for c in calls)  # every file
    assert out["disk"]["bf16"]["bytes_read"] > 2 * out["disk"]["polykv"]["bytes_read"]
    assert out["disk"]["page_cache_evicted"]["fadvise_files"] == len(calls[0])
    _check_loaded(codec, kv, s["loaders"])


def test_corrupt_block_is_refused(tmp_path: Path) -> None:
    codec, kv, fps, keys, s = _setup("cpu")
    tier = DiskTier(tmp_path, 2**30)
    tl.store(tier, fps["bf16"], keys["bf16"], s["payloads"]["bf16"])
    path = tier.path_of(f"{keys['bf16'][2].hex()}-r0")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="checksum"):
        s["loaders"]["bf16"].load(tier, fps["bf16"], keys["bf16"])


def test_evict_page_cache_calls_fadvise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [tmp_path / f"f{i}" for i in range(3)]
    for f in files:
        f.write_bytes(b"x" * 8192)
    seen: list[tuple[int, int, int, int]] = []
    real = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        seen.append((fd, offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    out = tl.evict_page_cache(files)
    assert out["fadvise_files"] == 3
    assert [s[1:] for s in seen] == [(0, 0, os.POSIX_FADV_DONTNEED)] * 3


def test_redis_round_trip() -> None:
    redis_helpers.require_redis()
    from polykv_vllm.connector.tiers.redis import RedisTier

    codec, kv, fps, keys, s = _setup("cpu")
    with redis_helpers.redis_server() as url:
        tier: Tier = RedisTier(url)
        for f in tl.FORMATS:
            tl.store(tier, fps[f], keys[f], s["payloads"][f])
        out = tl.measure({"redis": tier}, s["loaders"], fps, keys, repeats=1)
        tier.close()
    assert out["redis"]["page_cache_evicted"] is None
    _check_loaded(codec, kv, s["loaders"])
