"""``python -m polykv_vllm.demo`` (``make demo``): polykv in a real vLLM server, on CPU, measured.

What it does, end to end, with nothing but this machine:

1. Starts vLLM's OpenAI-compatible server as a subprocess with the embedded SmolLM2-135M model
   (``polykv_vllm.embedded``) and the polykv connector switched on, exactly as a user would:
   ``polykv-vllm serve MODEL --kv-cache-plugin polykv`` (run as ``python -m polykv_vllm.cli``).
   vLLM's own KV cache is kept small, ``--kv-cache-docs`` documents' worth, so not every
   document fits in it.
2. Runs a multi-agent workload through the ``openai`` client: ``--documents`` documents of real
   text (Python's ``pydoc_data.topics``, ``--doc-tokens`` tokens each, cut with the server's
   tokenizer), ``--agents`` agents per document, each asking its own question, interleaved
   (agent 0 on every document, then agent 1, ...), one request at a time, greedy, streamed.
   After every request ``/metrics`` is read, so each request's prompt tokens are attributed to
   vLLM's prefix cache, the polykv store (``external_kv_transfer``) or recompute.
3. Does the same with the plugin off (plain vLLM, same KV cache size) and prints one table:
   memory (compressed store bytes against the same tokens in the engine's KV dtype, both read
   from ``vllm:polykv_*`` metrics; vLLM's KV cache size from ``vllm:cache_config_info``), TTFT of
   first reads, of revisits served from the store and of the same revisits recomputed,
   throughput, and whether the answers equal the plugin-off answers.

``--only baseline`` runs plain vLLM alone (works without the connector). Timings are whatever this
machine gives; on a shared 2-core box they vary from run to run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["DemoConfig", "RequestRecord", "main", "server_command"]

QUESTIONS = (
    "Summarize the document above in one sentence.",
    "List three technical terms defined in the document above.",
    "What is the main topic of the document above? Answer in a few words.",
    "Give one example of Python code related to the document above.",
    "Which Python keyword is discussed first in the document above?",
    "Name one common mistake the document above warns about.",
    "Explain the document above to a beginner in two sentences.",
    "What question would a student ask after reading the document above?",
)
DOC_HEADER = "Read the following Python documentation.\n\n"
EXTERNAL = "vllm:prompt_tokens_by_source[source=external_kv_transfer]"
LOCAL_HIT = "vllm:prompt_tokens_by_source[source=local_cache_hit]"
COMPUTED = "vllm:prompt_tokens_by_source[source=local_compute]"


class DemoError(RuntimeError):
    """The demo could not run (server did not start, plugin missing, bad option)."""


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings (command-line options, validated in :func:`parse_args`)."""

    documents: int = 4
    agents: int = 3
    doc_tokens: int = 1500
    max_tokens: int = 16
    port: int = 8765
    kv_cache_docs: float = 2.5
    store_bytes: str = "256MiB"
    preset: str = "polykv"
    only: str = "both"
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 300.0
    json_out: str | None = None
    model: str | None = None


@dataclass
class RequestRecord:
    """One request of a run: which document/agent, what it measured, where its prompt came from.

    ``ttft_s`` is client-side (request sent → first streamed token); the ``tokens_*`` fields are
    deltas of ``vllm:prompt_tokens_by_source`` around this request alone (runs are sequential).
    """

    index: int
    doc: int
    agent: int
    revisit: bool
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_from_store: float = 0.0
    tokens_from_vllm_cache: float = 0.0
    tokens_computed: float = 0.0
    text: str = ""


@dataclass
class RunResult:
    """Everything one server run measured."""

    plugin: bool
    records: list[RequestRecord] = field(default_factory=list)
    startup_s: float = 0.0
    wall_s: float = 0.0
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    kv_cache_tokens: int | None = None
    kv_cache_bytes: int | None = None
    command: list[str] = field(default_factory=list)


