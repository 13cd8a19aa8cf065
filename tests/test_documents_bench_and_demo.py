"""Unit tests of ``benchmarks/documents_by_reference.py`` and of the demo
(``polykv_vllm.apps.documents_demo``), no model server: every mode's request, the prefix-cache
reset before each agent of ``by_reference_after_reset`` (against a tiny HTTP server that refuses
once), the summary's rates, the GPU server's command line (parsed by vLLM's own ``serve``
parser) and its dummy model with the committed tokenizer; the demo registering 4 documents and
sending only references.

The real runs are the benchmark's CPU command in its docstring and the H200 one in the README.
"""

from __future__ import annotations

import argparse
import http.server
import importlib.util
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from test_gpu_bench_serve import serve_parser  # noqa: F401 (a fixture)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(
        "documents_by_reference", BENCHMARKS / "documents_by_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load()
TEXT = "The document. " * 20


def test_each_mode_sends_what_its_client_would() -> None:
    requests = {m: bench.request_for(m, TEXT, 1, "m") for m in bench.MODES}
    route, body = requests["by_reference"]
    assert route == "/v1/chat/completions" and TEXT not in json.dumps(body)
    assert body["kv_transfer_params"] == {"polykv": {"doc_id": "doc", "by_reference": True}}
    assert requests["by_reference_after_reset"] == requests["by_reference"]
    assert requests["resend_same"][1]["messages"][0] == {"role": "user", "content": TEXT}
    assert requests["resend_system"][1]["messages"][0]["role"] == "system"
    for mode in ("resend_same", "resend_system", "resend_header", "resend_template"):
        assert (
            TEXT in json.dumps(requests[mode][1]) and "kv_transfer_params" not in requests[mode][1]
        )
    route, body = requests["resend_template"]
    assert route == "/v1/completions" and body["model"] == "m"
    # every client template renders the document differently; agent i and i + 4 share one
    n = len(bench.CLIENT_TEMPLATES)
    prompts = [bench.request_for("resend_template", TEXT, a, "m")[1]["prompt"] for a in range(n)]
    assert len({p[:40] for p in prompts}) == n and all(TEXT in p for p in prompts)
    later = bench.request_for("resend_template", TEXT, n, "m")[1]["prompt"]
    assert later[: later.index(TEXT)] == prompts[0][: prompts[0].index(TEXT)]


def test_the_reset_mode_resets_before_every_agent_and_only_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[str] = []
    monkeypatch.setattr(bench, "document_texts", lambda url, n, tokens, model: [TEXT])
    monkeypatch.setattr(bench.client, "register", lambda url, doc_id, messages: {"tokens": 9})
    monkeypatch.setattr(bench, "reset_prefix_cache", lambda url: events.append("reset") or 1)

    def post(url: str, route: str, body: dict[str, Any]) -> tuple[dict[str, Any], int, float]:
        ref = "kv_transfer_params" in body
        events.append("ref" if ref else "resend")
        usage = {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 8 if ref else 0}}
        receipt = {"tokens_from_store": 8 if events[-2:-1] == ["reset"] else 0}
        return {"usage": usage, "kv_transfer_params": {"polykv": receipt}}, 100, 0.5

    monkeypatch.setattr(bench, "post", post)
    args = bench.parse_args(["--agents", "2", "--modes", "by_reference,by_reference_after_reset"])
    out = bench.run("http://x", args, "m")
    assert events == ["ref", "ref", "reset", "ref", "reset", "ref"]
    s = out["summary"]
    assert s["by_reference"]["tokens_from_store"] == 0
    assert s["by_reference_after_reset"]["tokens_from_store"] == 16
    assert s["by_reference_after_reset"]["store_hit_rate"] == 0.8
    assert s["by_reference_after_reset"]["hit_rate"] == 0.8
    assert [r.get("reset_attempts") for r in out["rows"]] == [None, None, 1, 1]


