"""Multi-agent / RAG workload through the in-process ``LLM`` engine, one configuration per
process, the same request sequence for each (``workload_gen.py``: documents of mixed lengths,
Zipf popularity, agents in waves or a Poisson stream).

Per configuration (``gpu_serve.CONFIGS``: ``bf16``, ``fp8``, ``fp8+offload``, ``tq+offload``,
``polykv-cpu``, ``polykv-cpu-fp8``, ``polykv-gpu-fp8``, ...): start the engine (timed), a
warm-up not counted (``--warmup`` requests on their own documents, then the same documents again
after ``reset_prefix_cache()``, so loads and stores are compiled; then the GPU prefix cache is
emptied once more), then the workload. Memory: ``--kv-gib`` GPU KV cache for every
configuration (``kv_cache_memory_bytes``), ``--cpu-gib`` host memory for native offloading and
the polykv CPU store, ``--store-gib`` for the polykv GPU store (``--equal-gpu-memory`` takes it
out of the KV cache).

How it is measured: the requests go through ``llm.llm_engine`` (``add_request`` / ``step``, as
``LLM.generate`` does, with ``RequestOutputKind.DELTA``), timestamped here with
``time.perf_counter``. TTFT = the step that returned a request's first token minus its arrival
(closed-loop wave: the moment the wave was released; Poisson / open-loop: the scheduled arrival,
so queueing counts). ITL = the gaps between the steps that returned its next tokens. req/s =
finished requests / (last finish - start). vLLM's own ``RequestOutput.metrics.
first_token_latency`` (since the request was added) is kept as ``engine_ttft_p50_ms`` where the
version has it. Prompt tokens per tier are the deltas of vLLM's
``vllm:prompt_tokens_by_source`` counters (``llm.get_metrics()``, ``disable_log_stats=False``)
over the measured run: ``local_cache_hit``, ``external_kv_transfer`` (offloading or polykv),
``local_compute``; for polykv also the worker's own counters and ``vllm:polykv_*``.
``step_timeline``: the number of ``step()`` calls, the seconds inside them, the steps that
returned no token and their seconds, and the wall time outside any step.

Outputs in ``--out``: ``workload.json`` (parameters, request sequence, document bytes), one
``<config>.json`` per configuration as soon as it finished (an ``error`` with the log tail if it
failed), ``<config>.log``. ``plot_workload.py`` draws the PNG and the Markdown table.

Usage (GPU host)::

    python benchmarks/gpu_workload.py --out $OUT/wl --kv-gib 4 --cpu-gib 8 \\
        --configs bf16,fp8,fp8+offload,polykv-cpu,polykv-cpu-fp8,polykv-gpu-fp8

CPU smoke (embedded SmolLM2, tiny): ``python benchmarks/gpu_workload.py --cpu-smoke --out /tmp/wl``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_drive import drive, metric_values, step_summary, tiers  # noqa: E402
from gpu_serve import CONFIGS, GIB, LLAMA3_8B, engine_kwargs  # noqa: E402
from workload_gen import (  # noqa: E402
    Request,
    Workload,
    kv_bytes_per_token,
    make_workload,
    summarize,
    workload_dict,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = "bf16,fp8,fp8+offload,polykv-cpu,polykv-cpu-fp8,polykv-gpu-fp8"
# --cpu-smoke's defaults: embedded SmolLM2 (fp32: 46080 KV bytes per token, so 0.05 GiB holds
# ~1165 tokens, less than the 6 documents), eager, 4 waves of 3 requests.
SMOKE: dict[str, Any] = {
    "dtype": "float32",
    "eager": True,
    "kv_gib": 0.05,
    "cpu_gib": 0.25,
    "store_gib": 0.1,
    "docs": 6,
    "doc_lengths": "256,512",
    "waves": 4,
    "wave_size": 3,
    "query_tokens": 16,
    "out_tokens": 4,
    "warmup": 1,
}


def file_stem(config: str) -> str:
    """A file name for ``config``: ``[A-Za-z0-9_.-]`` only (``fp8+offload`` -> ``fp8_offload``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", config)


def _worker_counters() -> dict[str, float] | None:
    """The in-process polykv worker's totals (VLLM_ENABLE_V1_MULTIPROCESSING=0), or None."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    worker = getattr(get_kv_transfer_group(), "worker", None)
    if worker is None:
        return None
    worker.flush_timers()
    t = worker.totals
    return {
        "loads": len(t.load_seconds),
        "load_s": sum(t.load_seconds),
        "stores": len(t.store_seconds),
        "store_s": sum(t.store_seconds),
        "load_failures": t.load_failures,
        "tokens_decompressed": t.tokens_decompressed,
        "store_stalls": t.store_stalls,
        "stored_bytes": worker.nbytes,
    }


# --------------------------------------------------------------------------------------------
# One configuration (child process)


def build_workload(a: argparse.Namespace, vocab_size: int) -> Workload:
    return make_workload(
        docs=a.docs,
        lengths=a.doc_lengths,
        zipf=a.zipf,
        waves=a.waves,
        wave_size=a.wave_size,
        arrival=a.arrival,
        wave_interval=a.wave_interval,
        rate=a.rate,
        query_tokens=a.query_tokens,
        out_tokens=a.out_tokens,
        seed=a.seed,
        vocab=(min(1000, vocab_size // 4), vocab_size - min(1000, vocab_size // 4)),
    )


def run_config(name: str, a: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    """Start configuration ``name``'s engine, warm up, run the workload; its result dict."""
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    model_cfg = json.loads(Path(model_dir, "config.json").read_text())
    w = build_workload(a, model_cfg["vocab_size"])
    kw = engine_kwargs(
        name,
        kv_gib=a.kv_gib,
        cpu_gib=a.cpu_gib,
        store_gib=a.store_gib,
        preset=a.preset,
        equal_gpu_memory=a.equal_gpu_memory,
    )
    extra = json.loads(a.engine_args)
    t0 = time.perf_counter()
    llm = LLM(
        model_dir,
        load_format=a.load_format,
        skip_tokenizer_init=True,
        max_model_len=max(a.doc_lengths) + a.query_tokens + a.out_tokens + 16,
        enable_prefix_caching=True,
        enforce_eager=a.eager,
        disable_log_stats=False,  # the per-source prompt token counters
        seed=0,
        **({"dtype": a.dtype} if a.dtype else {}),
        **kw,
        **extra,
    )
    start_s = time.perf_counter() - t0
    engine = llm.llm_engine
    params = SamplingParams(
        max_tokens=a.out_tokens,
        temperature=0,
        ignore_eos=True,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )
    prompts = w.prompts()

    def prompt(r: Request) -> dict[str, Any]:
        return {"prompt_token_ids": prompts[r.index]}

    # Warm-up on its own documents: first read (stores), then again with the GPU prefix cache
    # emptied (loads from a CPU tier), then empty it again so the run starts cold on the GPU.
    t0 = time.perf_counter()
    n = a.warmup
    warm = Workload(
        a.seed + 7919,
        (min(a.doc_lengths),) * n,
        (1.0,) * n,
        tuple(Request(i, i, 0, None, False) for i in range(n)),
        a.query_tokens,
        a.out_tokens,
        w.vocab,
    )
    warm_prompts = warm.prompts()
    for round_ in range(2 if n else 0):
        drive(
            engine,
            warm.requests,
            lambda r: {"prompt_token_ids": warm_prompts[r.index]},
            params,
            prefix=f"warm{round_}-",
        )
        llm.reset_prefix_cache()
    warmup_s = time.perf_counter() - t0

    before = metric_values(llm.get_metrics())
    worker_before = _worker_counters()
    steps: list[tuple[float, float, int]] = []
    records, started = drive(engine, w.requests, prompt, params, steps=steps)
    after = metric_values(llm.get_metrics())
    worker_after = _worker_counters()
    deltas = {k: v - before.get(k, 0.0) for k, v in after.items()}

    cache = engine.vllm_config.cache_config
    sched = engine.vllm_config.scheduler_config
    res: dict[str, Any] = {
        "format": "gpu_workload",
        "config": name,
        "vllm_version": vllm.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "engine_kwargs": {k: str(v) for k, v in {**kw, **extra}.items()},
        "resolved": {
            "block_size": cache.block_size,
            "num_gpu_blocks": cache.num_gpu_blocks,
            "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
            "cache_dtype": str(cache.cache_dtype),
            "max_num_seqs": sched.max_num_seqs,
            "max_num_batched_tokens": sched.max_num_batched_tokens,
            "enforce_eager": a.eager,
        },
        "engine_start_s": start_s,
        "warmup_s": warmup_s,
        **(summary := summarize(records, started)),
        "step_timeline": step_summary(steps, summary["wall_s"]),
        **tiers(deltas),
        "metric_deltas": {k: v for k, v in deltas.items() if v},
        "args": {k: v for k, v in vars(a).items() if k != "child"},
    }
    # vLLM's own means over the run (its histograms' sum / count), next to the client's figures
    for key, metric in (("ttft", "time_to_first_token"), ("itl", "inter_token_latency")):
        n = deltas.get(f"vllm:{metric}_seconds:count")
        total = deltas.get(f"vllm:{metric}_seconds:sum")
        res[f"engine_{key}_mean_ms"] = total / n * 1000 if n and total is not None else None
    if worker_after is not None and worker_before is not None:
        res["polykv_worker"] = {k: worker_after[k] - worker_before[k] for k in worker_after}
        res["polykv_worker"]["stored_bytes"] = worker_after["stored_bytes"]
    if torch.cuda.is_available():
        res["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    res["per_request"] = [
        [r.index, r.ttft_s, r.num_cached_tokens, r.tokens_from_store] for r in records
    ]
    return res


# --------------------------------------------------------------------------------------------
# Parent: one process per configuration


def model_folder(a: argparse.Namespace) -> str:
    """``--model-dir``, else a dummy Llama-3-8B ``config.json`` long enough for the documents."""
    if a.model_dir:
        return str(a.model_dir)
    if a.cpu_smoke:
        from polykv_vllm.embedded import embedded_model_dir

        return str(embedded_model_dir())
    need = max(a.doc_lengths) + a.query_tokens + a.out_tokens + 16
    config = dict(LLAMA3_8B, max_position_embeddings=max(8192, -(-need // 1024) * 1024))
    path = tempfile.mkdtemp(prefix="llama3-8b-dummy-")
    Path(path, "config.json").write_text(json.dumps(config))
    return path


def describe(a: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    """workload.json: parameters, request sequence, document sizes vs the memory knobs."""
    cfg = json.loads(Path(model_dir, "config.json").read_text())
    w = build_workload(a, cfg["vocab_size"])
    per_token = {"bf16": kv_bytes_per_token(cfg, 2), "fp8": kv_bytes_per_token(cfg, 1)}
    info = w.describe(per_token)
    info["kv_bytes_per_token"] = per_token
    info["note"] = "document bytes are sizes computed from the model shape, not measurements"
    cpu = a.cpu_gib * GIB
    info["fits_cpu_uncompressed"] = {
        k: v <= cpu for k, v in info["kv_bytes_requested_documents"].items()
    }
    info.update(kv_gib=a.kv_gib, cpu_gib=a.cpu_gib, store_gib=a.store_gib)
    return {"summary": info, "args": vars(a), "workload": workload_dict(w)}


def child_command(name: str, model_dir: str, argv: Sequence[str]) -> list[str]:
    return [sys.executable, __file__, *argv, "--child", name, "--model-dir", model_dir]


def run_all(a: argparse.Namespace, argv: Sequence[str]) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = model_folder(a)
    info = describe(a, model_dir)
    (out / "workload.json").write_text(json.dumps(info, indent=1))
    s = info["summary"]
    print(
        f"workload: {s['requests']} requests ({s['revisits']} revisits) on "
        f"{s['documents_requested']} of {s['documents']} documents; requested documents take "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in s["kv_bytes_requested_documents"].items())
        + f" of KV (size from the model shape); --cpu-gib {a.cpu_gib:g}: fits uncompressed "
        f"{s['fits_cpu_uncompressed']}",
        flush=True,
    )
    failed = 0
    began = time.perf_counter()
    longest = 0.0
    for name in a.configs:
        path = out / f"{file_stem(name)}.json"
        if a.skip_done and path.is_file() and "error" not in json.loads(path.read_text()):
            print(f"[{name}] done before, skipped (--skip-done)", flush=True)
            continue
        elapsed = time.perf_counter() - began
        if a.stop_after and elapsed + longest > a.stop_after:
            print(
                f"[{name}] not started: {elapsed:.0f} s gone and the longest configuration took "
                f"{longest:.0f} s (--stop-after {a.stop_after:g}); run again with --skip-done",
                flush=True,
            )
            return 2
        path.unlink(missing_ok=True)
        log = out / f"{file_stem(name)}.log"
        cmd = child_command(name, model_dir, argv)
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")  # the worker in-process
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])  # polykv_vllm from here
        t = time.perf_counter()
        error = None
        with log.open("w") as f:
            proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=a.config_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                rc = proc.wait()
                error = f"ran past --config-timeout {a.config_timeout:g} s, killed"
        wall = time.perf_counter() - t
        longest = max(longest, wall)
        if error is None and (rc != 0 or not path.is_file()):
            error = f"exit code {rc}, no result"
        if error is not None:
            failed += 1
            tail = log.read_text(errors="replace")[-3000:]
            res = {"format": "gpu_workload", "config": name, "error": f"{error}\n{tail}"}
            print(f"[{name}] FAILED after {wall:.0f} s: {error}; log {log}", flush=True)
        else:
            res = json.loads(path.read_text())
            keys = ("req_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "engine_start_s")
            print(f"[{name}] {wall:.0f} s " + " ".join(f"{k}={res.get(k)}" for k in keys))
        res["child_wall_s"] = wall
        res["command"] = shlex.join(["python", "benchmarks/gpu_workload.py", *argv])
        path.write_text(json.dumps(res, indent=1))
    return 1 if failed else 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the JSON files")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"from {', '.join(CONFIGS)}")
    m = p.add_argument_group("memory")
    m.add_argument("--kv-gib", type=float, default=4.0, help="GPU KV cache of every config")
    m.add_argument("--cpu-gib", type=float, default=8.0, help="offload / polykv CPU store")
    m.add_argument("--store-gib", type=float, default=2.0, help="polykv GPU store")
    m.add_argument("--equal-gpu-memory", action="store_true", help="GPU store out of the KV")
    m.add_argument("--preset", default="polykv")
    w = p.add_argument_group("workload")
    w.add_argument("--docs", type=int, default=48)
    w.add_argument("--doc-lengths", default="2048,4096,8192", help="tokens, cycled over docs")
    w.add_argument("--zipf", type=float, default=1.0, help="popularity exponent (0: uniform)")
    w.add_argument("--arrival", choices=("waves", "poisson"), default="waves")
    w.add_argument("--waves", type=int, default=20, help="requests = waves x wave size")
    w.add_argument("--wave-size", type=int, default=16)
    w.add_argument("--wave-interval", type=float, default=0.0, help="s; 0: closed loop")
    w.add_argument("--rate", type=float, default=16.0, help="req/s of --arrival poisson")
    w.add_argument("--query-tokens", type=int, default=64)
    w.add_argument("--out-tokens", type=int, default=32)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--warmup", type=int, default=4, help="warm-up requests (not counted)")
    e = p.add_argument_group("engine")
    e.add_argument("--model-dir", help="model folder (default: a dummy Llama-3-8B)")
    e.add_argument("--load-format", default="dummy")
    e.add_argument("--dtype", default=None)
    e.add_argument("--eager", action="store_true", help="enforce_eager (faster start)")
    e.add_argument("--engine-args", default="{}", help="JSON dict of extra LLM(...) arguments")
    e.add_argument("--config-timeout", type=float, default=900.0, help="s per configuration")
    e.add_argument("--skip-done", action="store_true", help="keep configs already in --out")
    e.add_argument(
        "--stop-after",
        type=float,
        default=0.0,
        help="s; start no configuration that would likely end after this (0: no limit)",
    )
    p.add_argument("--cpu-smoke", action="store_true", help="tiny run on the embedded SmolLM2")
    p.add_argument("--child", help=argparse.SUPPRESS)
    if "--cpu-smoke" in argv:
        p.set_defaults(**SMOKE)
    a = p.parse_args(argv)
    a.doc_lengths = [int(x) for x in str(a.doc_lengths).split(",") if x]
    a.configs = [c for c in a.configs.split(",") if c]
    for c in a.configs:
        if c.partition(":")[0] not in CONFIGS:
            p.error(f"--configs: unknown {c!r}; choose from {', '.join(CONFIGS)}")
    if not isinstance(json.loads(a.engine_args), dict):
        p.error(
            f"--engine-args {a.engine_args!r} must be a JSON object, "
            "e.g. '{\"max_num_seqs\": 64}'"
        )
    return a


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.child:
        res = run_config(a.child, a, a.model_dir)
        Path(a.out, f"{file_stem(a.child)}.json").write_text(json.dumps(res, indent=1))
        return 0
    return run_all(a, argv)


if __name__ == "__main__":
    sys.exit(main())