def say(msg: str, out: TextIO = sys.stdout) -> None:
    """A progress line for the user (this module is a program, not library code)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=out, flush=True)


# ------------------------------------------------------------------------------------------
# Server


def plugin_problem() -> str | None:
    """Why the polykv connector cannot be used here, or None when it can."""
    try:
        config = importlib.import_module("polykv_vllm.connector.config")
        module = importlib.import_module(config.CONNECTOR_MODULE)
        getattr(module, config.CONNECTOR_CLASS)
        importlib.import_module("polykv_vllm.connector.plugin")
    except (ImportError, AttributeError) as exc:
        return (
            f"the polykv vLLM connector is not available ({type(exc).__name__}: {exc}). "
            "Install vLLM (`make env`) or run plain vLLM only with `--only baseline`."
        )
    return None


def plugin_flags(cfg: DemoConfig) -> list[str]:
    """The vLLM command-line flags that switch the polykv connector on (validated here first)."""
    from polykv_vllm.connector.config import PolyKVConfig

    PolyKVConfig.from_extra_config({"preset": cfg.preset, "store_bytes": cfg.store_bytes})
    return [
        "--kv-cache-plugin",
        "polykv",
        "--polykv-preset",
        cfg.preset,
        "--polykv-store-bytes",
        cfg.store_bytes,
    ]


def kv_bytes_per_token(model_dir: Path) -> int:
    """fp32 KV bytes per token of a HF model folder, used only to size vLLM's KV cache."""
    conf = json.loads((model_dir / "config.json").read_text())
    head_dim = conf.get("head_dim") or conf["hidden_size"] // conf["num_attention_heads"]
    return int(conf["num_hidden_layers"] * conf["num_key_value_heads"] * head_dim * 2 * 4)


def max_model_len(cfg: DemoConfig) -> int:
    """Context length: a document plus room for the question and answer, in 128-token blocks."""
    need = cfg.doc_tokens + 256 + cfg.max_tokens
    return -(-need // 128) * 128


def server_command(cfg: DemoConfig, model_dir: Path, plugin: bool) -> list[str]:
    """The command line of the vLLM server for one run."""
    per_token = kv_bytes_per_token(model_dir)
    tokens = max(int(cfg.kv_cache_docs * cfg.doc_tokens), max_model_len(cfg))
    # Whole 128-token blocks plus one: vLLM keeps a little of the budget back, and a cache
    # smaller than --max-model-len refuses to start.
    tokens = (-(-tokens // 128) + 1) * 128
    cmd = [
        sys.executable,
        "-m",
        "polykv_vllm.cli",
        "serve",
        str(model_dir),
        "--served-model-name",
        "smollm2",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(tokens * per_token),
        "--max-model-len",
        str(max_model_len(cfg)),
        "--port",
        str(cfg.port),
        "--host",
        "127.0.0.1",
        "--disable-uvicorn-access-log",
    ]
    if plugin:
        cmd += plugin_flags(cfg)
    return cmd


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    if "VLLM_CPU_OMP_THREADS_BIND" not in env:
        cpus = sorted(os.sched_getaffinity(0))
        if cpus == list(range(cpus[0], cpus[-1] + 1)):
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"{cpus[0]}-{cpus[-1]}"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The Makefile exports VLLM_ENABLE_V1_MULTIPROCESSING=0 for in-process LLM() scripts. For the
    # OpenAI server it puts the engine in the API-server process and made everything slower here
    # (2 cores, polykv, 650-token prompts: first-read TTFT 14.4 s vs 6.9 s, store revisit 4.6 s vs
    # 0.51 s, store loads 838 ms vs 368 ms), so the server always gets its own engine processes.
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    return env


def _http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def _http_post(url: str, body: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return dict(json.loads(resp.read().decode()))


@contextlib.contextmanager
def running_server(cfg: DemoConfig, cmd: list[str], label: str) -> Iterator[float]:
    """Start the server, wait for ``/health``, yield the start-up seconds, always stop it."""
    root = f"http://127.0.0.1:{cfg.port}"
    if _http_get(f"{root}/health", timeout=2)[0] != 0:
        raise DemoError(
            f"port {cfg.port} is already in use; pick a free one with --port (e.g. --port 8799)"
        )
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in finally)
        "w+", prefix=f"polykv-demo-{label}-", suffix=".log", delete=False
    )
    say(f"starting vLLM ({label}); server log: {log.name}")
    say("  $ " + " ".join(shlex.quote(c) for c in [Path(cmd[0]).name, *cmd[1:]]))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=_server_env(), start_new_session=True
    )
    try:
        while True:
            if proc.poll() is not None:
                log.flush()
                tail = Path(log.name).read_text().splitlines()[-25:]
                raise DemoError(
                    f"vLLM ({label}) exited with code {proc.returncode} while starting; "
                    "last lines of its log:\n" + "\n".join(tail)
                )
            if _http_get(f"{root}/health", timeout=2)[0] == 200:
                break
            if time.perf_counter() - t0 > cfg.startup_timeout_s:
                raise DemoError(
                    f"vLLM ({label}) did not answer /health within {cfg.startup_timeout_s:.0f} s "
                    f"(--startup-timeout); see {log.name}"
                )
            time.sleep(1.0)
        startup = time.perf_counter() - t0
        say(f"vLLM ({label}) ready in {startup:.1f} s")
        yield startup
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen[Any]) -> None:
    """Stop the server and its engine processes (its own process group)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------
# Metrics

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")
_SOURCE_RE = re.compile(r'source="([^"]*)"')


def read_metrics(root: str) -> dict[str, float]:
    """``/metrics`` summed by name (``_total`` stripped), plus ``name[source=...]`` splits."""
    status, text = _http_get(f"{root}/metrics")
    if status != 200:
        return {}
    totals: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE_RE.match(line)
        if m is None or line.startswith("#") or m.group(1).endswith("_created"):
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        name = m.group(1).removesuffix("_total")
        totals[name] = totals.get(name, 0.0) + value
        src = _SOURCE_RE.search(m.group(2) or "")
        if src:
            key = f"{name}[source={src.group(1)}]"
            totals[key] = totals.get(key, 0.0) + value
    return totals


def kv_cache_size(root: str) -> tuple[int | None, int | None]:
    """vLLM's KV cache (tokens, bytes) as the server reports it in ``vllm:cache_config_info``."""
    _status, text = _http_get(f"{root}/metrics")
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            tokens = re.search(r'kv_cache_size_tokens="(\d+)"', line)
            nbytes = re.search(r'kv_cache_memory_bytes="(\d+)"', line)
            return (
                int(tokens.group(1)) if tokens else None,
                int(nbytes.group(1)) if nbytes else None,
            )
    return None, None