@pytest.fixture()
def reset_server() -> Iterator[tuple[str, list[int]]]:
    """Answers ``POST /reset_prefix_cache`` with ``success: false`` once, then true; 404 on
    any other path (as vLLM without ``VLLM_SERVER_DEV_MODE``)."""
    calls: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            if self.path != "/reset_prefix_cache":
                self.send_error(404)
                return
            calls.append(1)
            body = json.dumps({"success": len(calls) > 1}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", calls
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_reset_retries_a_refusal_and_names_dev_mode_on_404(
    reset_server: tuple[str, list[int]],
) -> None:
    url, calls = reset_server
    assert bench.reset_prefix_cache(url) == 2 and len(calls) == 2
    with pytest.raises(RuntimeError, match="VLLM_SERVER_DEV_MODE=1"):
        bench.reset_prefix_cache(url + "/nowhere")


def test_gpu_server_command_parses_with_vllm(
    serve_parser: argparse.ArgumentParser,  # noqa: F811
    tmp_path: Path,
) -> None:
    args = bench.parse_args(
        ["--gpu-llama3-8b", "--doc-tokens", "4096", "--kv-gib", "4", "--cpu-gib", "8", "--eager"]
    )
    model = bench.write_dummy_model(tmp_path / "m", args.tokenizer_dir, "tokenizer")
    config = json.loads((model / "config.json").read_text())
    assert config["vocab_size"] == 49152 and config["num_hidden_layers"] == 32
    cmd = bench.gpu_server_command(args, model, 8125)
    assert cmd[1:4] == ["-m", "polykv_vllm.cli", "serve"]
    ns = serve_parser.parse_args(cmd[4:])
    assert ns.model_tag == str(model) and ns.load_format == "dummy" and ns.port == 8125
    assert ns.max_model_len == 4096 + 1024 and ns.enforce_eager
    assert ns.enable_prefix_caching and ns.enable_prompt_tokens_details
    assert ns.kv_cache_memory_bytes == 4 * 2**30
    assert ns.chat_template == str(model / "chat_template.jinja")
    assert "<|im_start|>" in (model / "chat_template.jinja").read_text()
    extra = ns.kv_transfer_config.kv_connector_extra_config
    assert extra["placement"] == "cpu" and int(extra["store_bytes"]) == 8 * 2**30


def test_arguments_are_checked() -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "by_reference,nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--gpu-llama3-8b", "--url", "http://x"])


def test_the_demo_registers_four_documents_and_sends_only_references(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from polykv_vllm.apps import documents_demo as demo

    texts = [f"Document number {d}. " * 8 for d in range(4)]
    monkeypatch.setattr(demo, "document_texts", lambda url, n, tokens: texts[:n])
    registered: list[tuple[str, Any]] = []

    def register(url: str, doc_id: str, messages: Any) -> dict[str, Any]:
        registered.append((doc_id, messages))
        return {"tokens": 50, "stored_blocks": 1, "total_blocks": 1, "stored_bytes": 10}

    monkeypatch.setattr(demo.client, "register", register)
    sent: list[dict[str, Any]] = []

    def post(url: str, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], int, float]:
        sent.append(body)
        receipt = {"by_reference": True, "tokens_from_store": 0}
        answer = {
            "choices": [{"message": {"content": "ok"}}],
            "kv_transfer_params": {"polykv": receipt},
        }
        return answer, len(json.dumps(body)), 0.1

    monkeypatch.setattr(demo, "post", post)
    rows = demo.run("http://x", agents=2, doc_tokens=64)
    assert registered == [(f"doc-{d}", [{"role": "user", "content": texts[d]}]) for d in range(4)]
    assert len(rows) == len(sent) == 8 and all(r["by_reference"] for r in rows)
    assert all(t not in json.dumps(b) for b in sent for t in texts)
    refs = [b["kv_transfer_params"]["polykv"] for b in sent]
    assert {r["doc_id"] for r in refs} == {f"doc-{d}" for d in range(4)}
    assert all(r["by_reference"] is True for r in refs)
