"""End-to-end GPU benchmark: vLLM 0.26 with a dummy Llama-3-8B, the polykv plugin vs vLLM's own
baselines, each configuration in its own process on the same GPU, in one run.

Phases per configuration (one engine each):

- ``ttft``: ``--reps`` 4K-token documents + 64-token queries, one request at a time: cold prefill,
  prefix-cache hit (same document, new query); then ``--others`` other documents; then each
  document revisited with a new query after ``reset_prefix_cache()`` emptied vLLM's GPU prefix
  cache (a connector's own tier is kept), and read once more. TTFT is the wall time of a
  1-token generate; medians over the documents. polykv's load and store times come from the
  worker's CUDA-event timers.
- ``throughput``: ``--docs`` documents x ``--agents`` agents, round-robin order, ``--out-tokens``
  output tokens, all submitted at once: requests/s and output tok/s.

- ``noreuse``: ``--noreuse-docs`` distinct documents read once, ``--noreuse-out-tokens`` output
  tokens each, all at once: requests/s, output tok/s and mean inter-token latency.

Configurations (``--configs``): ``bf16`` (prefix caching), ``fp8`` (``kv_cache_dtype=fp8``),
``turboquant`` (``kv_cache_dtype=turboquant_k8v4``, needs FlashAttention-2),
``offload`` (vLLM's native CPU offloading, ``--offload-gib``), ``polykv-gpu`` (store on the GPU,
``--store-gib``; with ``--equal-gpu-memory`` it is taken out of the KV cache), ``polykv-cpu``
(store in pinned host memory, ``--offload-gib`` of it, equal CPU memory with ``offload``);
``polykv-gpu:lite`` / ``polykv-cpu:lite`` use the polykv-lite preset, ``:sync`` / ``:async``
force ``async_load`` off / on (default ``auto``: on for ``polykv-cpu``); ``fp8+offload``,
``tq+offload``, ``polykv-gpu-fp8``, ``polykv-cpu-fp8`` combine an fp8 / turboquant KV cache
with the CPU tier (:data:`CONFIGS`).

``--tensor-parallel-size N`` runs every configuration at TP=N (vLLM's worker processes, one GPU
each; ``--kv-gib`` / ``--store-gib`` stay per GPU as vLLM counts them). NVLink multicast is off in
every process started (``NCCL_NVLS_ENABLE=0``, the GPU hosts' rule). At TP>1 polykv's timers and
store bytes come from every rank through ``LLM.collective_rpc``: timers of rank 0 (every rank
does the same work on its kv heads), bytes per rank in ``rank_store_bytes``.

Usage (GPU host with vLLM 0.26 installed)::

    python benchmarks/gpu_serve.py --out $OUT/gpu_serve.json --configs bf16,fp8,offload,polykv-gpu
    python benchmarks/gpu_serve.py --out $OUT/gpu_serve_tp2.json --tensor-parallel-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
GIB = 2**30


def dummy_model_dir() -> str:
    """A new folder holding only :data:`LLAMA3_8B`'s ``config.json`` (``load_format="dummy"``)."""
    path = tempfile.mkdtemp(prefix="llama3-8b-dummy-")
    Path(path, "config.json").write_text(json.dumps(LLAMA3_8B))
    return path


def _doc(i: int, n: int) -> list[int]:
    """Token ids of document ``i``: distinct per document from the first token on."""
    import random

    rng = random.Random(1000 + i)
    return [rng.randrange(1000, 120000) for _ in range(n)]


def _query(i: int, n: int) -> list[int]:
    import random

    rng = random.Random(500000 + i)
    return [rng.randrange(1000, 120000) for _ in range(n)]


# name -> (kv_cache_dtype or None for the model's, CPU tier: None / "offload" / polykv placement)
CONFIGS: dict[str, tuple[str | None, str | None]] = {
    "bf16": (None, None),
    "fp8": ("fp8", None),
    "turboquant": ("turboquant_k8v4", None),
    "offload": (None, "offload"),
    "fp8+offload": ("fp8", "offload"),
    "tq+offload": ("turboquant_k8v4", "offload"),
    "polykv-gpu": (None, "gpu"),
    "polykv-cpu": (None, "cpu"),
    "polykv-gpu-fp8": ("fp8", "gpu"),
    "polykv-cpu-fp8": ("fp8", "cpu"),
}