# ------------------------------------------------------------------------------------------
# Workload


def load_documents(root: str, model: str, documents: int, tokens: int) -> list[str]:
    """``documents`` disjoint windows of ``tokens`` tokens of ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    ids = _http_post(f"{root}/tokenize", {"model": model, "prompt": text[: documents * tokens * 8]})
    ids_list: list[int] = ids["tokens"]
    if len(ids_list) < documents * tokens:
        raise DemoError(
            f"--documents {documents} x --doc-tokens {tokens} needs more text than the corpus "
            f"slice gives ({len(ids_list)} tokens); lower one of them"
        )
    return [
        str(
            _http_post(
                f"{root}/detokenize",
                {"model": model, "tokens": ids_list[i * tokens : (i + 1) * tokens]},
            )["prompt"]
        )
        for i in range(documents)
    ]


def schedule(documents: int, agents: int) -> list[tuple[int, int, bool]]:
    """Interleaved ``(doc, agent, revisit)``: agent 0 on every document, then agent 1, ..."""
    return [(d, a, a > 0) for a in range(agents) for d in range(documents)]


def run_workload(
    cfg: DemoConfig, root: str, docs: Sequence[str], plugin: bool, result: RunResult
) -> None:
    """Send the requests one at a time through the ``openai`` client, streaming; fill ``result``."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{root}/v1", api_key="none", timeout=cfg.request_timeout_s)
    plan = schedule(cfg.documents, cfg.agents)
    result.metrics_before = read_metrics(root)
    before = result.metrics_before
    t0 = time.perf_counter()
    for i, (d, a, revisit) in enumerate(plan):
        rec = RequestRecord(index=i, doc=d, agent=a, revisit=revisit)
        extra: dict[str, Any] = {}
        if plugin:
            extra["kv_transfer_params"] = {"polykv": {"doc_id": f"demo-doc-{d}"}}
        prompt = f"{DOC_HEADER}{docs[d]}\n\nQuestion: {QUESTIONS[a % len(QUESTIONS)]}"
        start = time.perf_counter()
        stream = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=cfg.max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra or None,
        )
        pieces: list[str] = []
        for chunk in stream:
            if chunk.usage is not None:
                rec.prompt_tokens = chunk.usage.prompt_tokens
                rec.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    if not pieces:
                        rec.ttft_s = time.perf_counter() - start
                    pieces.append(choice.delta.content)
        rec.e2e_s = time.perf_counter() - start
        rec.text = "".join(pieces)
        after = read_metrics(root)
        rec.tokens_from_store = after.get(EXTERNAL, 0.0) - before.get(EXTERNAL, 0.0)
        rec.tokens_from_vllm_cache = after.get(LOCAL_HIT, 0.0) - before.get(LOCAL_HIT, 0.0)
        rec.tokens_computed = after.get(COMPUTED, 0.0) - before.get(COMPUTED, 0.0)
        before = after
        result.records.append(rec)
        say(
            f"  {i + 1:>2}/{len(plan)} doc {d} agent {a} {'revisit' if revisit else 'first  '}"
            f" TTFT {rec.ttft_s * 1e3:7.0f} ms  prompt {rec.prompt_tokens} tok = "
            f"{rec.tokens_from_store:.0f} store + {rec.tokens_from_vllm_cache:.0f} vLLM cache + "
            f"{rec.tokens_computed:.0f} computed"
        )
    result.wall_s = time.perf_counter() - t0
    time.sleep(1.0)  # connector gauges are published with the engine's next stats
    result.metrics_after = read_metrics(root)


