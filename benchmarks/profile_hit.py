"""Where a request's time goes: torch.profiler over prefix-cache hits, revisits and 0%-reuse
requests, one engine per configuration (vLLM 0.26, dummy Llama-3-8B, as
:mod:`benchmarks.gpu_serve`).

Per configuration it prints, and writes to ``--out``: the median TTFT of each phase, then the
profiler's top operators by self CPU time and by self CUDA time over ``--reps`` requests of the
phase, and the time inside polykv's hooks (``record_function`` ranges this script adds around
the connector's methods).

Usage (GPU host)::

    python benchmarks/profile_hit.py --out $OUT/profile --configs bf16,polykv-cpu,polykv-gpu
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_serve import LLAMA3_8B, _doc, _query, engine_kwargs  # noqa: E402

_HOOKS = (
    "get_num_new_matched_tokens",
    "update_state_after_alloc",
    "build_connector_meta",
    "update_connector_output",
    "request_finished",
    "start_load_kv",
    "wait_for_save",
    "get_finished",
    "build_connector_worker_meta",
    "get_kv_connector_stats",
)


def _wrap_hooks() -> None:
    """Name each connector hook in the profile (one ``record_function`` range per call)."""
    import functools

    import torch

    from polykv_vllm.connector.connector import PolyKVConnector

    for name in _HOOKS:
        fn = getattr(PolyKVConnector, name, None)
        if fn is None:
            continue

        def wrapped(*a: Any, _fn: Any = fn, _name: str = name, **k: Any) -> Any:
            with torch.profiler.record_function(f"polykv.{_name}"):
                return _fn(*a, **k)

        setattr(PolyKVConnector, name, functools.wraps(fn)(wrapped))


def run_one(name: str, args: argparse.Namespace, model_dir: str, out: Path) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    _wrap_hooks()
    kw = engine_kwargs(name, kv_gib=args.kv_gib, cpu_gib=args.cpu_gib, store_gib=args.store_gib)
    llm = LLM(
        model_dir,
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=args.doc_tokens + 256,
        enable_prefix_caching=True,
        seed=0,
        **kw,
    )
    one = SamplingParams(max_tokens=1, temperature=0, detokenize=False)

    def ttft(doc: int, query: int) -> float:
        prompt = TokensPrompt(prompt_token_ids=_doc(doc, args.doc_tokens) + _query(query, 64))
        t = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        return (time.perf_counter() - t) * 1000

    ttft(999, 0)  # warm-up: compiles, a store, then a load
    llm.reset_prefix_cache()
    ttft(999, 1)
    phases = {
        # same document, new query: vLLM already holds every document block
        "prefix_hit": lambda i: ttft(0, 100 + i),
        # the document after vLLM's own cache was emptied (polykv: a load)
        "revisit": lambda i: (llm.reset_prefix_cache(), ttft(0, 200 + i))[1],
        # a new document each time (polykv: a store)
        "noreuse": lambda i: ttft(5000 + i, 300 + i),
    }
    ttft(0, 99)
    res: dict[str, Any] = {"config": name}
    for phase, fn in phases.items():
        times = [fn(i) for i in range(args.reps)]
        res[f"{phase}_ms"] = statistics.median(times)
        res[f"{phase}_ms_all"] = [round(t, 2) for t in times]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(args.reps):
                fn(args.reps + i)
            torch.cuda.synchronize()
        ka = prof.key_averages()
        tables = {
            "cpu": ka.table(sort_by="self_cpu_time_total", row_limit=args.rows),
            "cuda": ka.table(sort_by="self_device_time_total", row_limit=args.rows),
        }
        # a record_function range can appear twice (likely its CPU event and its GPU-timeline
        # annotation, CPU time 0; not checked on the GPU): sum them instead of keeping the last
        hooks: dict[str, dict[str, float]] = {}
        for e in ka:
            if e.key.startswith("polykv."):
                h = hooks.setdefault(e.key, {"calls": 0, "cpu_ms": 0.0})
                h["calls"] = max(h["calls"], e.count)
                h["cpu_ms"] += e.cpu_time_total / 1000 / args.reps
        res[f"{phase}_hooks_ms_per_request"] = hooks
        for kind, table in tables.items():
            (out / f"{name}_{phase}_{kind}.txt").write_text(table)
        if args.trace:
            prof.export_chrome_trace(str(out / f"{name}_{phase}.trace.json"))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="directory")
    ap.add_argument("--configs", default="bf16,polykv-cpu,polykv-gpu")
    ap.add_argument("--kv-gib", type=float, default=4.0)
    ap.add_argument("--cpu-gib", type=float, default=6.0)
    ap.add_argument("--store-gib", type=float, default=3.0)
    ap.add_argument("--doc-tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--trace", action="store_true", help="also write chrome traces")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        print("RESULT " + json.dumps(run_one(args.child, args, args.model_dir, out)), flush=True)
        return
    model_dir = tempfile.mkdtemp(prefix="llama3-8b-dummy-")
    Path(model_dir, "config.json").write_text(json.dumps(LLAMA3_8B))
    results = []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--model-dir", model_dir, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            results.append({"config": name, "error": (proc.stdout + proc.stderr)[-3000:]})
        else:
            results.append(json.loads(line[0][7:]))
        print(json.dumps(results[-1])[:3000], flush=True)
        (out / "profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