def engine_kwargs(
    name: str,
    *,
    kv_gib: float,
    cpu_gib: float,
    store_gib: float,
    preset: str = "polykv",
    equal_gpu_memory: bool = False,
) -> dict[str, Any]:
    """``LLM(...)`` keyword arguments of configuration ``name`` (a key of :data:`CONFIGS`, a
    polykv one optionally with ``:lite`` for the polykv-lite preset, ``:sync`` / ``:async``
    for ``async_load`` off / on, or ``:tinylfu`` / ``:s3fifo`` for that ``eviction``).

    ``kv_gib``: GPU KV cache (``kv_cache_memory_bytes``); ``cpu_gib``: host memory of native
    offloading and of the polykv CPU store; ``store_gib``: the polykv GPU store, taken out of
    the KV cache when ``equal_gpu_memory``.
    """
    base, _, variant = name.partition(":")
    variants = ("lite", "sync", "async", "tinylfu", "s3fifo")
    if base not in CONFIGS or (
        variant and (variant not in variants or not base.startswith("polykv"))
    ):
        raise SystemExit(
            f"unknown config {name!r}: choose from {', '.join(CONFIGS)} "
            "(polykv ones also with ':lite', ':sync', ':async', ':tinylfu' or ':s3fifo')"
        )
    dtype, tier = CONFIGS[base]
    kv = int(kv_gib * GIB)
    kw: dict[str, Any] = {}
    if dtype is not None:
        kw["kv_cache_dtype"] = dtype
    if tier == "offload":
        kw["kv_offloading_size"] = cpu_gib
        kw["kv_offloading_backend"] = "native"
    elif tier in ("gpu", "cpu"):
        from polykv_vllm.connector.config import kv_transfer_config

        store = store_gib if tier == "gpu" else cpu_gib
        if tier == "gpu" and equal_gpu_memory:
            kv -= int(store_gib * GIB)  # the store comes out of the KV cache
        kw["kv_transfer_config"] = kv_transfer_config(
            placement=tier,
            store_bytes=int(store * GIB),
            preset="polykv-lite" if variant == "lite" else preset,
            async_load={"sync": "off", "async": "on"}.get(variant, "auto"),
            eviction=variant if variant in ("tinylfu", "s3fifo") else "lru",
        )
    kw["kv_cache_memory_bytes"] = kv
    return kw


def _engine_kwargs(name: str, args: argparse.Namespace) -> dict[str, Any]:
    return engine_kwargs(
        name,
        kv_gib=args.kv_gib,
        cpu_gib=args.offload_gib,
        store_gib=args.store_gib,
        preset=args.preset,
        equal_gpu_memory=args.equal_gpu_memory,
    )


def _polykv_worker(llm: Any = None, tp: int = 1) -> Any:
    """The in-process polykv worker (VLLM_ENABLE_V1_MULTIPROCESSING=0, TP=1), a
    :class:`RankWorkers` over vLLM's worker processes (TP>1), or None (no polykv)."""
    if tp > 1:
        return RankWorkers.of(llm)
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    return getattr(get_kv_transfer_group(), "worker", None)


def _rank_state(_worker: Any, flush: bool) -> dict[str, Any] | None:
    """In each vLLM worker process (``collective_rpc``): that rank's polykv timers and bytes."""
    from types import SimpleNamespace

    from vllm.distributed import get_tensor_model_parallel_rank
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    w = getattr(get_kv_transfer_group(), "worker", None)
    if w is None:
        return None
    if flush:
        w.flush_timers()
    return vars(
        SimpleNamespace(
            rank=int(get_tensor_model_parallel_rank()),
            load_seconds=list(w.totals.load_seconds),
            store_seconds=list(w.totals.store_seconds),
            nbytes=int(w.nbytes),
            row_bytes=int(w.store.row_bytes),
            block_size=int(w.block_size),
            device=str(w.store.device),
        )
    )


class RankWorkers:
    """The polykv workers of a TP>1 engine, read through ``LLM.collective_rpc``, with the
    attributes :func:`run_one` reads from an in-process worker (rank 0's timers)."""

    def __init__(self, llm: Any, states: list[dict[str, Any]]) -> None:
        self.llm = llm
        self._set(states)

    @classmethod
    def of(cls, llm: Any) -> RankWorkers | None:
        states = llm.collective_rpc(_rank_state, args=(False,))
        return None if any(s is None for s in states) else cls(llm, states)

    def _set(self, states: list[dict[str, Any]]) -> None:
        self.ranks = sorted(states, key=lambda s: s["rank"])
        first = self.ranks[0]
        self.totals = SimpleNamespace(
            load_seconds=first["load_seconds"], store_seconds=first["store_seconds"]
        )
        self.block_size = first["block_size"]
        # one block of every rank's kv heads: the bytes the document takes over all GPUs
        self.store = SimpleNamespace(
            row_bytes=sum(s["row_bytes"] for s in self.ranks), device=first["device"]
        )

    def flush_timers(self) -> None:
        self._set(self.llm.collective_rpc(_rank_state, args=(True,)))

    def rank_bytes(self) -> list[int]:
        return [s["nbytes"] for s in self.ranks]