def run_once(cfg: DemoConfig, model_dir: Path, plugin: bool, docs: list[str]) -> RunResult:
    """One server start, the workload, one server stop. Loads ``docs`` if it is empty."""
    label = "polykv on" if plugin else "plugin off"
    cmd = server_command(cfg, model_dir, plugin)
    result = RunResult(plugin=plugin, command=cmd)
    root = f"http://127.0.0.1:{cfg.port}"
    with running_server(cfg, cmd, label) as startup:
        result.startup_s = startup
        result.kv_cache_tokens, result.kv_cache_bytes = kv_cache_size(root)
        if not docs:
            docs.extend(load_documents(root, "smollm2", cfg.documents, cfg.doc_tokens))
            say(f"{len(docs)} documents of {cfg.doc_tokens} tokens from pydoc_data.topics")
        n = cfg.documents * cfg.agents
        say(f"running {n} requests ({cfg.documents} documents x {cfg.agents} agents) [{label}]")
        run_workload(cfg, root, docs, plugin, result)
    return result


# ------------------------------------------------------------------------------------------
# Report


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f} MB"


def summarize(run: RunResult) -> dict[str, Any]:
    """Per-run figures used by the table (medians over requests)."""
    recs = run.records
    out_tokens = sum(r.completion_tokens for r in recs)
    store_revisits = [r for r in recs if r.revisit and r.tokens_from_store > 0]
    delta = {
        k: run.metrics_after.get(k, 0.0) - run.metrics_before.get(k, 0.0)
        for k in (EXTERNAL, LOCAL_HIT, COMPUTED, "vllm:polykv_load_seconds_sum")
    }
    return {
        "ttft_first_s": _median([r.ttft_s for r in recs if not r.revisit]),
        "ttft_revisit_s": _median([r.ttft_s for r in recs if r.revisit]),
        "ttft_revisit_from_store_s": _median([r.ttft_s for r in store_revisits]),
        "revisits_from_store": len(store_revisits),
        "revisits": sum(r.revisit for r in recs),
        "output_tok_per_s": out_tokens / run.wall_s if run.wall_s else float("nan"),
        "requests_per_s": len(recs) / run.wall_s if run.wall_s else float("nan"),
        "wall_s": run.wall_s,
        "startup_s": run.startup_s,
        "store_bytes": run.metrics_after.get("vllm:polykv_stored_bytes"),
        "store_engine_dtype_bytes": run.metrics_after.get("vllm:polykv_stored_bf16_bytes"),
        "stored_documents": run.metrics_after.get("vllm:polykv_stored_documents"),
        "tokens_stored": run.metrics_after.get("vllm:polykv_tokens_stored"),
        "kv_cache_tokens": run.kv_cache_tokens,
        "kv_cache_bytes": run.kv_cache_bytes,
        "prompt_tokens_delta": delta,
    }


def render_table(cfg: DemoConfig, on: RunResult | None, off: RunResult | None) -> str:
    """The final table, for the terminal."""
    s_on = summarize(on) if on else None
    s_off = summarize(off) if off else None
    rows: list[tuple[str, str, str]] = []

    def ms(x: float | None) -> str:
        return "-" if x is None or x != x else f"{x * 1e3:.0f} ms"

    def both(key: str, fmt: Any) -> tuple[str, str]:
        return (fmt(s_on[key]) if s_on else "-", fmt(s_off[key]) if s_off else "-")

    kv = s_on or s_off
    assert kv is not None
    rows.append(
        (
            "vLLM KV cache (cache_config_info)",
            *both("kv_cache_tokens", lambda t: f"{t} tokens" if t else "n/a"),
        )
    )
    rows.append(("  its bytes", *both("kv_cache_bytes", _mb)))
    if s_on:
        docs_stored = s_on["stored_documents"]
        rows.append(
            (
                "polykv store (vllm:polykv_stored_bytes)",
                f"{_mb(s_on['store_bytes'])}"
                + (f", {docs_stored:.0f} docs" if docs_stored is not None else ""),
                "-",
            )
        )
        engine = s_on["store_engine_dtype_bytes"]
        rows.append(("  same tokens in engine dtype fp32", _mb(engine), "-"))
        rows.append(
            (
                "  same tokens in bf16 (fp32 bytes / 2)",
                _mb(engine / 2 if engine is not None else None),
                "-",
            )
        )
        load_s = s_on["prompt_tokens_delta"]["vllm:polykv_load_seconds_sum"]
        rows.append(("  time spent loading from the store", f"{load_s * 1e3:.0f} ms in all", "-"))
        if s_on["store_bytes"] and engine:
            ratio = engine / s_on["store_bytes"]
            rows.append(
                ("  compression vs fp32 / vs bf16", f"{ratio:.2f}x / {ratio / 2:.2f}x", "-")
            )
    rows.append(("TTFT first read (median)", *both("ttft_first_s", ms)))
    rows.append(("TTFT revisit (median)", *both("ttft_revisit_s", ms)))
    if s_on:
        n_store = f"{s_on['revisits_from_store']}/{s_on['revisits']} revisits"
        rows.append(
            (
                "  revisits served from the store",
                f"{ms(s_on['ttft_revisit_from_store_s'])} ({n_store})",
                "-",
            )
        )
    if s_on and s_off and s_on["ttft_revisit_s"] > 0:
        speedup = s_off["ttft_revisit_s"] / s_on["ttft_revisit_s"]
        rows.append(("  revisit speed-up vs recompute", f"{speedup:.1f}x", "1.0x"))
    for key, name in ((EXTERNAL, "store"), (LOCAL_HIT, "vLLM cache"), (COMPUTED, "computed")):
        rows.append(
            (
                f"prompt tokens from {name}",
                *both("prompt_tokens_delta", lambda d, k=key: f"{d[k]:.0f}"),
            )
        )
    rows.append(
        ("output tokens/s (1 request at a time)", *both("output_tok_per_s", "{:.1f}".format))
    )
    rows.append(("requests/s", *both("requests_per_s", "{:.2f}".format)))
    rows.append(("workload wall time", *both("wall_s", "{:.1f} s".format)))
    rows.append(("server start-up", *both("startup_s", "{:.1f} s".format)))
    if on and off:
        same = [a.text == b.text for a, b in zip(on.records, off.records, strict=True)]
        differ = [f"#{r.index + 1}" for r, s in zip(on.records, same, strict=True) if not s]
        rows.append(
            (
                "answers equal to plugin off (greedy)",
                f"{sum(same)}/{len(same)}" + (f" (differ: {' '.join(differ)})" if differ else ""),
                "-",
            )
        )
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(len(r[1]) for r in rows + [("", "polykv on", "")]) + 2
    head = f"{'':<{w0}}{'polykv on':<{w1}}plugin off"
    lines = [head, "-" * (len(head) + 12)]
    lines += [f"{a:<{w0}}{b:<{w1}}{c}" for a, b, c in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: Sequence[str] | None) -> DemoConfig:
    """Command line -> :class:`DemoConfig`."""
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="python -m polykv_vllm.demo",
        description="polykv in a real vLLM server on CPU: multi-agent documents, plugin on vs off.",
    )
    p.add_argument("--documents", type=int, default=d.documents, help="documents (default 4)")
    p.add_argument("--agents", type=int, default=d.agents, help="agents per document (default 3)")
    p.add_argument("--doc-tokens", type=int, default=d.doc_tokens, help="tokens per document")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="answer tokens")
    p.add_argument("--port", type=int, default=d.port, help="server port on 127.0.0.1")
    p.add_argument(
        "--kv-cache-docs",
        type=float,
        default=d.kv_cache_docs,
        help="vLLM's own KV cache, in documents (default 2.5: not all documents fit)",
    )
    p.add_argument("--store-bytes", default=d.store_bytes, help="polykv store budget, e.g. 256MiB")
    p.add_argument("--preset", default=d.preset, help="codec preset (polykv_vllm.core.PRESETS)")
    p.add_argument(
        "--only",
        choices=("both", "plugin", "baseline"),
        default=d.only,
        help="run polykv and plain vLLM (default), or one of them",
    )
    p.add_argument("--startup-timeout", type=float, default=d.startup_timeout_s)
    p.add_argument("--json-out", default=None, help="also write every measurement to this JSON")
    a = p.parse_args(argv)
    for name in ("documents", "agents", "doc_tokens", "max_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)} must be >= 1")
    if a.agents > len(QUESTIONS):
        p.error(f"--agents {a.agents}: at most {len(QUESTIONS)} (one distinct question each)")
    if a.kv_cache_docs <= 0:
        p.error(f"--kv-cache-docs {a.kv_cache_docs} must be > 0")
    if not 1024 <= a.port <= 65535:
        p.error(f"--port {a.port} must be in 1024..65535")
    return DemoConfig(
        documents=a.documents,
        agents=a.agents,
        doc_tokens=a.doc_tokens,
        max_tokens=a.max_tokens,
        port=a.port,
        kv_cache_docs=a.kv_cache_docs,
        store_bytes=a.store_bytes,
        preset=a.preset,
        only=a.only,
        startup_timeout_s=a.startup_timeout,
        json_out=a.json_out,
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.only != "baseline":
        problem = plugin_problem()
        if problem:
            say(f"error: {problem}", out=sys.stderr)
            return 2
        try:
            plugin_flags(cfg)  # validates --preset / --store-bytes before any server starts
        except ValueError as exc:
            say(f"error: {exc}", out=sys.stderr)
            return 2
    from polykv_vllm.embedded import embedded_model_dir

    t0 = time.perf_counter()
    model_dir = embedded_model_dir()
    say(f"model: {model_dir}")
    docs: list[str] = []
    on = off = None
    try:
        if cfg.only in ("both", "plugin"):
            on = run_once(cfg, model_dir, True, docs)
        if cfg.only in ("both", "baseline"):
            off = run_once(cfg, model_dir, False, docs)
    except DemoError as exc:
        say(f"error: {exc}", out=sys.stderr)
        return 1
    print()
    print(render_table(cfg, on, off))
    print()
    for run in (on, off):
        if run and run.records:
            r = run.records[-1]
            label = "polykv on" if run.plugin else "plugin off"
            say(f"last answer ({label}, doc {r.doc}, agent {r.agent}): {r.text!r}")
    say(f"done in {time.perf_counter() - t0:.0f} s")
    if cfg.json_out:
        payload = {
            "config": asdict(cfg),
            "command": " ".join(
                shlex.quote(x)
                for x in ["python", "-m", "polykv_vllm.demo"]
                + list(argv if argv is not None else sys.argv[1:])
            ),
            "runs": [
                {"summary": summarize(run), **asdict(run)} for run in (on, off) if run is not None
            ],
        }
        Path(cfg.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_out).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        say(f"wrote {cfg.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