def run_one(name: str, args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = _engine_kwargs(name, args)
    t0 = time.perf_counter()
    llm = LLM(
        model_dir,
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=args.doc_tokens + args.query_tokens + args.out_tokens + 64,
        enable_prefix_caching=True,
        enforce_eager=args.eager,
        disable_log_stats=False,  # per-request timestamps (ITL)
        seed=0,
        tensor_parallel_size=args.tensor_parallel_size,
        **kw,
    )
    start_s = time.perf_counter() - t0
    one = SamplingParams(max_tokens=1, temperature=0, detokenize=False)

    from_store: dict[int, int] = {}

    def ttft(doc: int, query: int) -> float:
        prompt = TokensPrompt(prompt_token_ids=_doc(doc, args.doc_tokens) + _query(query, 64))
        t = time.perf_counter()
        (out,) = llm.generate([prompt], one, use_tqdm=False)
        ms = (time.perf_counter() - t) * 1000
        params = (out.kv_transfer_params or {}).get("polykv", {})
        from_store[query] = int(params.get("tokens_from_store", 0))
        return ms

    # Warm-up: a first read (stores, for polykv), then the same document after vLLM's prefix
    # cache was emptied (loads, for polykv), so one-time Triton compiles stay out of the figures.
    ttft(999, 0)
    llm.reset_prefix_cache()
    ttft(999, 1)
    res: dict[str, Any] = {"config": name, "engine_kwargs": {k: str(v) for k, v in kw.items()}}
    res["engine_start_s"] = round(start_s, 1)
    res["tensor_parallel_size"] = args.tensor_parallel_size
    # --reps documents: cold read, prefix-cache hit; then (after --others other documents) each
    # revisited once vLLM's own prefix cache no longer holds it (reset_prefix_cache empties the
    # GPU cache only, not a connector's tier), then read again (a prefix-cache hit once more).
    worker = _polykv_worker(llm, args.tensor_parallel_size)
    if worker is not None:
        worker.flush_timers()
        loads_before = len(worker.totals.load_seconds)
        stores_before = len(worker.totals.store_seconds)
    phases: dict[str, list[float]] = {"cold": [], "prefix_hit": [], "revisit": [], "again": []}
    for r in range(args.reps):
        phases["cold"].append(ttft(r, 10 * r + 1))
        phases["prefix_hit"].append(ttft(r, 10 * r + 2))
    for d in range(args.others):
        ttft(100 + d, 100 + d)
    tokens_loaded = []
    for r in range(args.reps):
        llm.reset_prefix_cache()
        phases["revisit"].append(ttft(r, 10 * r + 3))
        tokens_loaded.append(from_store.get(10 * r + 3, 0))
        phases["again"].append(ttft(r, 10 * r + 4))
    for key, values in phases.items():
        res[f"ttft_{key}_ms"] = statistics.median(values)
        res[f"ttft_{key}_ms_all"] = [round(v, 2) for v in values]
    res["ttft_revisit2_ms"] = res["ttft_again_ms"]
    res["revisit_tokens_from_store"] = tokens_loaded
    if worker is not None:
        # the worker's own timers (GPU stream time, CUDA events)
        worker.flush_timers()
        t = worker.totals
        loads = t.load_seconds[loads_before:]
        stores = [x for x in t.store_seconds[stores_before:] if x > 0]
        res["revisit_load_ms"] = statistics.median(loads) * 1000 if loads else None
        res["store_ms_median"] = statistics.median(stores) * 1000 if stores else None
        res["store_ms_all"] = [round(x * 1000, 2) for x in stores]
        res["load_ms_all"] = [round(x * 1000, 2) for x in loads]
    sp = SamplingParams(max_tokens=args.out_tokens, temperature=0, ignore_eos=True)
    base = 2000
    prompts = [
        TokensPrompt(
            prompt_token_ids=_doc(base + d, args.doc_tokens) + _query(base + 97 * d + a, 64)
        )
        for a in range(args.agents)
        for d in range(args.docs)
    ]
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    # Second pass over the same documents with new queries: the reuse that the tiers are for.
    prompts2 = [
        TokensPrompt(
            prompt_token_ids=_doc(base + d, args.doc_tokens) + _query(base + 7 * d + a + 31, 64)
        )
        for a in range(args.agents)
        for d in range(args.docs)
    ]
    t = time.perf_counter()
    outs2 = llm.generate(prompts2, sp, use_tqdm=False)
    wall2 = time.perf_counter() - t
    res.update(
        throughput_pass1_req_s=len(prompts) / wall,
        throughput_pass1_out_tok_s=n_out / wall,
        throughput_pass2_req_s=len(prompts2) / wall2,
        throughput_pass2_out_tok_s=sum(len(o.outputs[0].token_ids) for o in outs2) / wall2,
        requests=len(prompts),
    )
    # 0% reuse: distinct documents, each read once, longer answers (throughput and ITL)
    sp_long = SamplingParams(max_tokens=args.noreuse_out_tokens, temperature=0, ignore_eos=True)
    fresh = [
        TokensPrompt(prompt_token_ids=_doc(50000 + d, args.doc_tokens) + _query(d, 64))
        for d in range(args.noreuse_docs)
    ]
    t = time.perf_counter()
    outs3 = llm.generate(fresh, sp_long, use_tqdm=False)
    wall3 = time.perf_counter() - t
    itl = []
    for o in outs3:
        m = getattr(o, "metrics", None)
        n = len(o.outputs[0].token_ids)
        if m is not None and n > 1 and getattr(m, "last_token_ts", 0) > 0:
            itl.append((m.last_token_ts - m.first_token_ts) / (n - 1) * 1000)
    res.update(
        noreuse_req_s=len(fresh) / wall3,
        noreuse_out_tok_s=sum(len(o.outputs[0].token_ids) for o in outs3) / wall3,
        noreuse_mean_itl_ms=sum(itl) / len(itl) if itl else None,
    )
    # bytes held per document: vLLM's KV cache (GPU) from its own block count, the tier's
    cache = llm.llm_engine.vllm_config.cache_config
    tokens = (cache.num_gpu_blocks or 0) * cache.block_size
    kv_bytes = int(kw["kv_cache_memory_bytes"])
    res["kv_cache_tokens"] = tokens
    res["kv_bytes_per_doc"] = kv_bytes / tokens * args.doc_tokens if tokens else None
    if worker is not None:
        res["store_bytes_per_doc"] = worker.store.row_bytes / worker.block_size * args.doc_tokens
        res["store_device"] = str(worker.store.device)
        if isinstance(worker, RankWorkers):
            worker.flush_timers()
            res["rank_store_bytes"] = worker.rank_bytes()
    import torch

    res["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="bf16,fp8,offload,polykv-gpu,polykv-cpu")
    ap.add_argument("--kv-gib", type=float, default=4.0)
    ap.add_argument("--store-gib", type=float, default=3.0)
    ap.add_argument(
        "--equal-gpu-memory",
        action="store_true",
        help="take polykv-gpu's store out of its KV cache (throughput at equal GPU memory)",
    )
    ap.add_argument("--offload-gib", type=float, default=6.0)
    ap.add_argument("--preset", default="polykv")
    ap.add_argument("--doc-tokens", type=int, default=4096)
    ap.add_argument("--query-tokens", type=int, default=64)
    ap.add_argument("--out-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5, help="documents in the TTFT phase (median)")
    ap.add_argument("--others", type=int, default=0, help="other documents before the revisits")
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--noreuse-docs", type=int, default=32)
    ap.add_argument("--noreuse-out-tokens", type=int, default=128)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (faster start)")
    ap.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="GPUs per engine (tensor parallelism; NCCL_NVLS_ENABLE=0 in every process)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off here, in children, in workers

    if args.child:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker's timers in-process
        res = run_one(args.child, args, args.model_dir)
        print("RESULT " + json.dumps(res), flush=True)
        return

    model_dir = dummy_model_dir()
    results = []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--model-dir", model_dir, *sys.argv[1:]]
        t = time.perf_counter()
        env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            tail = (proc.stdout + proc.stderr)[-3000:]
            results.append({"config": name, "error": tail})
            print(f"[{name}] FAILED after {time.perf_counter() - t:.0f}s\n{tail}", flush=True)
        else:
            results.append(json.loads(line[0][7:]))
            print(f"[{name}] {results[-1]}", flush=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    import torch

    summary = {"device": torch.cuda.get_device_name(), "args": vars(args), "results": results}
    Path(args.out).write_text(json.dumps(summary, indent=1))
    keys = [
        "ttft_cold_ms",
        "ttft_prefix_hit_ms",
        "ttft_revisit_ms",
        "revisit_load_ms",
        "throughput_pass1_req_s",
        "throughput_pass2_req_s",
        "noreuse_req_s",
        "noreuse_mean_itl_ms",
    ]
    print("config".ljust(16) + "".join(k[:14].rjust(15) for k in keys))
    for r in results:
        cells = [r.get(k) for k in keys]
        print(
            r["config"].ljust(16)
            + "".join(f"{c:15.2f}" if isinstance(c, float | int) else f"{'-':>15}" for c in cells)
        )


if __name__ == "__main__":
    main()
